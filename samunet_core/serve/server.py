"""Run the app with uvicorn: in the foreground (`samunet serve`) or in a background thread on a given socket (tests,
notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from samunet_core.errors import InputError
from samunet_core.serve.protocol import is_loopback


def check_host(host: str, insecure_no_auth: bool) -> None:
    """--insecure-no-auth only where nobody else can connect."""
    if insecure_no_auth and not is_loopback(host):
        raise InputError(f"--insecure-no-auth is refused on {host}: anyone on the network could use the server; "
                         "give --token-file, or bind to 127.0.0.1")


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port unless given) in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        self.scheme = "https" if ssl_certfile else "http"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        state = getattr(self.app.state, "samunet", None)
        if state is not None:
            state.worker.stop()
        self.sock.close()
