"""Tasks of the example project: periodic ones (see ``beat_schedule`` in
celeryconfig) and a ``@leader_only`` maintenance task."""

import logging
import socket

import celery_leader
from celery_leader import leader_only

from . import audit
from .app import app

log = logging.getLogger(__name__)

# The store itself rejects a write from an older term than the last one it
# accepted: the fencing token at work (a SQL database would do the same with
# ``UPDATE ... WHERE fencing_term <= :term``).
FENCED_WRITE_LUA = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'term') or '0')
if stored > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'term', ARGV[1], 'worker', ARGV[2], 'purged', ARGV[3])
return 1
"""


def _redis_url():
    return str(app.conf.broker_url)


def _name():
    return str(app.conf.get("leader_name"))


@app.task(bind=True)
def heartbeat(self):
    """Sent every second by the leader, with two headers the scheduler adds:
    ``leader_fire_time`` (the tick, ISO 8601 UTC) and ``leader_term`` (the
    fencing term of the leader that sent it)."""
    fire_time = getattr(self.request, "leader_fire_time", None)
    if fire_time is None:
        return  # called by hand, not by the schedule
    audit.record_heartbeat(_redis_url(), _name(), fire_time, self.request.leader_term,
                           worker=self.request.hostname or socket.gethostname())


@app.task
def send_daily_report():
    log.info("daily report sent")


@app.task
def send_weekly_digest():
    log.info("weekly digest sent")


@app.task
def refresh_exchange_rates(base, quote):
    log.info("refreshed %s/%s", base, quote)


@leader_only
@app.task(bind=True, acks_late=True)
def purge_expired_sessions(self):
    """Runs only on the leader, whoever sends it; on a follower the message
    goes back to the leader queue."""
    term = celery_leader.current_term()  # the fencing term this worker leads under
    purged = 0  # a real app would delete expired rows here
    store = audit.client(_redis_url())
    accepted = store.eval(FENCED_WRITE_LUA, 1, audit.key(_name(), "maintenance"),
                          term, self.request.hostname or socket.gethostname(), purged)
    if not accepted:
        log.warning("a newer leader already wrote; this result (term %d) is dropped", term)
