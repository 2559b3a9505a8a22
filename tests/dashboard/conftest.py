"""The dashboard runs against the bundled demo model's server (``tests/server``'s fixture)."""

from server.conftest import Server, demo_server, start_server

__all__ = ["Server", "demo_server", "start_server"]
