"""The web view: live list, series, trends, ``/health`` and ``/metrics``, served inside the daemon.

Read-only and GET only. It reads the store and the daemon's :class:`~qc_daemon.status.DaemonStatus`, never the
listener, assembler or scorer. :func:`create_app` builds the ASGI app; :class:`WebServer` runs it with uvicorn on
a thread of its own, so a slow browser never delays reception or scoring.
"""

from qc_daemon.web.app import WebView, create_app
from qc_daemon.web.server import WebServer, WebServerError

__all__ = ["WebServer", "WebServerError", "WebView", "create_app"]
