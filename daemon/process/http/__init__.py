"""The HTTP listener: an ASGI app (Starlette) on Hypercorn's trio worker.

- `server.py` — `HttpServer`: binds, serves the app in the daemon's nursery, closes it.
- `app.py` — builds the app from route groups, and what every route gets: the error shape
  with real statuses and headers, timing, the request and body limits.
- `auth.py` — who a request's Bearer token names: a user, or an operator.
- `probes.py` — /healthz, /readyz, /health, /metrics.
- `api.py` — the /v1 JSON API for applications and operators.
- `dashboard.py` — the dashboard: the page in ui/ and what it reads besides /v1.
"""

from jobwarden.process.http.server import HttpServer, open_listeners, parse_listen

__all__ = ["HttpServer", "open_listeners", "parse_listen"]
