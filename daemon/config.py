"""Configuration: config.toml decoded into frozen msgspec Structs.

Unknown keys are errors, and every error names its key path
(`kinds.storybook.timeout: expected a duration like "15m", got "fast"`), because a daemon
that silently ignores a misspelt threshold runs with a limit nobody chose.
"""

from __future__ import annotations

import ast
import datetime
import functools
import importlib
import json
import math
import os
import re
import tomllib
import typing
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit, urlunsplit

import msgspec
from cronsim import CronSim, CronSimError

from jobwarden.errors import ConfigError

ENV_CONFIG = "JOBWARDEN_CONFIG"
# Looked at last: where a system-wide install keeps it, as systemd/jobwarden.service does.
SYSTEM_CONFIG = Path("/etc/jobwarden/config.toml")


class Duration(float):
    """Seconds, written in config as "500ms", "30s", "15m", "2h", "7d" or "1h30m";
    "off" means never (infinity), for a rule or timeout that should not apply."""


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: object) -> Duration:
    if text == "off":
        return Duration(math.inf)
    if isinstance(text, str) and text and _DURATION_PART.sub("", text.strip()) == "":
        parts = _DURATION_PART.findall(text.strip())
        return Duration(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))
    raise ValueError(f'expected a duration like "15m", got {_show(text)}')


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration: 3645 -> "1h45s", 0.25 -> "250ms", inf -> "off"."""
    if math.isinf(seconds):
        return "off"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    parts, rest = [], round(seconds)
    for unit in ("d", "h", "m", "s"):
        count, rest = divmod(rest, int(_UNIT_SECONDS[unit]))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


class Rate(float):
    """Events per second, written in config as "100/min", "10/s" or "500/h"; "off" for
    no limit."""


_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)")
_RATE_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_RATE_SECONDS |= {"h": 3600, "hour": 3600}


def parse_rate(text: object) -> Rate:
    """ "off" is an unlimited rate (infinity)."""
    if text == "off":
        return Rate(math.inf)
    match = _RATE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or float(match[1]) <= 0:
        raise ValueError(f'expected a rate like "100/min", got {_show(text)}')
    return Rate(float(match[1]) / _RATE_SECONDS[match[2]])


class Size(int):
    """Bytes, written in config as "512MB", "4GB" or "1.5GiB" (powers of 1024 either way:
    memory is counted in binary units)."""


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)", re.I)
_SIZE_POWER = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: object) -> Size:
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f'expected a size like "4GB", got {_show(text)}')
    return Size(round(float(match[1]) * 1024 ** _SIZE_POWER[match[2][0].lower()]))


def format_size(size: float) -> str:
    return f"{size / 1024**3:.1f} GB"


def _show(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def decode_hook(tp: type, obj: Any) -> Any:
    if tp is Duration:
        return parse_duration(obj)
    if tp is Rate:
        return parse_rate(obj)
    if tp is Size:
        return parse_size(obj)
    raise NotImplementedError(f"no decoder for {tp}")


PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonSection(Section):
    max_concurrent_jobs: PositiveInt = 2
    shutdown_grace: Duration = Duration(30)
    # A job that was running at this many crashes of the daemon is failed CRASH_LOOP.
    crash_loop_after: PositiveInt = 3


DEFAULT_DATABASE = "var/jobwarden.db"
# A [store] url in one of these schemes runs the store on PostgreSQL.
DATABASE_URL_SCHEMES = ("postgresql", "postgres")


def is_database_url(target: str) -> bool:
    return urlsplit(target).scheme in DATABASE_URL_SCHEMES


def redacted_url(target: str) -> str:
    """A database URL as it may be shown and logged: its password, in the user part or as a
    parameter, replaced by ***. A file path is returned as it is."""
    if "://" not in target:
        return target
    parts = urlsplit(target)
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{parts.username or ''}:***@{host}"
    query = re.sub(r"password=[^&]*", "password=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class StoreSection(Section):
    # The SQLite database file (the default: var/jobwarden.db) ...
    path: str = ""
    # ... or a PostgreSQL database instead: postgresql://user[:password]@host[:port]/dbname
    # (libpq's URL, parameters such as ?host=/run/postgresql or &sslmode=require included).
    url: str = ""
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    # Upper bound on writes folded into one transaction by group commit.
    max_batch: PositiveInt = 1000

    def __post_init__(self) -> None:
        if self.url and self.path:
            raise ValueError(
                "path, url: set one of them, not both (path: an SQLite file; url: a "
                "postgresql:// URL)"
            )
        if self.url and not is_database_url(self.url):
            raise ValueError(
                f"url: expected a postgresql:// or postgres:// URL, got '{redacted_url(self.url)}'"
            )
        if not self.url and not self.path:
            msgspec.structs.force_setattr(self, "path", DEFAULT_DATABASE)


class ClusterSection(Section):
    # A daemon's lease on its running jobs: it renews it every third of this. One whose lease
    # has run out is dead to the others: the elected daemon puts its running jobs back in the
    # queue (RECOVERED), and whatever it writes for them afterwards changes nothing.
    lease: Duration = Duration(30)


class AdminSection(Section):
    socket: str = "var/admin.sock"
    # Empty: mode 0600, only root and the daemon's user. A group name: mode 0660 and
    # members of that group may connect too.
    group: str = ""
    max_line_bytes: PositiveInt = 1024 * 1024
    max_connections: PositiveInt = 64
    # A connection with no request in flight and no watch is closed after this long without a
    # request, and one whose reader stops taking its replies after this long without progress:
    # silent peers cannot hold the max_connections slots.
    idle_timeout: Duration = Duration(60)
    # A request line begun must end (its newline) within this.
    line_timeout: Duration = Duration(10)

    def __post_init__(self) -> None:
        for key in ("idle_timeout", "line_timeout"):
            if not getattr(self, key) > 0:
                raise ValueError(f'{key}: expected a duration longer than 0 or "off"')


class AdmissionSection(Section):
    max_payload_bytes: PositiveInt = 64 * 1024
    # A finished job's idempotency key returns that job for this long after it finished;
    # 0: the key starts a new job as soon as its job has finished.
    idempotency_window: Duration = Duration(0)
    # Items one `submit_many` may carry; the listener's frame limit bounds its bytes too.
    max_batch_items: PositiveInt = 1000
    # How far ahead a job may be submitted to start (run_at, delay); further is refused.
    max_delay: Duration = Duration(30 * 86400)


class JobLogsSection(Section):
    """What is kept of jobs' own output: a command's stderr and non-protocol stdout, and
    what a python handler logs (ctx.log, or the standard logging inside its task)."""

    # Per job; past it the oldest lines are dropped (and counted).
    max_bytes: Size = Size(256 * 1024)
    # A longer line is cut to this many characters, saying how many were cut.
    max_line_chars: PositiveInt = 2000
    # Lines are written in one store write this often (and when a job ends).
    flush_every: Duration = Duration(0.5)

    def __post_init__(self) -> None:
        if self.max_bytes < 4 * self.max_line_chars + 64:
            raise ValueError("max_bytes: must hold at least one longest line (4 bytes a char)")
        if not 0 < self.flush_every < math.inf:
            raise ValueError("flush_every: expected a duration longer than 0")


class LogSection(Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class RetrySection(Section):
    max_attempts: PositiveInt = 4
    backoff: list[Duration] = msgspec.field(
        default_factory=lambda: [Duration(0), Duration(30), Duration(120)]
    )
    # Each delay is spread by +/- this fraction so retries of many jobs do not arrive together.
    jitter: Fraction = 0.1


class KindSection(Section):
    handler: str | None = None
    command: list[str] | None = None
    timeout: Duration = Duration(900)
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] = 0
    max_concurrent: PositiveInt | None = None
    max_attempts: PositiveInt | None = None
    backoff: list[Duration] | None = None
    jitter: Fraction | None = None
    # Lines of stderr kept as a failed command's message.
    stderr_tail_lines: PositiveInt = 20
    # The services this kind calls: its queued jobs wait while one of them is open.
    services: list[str] = msgspec.field(default_factory=list)
    # Monitor rules for this kind; unset: the [monitor] defaults. sla unset: no SLA.
    stuck_after: Duration | None = None
    stall_after: Duration | None = None
    queued_timeout: Duration | None = None
    sla: Duration | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    # A command kind's payload, field by field: "string", "number", "integer", "boolean",
    # or a table of fields for an object. Unset: any payload that fills the command.
    payload: dict[str, Any] | None = None
    # What one job costs its user in credits: reserved at admission, spent when done,
    # refunded when it fails or is canceled.
    credits: Annotated[int, msgspec.Meta(ge=0)] = 1
    # Queued jobs of this kind beyond which submissions get QUEUE_FULL; 0: only the global limit.
    max_queued: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Memory that must be free before one of its jobs starts (seed 003: 4GB for a render).
    min_memory: Size | None = None


class LimitsSection(Section):
    """Per-user request guards and system guards (seed 000 §7). A user's own settings
    (`jobwarden users`) override the per-user defaults here."""

    # Credits a user gets when created; "unlimited" turns the credit check off.
    credits: NonNegativeInt | Literal["unlimited"] = 100
    # Users named on the admin socket who do not exist yet are created with these defaults;
    # false: they are refused (FORBIDDEN). WebSocket users always need a token.
    create_users: bool = True
    # Token bucket per user: `rate` refills it, `burst` is its size. "off": no rate limit.
    rate: Rate = Rate(10 / 60)
    burst: PositiveInt = 10
    # Jobs a user may submit per day (days start at midnight in `timezone`); 0: no limit.
    daily_jobs: NonNegativeInt = 20
    # "" means the budget's time zone.
    timezone: str = ""
    # Jobs of one user running at once; 0: no limit.
    max_running_per_user: NonNegativeInt = 0
    # Queued jobs beyond which submissions get QUEUE_FULL; 0: no limit.
    max_queued: NonNegativeInt = 100
    # Adaptive shedding (seed 002): above this share of max_queued, users holding more than
    # their fair share of the queue are limited to `shed_rate_factor` of their rate.
    shed_at: Fraction = 0.7
    shed_rate_factor: Fraction = 0.25
    # Dispatch pauses while memory or CPU use is above these percentages; 100 never pauses.
    max_memory_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] = 80.0
    max_cpu_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] = 90.0
    # How often memory and CPU are sampled (CPU is the average over this interval).
    sample_every: Duration = Duration(5)
    # Queue positions and waiting reasons are emitted as events at most this often.
    position_every: Duration = Duration(2)
    # ...for this many jobs at the head of the queue (the rest get one when they reach it).
    position_head: PositiveInt = 100

    def day_zone(self, budget: BudgetSection) -> str:
        return self.timezone or budget.timezone


class MonitorSection(Section):
    interval: Duration = Duration(30)
    # Rule 1: running with no heartbeat (progress, checkpoint, ctx call) for this long.
    stuck_after: Duration = Duration(900)
    # Rule 2: running, has reported progress, and it has not changed for this long.
    stall_after: Duration = Duration(300)
    # Rule 4: eligible to run (not in backoff, kind not paused) but not started for this long.
    queued_timeout: Duration = Duration(1800)
    retain_finished: Duration = Duration(7 * 86400)
    prune_batch: PositiveInt = 500
    # Alerts (seed 001 §7): failure rate over a window, and too many stuck jobs at once.
    failure_rate_alert: Fraction = 0.05
    failure_window: Duration = Duration(900)
    failure_min_jobs: PositiveInt = 20
    stuck_alert: PositiveInt = 10
    # Run with each alert as JSON on stdin (wire it to Slack or PagerDuty); [] = log only.
    alert_command: list[str] = msgspec.field(default_factory=list)
    alert_timeout: Duration = Duration(10)
    # The same alert is not sent again within this time.
    alert_repeat: Duration = Duration(900)
    # Requests slower than these are logged (seed 004).
    slow_request: Duration = Duration(1)
    very_slow_request: Duration = Duration(5)


# What a listen key takes: "host:port", "[v6 address]:port", or "" for no listener.
LISTEN_ADDRESS = re.compile(r"[\w.\-]+:(\d{1,5})|\[[0-9a-fA-F:]+\]:(\d{1,5})")


def check_listen(listen: str) -> None:
    """Raises ValueError unless `listen` is "" or a host and a port from 0 to 65535."""
    match = LISTEN_ADDRESS.fullmatch(listen)
    if listen and (match is None or int(match[1] or match[2]) > 65535):
        raise ValueError(f'expected "host:port" (port 0 to 65535) or "", got "{listen}"')


class HttpSection(Section):
    # "host:port" for the probes, /metrics and the /v1 API; "" turns the listener off.
    listen: str = "127.0.0.1:8766"
    # Requests served at once; more are refused with 503 QUEUE_FULL and Retry-After.
    max_requests: PositiveInt = 1000
    # A larger request body is refused with 413, from its Content-Length before it is read.
    max_body_bytes: PositiveInt = 1024 * 1024
    # A request body must have arrived within this.
    body_timeout: Duration = Duration(10)
    # The longest `GET /v1/jobs/{id}/result?wait=` may wait for a job to finish.
    max_wait: Duration = Duration(60)
    # An event stream with nothing to send sends a comment this often, so proxies keep it.
    keepalive: Duration = Duration(15)
    # Events buffered for one event stream: a client reading slower is told to resync.
    queue: PositiveInt = 256


class WebhooksSection(Section):
    """Where and how jobwarden tells an application that its job is final (a submission's
    `webhook` URL): only to the hosts listed, signed with `secret`."""

    # Host names (or "host:port") a webhook URL may point at; [] refuses every webhook.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # The key of each delivery's HMAC-SHA256 signature; required once a host is allowed.
    secret: str = ""
    # How long one delivery waits for the receiver's answer.
    timeout: Duration = Duration(10)
    # A failed delivery is tried again after these waits (the last repeats) until max_attempts.
    backoff: list[Duration] = msgspec.field(
        default_factory=lambda: [Duration(d) for d in (5, 30, 120, 600, 1800, 3600)]
    )
    max_attempts: PositiveInt = 12
    # Deliveries sent at once.
    max_in_flight: PositiveInt = 8

    def __post_init__(self) -> None:
        if self.allowed_hosts and len(self.secret) < 16:
            raise ValueError(
                "secret: webhooks need a signing secret of at least 16 characters "
                "once allowed_hosts lists a host"
            )
        if not self.backoff:
            raise ValueError("backoff: expected at least one duration")


class WebSocketSection(Section):
    # "host:port" for WebSocket clients; "" turns the listener off.
    listen: str = "127.0.0.1:8765"
    # Origins ("https://app.example.com") whose browser pages may connect; [] lets any page.
    # Clients that send no Origin header (scripts, the CLI) are not affected.
    origins: list[str] = msgspec.field(default_factory=list)
    # More are refused in the handshake with 503.
    max_connections: PositiveInt = 1000
    # A larger frame closes the connection with code 1009.
    max_frame_bytes: PositiveInt = 1024 * 1024
    # Ops one connection may send per second, in bursts of as many; more get RATE_LIMITED.
    max_messages_per_second: PositiveInt = 100
    max_watches: PositiveInt = 16
    # Frames buffered for one connection, and events for one of its watches: a client that
    # reads slower than its events come is told to resync, and costs at most
    # (1 + max_watches) * queue frames.
    queue: PositiveInt = 256
    # Every ping_interval the daemon pings; no pong within ping_timeout closes with 1011.
    ping_interval: Duration = Duration(30)
    ping_timeout: Duration = Duration(20)


class BreakerSpec(Section):
    # Open after this many consecutive failures...
    failures: PositiveInt = 5
    # ...or when more than this share of calls failed over `window`, once it saw `min_calls`.
    error_rate: Fraction = 0.10
    window: Duration = Duration(60)
    min_calls: PositiveInt = 20
    # How long an open circuit refuses calls before letting probes through.
    recovery: Duration = Duration(60)
    half_open_calls: PositiveInt = 1


class ServiceSection(Section):
    """An external service every call to which goes through ctx.call."""

    price_usd: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # What one unit is ("call", "1k_tokens", "minute"); the price is per unit.
    unit: str = "call"
    # The most units one call can use: the ledger reserves that much before each call (a call
    # may declare a smaller bound with `units=`). A call that reports more is an overrun.
    max_units: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    max_concurrent: PositiveInt | None = None
    rate: Rate | None = None
    timeout: Duration = Duration(30)
    # Waits between tries of one call (seed 001: 2s, 5s, 12s for images), spread by jitter.
    retries: list[Duration] = msgspec.field(default_factory=list)
    jitter: Fraction = 0.2
    # Whether a failed call costs money (some providers bill failed generations).
    failures_billed: bool = False
    breaker: BreakerSpec = msgspec.field(default_factory=BreakerSpec)


class BudgetSection(Section):
    # Hard limits in USD; spend never crosses them. 0 means no limit.
    daily_usd: Annotated[float, msgspec.Meta(ge=0)] = 500.0
    monthly_usd: Annotated[float, msgspec.Meta(ge=0)] = 10000.0
    # Alert when the day's spend crosses each of these fractions of the daily limit.
    alert_at: list[Fraction] = msgspec.field(default_factory=lambda: [0.5, 0.8, 1.0])
    # Budget days begin at midnight in this time zone.
    timezone: str = "UTC"


# Who owns a schedule's runs when its table names no `user`.
SCHEDULE_USER = "schedules"


class ScheduleSection(Section):
    """A recurring job: a run of `kind` with `payload` at each slot of `cron` in `timezone`."""

    # Five fields: minute, hour, day of month, month, day of week (Debian cron's meaning).
    cron: str
    kind: str
    payload: Any = msgspec.field(default_factory=dict)
    timezone: str = "UTC"
    # The user the runs belong to: their jobs, their credits and their own limits.
    user: str = SCHEDULE_USER
    # Unset: the kind's priority.
    priority: Annotated[int, msgspec.Meta(ge=-100, le=100)] | None = None
    # skip: a slot whose previous run is still queued or running is skipped; queue: it runs too.
    overlap: Literal["skip", "queue"] = "skip"
    # After downtime: none of the missed slots run, the latest one, or each (at most
    # max_catch_up of them, the latest).
    catch_up: Literal["none", "latest", "all"] = "latest"
    max_catch_up: PositiveInt = 100


class Overrides(msgspec.Struct, frozen=True, kw_only=True):
    """What `jobwarden serve`'s flags set over the file, at start-up and at every reload."""

    admin_socket: str | None = None
    http_listen: str | None = None
    websocket_listen: str | None = None
    log_format: Literal["auto", "json", "console"] | None = None

    def apply(self, config: Config) -> Config:
        def replace(section: Any, **values: Any) -> Any:
            chosen = {key: value for key, value in values.items() if value is not None}
            return msgspec.structs.replace(section, **chosen)

        return msgspec.structs.replace(
            config,
            admin=replace(config.admin, socket=self.admin_socket),
            http=replace(config.http, listen=self.http_listen),
            websocket=replace(config.websocket, listen=self.websocket_listen),
            log=replace(config.log, format=self.log_format),
        )


class RetryPolicy(msgspec.Struct, frozen=True):
    max_attempts: int
    backoff: list[float]
    jitter: float


class Config(Section):
    daemon: DaemonSection = msgspec.field(default_factory=DaemonSection)
    store: StoreSection = msgspec.field(default_factory=StoreSection)
    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    admin: AdminSection = msgspec.field(default_factory=AdminSection)
    admission: AdmissionSection = msgspec.field(default_factory=AdmissionSection)
    log: LogSection = msgspec.field(default_factory=LogSection)
    job_logs: JobLogsSection = msgspec.field(default_factory=JobLogsSection)
    retry: RetrySection = msgspec.field(default_factory=RetrySection)
    monitor: MonitorSection = msgspec.field(default_factory=MonitorSection)
    http: HttpSection = msgspec.field(default_factory=HttpSection)
    websocket: WebSocketSection = msgspec.field(default_factory=WebSocketSection)
    webhooks: WebhooksSection = msgspec.field(default_factory=WebhooksSection)
    budget: BudgetSection = msgspec.field(default_factory=BudgetSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    services: dict[str, ServiceSection] = msgspec.field(default_factory=dict)
    kinds: dict[str, KindSection] = msgspec.field(default_factory=dict)
    schedules: dict[str, ScheduleSection] = msgspec.field(default_factory=dict)
    # Where relative paths resolve: the config file's directory.
    base_dir: str = "."

    def path(self, relative: str) -> Path:
        return Path(self.base_dir, relative).resolve()

    def database(self) -> str:
        """Where the store is: the [store] url, or the file its path names."""
        return self.store.url or str(self.path(self.store.path))

    def rule(self, kind: str, name: str) -> float:
        """A monitor threshold for a kind: its own, else the [monitor] default (sla: off)."""
        spec = self.kinds.get(kind)
        own = getattr(spec, name) if spec is not None else None
        if own is not None:
            return own
        return getattr(self.monitor, name) if name != "sla" else math.inf

    def retry_policy(self, kind: str) -> RetryPolicy:
        spec = self.kinds[kind]
        return RetryPolicy(
            max_attempts=spec.max_attempts or self.retry.max_attempts,
            backoff=list(spec.backoff if spec.backoff is not None else self.retry.backoff),
            jitter=spec.jitter if spec.jitter is not None else self.retry.jitter,
        )


_VALIDATION_PATH = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)


def _convert(obj: Any, tp: type, prefix: str) -> Any:
    try:
        return msgspec.convert(obj, tp, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(name_path(str(exc), prefix, tp)) from None


def name_path(message: str, prefix: str, tp: Any = None) -> str:
    """Turn msgspec's "msg - at `$.a[0].b`" into "prefix.a.0.b: msg"; given the type that
    was decoded, a value outside a Literal's choices is told what the choices are."""
    match = _VALIDATION_PATH.match(message)
    msg, path = (match["msg"], match["path"]) if match else (message, "")
    if tp is not None:
        msg = _explain_choices(msg, path, tp)
    path = prefix + path.replace("[", ".").replace("]", "")
    unknown = re.match(r"Object contains unknown field `(.+)`", msg)
    if unknown:
        path, msg = f"{path}.{unknown[1]}", "unknown key"
    return f"{path.strip('.')}: {msg}" if path.strip(".") else msg


_INVALID_CHOICE = re.compile(r"Invalid enum value (?P<value>.+)")
_PATH_PART = re.compile(r"\.(\w+)|\[[^]]*\]")


def _explain_choices(msg: str, path: str, tp: Any) -> str:
    """msgspec's "Invalid enum value 'x'" as `expected one of A, B; got "x"`, the choices
    read, in the order they are declared, off the Literal at `path` in `tp`."""
    invalid = _INVALID_CHOICE.fullmatch(msg)
    if invalid is None:
        return msg
    for part in _PATH_PART.finditer(path):
        tp = _bare(tp)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            tp = typing.get_type_hints(tp)[part[1]]
        else:  # a dict's value or a list's item
            tp = typing.get_args(tp)[-1]
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, UnionType) else (tp,)
    choices: list[str] = []
    numbers: list[str] = []
    for option in map(_bare, options):
        if typing.get_origin(option) is Literal:
            choices += map(str, typing.get_args(option))
        elif option in (int, float):
            # A union of a number and words (credits = 100 or "unlimited") names it too.
            numbers.append("a whole number" if option is int else "a number")
    words = choices[0] if len(choices) == 1 else f"one of {', '.join(choices)}"
    got = _show(ast.literal_eval(invalid["value"]))
    return f"expected {' or '.join([*numbers, words])}; got {got}"


def _bare(tp: Any) -> Any:
    """A type without its Annotated constraints."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


# `{payload.input}`, `{job_id}` and `{attempt}` in a command kind's argv.
COMMAND_PLACEHOLDER = re.compile(r"\{(payload(?:\.\w+)+|job_id|attempt)\}")


def template_fields(command: list[str]) -> set[tuple[str, ...]]:
    """The payload paths a command template needs, e.g. {("input",)}."""
    fields = set()
    for arg in command:
        for match in COMMAND_PLACEHOLDER.finditer(arg):
            if match[1].startswith("payload."):
                fields.add(tuple(match[1].split(".")[1:]))
    return fields


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


# The words a command kind's `payload` table declares a field with, and what each accepts.
PAYLOAD_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "number": _is_number,
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
}


def check_payload(schema: dict[str, Any], payload: Any, path: str = "payload") -> None:
    """Raises ValueError naming the first field of `payload` that `schema` (a kind's
    `payload` table) does not allow: a wrong type, a field missing, or one not declared."""
    if not isinstance(payload, dict):
        raise ValueError(
            f"{path}: expected an object with {', '.join(schema)}, got {_json(payload)}"
        )
    for field in payload:
        if field not in schema:
            raise ValueError(
                f"{path}.{field}: not a field of this kind (it takes {', '.join(schema)})"
            )
    for field, declared in schema.items():
        where = f"{path}.{field}"
        if field not in payload:
            raise ValueError(f"{where}: required")
        if isinstance(declared, dict):
            check_payload(declared, payload[field], where)
        elif not PAYLOAD_TYPES[declared](payload[field]):
            raise ValueError(f"{where}: expected {_a(declared)}, got {_json(payload[field])}")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _json(value: Any) -> str:
    """A client's value in an error, cut short: messages never carry unbounded input."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _check_payload_schema(schema: dict[str, Any], where: str) -> None:
    for field, declared in schema.items():
        if not re.fullmatch(r"\w+", field):
            raise ConfigError(f"{where}.{field}: a field name uses letters, digits and '_' only")
        if isinstance(declared, dict):
            _check_payload_schema(declared, f"{where}.{field}")
        elif declared not in PAYLOAD_TYPES:
            raise ConfigError(
                f"{where}.{field}: expected one of {', '.join(PAYLOAD_TYPES)} or a table of "
                f"fields; got {_show(declared)}"
            )


def _check_command_payload(kind: KindSection, where: str) -> None:
    if kind.payload is None:
        return
    if kind.command is None:
        raise ConfigError(
            f"{where}.payload: only a command kind declares its payload here; a python kind "
            "annotates its handler's payload parameter with a msgspec Struct"
        )
    _check_payload_schema(kind.payload, f"{where}.payload")
    for path in sorted(template_fields(kind.command)):
        declared: Any = kind.payload
        for field in path:
            declared = declared.get(field) if isinstance(declared, dict) else None
        if declared is None or isinstance(declared, dict):
            raise ConfigError(
                f"{where}.payload: the command uses {{payload.{'.'.join(path)}}}, which the "
                "table must declare as a string, number, integer or boolean"
            )


def _check_kind(name: str, kind: KindSection) -> None:
    where = f"kinds.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{where}: a kind name uses letters, digits, '_', '.', '-' only")
    if (kind.handler is None) == (kind.command is None):
        raise ConfigError(f"{where}: set exactly one of handler or command")
    if kind.handler is not None and not re.fullmatch(r"[\w.]+:[\w.]+", kind.handler):
        raise ConfigError(
            f'{where}.handler: expected "package.module:function", got "{kind.handler}"'
        )
    if kind.command is not None and not kind.command:
        raise ConfigError(f"{where}.command: needs at least the program to run")
    _check_command_payload(kind, where)


def check_cron(expression: str) -> None:
    """Raises ValueError saying what is wrong with a five-field cron expression."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"expected five fields (minute hour day-of-month month day-of-week) like "
            f'"*/5 * * * *", got {len(fields)} in "{expression}"'
        )
    try:
        # Parsing is all the constructor does with the moment; any fixed one will do.
        CronSim(expression, datetime.datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ValueError(f'{exc} in "{expression}"') from None


def _check_schedule(name: str, schedule: ScheduleSection, kinds: dict[str, KindSection]) -> None:
    where = f"schedules.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{where}: a schedule name uses letters, digits, '_', '.', '-' only")
    try:
        check_cron(schedule.cron)
    except ValueError as exc:
        raise ConfigError(f"{where}.cron: {exc}") from None
    _check_timezone(schedule.timezone, f"{where}.timezone")
    if schedule.kind not in kinds:
        known = ", ".join(sorted(kinds)) or "none"
        raise ConfigError(f"{where}.kind: no kind '{schedule.kind}' (known: {known})")
    if not 0 < len(schedule.user) <= 64 or not schedule.user.isprintable():
        raise ConfigError(f"{where}.user: expected 1 to 64 printable characters")
    if schedule.catch_up == "all" and schedule.overlap == "skip":
        raise ConfigError(
            f'{where}.catch_up: "all" runs the missed slots together, and overlap = "skip" '
            'would skip all but the first; set overlap = "queue", or catch_up = "latest"'
        )


def _check_listeners(config: Config) -> None:
    for key, listen in (
        ("http.listen", config.http.listen),
        ("websocket.listen", config.websocket.listen),
    ):
        try:
            check_listen(listen)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def load_config_text(text: str, *, base_dir: str | os.PathLike[str] = ".") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    kinds = {
        name: _convert(table, KindSection, f"kinds.{name}")
        for name, table in _tables(raw.pop("kinds", {}), "kinds").items()
    }
    services = {
        name: _convert(table, ServiceSection, f"services.{name}")
        for name, table in _tables(raw.pop("services", {}), "services").items()
    }
    for name, service in services.items():
        if not math.isfinite(service.max_units):
            raise ConfigError(f"services.{name}.max_units: expected a finite number of units")
    for name, kind in kinds.items():
        _check_kind(name, kind)
        for service in kind.services:
            if service not in services:
                known = ", ".join(sorted(services)) or "none"
                raise ConfigError(f"kinds.{name}.services: no service '{service}' (known: {known})")
    schedules = {
        name: _convert(table, ScheduleSection, f"schedules.{name}")
        for name, table in _tables(raw.pop("schedules", {}), "schedules").items()
    }
    for name, schedule in schedules.items():
        _check_schedule(name, schedule, kinds)
    if "base_dir" in raw:
        raise ConfigError("base_dir: unknown key")
    config = _convert(raw, Config, "")
    _check_listeners(config)
    if math.isinf(config.admission.idempotency_window):
        raise ConfigError(
            'admission.idempotency_window: "off" would hold a finished job\'s key until it '
            'is pruned; "0s" turns the window off'
        )
    if not 3 <= config.cluster.lease < math.inf:
        raise ConfigError(
            'cluster.lease: expected a duration of at least "3s" (renewed every third of it), '
            f"got {format_duration(config.cluster.lease)}"
        )
    _check_timezone(config.budget.timezone, "budget.timezone")
    if config.limits.timezone:
        _check_timezone(config.limits.timezone, "limits.timezone")
    return msgspec.structs.replace(
        config, kinds=kinds, services=services, schedules=schedules, base_dir=str(base_dir)
    )


def _tables(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of named tables")
    return value


def _check_timezone(name: str, key: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f'{key}: unknown time zone "{name}"') from None


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return load_config_text(text, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def find_config(explicit: str | None) -> Path:
    """--config, then $JOBWARDEN_CONFIG, then ./config.toml, then /etc/jobwarden/config.toml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    for candidate in (Path("config.toml"), SYSTEM_CONFIG):
        if candidate.exists():
            return candidate
    raise ConfigError(
        "no config file. jobwarden looks, in this order, at:\n"
        "  1. --config PATH\n"
        f"  2. ${ENV_CONFIG}\n"
        f"  3. ./config.toml (in {Path.cwd()})\n"
        f"  4. {SYSTEM_CONFIG}\n"
        "`jobwarden init` writes the default config.toml into this directory."
    )


@functools.cache
def import_handler(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f'cannot import "{module_name}": {exc}') from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f'"{module_name}" has no attribute "{attr}"')
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f'"{spec}" is not callable')
    return target


def check_handlers(config: Config) -> None:
    """Import every python handler now, so a typo fails at start-up, not at the first job."""
    for name, kind in config.kinds.items():
        if kind.handler is not None:
            try:
                import_handler(kind.handler)
            except ConfigError as exc:
                raise ConfigError(f"kinds.{name}.handler: {exc}") from None
