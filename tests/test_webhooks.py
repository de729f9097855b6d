"""Webhooks: a job's application is told of its final status by a signed POST that survives a
crash of the daemon, and only hosts the config allows are ever called."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from jobwarden.actors.admission import check_webhook
from jobwarden.config import WebhooksSection, load_config_text
from jobwarden.errors import AdminError, ConfigError, RequestError
from jobwarden.process.webhooks import retry_at
from tests.process import DaemonFactory, DaemonProcess, daemon_factory, free_port

SECRET = "a-test-secret-of-some-length"


def verify(headers: Any, body: bytes) -> bool:
    """What a receiver does, written from docs/webhooks.md (Standard Webhooks)."""
    signed = f"{headers['Webhook-Id']}.{headers['Webhook-Timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(SECRET.encode(), signed, hashlib.sha256).digest())
    return any(
        hmac.compare_digest(f"v1,{expected.decode()}", given)
        for given in headers["Webhook-Signature"].split()
    )


class Receiver:
    """A local HTTP server that answers each POST with the next of `answers` (then 204)."""

    def __init__(self, answers: list[int], port: int = 0) -> None:
        self.answers = list(answers)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._arrived:
                    receiver.received.append((dict(self.headers), body))
                    status = receiver.answers.pop(0) if receiver.answers else 204
                    receiver._arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.received)} of {count} webhook POSTs arrived"
                self._arrived.wait(left)
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([])
    yield server
    server.close()


WEBHOOK_CONFIG: dict[str, Any] = {
    "webhooks": {
        "allowed_hosts": ["127.0.0.1"],
        "secret": SECRET,
        "backoff": ["1s"],
        "timeout": "5s",
    },
    "kinds": {
        "quick": {"handler": "tests.handlers:sleepy"},
        "broken": {"handler": "tests.handlers:crashing", "max_attempts": 1},
    },
}


# -- the guard and the policy, as plain functions ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed", "complaint"),
    [
        ("http://hooks.example.com/x", [], "webhooks are off"),
        ("ftp://hooks.example.com/x", ["hooks.example.com"], "http:// or https://"),
        ("not a url", ["hooks.example.com"], "http:// or https://"),
        ("http://other.example.com/x", ["hooks.example.com"], "'other.example.com' is not"),
        ("http://hooks.example.com:99999/", ["hooks.example.com"], "http:// or https://"),
        ("http://me:pw@hooks.example.com/", ["hooks.example.com"], "without user or password"),
        ("http://hooks.example.com:8443/", ["hooks.example.com:9000"], "is not in"),
    ],
)
def test_a_webhook_url_outside_the_allowed_hosts_is_refused_naming_the_field(
    url: str, allowed: list[str], complaint: str
) -> None:
    with pytest.raises(RequestError) as refused:
        check_webhook(url, allowed)
    assert refused.value.body.code == "INVALID_REQUEST"
    assert refused.value.body.message.startswith("webhook: ")
    assert complaint in refused.value.body.message


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/jobs?x=1", ["hooks.example.com"]),
        ("http://hooks.example.com:8443/", ["hooks.example.com:8443"]),
    ],
)
def test_a_webhook_url_on_an_allowed_host_passes(url: str, allowed: list[str]) -> None:
    check_webhook(url, allowed)


def test_a_failed_delivery_backs_off_as_configured_and_gives_up_after_max_attempts() -> None:
    settings = WebhooksSection(
        allowed_hosts=["h"], secret=SECRET, backoff=[5.0, 30.0], max_attempts=4
    )
    assert retry_at(settings, 1, 100.0) == 105.0
    assert retry_at(settings, 2, 100.0) == 130.0
    # The last wait repeats.
    assert retry_at(settings, 3, 100.0) == 130.0
    assert retry_at(settings, 4, 100.0) is None


def test_webhooks_need_a_secret_once_a_host_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="webhooks: secret: "):
        load_config_text('[webhooks]\nallowed_hosts = ["hooks.example.com"]\n', base_dir=tmp_path)


# -- with the real daemon ---------------------------------------------------------------------


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    yield from daemon_factory(tmp_path)


def _logged(daemon: DaemonProcess, event: str, job_id: int, count: int = 1) -> None:
    """Wait until the daemon has logged `event` about the job `count` times."""
    daemon.wait_for_log(
        lambda _line: (
            len([line for line in daemon.logs(event) if line.get("job") == job_id]) >= count
        ),
        timeout=20.0,
    )


def test_a_final_status_is_posted_signed_and_sent_again_until_the_receiver_takes_it(
    daemons: DaemonFactory, receiver: Receiver
) -> None:
    receiver.answers = [500]
    daemon = daemons(WEBHOOK_CONFIG)
    with daemon.client() as admin:
        job = admin.call("submit", kind="quick", payload={"seconds": 0}, webhook=receiver.url)
        job_id = job["job"]["id"]
        (first_headers, _), (headers, body) = receiver.wait_for(2)
        # The same delivery both times: a receiver deduplicates on Webhook-Id.
        assert first_headers["Webhook-Id"] == headers["Webhook-Id"]
        assert verify(headers, body)
        notice = json.loads(body)
        assert notice["type"] == "job.done"
        assert notice["data"]["id"] == job_id
        assert notice["data"]["status"] == "done"
        _logged(daemon, "webhook delivered", job_id)
        [delivery] = admin.call("webhooks", job=job_id)["deliveries"]
    assert delivery["attempts"] == 2
    assert delivery["answer"] == "HTTP 204"
    assert delivery["delivered_at"] is not None


def test_a_tampered_body_fails_the_signature(daemons: DaemonFactory, receiver: Receiver) -> None:
    daemon = daemons(WEBHOOK_CONFIG)
    with daemon.client() as admin:
        admin.call("submit", kind="broken", payload={}, webhook=receiver.url)
        [(headers, body)] = receiver.wait_for(1)
    assert json.loads(body)["type"] == "job.failed"
    assert verify(headers, body)
    assert not verify(headers, body.replace(b"failed", b"done!!"))


def test_a_delivery_owed_when_the_daemon_is_killed_is_made_after_its_restart(
    daemons: DaemonFactory,
) -> None:
    # Nobody listens on the port yet: every send is refused.
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    daemon = daemons(WEBHOOK_CONFIG)
    with daemon.client() as admin:
        job_id = admin.call("submit", kind="quick", payload={"seconds": 0}, webhook=url)["job"][
            "id"
        ]
    _logged(daemon, "webhook failed", job_id)
    daemon.kill9()
    receiver = Receiver([], port=port)
    try:
        daemon.start()
        [(headers, body)] = receiver.wait_for(1)
        assert json.loads(body)["data"]["id"] == job_id
        assert verify(headers, body)
        _logged(daemon, "webhook delivered", job_id)
    finally:
        receiver.close()


def test_a_submission_with_a_webhook_the_config_does_not_allow_is_refused(
    daemons: DaemonFactory,
) -> None:
    daemon = daemons(WEBHOOK_CONFIG)
    with daemon.client() as admin:
        with pytest.raises(AdminError) as refused:
            admin.call("submit", kind="quick", webhook="http://10.0.0.1/steal")
        assert refused.value.error.code == "INVALID_REQUEST"
        assert "'10.0.0.1' is not in" in refused.value.error.message
        # The daemon goes on.
        assert admin.call("jobs")["jobs"] == []
