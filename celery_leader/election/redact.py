"""Passwords masked wherever celery-leader prints or serves a Redis URL, client
options or an error text: the one helper every output goes through.

A Redis password in ``leader_redis_url`` must never reach stderr, a log
collector, the command line's output or an HTTP endpoint.  The forms masked:

- URL credentials: ``redis://:pw@h:6379/0`` -> ``redis://:***@h:6379/0``,
  ``redis://user:pw@h`` -> ``redis://user:***@h`` (a bare ``redis://user@h`` is
  a user name to redis-py and kombu, and Celery's banner shows it too), each URL
  of a Sentinel list ``sentinel://:pw@h1;sentinel://h2/0``, and a URL whose
  ``://`` was mistyped (``redis:/:pw@h`` -> ``redis:/:***@h``);
- query parameters named like a secret: ``?password=pw`` -> ``?password=***``;
- options: the value of every key named like a secret (``password``,
  ``sentinel_password``, ``ssl_password``, ``credential_provider``, ...), also
  inside nested mappings such as ``sentinel_kwargs``;
- free text (exception messages, log lines): every ``scheme://...`` URL in it,
  and ``password=pw`` / ``'password': 'pw'`` pairs, which is how client reprs
  print their connection keyword arguments (redis-py 6.2 to 7.x printed the
  password in ``ConnectionPool.__repr__``, and so in ``MasterNotFoundError``).

The credentials part of a URL is taken to end at its last ``@``: a password
with an unescaped ``/``, ``?``, ``#`` or ``@`` is masked whole, even where a URL
parser would have split it (and then printed a piece of it as the port).

Celery-free, like the rest of the election layer.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "RedactingFilter", "is_secret_key", "redact", "redact_options",
           "redact_text", "redact_url", "secret_safe_logger"]

MASK = "***"

# A key (option, query parameter, keyword argument) whose value is a secret.
SECRET_WORDS = ("password", "passwd", "secret", "token", "credential")

_SCHEME_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*[:/]+")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")
_SECRET_KEY = r"[\w-]*(?:" + "|".join(SECRET_WORDS) + r")[\w-]*"
_SECRET_VALUE = r"(?P<value>'[^']*'|\"[^\"]*\"|<[^>]*>|[^\s,;&)}\]>]+)"
# ``password=pw`` (keyword arguments, as reprs print them) and ``'password': 'pw'``
# (a dict's repr); not ``word: text``, which is how log lines read.
_SECRET_PAIR = re.compile(
    r"(?P<key>\b" + _SECRET_KEY + r"|(?P<q>['\"])" + _SECRET_KEY + r"(?P=q))"
    r"(?P<sep>(?(q)\s*[:=]\s*|\s*=\s*))" + _SECRET_VALUE,
    re.IGNORECASE,
)


def is_secret_key(key: object) -> bool:
    """Whether an option or parameter named ``key`` holds a secret."""
    lowered = str(key).lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` (or a ``;``-separated list of URLs) with its passwords masked."""
    return ";".join(_redact_one_url(part) for part in str(url).split(";"))


def _redact_one_url(part: str) -> str:
    scheme, sep, rest = part.partition("://")
    if not sep:  # no (or a mistyped) "://": all between a scheme and the last "@" may be secret
        before, at, after = part.rpartition("@")
        if not at:
            return _redact_query(part)
        prefix = _SCHEME_LIKE.match(before)
        return _redact_query(f"{prefix.group(0) if prefix else ''}{MASK}@{after}")
    userinfo, at, hostpart = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:{MASK}@{hostpart}" if colon else f"{user}@{hostpart}"
    return _redact_query(f"{scheme}://{rest}")


def _redact_query(url: str) -> str:
    base, question, query = url.partition("?")
    if not question:
        return url
    params = []
    for param in query.split("&"):
        key, equals, _ = param.partition("=")
        params.append(f"{key}={MASK}" if equals and is_secret_key(key) else param)
    return f"{base}?{'&'.join(params)}"


def redact_options(options: Mapping[Any, Any]) -> dict[Any, Any]:
    """A copy of client options with every secret value masked (recursively)."""
    return {key: (MASK if is_secret_key(key) and value is not None else redact(value))
            for key, value in options.items()}


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with URL passwords and
    ``password=...`` pairs masked."""
    text = str(text)
    if "://" in text:
        text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    return _SECRET_PAIR.sub(_mask_pair, text)


def _mask_pair(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('key')}{match.group('sep')}{quote}{MASK}{quote}"


def redact(value: Any) -> Any:
    """Any printable value with its secrets masked: text, options (mappings),
    and lists or tuples of them; anything else is returned as it is."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_options(value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and traceback before any handler
    formats it (the traceback is formatted here, once, into ``exc_text``,
    which logging's formatters print instead of formatting ``exc_info``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            formatted = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redact_text(formatted)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_FILTER = RedactingFilter()


def secret_safe_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the masking filter: what every
    celery-leader module logs through."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
