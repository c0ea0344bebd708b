"""The servers the tests run (see `server.testing.processes`)."""

from server.testing.processes import free_port, running_server, server_process, wait_ready

__all__ = ["free_port", "running_server", "server_process", "wait_ready"]
