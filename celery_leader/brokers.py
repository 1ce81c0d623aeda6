"""What this worker's broker lets celery-leader promise, said at worker start.

The guarantees differ by broker (README, "Guarantees and their limits"): on the
lease's own Redis the leader queue is taken under the term with in-flight
records (leaderqueue.py) and ticks are pushed by the script that clears their
claim; on any other broker the leader queue is consumed through kombu and ticks
are published after their claim.  A worker says which column it is in, once,
at start, before it ever leads: the place an operator looks.

Where the leader queue goes through kombu there is no in-flight record, so a
leader-only task that acknowledges early (Celery's default) is gone from the
broker once accepted, and a leader that dies mid-body loses it.  There,
leader-only tasks are made to acknowledge late with reject-on-worker-lost: the
message stays unacknowledged until its body ends, so the broker hands a dead
leader's messages (running or merely prefetched) to the next consumer of the
leader queue, which is the next leader, and the per-task-id ``done`` claim
(taskruns.py) refuses a copy of a run that finished.  That is the same rule as
on the lease's Redis: at least once for in-flight work, never on a follower,
never again once finished.  It is chosen over recording kombu-consumed
messages in the lease's Redis because the broker already keeps exactly this
record (an unacknowledged delivery) on every transport kombu supports, and
redelivers it when the consumer's connection dies, with no extra round trip
per message and no second copy to keep consistent with the broker's.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

from .election.redact import secret_safe_logger
from .schedule.publish import same_redis
from .settings import LeaderSettings
from .state import LEADER_ONLY_TASKS

__all__ = ["OTHER_KOMBU", "RABBITMQ", "REDIS_ELSEWHERE", "REDIS_ON_LEASE", "broker_column",
           "broker_guarantees", "declare", "force_late_ack"]

log = secret_safe_logger(__name__)

REDIS_ON_LEASE = "Redis broker on the lease's Redis"
REDIS_ELSEWHERE = "Redis broker elsewhere"
RABBITMQ = "RabbitMQ"
OTHER_KOMBU = "other kombu transport"
INSPECT_TIMEOUT = 5.0
"""Seconds the start-up look at a Redis broker may take (the broker may be down)."""


def broker_column(app: Any, lease_client: Any, use_eventloop: bool) -> tuple[str, str, str]:
    """(column, transport name, note) of the guarantees table for ``app``'s broker.

    A Redis broker counts as the lease's only when it is the same server and
    database and the worker runs an event loop (what the reliable leader queue
    needs, worker.py); one that cannot be inspected now counts as elsewhere, the
    column that promises less, and ``note`` says why."""
    with app.connection_for_read() as connection:
        transport = connection.transport  # not connected yet: only its class
        name = str(getattr(transport, "driver_name", "") or connection.transport_cls)
        if isinstance(transport, kombu_redis.Transport):
            if not use_eventloop:
                return REDIS_ELSEWHERE, name, ""
            try:
                connection.ensure_connection(max_retries=1, timeout=INSPECT_TIMEOUT)
                same = same_redis(lease_client, connection.default_channel.client)
            except Exception as exc:
                return REDIS_ELSEWHERE, name, (
                    f"celery-leader: cannot inspect the Redis broker at start ({exc}); "
                    "assuming it is not the lease's Redis")
            return (REDIS_ON_LEASE if same else REDIS_ELSEWHERE), name, ""
        if getattr(transport, "driver_type", "") == "amqp":
            return RABBITMQ, name, ""
        return OTHER_KOMBU, name, ""


def force_late_ack(app: Any) -> list[str]:
    """Make every leader-only task of ``app`` acknowledge late and requeue on a
    lost pool child; returns the names of those that did not already.  Must run
    before the worker's consumer builds its task strategies (Celery reads
    ``acks_late`` there) and before the pool forks (children read it too)."""
    changed = []
    for name, task in sorted(app.tasks.items()):
        if name not in LEADER_ONLY_TASKS:
            continue
        if not (task.acks_late and task.reject_on_worker_lost):
            changed.append(name)
        # INVARIANT: through kombu, a leader-only message stays unacknowledged
        # until its body ended, so a dead leader's in-flight work is redelivered.
        task.acks_late = True
        task.reject_on_worker_lost = True
    return changed


def broker_guarantees(app: Any, settings: LeaderSettings, lease_client: Any,
                      use_eventloop: bool) -> tuple[str, list[str]]:
    """Find this worker's column and force late ack for leader-only tasks where the
    leader queue goes through kombu (now: before the pool forks and the consumer
    starts).  Returns the column and the lines that say what it means, logged by
    :func:`declare` once the worker's own set-up succeeded (a worker stopped by a
    configuration error prints that one line only)."""
    column, transport, note = broker_column(app, lease_client, use_eventloop)
    queue, beat = settings.queue, settings.beat
    runs = ("run once by their start token" if settings.tick_run_once
            else "not guarded when they run (leader_tick_run_once is off)")
    prefix = f"celery-leader: guarantees column {column!r}"
    if column == REDIS_ON_LEASE:
        lines = [f"{prefix}: leader queue {queue!r} taken under the term with in-flight "
                 "records in Redis (a dead leader's messages run under the next term, "
                 "whatever the task's ack setting)"]
        if beat:
            lines.append(f"{prefix}: ticks are pushed by the script that clears their claim "
                         f"(sent once), and {runs}")
        return column, lines
    forced = force_late_ack(app)
    lines = [note] if note else []
    if column == RABBITMQ:
        redelivery = ("the broker redelivers a dead leader's unacknowledged messages to the "
                      "next leader as soon as its connection closes; a body running longer "
                      "than RabbitMQ's consumer_timeout (30 min by default) makes the broker "
                      "close the channel and this worker shut down once the body ends: set "
                      "consumer_timeout above the longest leader-only body")
    elif column == REDIS_ELSEWHERE:
        redelivery = ("kombu redelivers a dead leader's unacknowledged messages after the "
                      "broker's visibility_timeout; a message sent as a leader dies can still "
                      "be lost (celery/kombu#305)")
    else:
        redelivery = (f"in-flight work comes back when the {transport!r} transport "
                      "redelivers an unacknowledged message")
    lines.append(f"{prefix} (transport {transport!r}): leader queue {queue!r} is consumed "
                 "through kombu; leader-only tasks acknowledge late with "
                 f"reject-on-worker-lost (made so here: {', '.join(forced) or 'none needed it'}"
                 f"); {redelivery}")
    if beat:
        lines.append(f"{prefix}: ticks are published after their claim (a leader frozen "
                     f"mid-publish can send one twice: same task id) and {runs}")
    return column, lines


def declare(lines: list[str]) -> None:
    """Log the guarantees lines (WARNING: seen at Celery's default log level)."""
    for line in lines:
        log.warning("%s", line)
