"""Clients for applications and scripts that talk to a running daemon.

`AdminClient` is the operator's, over the local admin socket; `connect` opens a user's
WebSocket session on trio. The client imports only the wire and the base modules, so an
application that uses it does not load the daemon.
"""

from jobwarden.client.admin import AdminClient
from jobwarden.client.websocket import Accepted, Watch, WebSocketClient, connect
from jobwarden.errors import AdminError, DaemonError, DaemonUnreachable
from jobwarden.wire.views import BatchItem, BatchResult, BulkOutcome, ItemResult, JobFilter

__all__ = [
    "Accepted",
    "AdminClient",
    "AdminError",
    "BatchItem",
    "BatchResult",
    "BulkOutcome",
    "DaemonError",
    "DaemonUnreachable",
    "ItemResult",
    "JobFilter",
    "Watch",
    "WebSocketClient",
    "connect",
]
