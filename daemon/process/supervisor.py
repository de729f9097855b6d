"""The supervisor: builds the channels, owns start-up order, signals and shutdown.

Start-up: lock the database, open the store, end what is left of the commands a crash left
running, put their jobs back in the queue, register this daemon's node (process/cluster.py),
then start the node's keeper, the actors (scheduler, pool, admission) and the listeners last,
each with `nursery.start` so the next starts only once the previous really serves; then
READY=1. A clean stop takes the node's row out of the store as the last write.
Memory and CPU are read in one place (jobwarden.system): once before the actors start, then
every `limits.sample_every`, each reading handed to the scheduler and the monitor.

Shutdown (SIGTERM, SIGINT, admin `drain`): stop admitting, stop dispatching, let running jobs
finish within `shutdown_grace`, interrupt the rest (back to the queue, attempt not spent),
exit 0. A second signal, or admin `shutdown`, interrupts at once. SIGHUP reloads thresholds.
The store wraps the actors' nursery, so the final writes of jobs being torn down still land.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import structlog
import trio

from jobwarden import __version__
from jobwarden.actors.admission import Admission
from jobwarden.actors.breaker import Breaker
from jobwarden.actors.joblogs import JobLogs
from jobwarden.actors.ledger import Ledger
from jobwarden.actors.messages import (
    Drain,
    Reconfigure,
    SchedulerSnapshot,
    StopAdmitting,
    StopDispatch,
)
from jobwarden.actors.monitor import Monitor
from jobwarden.actors.pool import Pool
from jobwarden.actors.processes import end_leftover_groups
from jobwarden.actors.scheduler import Scheduler
from jobwarden.actors.schedules import check_schedules
from jobwarden.clock import WallClock
from jobwarden.config import Config, Overrides, check_handlers, load_config, redacted_url
from jobwarden.errors import ConfigError, StartupError, StoreError
from jobwarden.hub import EventHub
from jobwarden.logs import configure_logging, use_clock
from jobwarden.mailbox import ReplySlot
from jobwarden.metrics import Metrics
from jobwarden.process import cluster
from jobwarden.process.admin import AdminServer, Stop
from jobwarden.process.cluster import NodeKeeper
from jobwarden.process.commands import Commands
from jobwarden.process.http import HttpServer
from jobwarden.process.systemd import SystemdNotifier
from jobwarden.process.webhooks import WebhookSender
from jobwarden.process.websocket import WebSocketServer
from jobwarden.store import jobs, nodes
from jobwarden.store.engine import Store, StoreState
from jobwarden.system import SystemLoad, SystemSampler

log = structlog.get_logger("supervisor")

STATUS_INTERVAL = 10.0
# What a stop takes beyond the drain grace: interrupting the jobs still running (each final
# write is bounded at 10 s), closing WebSocket connections (2 s) and the store.
STOP_AFTER_GRACE = 30.0


class Reload(msgspec.Struct):
    pass


class DaemonHandle(msgspec.Struct):
    """What a caller of `run_daemon` (tests, the load test) can reach once it is ready."""

    store: Store
    hub: EventHub
    clock: WallClock
    control: trio.MemorySendChannel[Any]
    admission: trio.MemorySendChannel[Any]
    scheduler: trio.MemorySendChannel[Any]
    pool: trio.MemorySendChannel[Any]
    monitor: trio.MemorySendChannel[Any]
    breaker: trio.MemorySendChannel[Any]
    ledger: trio.MemorySendChannel[Any]
    job_logs: JobLogs
    metrics: Metrics
    http_port: int | None
    websocket_port: int | None


def lock_database(db_path: Path) -> int:
    """One daemon per database: a second would dispatch the same jobs twice.

    The lock is on the database file itself, not on a name beside it, so that every path to
    the file (a symlink, a hard link, another mount of the directory) meets it: an exclusive
    flock on a descriptor of the file, held for as long as the daemon runs. SQLite locks with
    POSIX record locks, which flock locks never meet on a local file system. The descriptor
    is closed only after the store has closed its connections (closing any descriptor of the
    file would drop the POSIX locks this process holds on it)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Read-only is enough for flock, and works on a file that refuses writes.
        fd = os.open(db_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartupError(f"cannot open the database {db_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(os.fstat(fd))
        os.close(fd)
        pid = "" if holder is None else f" (pid {holder})"
        raise StartupError(
            f"another jobwarden is already using the database {db_path}{pid}, "
            "through this path or another link to the same file"
        ) from None
    return fd


def process_runs(pid: int) -> bool:
    """Whether a process of this pid runs here (this daemon's own pid is a previous
    incarnation's, before it registered)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(file: os.stat_result) -> int | None:
    """The pid that holds a flock on `file`, as Linux lists it in /proc/locks; None where
    that is not known (another system, a pid outside our namespace)."""
    inode = f"{os.major(file.st_dev):02x}:{os.minor(file.st_dev):02x}:{file.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2b:81 0 EOF"; a waiter's line has "->" after
        # the number.
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
            pid = int(fields[4])
            return pid if pid > 0 else None
    return None


# Keys that the running daemon cannot change; a reload warns that they need a restart.
RESTART_KEYS = ("store", "admin", "log", "http", "websocket")


class Supervisor:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        overrides: Overrides | None = None,
        notifier: SystemdNotifier | None = None,
        threaded_store: bool = True,
        clock_epoch: float | None = None,
        sample_system: Callable[[], SystemLoad] | None = None,
    ) -> None:
        self._config = config
        # The one reader of memory and CPU: see jobwarden.system.
        self._sample_system = sample_system or SystemSampler()
        self._config_path = config_path
        # The serve flags win over the file on every reload, as they did at start-up.
        self._overrides = overrides or Overrides()
        self._notifier = notifier or SystemdNotifier.from_environ({})
        self._threaded_store = threaded_store
        self._clock_epoch = clock_epoch
        self._draining = False
        self._ready = False
        self._websocket: WebSocketServer | None = None
        self._http: HttpServer | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[DaemonHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self._config
        clock = WallClock(self._clock_epoch)
        self._clock = clock
        use_clock(clock)
        database = config.database()
        # One daemon per SQLite file. A PostgreSQL database takes no file lock: several
        # daemons on one database are a cluster (docs/operations.md says what holds there).
        lock_fd = None if config.store.url else lock_database(Path(database))
        hub = EventHub()
        try:
            async with Store.open(
                database,
                hub=hub,
                synchronous=config.store.synchronous,
                max_batch=config.store.max_batch,
                threaded=self._threaded_store,
                clock=clock,
            ) as store:
                await self._recover(
                    store, clock, redacted_url(database), locked=lock_fd is not None
                )
                node, registered = await NodeKeeper.register(store, clock, config)
                if registered and lock_fd is not None:
                    # The database is locked to this daemon: other nodes' rows are daemons
                    # that stopped, whose jobs the recovery has just requeued.
                    await store.write(partial(nodes.forget_others, node=node))
                await self._run_actors(store, hub, clock, node, registered, task_status)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
            use_clock(None)

    async def _recover(
        self, store: Store, clock: WallClock, database: str, *, locked: bool
    ) -> None:
        """Jobs a crash left `running` go back to the queue, once what is left of their
        commands has been ended: a command's children may outlive a crash. On a store
        `locked` to this daemon (SQLite) every running job is a crashed daemon's. Where several
        share the database, only those of this host's daemons whose process is gone (a
        restart after a crash); the other dead daemons' jobs are the maintenance role's once
        their lease runs out (process/cluster.py). On a store that
        takes no writes (a full disk) the daemon starts all the same, read-only: the recovery
        is kept, and committed ahead of every other write once the store takes writes again,
        so no job is dispatched before it."""
        now, crash_loop_after = clock.now(), self._config.daemon.crash_loop_after
        if locked:
            dead = None
            recover = partial(jobs.recover_running, now=now, crash_loop_after=crash_loop_after)
        else:
            here = await store.read(partial(nodes.on_host, host=socket.gethostname()))
            dead = [node for node, pid in here if not process_runs(pid)]
            if not dead:
                return
            recover = partial(
                nodes.recover_nodes, nodes=dead, now=now, crash_loop_after=crash_loop_after
            )
        leftovers = await end_leftover_groups(
            await store.read(partial(jobs.running_process_groups, nodes=dead))
        )
        try:
            recovered = await store.write(recover)
        except StoreError as exc:
            store.hand_over(recover, keep=True)
            log.error(
                "start-up recovery waits for the store to take writes; starting read-only",
                database=database,
                code=exc.code,
                error=str(exc),
            )
            return
        log.info(
            "start-up recovery done",
            database=database,
            leftover_processes_ended=leftovers,
            **recovered,
        )

    async def _run_actors(
        self,
        store: Store,
        hub: EventHub,
        clock: WallClock,
        node: int,
        registered: bool,
        task_status: trio.TaskStatus[DaemonHandle],
    ) -> None:
        config = self._config
        self._store = store
        metrics = self._metrics = Metrics()
        metrics.declare(config)
        # Scheduler and pool feed each other; unbounded buffers keep that cycle from ever
        # deadlocking. Their depth is bounded anyway: RunJobs by free slots, JobQueued by
        # admissions, each consumed in the next dispatch round.
        scheduler_tx, scheduler_rx = trio.open_memory_channel[Any](math.inf)
        pool_tx, pool_rx = trio.open_memory_channel[Any](math.inf)
        admission_tx, admission_rx = trio.open_memory_channel[Any](1024)
        # Actors ask the monitor nothing it must answer, but it asks them (breaker, ledger):
        # an unbounded inbox means an alert can never block an actor the monitor waits on.
        monitor_tx, monitor_rx = trio.open_memory_channel[Any](math.inf)
        breaker_tx, breaker_rx = trio.open_memory_channel[Any](math.inf)
        ledger_tx, ledger_rx = trio.open_memory_channel[Any](math.inf)
        control_tx, control_rx = trio.open_memory_channel[Any](16)
        self._channels = (admission_tx, scheduler_tx, pool_tx, monitor_tx, breaker_tx, ledger_tx)
        actor = {"config": config, "store": store, "clock": clock}
        load = self._sample_system()
        keeper = self._keeper = NodeKeeper(
            **actor,
            node=node,
            registered=registered,
            pool=pool_tx.clone(),
            monitor=monitor_tx.clone(),
            scheduler=scheduler_tx.clone(),
        )
        scheduler = Scheduler(
            **actor, inbox=scheduler_rx, pool=pool_tx.clone(), load=load, node=node
        )
        hub.foreign_listeners.append(
            partial(cluster.relay, scheduler=scheduler_tx.clone(), pool=pool_tx.clone())
        )
        breaker = Breaker(
            **actor, inbox=breaker_rx, scheduler=scheduler_tx.clone(), alerts=monitor_tx.clone()
        )
        ledger = Ledger(
            **actor,
            inbox=ledger_rx,
            listeners=[admission_tx.clone(), scheduler_tx.clone()],
            alerts=monitor_tx.clone(),
            metrics=metrics,
        )
        job_logs = JobLogs(store=store, clock=clock, config=config.job_logs)
        pool = Pool(
            **actor,
            job_logs=job_logs,
            inbox=pool_rx,
            scheduler=scheduler_tx.clone(),
            ledger=ledger_tx.clone(),
            breaker=breaker_tx.clone(),
            monitor=monitor_tx.clone(),
            metrics=metrics,
            node=node,
        )
        admission = Admission(
            **actor,
            inbox=admission_rx,
            scheduler=scheduler_tx.clone(),
            metrics=metrics,
            total_memory=load.memory_total,
        )
        monitor = Monitor(
            **actor,
            inbox=monitor_rx,
            pool=pool_tx.clone(),
            scheduler=scheduler_tx.clone(),
            breaker=breaker_tx.clone(),
            ledger=ledger_tx.clone(),
            metrics=metrics,
            daemon_status=self._status,
            load=load,
            node=node,
        )
        # What a request means, shared by every listener.
        commands = Commands(
            **actor,
            hub=hub,
            job_logs=job_logs,
            admission=admission_tx.clone(),
            scheduler=scheduler_tx.clone(),
            pool=pool_tx.clone(),
            monitor=monitor_tx.clone(),
            breaker=breaker_tx.clone(),
            ledger=ledger_tx.clone(),
        )
        self._commands = commands
        self._admin = AdminServer(
            config=config,
            commands=commands,
            scheduler=scheduler_tx.clone(),
            supervisor=control_tx.clone(),
            metrics=metrics,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(store.probe_while_faulted)
            await nursery.start(keeper.run)
            await nursery.start(scheduler.run)
            await nursery.start(breaker.run)
            await nursery.start(ledger.run)
            await nursery.start(pool.run)
            await nursery.start(admission.run)
            await nursery.start(monitor.run)
            nursery.start_soon(self._sample, scheduler_tx.clone(), monitor_tx.clone())
            nursery.start_soon(self._follow_store, store, scheduler_tx.clone(), monitor_tx.clone())
            self._ready = True
            await nursery.start(self._admin.run)
            http_port = None
            if config.http.listen:
                self._http = HttpServer(
                    listen=config.http.listen,
                    settings=config.http,
                    store=store,
                    commands=commands,
                    metrics=metrics,
                    daemon_status=self._status,
                    slow_request=config.monitor.slow_request,
                    very_slow_request=config.monitor.very_slow_request,
                )
                http_port = await nursery.start(self._http.run)
            websocket_port = None
            if config.websocket.listen:
                self._websocket = WebSocketServer(
                    settings=config.websocket,
                    store=store,
                    commands=commands,
                    metrics=metrics,
                    slow_request=config.monitor.slow_request,
                    very_slow_request=config.monitor.very_slow_request,
                )
                websocket_port = await nursery.start(self._websocket.run)
            if config.webhooks.allowed_hosts:
                sender = WebhookSender(settings=config.webhooks, store=store, hub=hub, clock=clock)
                await nursery.start(sender.run)
            nursery.start_soon(self._watch_signals, control_tx.clone())
            await nursery.start(self._notifier.run_watchdog)
            nursery.start_soon(self._report_status, scheduler_tx)
            self._notifier.ready("ready")
            log.info(
                "jobwarden ready",
                version=__version__,
                pid=os.getpid(),
                kinds=sorted(config.kinds),
                max_concurrent_jobs=config.daemon.max_concurrent_jobs,
                node=node,
                http_port=http_port,
                websocket_port=websocket_port,
            )
            task_status.started(
                DaemonHandle(
                    store=store,
                    hub=hub,
                    clock=clock,
                    control=control_tx,
                    admission=admission_tx,
                    scheduler=scheduler_tx,
                    pool=pool_tx,
                    monitor=monitor_tx,
                    breaker=breaker_tx,
                    ledger=ledger_tx,
                    job_logs=job_logs,
                    metrics=metrics,
                    http_port=http_port,
                    websocket_port=websocket_port,
                )
            )
            await self._control(control_rx)
            if self._websocket is not None:
                await self._websocket.close_all("daemon stopping")
            if self._http is not None:
                await self._http.close()
            nursery.cancel_scope.cancel()
        await keeper.leave()
        log.info("jobwarden stopped")

    def _status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(self._clock.uptime(), 3),
            "ready": self._ready,
            "draining": self._draining,
            **({"websocket": self._websocket.statistics()} if self._websocket else {}),
        }

    async def _control(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        """Serve stop and reload requests until a drain has finished."""
        finished = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_requests, inbox, finished, nursery)
            await finished.wait()
            nursery.cancel_scope.cancel()

    async def _follow_requests(
        self, inbox: trio.MemoryReceiveChannel[Any], finished: trio.Event, nursery: trio.Nursery
    ) -> None:
        async with inbox:
            async for msg in inbox:
                match msg:
                    case Stop(grace=grace) if not self._draining:
                        self._draining = True
                        nursery.start_soon(self._drain, grace, finished)
                    case Stop():
                        log.warning("second stop request: interrupting running jobs now")
                        await self._channels[2].send(Drain(grace=0.0, reply=ReplySlot()))
                    case Reload():
                        await self._reload()

    async def _drain(self, grace: float | None, finished: trio.Event) -> None:
        admission_tx, scheduler_tx, pool_tx, *_ = self._channels
        grace = self._config.daemon.shutdown_grace if grace is None else grace
        self._notifier.stopping(
            f"draining, grace {grace:g}s", expected_seconds=grace + STOP_AFTER_GRACE
        )
        log.info("draining", grace=grace)
        await admission_tx.send(StopAdmitting())
        await scheduler_tx.send(StopDispatch())
        # The snapshot answers only after StopDispatch was handled: no dispatch after this.
        snapshot: ReplySlot[dict[str, Any]] = ReplySlot()
        await scheduler_tx.send(SchedulerSnapshot(reply=snapshot))
        await snapshot.wait()
        reply: ReplySlot[int] = ReplySlot()
        await pool_tx.send(Drain(grace=grace, reply=reply))
        interrupted = await reply.wait()
        log.info("drained", interrupted=interrupted)
        finished.set()

    async def _reload(self) -> None:
        if self._config_path is None:
            log.warning("reload requested, but the daemon was not started from a file")
            return
        self._notifier.reloading()
        try:
            new = self._overrides.apply(load_config(self._config_path))
            check_handlers(new)
            check_schedules(new)
        except ConfigError as exc:
            log.error("reload rejected; keeping the running config", error=str(exc))
            self._notifier.ready("ready (reload rejected)")
            return
        for key in RESTART_KEYS:
            if getattr(new, key) != getattr(self._config, key):
                log.warning("config change needs a restart to take effect", section=key)
        self._config = new
        self._metrics.declare(new)
        self._keeper.reconfigure(new)
        for actor in self._channels:
            await actor.send(Reconfigure(config=new))
        self._admin.reconfigure(new)
        self._commands.reconfigure(new)
        log.info(
            "config reloaded",
            path=str(self._config_path),
            kinds=sorted(new.kinds),
            schedules=sorted(new.schedules),
        )
        self._notifier.ready("ready")

    async def _watch_signals(self, control: trio.MemorySendChannel[Any]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with control:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await control.send(Reload())
                    else:
                        log.info("signal received", signal=signal.Signals(signum).name)
                        await control.send(Stop())

    async def _sample(
        self, scheduler: trio.MemorySendChannel[Any], monitor: trio.MemorySendChannel[Any]
    ) -> None:
        """Every `limits.sample_every`, one reading of memory and CPU for each actor that
        decides by it, so they see the same figures for the same interval."""
        async with scheduler, monitor:
            while True:
                await trio.sleep(self._config.limits.sample_every)
                load = self._sample_system()
                await scheduler.send(load)
                await monitor.send(load)

    async def _follow_store(self, store: Store, *actors: trio.MemorySendChannel[Any]) -> None:
        """Each change of the store's health, to the actors that act on it: the scheduler
        resumes dispatch when the store takes writes again, the monitor raises an alert when
        it stops. A fault found before they started (at start-up recovery) is handed on too."""
        async with contextlib.AsyncExitStack() as stack:
            for actor in actors:
                await stack.enter_async_context(actor)
            seen = 0
            while True:
                seen = await store.health.wait_change(seen)
                state = StoreState(fault=store.health.fault)
                for actor in actors:
                    await actor.send(state)

    async def _report_status(self, scheduler: trio.MemorySendChannel[Any]) -> None:
        if not self._notifier.enabled:
            return
        while True:
            reply: ReplySlot[dict[str, Any]] = ReplySlot()
            await scheduler.send(SchedulerSnapshot(reply=reply))
            snapshot = await reply.wait()
            queued = sum((await self._store.read(jobs.queued_by_kind)).values())
            state = "draining, " if self._draining else ""
            self._notifier.status(f"{state}{snapshot['running']} running, {queued} queued")
            await trio.sleep(STATUS_INTERVAL)


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions of a group, however deep the nurseries nested them."""
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def serve_main(config_path: Path, overrides: Overrides | None = None) -> int:
    """`jobwarden serve`: run until drained. Exit 0 after a clean stop; 2 when the config
    cannot be used, a listen port among it (systemd is told not to restart on 2); 1 when
    another resource is taken."""
    overrides = overrides or Overrides()
    try:
        config = overrides.apply(load_config(config_path))
        check_handlers(config)
        check_schedules(config)
    except ConfigError as exc:
        print(f"jobwarden: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log.format, config.log.level)
    supervisor = Supervisor(
        config,
        config_path=config_path,
        overrides=overrides,
        notifier=SystemdNotifier.from_environ(),
    )
    refusals: list[str] = []
    code = 0
    try:
        trio.run(supervisor.run)
    except* ConfigError as group:
        refusals += [f"{config_path}: {exc}" for exc in _leaves(group)]
        code = 2
    except* StartupError as group:
        refusals += [str(exc) for exc in _leaves(group)]
        code = code or 1
    for refusal in refusals:
        log.error("jobwarden could not start", error=refusal)
        print(f"jobwarden: {refusal}", file=sys.stderr)
    return code
