"""Broker messages of an entry's ticks, built from a per-entry template.

Problem.  Building a tick's message through ``app.send_task`` and kombu's
``Producer.publish`` costs about a millisecond (routing, serialisation,
``maybe_declare`` of the queue for every tick): a herd of 10,000 ticks due at
the top of the hour spends seconds there.

Mechanism.  Once per entry (and per dispatching thread: Celery's ``reply_to``
is a per-thread id), the runner lets Celery and kombu build the entry's message
for real, with *sentinels* in the places that change from tick to tick: the
task id, the fire time, the term, the tick's name, kombu's delivery tag, and,
for ``expires``/``countdown`` given in seconds, the send time.  kombu's Redis
``_put`` is recorded, not run (publish.py's recorder), so nothing is sent; the
queue is declared then, once.  The recorded ``(list key, JSON payload)`` is cut
at the sentinels into constant pieces; a tick's message is those pieces joined
with the tick's values, JSON-escaped as kombu's encoder escapes them.  The body
(args, kwargs; base64) holds no per-tick value, so it is part of a piece.

Entries alike (the same task and options: thousands of per-customer reports)
share one template, built once: its body (base64 of ``[args, kwargs, embed]``)
and ``argsrepr``/``kwargsrepr`` headers are holes too, filled per entry by
:class:`EntryParts` with the serializer's own functions.  They are filled
only if, for the entry the template was built from, they reproduce kombu's
bytes exactly (json serializer, no compression); otherwise the template is
that entry's own.

Result: byte for byte what ``send_task`` produces for that tick (tests compare
with kombu's own output), in a few microseconds.  What a template cannot
reproduce (a fanout exchange, several bound queues, an absolute ``expires``
whose ``expiration`` property counts down from the send time, a non-Redis
transport) raises :class:`NoTemplate`, and those entries keep the per-tick
``send_task`` path.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.utils.saferepr import saferepr
from celery.utils.time import is_naive, maybe_make_aware
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json

from .publish import same_redis

UTC = timezone.utc
# A send instant no real tick uses, with microseconds distinctive enough that
# its derived ISO strings cannot occur by accident in an entry's own data.
_FROZEN_NOW = datetime(2001, 2, 3, 4, 5, 6, 918273, tzinfo=UTC)


class NoTemplate(Exception):
    """The entry's message cannot be built from a template; send it per tick."""


@dataclass(frozen=True)
class Rendered:
    """One tick's message: where kombu would push it, and its delivery tag."""

    key: str
    payload: str
    delivery_tag: str


@dataclass(frozen=True)
class TickValues:
    task_id: str
    fire_time: str  # the leader_fire_time header (ISO 8601)
    term: int
    tick: str


@dataclass(frozen=True)
class EntryParts:
    """How an entry fills a shared template's body, argsrepr and kwargsrepr:
    Celery's and kombu's own formulas (``as_task_v2``, kombu's JSON, the Redis
    channel's base64), checked against kombu's output when the template is built."""

    embed: Any  # the body's third element: callbacks, errbacks, chain, chord
    argsrepr_maxsize: int
    kwargsrepr_maxsize: int
    maxlevels: int

    def fill(self, args: list[Any] | tuple[Any, ...],
             kwargs: dict[str, Any]) -> dict[str, str]:
        dumps: Callable[[Any], str] = kombu_json.dumps
        args, kwargs = args or (), kwargs or {}  # as as_task_v2 does
        body = base64.b64encode(dumps((args, kwargs, self.embed)).encode("utf-8"))
        return {"body": '"body": "' + body.decode("ascii") + '"',
                "argsrepr": '"argsrepr": ' + dumps(
                    saferepr(args, self.argsrepr_maxsize, maxlevels=self.maxlevels)),
                "kwargsrepr": '"kwargsrepr": ' + dumps(
                    saferepr(kwargs, self.kwargsrepr_maxsize, maxlevels=self.maxlevels))}


class MessageTemplate:
    """An entry's message with holes for a tick's values (see module docstring);
    a shared one (``entry_parts`` set) also has holes for an entry's parts."""

    entry_parts: EntryParts | None = None

    def __init__(self, key: str, pieces: list[str], slots: list[str],
                 offsets: dict[str, float], escape: Callable[[str], str],
                 broker_client: Any, same_server: bool, unacked_key: str,
                 keep_pieces: bool = True) -> None:
        self.key = key  # the broker list (priority suffix and global_keyprefix included)
        # Kept for for_entry (a shared template); an entry's own needs only the format.
        self._pieces = pieces if keep_pieces else []
        self._slots = slots if keep_pieces else []
        # The pieces as one %-format with a named field per slot (a slot may
        # occur twice: the task id is also the correlation id): filled in one call.
        self._format = "".join(
            piece.replace("%", "%%") + (f"%({slots[index]})s" if index < len(slots) else "")
            for index, piece in enumerate(pieces))
        self._offsets = offsets  # slot -> seconds after the send time (expires, eta)
        self._escape = escape
        self.broker_client = broker_client
        self.same_server = same_server  # the broker list is on the lease's Redis and db
        self.unacked_key = unacked_key

    def render(self, values: TickValues, now: datetime | None = None,
               delivery_tag: str | None = None) -> Rendered:
        """The tick's message; ``now`` is the send time (Celery's ``app.now()``),
        needed only by templates with ``expires``/``countdown`` in seconds."""
        tag = delivery_tag or str(uuid.uuid4())
        return Rendered(self.key, self.fill(
            values.task_id, self._escape(values.fire_time), str(int(values.term)),
            self._escape(values.tick), tag, now), tag)

    def fill(self, task_id: str, fire_time: str, term: str, tick: str, tag: str,
             now: datetime | None = None) -> str:
        """The payload of :meth:`render` from values ready to insert: the fire time
        and the tick's name JSON-escaped (:meth:`escape`), the term as text (a
        herd renders thousands of ticks sharing a few fire times)."""
        filled = {"id": task_id, "fire": fire_time, "term": term, "tick": tick, "tag": tag}
        for slot, seconds in self._offsets.items():
            if now is None:
                raise ValueError("this template needs the send time (now)")
            filled[slot] = _seconds_after(now, seconds)
        return self._format % filled

    def escape(self, text: str) -> str:
        """``text`` as it appears inside a JSON string of the message."""
        return self._escape(text)

    @property
    def needs_now(self) -> bool:
        return bool(self._offsets)

    def for_entry(self, args: list[Any], kwargs: dict[str, Any]) -> MessageTemplate:
        """A shared template with one entry's parts filled in: that entry's own."""
        if self.entry_parts is None:
            raise ValueError("not a shared template")
        filled = self.entry_parts.fill(args, kwargs)
        pieces = [self._pieces[0]]
        slots: list[str] = []
        for index, slot in enumerate(self._slots):
            if slot in filled:
                pieces[-1] += filled[slot] + self._pieces[index + 1]
            else:
                slots.append(slot)
                pieces.append(self._pieces[index + 1])
        return MessageTemplate(self.key, pieces, slots, self._offsets, self._escape,
                               self.broker_client, self.same_server, self.unacked_key,
                               keep_pieces=False)


# celery.utils.saferepr's default depth, what Celery used before task_repr_maxlevels.
SAFEREPR_MAXLEVELS = 3


def _seconds_after(now: datetime, seconds: float) -> str:
    # Celery's own formula (app/amqp.py, as_task_v2), so the strings match: the
    # seconds added in UTC, the same instant across a DST change. Written out (it is
    # celery.utils.time.add_seconds_to_datetime) as Celery 5.3 does not have it.
    delta = timedelta(seconds=seconds)
    later = now + delta if is_naive(now) else \
        (now.astimezone(timezone.utc) + delta).astimezone(now.tzinfo)
    return str(maybe_make_aware(later, tz=now.tzinfo).isoformat())


def build_template(app: Any, send: Callable[[Any, str, dict[str, Any]], None],
                   options: dict[str, Any], lease_client: Any,
                   shared: tuple[list[Any], dict[str, Any]] | None = None) -> MessageTemplate:
    """Let Celery and kombu build the entry's message once, with sentinels.

    With ``shared`` (the entry's args and kwargs, as ``send`` sends them) the
    template is made shareable (``entry_parts`` set) if the entry's parts are
    found in kombu's message exactly as :class:`EntryParts` writes them.

    ``send(producer, task_id, sentinel_headers)`` must call ``app.send_task``
    exactly as the tick's publish would, with ``task_id`` and with
    ``sentinel_headers`` (``leader_fire_time``, ``leader_term`` and, when ticks
    are tracked, the tick headers built from the tick name it is given through
    ``sentinel_headers["__tick__"]``) merged into the entry's headers.
    """
    for option in ("eta",):
        if option in options:
            raise NoTemplate(f"option {option!r} is absolute")
    expires = options.get("expires")
    if expires is not None and not isinstance(expires, (int, float)):
        raise NoTemplate("an absolute expires: its expiration property depends on the send time")
    marker = uuid.uuid4().hex
    sentinels = {
        "id": str(uuid.UUID(marker[::-1])),
        "fire": f"F{marker}F",
        "term": f"T{marker}T",
        "tick": f"K{marker}K",
        "tag": f"G{marker}G",
    }
    offsets: dict[str, float] = {}
    if isinstance(expires, (int, float)):
        offsets["expires"] = float(expires)
    countdown = options.get("countdown")
    if countdown:
        offsets["eta"] = float(countdown)
    dumps: Callable[[Any], str] = kombu_json.dumps

    def escape(text: str) -> str:
        return dumps(text)[1:-1]

    captured: list[tuple[str, str]] = []
    me = threading.get_ident()
    with app.producer_or_acquire() as producer:
        channel: Any = producer.channel
        redis_transport = isinstance(channel, kombu_redis.Channel)  # not narrowing ``channel``
        if not redis_transport:
            raise NoTemplate("the broker is not kombu's Redis transport")
        prefix = getattr(channel, "global_keyprefix", "") or ""
        expiring = getattr(channel, "_expires", None) or {}

        def put(queue: str, message: dict[str, Any], **kwargs: Any) -> None:
            if queue in expiring or kwargs.get("_publish_batch") is not None:
                raise NoTemplate(f"queue {queue!r} expires or is batched")
            priority = channel._get_message_priority(message, reverse=False)
            captured.append((prefix + channel._q_for_pri(queue, priority), dumps(message)))

        def put_fanout(*args: Any, **kwargs: Any) -> None:
            raise NoTemplate("fanout exchange")

        original_now = app.now

        def frozen_now() -> datetime:
            # Only this thread sees the frozen clock (a worker's tasks may call app.now).
            if threading.get_ident() == me:
                return _FROZEN_NOW.astimezone(app.timezone)
            return original_now()  # type: ignore[no-any-return]

        channel._put, channel._put_fanout = put, put_fanout
        channel._next_delivery_tag = lambda: sentinels["tag"]
        app.now = frozen_now
        try:
            send(producer, sentinels["id"],
                 {"leader_fire_time": sentinels["fire"], "leader_term": sentinels["term"],
                  "__tick__": sentinels["tick"]})
        finally:
            del channel._put, channel._put_fanout, channel._next_delivery_tag
            del app.now
        broker_client = channel.client
        same_server = same_redis(lease_client, broker_client)
        unacked = prefix + str(getattr(channel, "unacked_key", "unacked"))
    if len(captured) != 1:
        raise NoTemplate(f"the message goes to {len(captured)} queues, not one")
    key, payload = captured[0]
    frozen = _FROZEN_NOW.astimezone(app.timezone)
    tokens = {sentinels["id"]: "id", escape(sentinels["fire"]): "fire",
              dumps(sentinels["term"]): "term", sentinels["tick"]: "tick",
              sentinels["tag"]: "tag"}
    for slot, seconds in offsets.items():
        text = _seconds_after(frozen, seconds)
        if payload.count(text) != 1:
            raise NoTemplate(f"cannot find the {slot} time in the message")
        tokens[text] = slot
    parts = _entry_parts(app, payload, shared) if shared is not None else None
    if parts is not None and shared is not None:
        for slot, text in parts.fill(*shared).items():
            tokens[text] = slot
    pattern = re.compile("|".join(re.escape(token) for token in
                                  sorted(tokens, key=len, reverse=True)))
    pieces = pattern.split(payload)
    slots = [tokens[match] for match in pattern.findall(payload)]
    for required in ("id", "fire", "term", "tag"):
        if required not in slots:
            raise NoTemplate(f"the message does not carry the tick's {required}")
    template = MessageTemplate(key, pieces, slots, offsets, escape, broker_client, same_server,
                               unacked)
    template.entry_parts = parts
    return template


def _entry_parts(app: Any, payload: str,
                 shared: tuple[list[Any], dict[str, Any]]) -> EntryParts | None:
    """The EntryParts that reproduce this message's own parts exactly, once
    each; None when they do not (another serializer, compression, ...)."""
    try:
        body = json.loads(base64.b64decode(json.loads(payload)["body"]))
        embed = body[2]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    # Celery before 5.7 has no task_repr_maxlevels: its saferepr's default, 3, applies.
    parts = EntryParts(embed, int(app.amqp.argsrepr_maxsize), int(app.amqp.kwargsrepr_maxsize),
                       int(app.conf.get("task_repr_maxlevels", SAFEREPR_MAXLEVELS)))
    try:
        filled = parts.fill(*shared)
    except (TypeError, ValueError):
        return None
    if any(payload.count(text) != 1 for text in filled.values()):
        return None
    return parts
