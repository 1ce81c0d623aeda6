"""Leadership signal receivers: log every transition and keep an audit trail.

celery-leader sends these in the worker's main process; a receiver that
raises is logged by Celery and never disturbs the election.
"""

import logging

from celery_leader import signals

from . import audit
from .app import app

log = logging.getLogger("example_project.leadership")


def _record(kind, **fields):
    audit.record_event(str(app.conf.broker_url), str(app.conf.get("leader_name")),
                       kind, **fields)


@signals.started_leading.connect(sender=app)
def on_started_leading(sender, identity, term, **kwargs):
    log.info("%s started leading (term %d)", identity, term)
    _record("started_leading", identity=identity, term=term)


@signals.stopped_leading.connect(sender=app)
def on_stopped_leading(sender, identity, term, reason, **kwargs):
    log.info("%s stopped leading (term %d): %s", identity, term, reason)
    _record("stopped_leading", identity=identity, term=term, reason=reason)


@signals.new_leader.connect(sender=app)
def on_new_leader(sender, identity, term, **kwargs):
    log.info("the leader is now %s (term %d)", identity, term)
    _record("new_leader", identity=identity, term=term)
