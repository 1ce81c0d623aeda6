"""The schedule layer: beat_schedule and runtime entries, dispatched by whoever
leads, every tick claimed under the leader's term.

- ``cronexpr``: ``cron``, a cron expression schedule with exact fire times;
- ``entries``: entries, validated, and their exact next fire times;
- ``options``: ``ScheduleOptions``, what the runner is told;
- ``store``: ``ScheduleStore``, the entries and progress in Redis;
- ``runner``: ``ScheduleRunner``, the leader's dispatch loop and its scripts;
- ``publish``: a tick published in the same step as its claim is cleared;
- ``tickstart``: a tick is done when its task starts (lost ticks sent again).

It builds on the election layer (``RedisLock``, fenced scripts) and on a
Celery app object it is handed (Celery's schedule types, ``send_task``, kombu's
Redis transport for the fenced publish); it never imports the Celery glue
(``celery_leader.settings``, ``.worker``, ``.beat``...) nor reads ``leader_*``
settings.  tests/test_layers.py checks it.
"""
