"""Clients for applications and scripts that talk to a running daemon.

`Client` and `AsyncClient` are an application's, over the HTTP API (sync, and async under
asyncio or trio); `AdminClient` is the operator's, over the local admin socket; `connect`
opens a user's WebSocket session on trio. The clients import only the wire and the base
modules, so an application that uses them does not load the daemon.
"""

from jobwarden.client.admin import AdminClient
from jobwarden.client.http import (
    AsyncClient,
    AsyncJob,
    Client,
    Job,
    JobCanceled,
    JobFailed,
    Outcome,
    Refused,
)
from jobwarden.client.websocket import Accepted, Watch, WebSocketClient, connect
from jobwarden.errors import AdminError, DaemonError, DaemonUnreachable
from jobwarden.wire.views import BatchResult, BulkOutcome, ItemResult, JobFilter, Submission

__all__ = [
    "Accepted",
    "AdminClient",
    "AdminError",
    "AsyncClient",
    "AsyncJob",
    "BatchResult",
    "BulkOutcome",
    "Client",
    "DaemonError",
    "DaemonUnreachable",
    "ItemResult",
    "Job",
    "JobCanceled",
    "JobFailed",
    "JobFilter",
    "Outcome",
    "Refused",
    "Submission",
    "Watch",
    "WebSocketClient",
    "connect",
]
