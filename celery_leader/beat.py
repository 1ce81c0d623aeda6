"""Standalone mode: ``celery -A proj beat -S celery_leader.beat:LeaderScheduler``
(or ``-S leader``) on any number of replicas; followers idle.

Beat's service loop sleeps whatever ``tick()`` returns and cannot be woken, so
the dispatching happens in the elector's leadership thread (the same
ScheduleRunner the worker-embedded mode uses) and ``tick()`` only keeps the
process alive.

The beats elect among themselves as ``<leader_name>-beat`` (keys in the
schedule's hash slot) and share the schedule's progress and its dispatcher
claim with the worker-embedded mode: a beat leader dispatches only while the
schedule is not owned by a live worker leader with ``leader_beat = True``.

With ``leader_healthz_port`` set, each beat serves ``/healthz`` (a probe for
its pod), ``/metrics``, ``/status`` and the status page there, as a worker does
(status.py): its own election (``<leader_name>-beat``) and the schedule.

``celery_leader.is_leader()`` and ``current_term()`` answer for a worker's
election (the page its pool children share) and stay false/0 in a beat
process, leading or not; here ask ``scheduler.elector.is_leader()``.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from celery.beat import Scheduler

from .election.config import LeaderCallbacks
from .election.elections import ROLE_BEAT, StepDownListener, mark_role
from .election.elector import LeaderElector
from .election.healthz import HealthzAdaptor, HealthzServer
from .election.redact import secret_safe_logger
from .election.redislock import RedisLock
from .election.running import run_while_leading, start_elector_thread
from .schedule.runner import ScheduleRunner
from .settings import exit_on_configuration_error, read_settings
from .sources import entry_source
from .status import ReplicaRegistry, StatusSource, serve_status
from .tlscheck import check_credentials

log = secret_safe_logger(__name__)


SIGNAL_LATENCY = 1.0
"""Longest sleep of beat's main thread, so the longest wait for a SIGTERM's handler."""


class LeaderScheduler(Scheduler):  # type: ignore[misc]
    """A beat scheduler that dispatches only while its replica leads."""

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        with exit_on_configuration_error():  # one line naming the setting, as a worker does
            settings = read_settings(app)
            identity = settings.default_identity(f"beat@{socket.gethostname()}")
            self.leader_settings = settings
            self.lock: RedisLock = settings.beat_lock(identity)
            check_credentials(app, settings, self.lock)  # one line, not retries forever
            self.healthz = HealthzAdaptor.for_lease(settings.lease_duration)
            self.elector: LeaderElector = settings.elector(
                self.lock, LeaderCallbacks(on_started_leading=self._lead,
                                           on_stopped_leading=lambda: None),
                watchdog=self.healthz)
            self.runner = ScheduleRunner(app, self.lock, settings,
                                         still_leading=self.elector.is_leader,
                                         per_entry_metrics=settings.metrics_per_entry,
                                         source=entry_source(app, settings, self.lock))
        # The health port: the same endpoints as a worker's, for this election.
        self.replicas = ReplicaRegistry(self.lock, identity,
                                        interval=max(settings.retry_period,
                                                     settings.lease_duration / 3))
        self.status_source = StatusSource(self.lock.name, identity, self.elector,
                                          self.replicas, self.runner.store, self.runner, None)
        self.http: HealthzServer | None = None
        # No control consumer here: `celery leader step-down` reaches beat through Redis.
        self.step_down_listener = StepDownListener(self.elector, self.lock,
                                                   poll=settings.lease_duration)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(app, *args, **kwargs)

    def setup_schedule(self) -> None:
        # beat_schedule was validated by ScheduleRunner; the stock store is unused.
        settings = self.leader_settings
        if settings.healthz_port is not None:  # before the elector: a bad port, no lead
            with exit_on_configuration_error():
                self.http = serve_status(self.healthz, self.status_source,
                                         settings.healthz_port, settings.healthz_host,
                                         settings.healthz_token)
        self._thread = start_elector_thread(self.elector, self._stop)
        threading.Thread(target=self.replicas.run, name="celery-leader-replicas", daemon=True,
                         args=(self._stop, lambda: (self.elector.is_leader(),
                                                    self.elector.term))).start()
        self.step_down_listener.start()

    def _lead(self, stop: threading.Event) -> None:
        # The runner sleeps until its next tick otherwise: wake it on stop.
        run_while_leading([self.runner.run, self._mark_role], self.elector.term, stop,
                          self.leader_settings.renew_deadline, on_stop=self.runner.wake,
                          name="celery-leader-scheduler")

    def _mark_role(self, term: int, stop: threading.Event) -> None:
        mark_role(self.lock, ROLE_BEAT)  # for `celery leader status --all`

    def tick(self, *args: Any, **kwargs: Any) -> float:
        # Dispatch runs in the leadership thread; the main thread only sleeps.  A
        # SIGTERM the kernel hands to another of our threads (it does when the main
        # thread was just stopped, e.g. SIGCONT then SIGTERM) runs its handler only
        # when this sleep ends: keep it short, or a stop waits beat_max_loop_interval.
        return min(float(self.max_interval), SIGNAL_LATENCY)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.step_down_listener.stop()
        self.elector.stop()  # sets _stop: the replica heartbeat ends too
        if self._thread is not None:
            self._thread.join(self.leader_settings.renew_deadline
                              + 2 * self.leader_settings.retry_period)
        if self.http is not None:
            self.http.close()
            self.http = None

    @property
    def info(self) -> str:
        # The election this process really joins (<leader_name>-beat), not the workers'.
        return (f"celery-leader election {self.lock.name!r} (standalone beat) as "
                f"{self.lock.identity()}")
