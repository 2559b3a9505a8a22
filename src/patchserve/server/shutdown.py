"""Graceful shutdown on SIGTERM / SIGINT.

uvicorn stops accepting connections at the first signal and waits for the
requests in flight. ``GracefulServer`` adds a deadline for the work behind
them: ``grace_s`` seconds after the signal it sets ``ServerState.stopping``,
which every worker's cancel scope checks (``patchserve.cancel``), so a long
sweep or generation stops within a transformer block and its request is
answered 503; nothing waits on a thread that would run for minutes. Runs are
saved atomically (``server/runfiles.py``), so no save is left half done. A
second signal exits at once, and once shut down the process re-raises the
signal (both uvicorn's own behaviour), so a supervisor sees why it ended.
"""

from __future__ import annotations

import logging
import math
import threading
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from patchserve.server.state import ServerState

log = logging.getLogger("patchserve.server")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.warning(
                "signal %d: accepting no new connections; work still running in %.0f s is "
                "stopped (%d model batches queued or running)",
                sig,
                self.grace_s,
                self.state.gate.waiting,
            )
            timer = threading.Timer(self.grace_s, self.state.stopping.set)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def serve(
    state: ServerState, app: ASGIApp, host: str, port: int, log_level: str, grace_s: float
) -> None:
    """Run ``app`` until a signal, then shut down within about ``grace_s`` seconds."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(grace_s) + 5,  # a backstop: work stops at grace_s
    )
    GracefulServer(config, state, grace_s).run()
