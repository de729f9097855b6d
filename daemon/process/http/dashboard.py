"""The dashboard: a page for a person in a browser, served by the daemon, no internet needed.

/          redirects to /ui/
/ui/       the page (ui/index.html); the person logs in there with a user or operator token
/ui/static/{file}   its scripts and stylesheet (ui/), plain files, no build step
/ui/api/session     who the token names: {"name", "operator"}
/ui/api/jobs/{id}/cost   what the job's calls have cost so far: {"usd"}
/ui/api/overview    (operator) the health snapshot with the kinds, jobs by status and kind,
                    the jobs finished in each five minutes of the last hour, and the alerts

Everything else the page reads is the /v1 API, with the same Bearer token: the page keeps it
in the tab's sessionStorage and sends it in the Authorization header, never in a cookie, so
another site cannot make the browser act with it (no CSRF). The page and its files are sent
with a Content-Security-Policy that lets only the daemon's own scripts run and connect, which
keeps an injected script from reading the token.

The files are read once, when the module loads (they are small), and served from memory with
an ETag: a browser revalidates them, so an upgraded daemon's page is never mixed with old
scripts from the cache.
"""

from __future__ import annotations

import hashlib
import mimetypes
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute

from jobwarden.errors import RequestError
from jobwarden.process.http.app import Context, json_response, route
from jobwarden.process.http.auth import caller_of, operator_of

# Scripts, styles and connections from the daemon only; inline SVG is built by script, and
# the page has no inline script or style to allow.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class StaticFile:
    """One file of the page, as it is sent."""

    def __init__(self, name: str, body: bytes) -> None:
        self.body = body
        suffix = name[name.rfind(".") :]
        guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.content_type = CONTENT_TYPES.get(suffix, guessed)
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'

    def response(self, request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "ETag": self.etag}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, 200, headers, media_type=self.content_type)


def load_files() -> dict[str, StaticFile]:
    """Every file under ui/, by its path there ("app.js", "pages/jobs.js")."""
    files: dict[str, StaticFile] = {}

    def walk(folder: resources.abc.Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.startswith("."):
                files[prefix + entry.name] = StaticFile(entry.name, entry.read_bytes())

    walk(resources.files(__package__) / "ui", "")
    return files


FILES = load_files()


def routes(context: Context) -> list[BaseRoute]:
    async def to_the_page(request: Request) -> Response:
        return RedirectResponse("/ui/", status_code=307)

    async def page(request: Request) -> Response:
        return FILES["index.html"].response(request)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        found = FILES.get(name)
        if found is None:
            raise RequestError("NOT_FOUND", f"no such file: /ui/static/{name}")
        return found.response(request)

    async def session(request: Request) -> Response:
        caller = await caller_of(request, context.store)
        operator = caller.user is None
        return json_response(
            {"name": "operator" if operator else caller.user, "operator": operator}
        )

    async def job_cost(request: Request) -> Response:
        caller = await caller_of(request, context.store)
        job_id = request.path_params["id"]
        return json_response({"usd": await context.commands.job_cost(caller, job_id)})

    async def overview(request: Request) -> Response:
        await operator_of(request, context.store)
        return json_response(await context.commands.overview())

    return [
        route("/", GET=to_the_page),
        route("/ui", GET=to_the_page),
        route("/ui/", GET=page),
        route("/ui/static/{name:path}", GET=static),
        route("/ui/api/session", GET=session),
        route("/ui/api/overview", GET=overview),
        route("/ui/api/jobs/{id:int}/cost", GET=job_cost),
    ]
