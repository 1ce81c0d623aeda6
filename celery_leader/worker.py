"""Celery worker glue: the elector as a worker bootstep.

A worker-blueprint step (started once, in the main process) owns the elector
thread; a consumer-blueprint step only re-applies "consume the leader queue
iff leading" after every broker reconnect, so reconnects never touch
leadership.  Warm shutdown keeps the lease until the pool has drained
(``worker_shutdown``), then releases it.
"""

from __future__ import annotations

# Imported before any pool child forks: the first DNS lookup imports it under
# the import lock, and a child forked while an elector thread holds that lock
# would hang forever on its own first connection.
import encodings.idna  # noqa: F401
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from celery import bootsteps
from kombu.transport import redis as kombu_redis

from . import signals
from .election.config import ConfigurationError, LeaderCallbacks
from .election.elections import ROLE_WORKERS, mark_role
from .election.elector import LeaderElector
from .election.healthz import HealthzAdaptor, HealthzServer
from .election.redact import secret_safe_logger
from .election.redislock import RedisLock
from .election.running import (
    LeadershipHook,
    run_elector,
    run_while_leading,
    start_elector_thread,
)
from .leaderqueue import DEFAULT_PREFETCH, FinishRun, LeaderQueue
from .schedule.publish import same_redis
from .schedule.runner import ScheduleRunner
from .schedule.store import ScheduleStore
from .schedule.tickstart import TickStartClaim, guard_tick_starts
from .settings import (
    LeaderSettings,
    _bool,
    _name,
    _optional_port,
    exit_on_configuration_error,
    read_settings,
)
from .sources import entry_source
from .state import LEADER_ONLY_TASKS, shared_leadership
from .status import ReplicaRegistry, StatusSource, serve_status
from .taskruns import done_ttl_ms
from .taskstats import TaskStats
from .tlscheck import check_credentials, check_tls

__all__ = ["LeaderController", "LeaderQueueStep", "LeaderWorkerStep", "LeadershipHook",
           "controller_for_worker", "current_controller", "on_worker_shutdown", "run_elector"]

log = secret_safe_logger(__name__)

REFUSED_POOLS = ("gevent", "eventlet")

_controller: LeaderController | None = None


def current_controller() -> LeaderController | None:
    """The worker's controller; inherited by prefork children."""
    return _controller


class LeaderController:
    """Translates elector transitions into signals, events and queue changes."""

    def __init__(self, app: Any, settings: LeaderSettings, hostname: str | None = None) -> None:
        self.app = app
        self.settings = settings
        self.identity = settings.default_identity(hostname)
        self.shared = shared_leadership()  # before the pool forks
        self.lock: RedisLock = settings.lock(self.identity)
        self.healthz = HealthzAdaptor.for_lease(settings.lease_duration)
        self.elector: LeaderElector = settings.elector(
            self.lock,
            LeaderCallbacks(on_started_leading=self._on_started,
                            on_stopped_leading=self._on_stopped,
                            on_new_leader=self._on_new_leader),
            watchdog=self.healthz)
        self.elector.add_lease_listener(self.shared.write)
        # Run while leading, in the elector's work thread, until the event is
        # set; the lease is released only after they return (the scheduler).
        self.leadership_hooks: list[LeadershipHook] = []
        self.scheduler: ScheduleRunner | None = None
        if settings.beat:
            # Validates beat_schedule now: a bad entry stops the worker at start.
            self.scheduler = ScheduleRunner(app, self.lock, settings,
                                            still_leading=self.elector.is_leader,
                                            per_entry_metrics=settings.metrics_per_entry,
                                            source=entry_source(app, settings, self.lock))
            self.leadership_hooks.append(self.scheduler.run)
        # Leader-only messages: taken under the term and never lost in flight
        # (leaderqueue.py) when the broker is the lease's Redis, else through kombu.
        self.finish_run = FinishRun(self.lock)
        self.done_ttl_ms = done_ttl_ms(settings.transport_options)
        self.leader_queue = LeaderQueue(self.lock, settings.queue,
                                        keeps_record=LEADER_ONLY_TASKS.__contains__,
                                        deliver=self._call_in_loop, handler=self._task_handler,
                                        capacity=self._prefetch_limit,
                                        refused=self._use_kombu_for_leader_queue)
        self._reliable_queue: bool | None = None  # decided at the first leadership
        if settings.tick_run_once:
            # Every task of the app: a tick's copies run once, whichever queue it is on.
            guard_tick_starts(app.tasks, TickStartClaim(lambda: self.lock.client,
                                                        wait_replicas=self.lock.wait_replicas,
                                                        wait_timeout=self.lock.wait_timeout))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # /metrics, /status and / on the health port (status.py); the task counters
        # are shared with the pool's children, so made before it forks.
        self.task_stats = TaskStats(per_task=settings.metrics_per_task)
        self.replicas = ReplicaRegistry(self.lock, self.identity,
                                        interval=max(settings.retry_period,
                                                     settings.lease_duration / 3))
        # Every worker's page shows the schedule as Redis holds it, whoever dispatches.
        store = (self.scheduler.store if self.scheduler is not None
                 else ScheduleStore(app, self.lock, entries_name=settings.name))
        self.status_source = StatusSource(settings.name, self.identity, self.elector,
                                          self.replicas, store, self.scheduler, self.task_stats)
        self._transition = threading.Lock()
        self._started_term = 0
        self._accepting = True  # false once warm shutdown began
        self.hub: Any = None
        self.consumer: Any = None
        self.worker: Any = None
        self.http: HealthzServer | None = None
        self._unsent_event: tuple[str, dict[str, Any]] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, worker: Any = None) -> None:
        global _controller
        _controller = self
        self.worker = worker
        self.hub = getattr(worker, "hub", None)
        port, host = self.settings.healthz_port, self.settings.healthz_host
        if port is not None:  # before the elector starts: a bad port, and it never leads
            self.http = serve_status(self.healthz, self.status_source, port, host,
                                     self.settings.healthz_token,
                                     routes={"/leader": self.status_route})
        self._thread = start_elector_thread(self.elector, self._stop)
        threading.Thread(target=self.replicas.run, name="celery-leader-replicas", daemon=True,
                         args=(self._stop, lambda: (self.elector.is_leader(),
                                                    self.elector.term))).start()

    def begin_warm_shutdown(self) -> None:
        """Stop taking new leader work; keep the lease while the pool drains.
        A follower stops contending now: a worker on its way out must not lead."""
        self._accepting = False
        if not self.elector.is_leader():
            self.elector.stop()
        self._reconcile_queue()

    def shutdown(self, release: bool = True) -> None:
        """Stop the elector; with ``release`` hand the lease over now, else let it expire."""
        self._accepting = False
        if not release:
            self.elector.config.release_on_cancel = False
        self.elector.stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.settings.renew_deadline + 2 * self.settings.retry_period)
        if self.http is not None:
            self.http.close()
            self.http = None

    def status_route(self) -> tuple[int, Any]:
        return 200, self.status()

    def status(self) -> dict[str, Any]:
        record = self.elector.observed_record()
        return {
            "name": self.settings.name,
            "identity": self.identity,
            "is_leader": self.elector.is_leader(),
            "term": self.elector.term,
            "leader": self.elector.get_leader() or None,
            "leader_term": record.term if record else None,
        }

    # ------------------------------------------------------------ elector callbacks

    def _on_started(self, stop: threading.Event) -> None:
        term = self.elector.term
        with self._transition:
            if not term or stop.is_set():
                return  # ended before it began: neither signal is sent
            self._started_term = term
            self._send(signals.started_leading, "leader-started", identity=self.identity,
                       term=term)
        hooks = list(self.leadership_hooks)
        if self._uses_reliable_queue():
            hooks.append(self.leader_queue.run)
        self._reconcile_queue()
        scheduler = self.scheduler
        # The scheduler sleeps until its next tick otherwise.
        run_while_leading(hooks, term, stop, self.settings.renew_deadline,
                          on_stop=scheduler.wake if scheduler is not None else lambda: None)

    def _on_stopped(self) -> None:
        with self._transition:
            term, self._started_term = self._started_term, 0
            if term:
                self._send(signals.stopped_leading, "leader-stopped", identity=self.identity,
                           term=term, reason=self.elector.last_stop_reason)
        self._reconcile_queue()

    def _on_new_leader(self, identity: str) -> None:
        record = self.elector.observed_record()
        term = record.term if record else 0
        self._send(signals.new_leader, "leader-elected", identity=identity, term=term)

    def _send(self, signal: Any, event_type: str, **fields: Any) -> None:
        signal.send(sender=self.app, **fields)
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        if dispatcher is None:
            # The first election usually ends before the consumer exists: keep
            # the latest transition and send it once the consumer attaches.
            self._unsent_event = (event_type, fields)
        elif getattr(dispatcher, "enabled", False) and self.hub:
            self.hub.call_soon(lambda: self._send_event(dispatcher, event_type, fields))

    def _send_event(self, dispatcher: Any, event_type: str, fields: dict[str, Any]) -> None:
        try:
            dispatcher.send(event_type, name=self.settings.name, **fields)
        except Exception:
            log.exception("celery-leader: could not send the %s event", event_type)

    # ------------------------------------------------------------ leader queue

    def attach_consumer(self, consumer: Any) -> None:
        """Called in the consumer thread after every (re)connect."""
        self.consumer = consumer
        unsent, self._unsent_event = self._unsent_event, None
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if unsent is not None and dispatcher is not None and getattr(dispatcher, "enabled", False):
            self._send_event(dispatcher, *unsent)
        self._apply_queue_state()

    def detach_consumer(self) -> None:
        self.consumer = None
        # Celery forgets what it reserved and had not started: queue it again.
        self.leader_queue.give_back_unstarted()

    def _use_kombu_for_leader_queue(self) -> None:
        self._reliable_queue = False
        self._reconcile_queue()

    def _call_in_loop(self, callback: Callable[[], None]) -> None:
        self.hub.call_soon(callback)

    def _task_handler(self) -> Any:
        task_consumer = getattr(self.consumer, "task_consumer", None)
        return getattr(task_consumer, "on_message", None)

    def _prefetch_limit(self) -> int:
        return int(getattr(self.consumer, "initial_prefetch_count", 0) or DEFAULT_PREFETCH)

    def _uses_reliable_queue(self) -> bool:
        """Whether the leader queue is taken by leaderqueue.py (decided once)."""
        if self._reliable_queue is None:
            try:
                self._reliable_queue = self._find_leader_queue_lists()
            except Exception as exc:  # the broker is down: kombu's path this time
                log.warning("celery-leader: cannot inspect the broker for the leader queue "
                            "(%s); consuming it through kombu for this leadership", exc)
                return False
        return self._reliable_queue

    def _find_leader_queue_lists(self) -> bool:
        queue = self.settings.queue
        with self.app.connection_for_read() as connection:
            if not isinstance(connection.transport, kombu_redis.Transport):
                log.warning("celery-leader: the broker is not Redis; leader queue %r is "
                            "consumed through kombu (no in-flight recovery)", queue)
                return False
            channel = connection.default_channel
            if self.hub is None or not same_redis(self.lock.client, channel.client):
                log.warning("celery-leader: leader_redis_url is not the broker's Redis server "
                            "and database; leader queue %r is consumed through kombu, and a "
                            "message sent as a leader dies can be lost (celery/kombu#305)",
                            queue)
                return False
            prefix = getattr(channel, "global_keyprefix", "") or ""
            lists: list[str] = []
            for priority in channel.priority_steps:
                key = prefix + channel._q_for_pri(queue, priority)
                if key not in lists:
                    lists.append(key)
        self.leader_queue.use_lists(lists)
        return True

    def _reconcile_queue(self) -> None:
        if self.hub is not None:
            self.hub.call_soon(self._apply_queue_state)
        elif self.consumer is not None:  # no event loop: best effort from this thread
            self._apply_queue_state()

    def _apply_queue_state(self) -> None:
        consumer = self.consumer
        task_consumer = getattr(consumer, "task_consumer", None)
        if consumer is None or task_consumer is None:
            return
        queue = self.settings.queue
        # INVARIANT: with the reliable leader queue, kombu never pops from it.
        want = self._accepting and self.shared.is_leader() and not self._reliable_queue
        consuming = task_consumer.consuming_from(queue)
        try:
            if want and not consuming:
                consumer.add_task_queue(queue, exchange=queue, exchange_type="direct",
                                        routing_key=queue)
            elif not want and consuming:
                consumer.cancel_task_queue(queue)
        except Exception:
            log.exception("celery-leader: could not %s queue %s",
                          "start consuming" if want else "cancel", queue)


def controller_for_worker(worker: Any, options: dict[str, Any]) -> LeaderController:
    """Build the worker's controller, or stop the worker with one clear line."""
    app = worker.app
    with exit_on_configuration_error():
        pool = getattr(worker, "pool_cls", None)
        pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        if any(refused in str(pool_name) for refused in REFUSED_POOLS):
            raise ConfigurationError(
                f"worker pool {pool_name!r} is not supported by celery-leader; use prefork, "
                "threads or solo"
            )
        settings = _with_cli_overrides(read_settings(app), options)
        if options.get("beat") and settings.beat:
            # INVARIANT: never two dispatchers: -B's stock beat would send every
            # entry from every replica beside the leader's.
            raise ConfigurationError(
                "celery worker -B starts Celery's own beat beside celery-leader's dispatcher "
                "(leader_beat is on), so every entry would be sent twice or more: drop -B "
                "(the leader already sends beat_schedule), or set leader_beat = False")
        if options.get("beat") and not settings.beat and not _leader_scheduler(
                getattr(worker, "scheduler", None)):
            log.warning("celery-leader: celery worker -B runs Celery's own beat in this worker "
                        "(leader_beat is off): every replica started with -B sends every "
                        "entry; add --scheduler leader so that only the leading one sends")
        check_tls(app, settings)  # a certificate problem: one line now, not retries forever
        controller = LeaderController(app, settings, hostname=worker.hostname)
        check_credentials(app, settings, controller.lock)  # one line now, not retries forever
    lock = controller.lock
    # Each new leader labels the election for `celery leader status --all`.
    controller.leadership_hooks.append(lambda term, stop: mark_role(lock, ROLE_WORKERS))
    return controller


def _leader_scheduler(scheduler: Any) -> bool:
    """Whether -B's scheduler is celery-leader's (by name: the beat module is not
    imported here)."""
    if isinstance(scheduler, str):
        return scheduler in ("leader", "celery_leader.beat:LeaderScheduler",
                             "celery_leader.beat.LeaderScheduler")
    return any(klass.__name__ == "LeaderScheduler" and klass.__module__ == "celery_leader.beat"
               for klass in getattr(scheduler, "__mro__", ()))


def _with_cli_overrides(settings: LeaderSettings, options: dict[str, Any]) -> LeaderSettings:
    """Worker flags override settings; they get the same checks as the settings, so
    a bad flag is a ConfigurationError naming it, not a traceback from deeper in."""
    overrides: dict[str, Any] = {}
    if options.get("leader_name"):
        overrides["name"] = _name("--leader-name", options["leader_name"])
    if options.get("leader_identity"):
        overrides["identity"] = _name("--leader-identity", options["leader_identity"])
    if options.get("leader_healthz_port") is not None:
        overrides["healthz_port"] = _optional_port("--leader-healthz-port",
                                                   options["leader_healthz_port"])
    if options.get("leader_beat") is not None:
        overrides["beat"] = _bool("--leader-beat", options["leader_beat"])
    return replace(settings, **overrides) if overrides else settings


class LeaderWorkerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Runs the elector in the worker's main process."""

    label = "celery-leader"
    conditional = False
    # Start the elector's threads only once the prefork pool has forked its
    # children.  A child forked while one of those threads holds a lock inherits
    # it held forever: e.g. the first Redis connect's getaddrinfo imports
    # encodings.idna under the import lock, and the child then hangs on its own
    # first connection (seen as leader-only tasks that never finish).
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        global _controller
        self.controller = controller_for_worker(worker, kwargs)
        worker.celery_leader = self.controller
        # Before the pool forks (start() now runs after it): children need it to
        # fence leader-only task runs.
        _controller = self.controller
        super().__init__(worker, **kwargs)

    def start(self, worker: Any) -> None:
        with exit_on_configuration_error():
            self.controller.start(worker)

    def stop(self, worker: Any) -> None:
        self.controller.begin_warm_shutdown()

    def terminate(self, worker: Any) -> None:
        self.controller.shutdown(release=False)


class LeaderQueueStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: re-applies leader-queue consumption after each (re)connect."""

    label = "celery-leader-queue"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        controller = getattr(consumer.controller, "celery_leader", None)
        if controller is not None:
            controller.attach_consumer(consumer)

    def stop(self, consumer: Any) -> None:
        controller = getattr(consumer.controller, "celery_leader", None)
        if controller is not None:
            controller.detach_consumer()

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)


def on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    """Sent after the pool drained: leader work in flight has finished, so the
    lease can be handed over now."""
    controller = getattr(sender, "celery_leader", None)
    if controller is not None:
        controller.shutdown(release=controller.settings.release_on_cancel)
