"""Who a request comes from: `Authorization: Bearer <token>`.

A user's token (the one `users add` and `users token` show, as the WebSocket takes it) makes
the request that user's: `Caller(user=name)`, who sees and touches only their own jobs. An
operator token (`jobwarden tokens add --operator NAME`) makes it the operator's: `OPERATOR`,
who may do everything the admin socket can. No token, or one that is unknown, replaced,
revoked or whose user is disabled, is 401; a user on an operator's route is 403.
"""

from __future__ import annotations

from functools import partial

from starlette.requests import Request

from jobwarden.errors import RequestError
from jobwarden.process.commands import OPERATOR, Caller
from jobwarden.store import tokens, users
from jobwarden.store.engine import Store


async def caller_of(request: Request, store: Store) -> Caller:
    """The caller the request's Bearer token names; UNAUTHENTICATED (401) if none."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else ""
    if not token:
        raise RequestError("UNAUTHENTICATED", "no token: send `Authorization: Bearer <token>`")
    if token.startswith(tokens.OPERATOR_TOKEN_PREFIX):
        if await store.read(partial(tokens.authenticate, token=token)) is not None:
            return OPERATOR
    else:
        user = await store.read(partial(users.authenticate, token=token))
        if user is not None:
            return Caller(user=user.name)
    raise RequestError(
        "UNAUTHENTICATED",
        "the token is not valid: unknown, replaced, revoked, or its user is disabled",
    )


async def operator_of(request: Request, store: Store) -> Caller:
    """The operator, if the request's token is an operator token; else 401 or 403."""
    caller = await caller_of(request, store)
    if caller.user is not None:
        raise RequestError("FORBIDDEN", "this needs an operator token")
    return caller
