"""The /v1 JSON API."""

from __future__ import annotations

from starlette.routing import BaseRoute

from jobwarden.process.http.app import Context


def routes(context: Context) -> list[BaseRoute]:
    return []
