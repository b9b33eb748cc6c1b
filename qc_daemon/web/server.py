"""uvicorn on a thread of its own, on a socket bound before the thread starts.

Binding first turns a busy port into an ``OSError`` in the caller, as the DICOM listener's does (uvicorn binding
its own would end the thread with ``sys.exit(1)``). Off the main thread uvicorn installs no signal handlers: the
daemon's SIGTERM handling calls :meth:`WebServer.stop`, which sets ``should_exit``.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from qc_daemon.settings import HttpSettings

STARTUP_TIMEOUT_S = 10.0
GRACEFUL_SHUTDOWN_S = 2.0  # open event streams end on the daemon's stop event well within this


class WebServerError(RuntimeError):
    """The web server did not come up (its port is taken, or uvicorn stopped during start-up)."""


class WebServer:
    def __init__(self, app: ASGIApp, settings: HttpSettings):
        self.settings = settings
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,  # our logging setup stays in charge
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                ssl_certfile=str(Path(settings.tls_cert_file).expanduser()) if settings.tls else None,
                ssl_keyfile=str(Path(settings.tls_key_file).expanduser()) if settings.tls else None,
            )
        )
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.settings.tls else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        where = f"{self.settings.host}:{self.settings.port}"
        try:
            self._socket = socket.create_server((self.settings.host, self.settings.port), family=family)
        except OSError as exc:
            raise WebServerError(
                f"cannot listen on {where} for the web view: {exc.strerror} (set [http] host/port)"
            ) from exc
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name="qc-web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise WebServerError(f"the web server on {where} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACEFUL_SHUTDOWN_S + 5)
        if self._socket is not None:
            self._socket.close()
