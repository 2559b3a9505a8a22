"""The command line's help layout: defaults shown once, descriptions kept as written."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (when it has one the help does not already
    name) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is argparse.SUPPRESS or "default" in text or not text:
            return text
        if isinstance(default, bool):
            return text
        return f"{text} (default: {default})"
