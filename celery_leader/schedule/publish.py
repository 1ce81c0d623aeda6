"""Publishing a tick in the same atomic step as clearing its claim.

When the broker is the very Redis (server and database) that holds the
lease, the scheduler does not let kombu write the message: it lets Celery and
kombu build it as usual, takes the ``LPUSH`` that kombu's Redis transport
would run, and runs it inside the fenced script that also deletes the tick's
pending copy.  A leader then either published and cleared, or did neither, so
a successor never re-sends a tick that was sent (and a deposed leader never
sends one at all).  Any other broker falls back to publish-then-clear.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..election.redact import secret_safe_logger

# Logger names are part of the interface (users configure them): the old module's.
log = secret_safe_logger("celery_leader.publish")

# What identifies "the same Redis": a script only sees one server and database.
# (An ACL user that may not push to the queue is found at the first push.)
_SAME_SERVER_FIELDS = ("host", "port", "path", "db")


class Unsupported(Exception):
    """This publish cannot be captured (fanout exchange, expiring queue...)."""


def _server_of(client: Any) -> tuple[Any, ...] | None:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict) or not (kwargs.get("host") or kwargs.get("path")):
        return None  # a cluster or Sentinel client: no single known server
    return tuple(kwargs.get(field) for field in _SAME_SERVER_FIELDS)


def same_redis(lease_client: Any, broker_client: Any) -> bool:
    lease, broker = _server_of(lease_client), _server_of(broker_client)
    return lease is not None and lease == broker


def capture_redis_publish(app: Any, lease_client: Any, send: Callable[[Any], None],
                          check_transport: bool = True,
                          broker_keys: dict[str, str] | None = None,
                          ) -> list[tuple[str, str]] | None:
    """Run ``send(producer)`` with kombu's Redis ``_put`` replaced by a recorder.

    Returns the (list key, payload) pairs kombu would have pushed, or None when
    the broker is not ``lease_client``'s Redis (nothing was sent then).  Raises
    :class:`Unsupported` for a publish it cannot capture (nothing was sent).
    ``check_transport=False`` skips the look at the broker's transport (about
    150 µs) once an earlier call found it to be Redis.  ``broker_keys`` gets
    ``"unacked"``: the key of kombu's hash of delivered, unacknowledged messages.
    """
    from kombu.transport import redis as kombu_redis
    from kombu.utils import json as kombu_json

    dumps: Callable[[Any], str] = kombu_json.dumps  # what kombu's Redis ``_put`` uses
    if check_transport:  # before a producer connects to a broker that may not be Redis
        with app.connection_for_write() as connection:  # not connected: only its transport
            if not isinstance(connection.transport, kombu_redis.Transport):
                return None
    with app.producer_or_acquire() as producer:
        channel: Any = producer.channel
        redis_transport = isinstance(channel, kombu_redis.Channel)  # not narrowing ``channel``
        if not redis_transport or not same_redis(lease_client, channel.client):
            return None
        prefix = getattr(channel, "global_keyprefix", "") or ""
        if broker_keys is not None:
            broker_keys["unacked"] = prefix + str(getattr(channel, "unacked_key", "unacked"))
        expiring = getattr(channel, "_expires", None) or {}
        captured: list[tuple[str, str]] = []

        def put(queue: str, message: dict[str, Any], **kwargs: Any) -> None:
            if queue in expiring or kwargs.get("_publish_batch") is not None:
                raise Unsupported(f"queue {queue!r} expires or is batched")
            priority = channel._get_message_priority(message, reverse=False)
            captured.append((prefix + channel._q_for_pri(queue, priority),
                             dumps(message)))

        def put_fanout(*args: Any, **kwargs: Any) -> None:
            raise Unsupported("fanout exchange")

        # Instance attributes shadow the methods for this channel only; the
        # producer is ours alone until the block ends.
        channel._put, channel._put_fanout = put, put_fanout
        try:
            send(producer)
        finally:
            del channel._put, channel._put_fanout
        return captured
