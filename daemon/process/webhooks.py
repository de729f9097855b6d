"""Webhooks: the outbound door. When a job with a `webhook` URL reaches a final status, its
application is told with a signed POST of the job's view.

The store writes a delivery row in the transaction of the final status (store/webhooks.py), so
delivery is durable: at least once, each with a delivery id the receiver can deduplicate on.
This sender takes due deliveries on a lease, POSTs them a few at a time, and records each
answer: a 2xx ends the delivery; anything else (an error status, a timeout, a refused
connection) tries again after the configured backoff, until max_attempts, then gives up and
says so in the log and in `jobwarden webhooks`.

Signature (the Standard Webhooks scheme, https://www.standardwebhooks.com): headers
`Webhook-Id`, `Webhook-Timestamp` (Unix seconds) and `Webhook-Signature: v1,<base64 of
HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>`. A receiver recomputes it with the shared
secret and refuses a stale timestamp, which stops replays.

It wakes when a final status is committed (the event hub) or when the next retry is due, on
trio's clock; it never polls. Redirects are not followed: the URL's host is the one the config
allowed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from typing import Any

import httpx
import msgspec
import structlog
import trio

from jobwarden.clock import WallClock
from jobwarden.config import WebhooksSection
from jobwarden.errors import StoreError
from jobwarden.hub import EventHub
from jobwarden.store import jobs, webhooks
from jobwarden.store.engine import Engine
from jobwarden.store.webhooks import Delivery
from jobwarden.wire.views import TERMINAL_STATUSES, JobView

log = structlog.get_logger("webhooks")

# How much of a refusing receiver's answer the delivery keeps (for `jobwarden webhooks`).
ANSWER_CHARS = 200
# A lease outlives the send's timeout by this much, so a slow but successful send is never
# taken again by another sender while it runs.
LEASE_MARGIN = 30.0


class Notice(msgspec.Struct):
    """What a receiver gets: `type` job.done, job.failed or job.canceled, and the job."""

    type: str
    timestamp: float
    delivery: int
    data: JobView


_encoder = msgspec.json.Encoder()


def signature(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, delivery_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "jobwarden-webhooks",
        "Webhook-Id": delivery_id,
        "Webhook-Timestamp": str(timestamp),
        "Webhook-Signature": signature(secret, delivery_id, timestamp, body),
    }


def retry_at(settings: WebhooksSection, attempts: int, now: float) -> float | None:
    """When a delivery that failed its `attempts`-th try goes again (None: it gives up)."""
    if attempts >= settings.max_attempts:
        return None
    backoff = settings.backoff
    return now + backoff[min(attempts, len(backoff)) - 1]


def delivery_id(delivery: Delivery) -> str:
    return f"delivery-{delivery.id}"


class WebhookSender:
    def __init__(
        self,
        *,
        settings: WebhooksSection,
        store: Engine,
        hub: EventHub,
        clock: WallClock,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._hub = hub
        self._clock = clock
        self._transport = transport
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with (
            httpx.AsyncClient(
                timeout=self._settings.timeout,
                follow_redirects=False,
                transport=self._transport,
            ) as http,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._follow_final_statuses)
            task_status.started()
            while True:
                self._wake = trio.Event()
                taken = await self._take_due()
                if taken:
                    async with trio.open_nursery() as sends:
                        for delivery in taken:
                            sends.start_soon(self._send, http, delivery)
                    # More may be due already: take them before sleeping.
                    continue
                due = await self._store.read(webhooks.next_due)
                with trio.move_on_at(math.inf if due is None else self._clock.deadline_for(due)):
                    await self._wake.wait()

    async def _follow_final_statuses(self) -> None:
        while True:
            with self._hub.subscribe(buffer=1024) as subscription:
                async for event in subscription.events:
                    if event.type == "status" and event.data.get("status") in TERMINAL_STATUSES:
                        self._wake.set()
            # Cut off for falling behind: whatever it missed is in the store, so look there.
            self._wake.set()

    async def _take_due(self) -> list[Delivery]:
        now = self._clock.now()
        try:
            return await self._store.write(
                lambda conn, events: webhooks.take_due(
                    conn,
                    events,
                    now=now,
                    lease=self._settings.timeout + LEASE_MARGIN,
                    limit=self._settings.max_in_flight,
                )
            )
        except StoreError as exc:
            # The deliveries wait in the store; the store's own probe says when it is back.
            log.warning("webhooks wait for the store", error=str(exc))
            await self._store.health.wait_change(self._store.health.version)
            return []

    async def _send(self, http: httpx.AsyncClient, delivery: Delivery) -> None:
        job = await self._store.read(lambda conn: jobs.get_job(conn, delivery.job_id))
        if job is None:
            return
        now = self._clock.now()
        body = _encoder.encode(
            Notice(type=f"job.{delivery.status}", timestamp=now, delivery=delivery.id, data=job)
        )
        headers = signed_headers(self._settings.secret, delivery_id(delivery), int(now), body)
        answer = await _post(http, delivery.url, body, headers)
        delivered = answer.startswith("HTTP 2")
        after = self._clock.now()
        next_try = None if delivered else retry_at(self._settings, delivery.attempts, after)
        try:
            await self._store.write(
                lambda conn, events: webhooks.settle(
                    conn,
                    events,
                    delivery_id=delivery.id,
                    attempts=delivery.attempts,
                    now=after,
                    delivered=delivered,
                    answer=answer,
                    retry_at=next_try,
                )
            )
        except StoreError as exc:
            # Its lease runs out and it is sent again: at least once.
            log.warning("webhook outcome not stored", delivery=delivery.id, error=str(exc))
            return
        # Logged once stored, so the log never tells of an outcome a crash then lost.
        if delivered:
            log.info("webhook delivered", job=delivery.job_id, delivery=delivery.id)
        elif next_try is None:
            log.error(
                "webhook given up",
                job=delivery.job_id,
                delivery=delivery.id,
                attempts=delivery.attempts,
                answer=answer,
            )
        else:
            log.warning(
                "webhook failed",
                job=delivery.job_id,
                delivery=delivery.id,
                attempt=delivery.attempts,
                answer=answer,
                retry_in=round(next_try - after, 3),
            )


async def _post(http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, Any]) -> str:
    """The receiver's answer, in a few words: "HTTP 204", "timed out", "ConnectError: …"."""
    try:
        response = await http.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        return "timed out"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:ANSWER_CHARS]
    return f"HTTP {response.status_code}"
