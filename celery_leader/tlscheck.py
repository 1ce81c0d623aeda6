"""TLS to the election's Redis, checked once when a worker starts.

A certificate problem is not an outage: waiting cannot fix a CA that did not
sign the server's certificate, a certificate file that does not load, or a
server that asks for a client certificate it is not given.  Without this check
the elector treated each of them as a connection error and retried it every
retry period, and the worker ran on without ever leading.

:func:`check_tls` loads the configured certificate files and opens one TLS
connection.  What only a change of settings can fix becomes one
ConfigurationError naming the setting (``leader_redis_url``,
``leader_redis_options['ssl_ca_certs']``, ...); anything else (Redis down, a
timeout) is left to the elector, which retries it like any outage.  Nothing
here prints the URL: it may carry a password.

:func:`check_credentials` does the same for credentials: a password Redis does
not accept (WRONGPASS, NOAUTH) or an ACL user without the grants the election
needs (NOPERM) becomes one ConfigurationError naming ``leader_redis_url``, its
password masked.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from redis.backoff import NoBackoff
from redis.retry import Retry

from .election.config import ConfigurationError
from .election.redact import redact_url
from .election.redislock import RedisLock, credentials_refused
from .settings import LeaderSettings, setting

TLS_SCHEMES = ("rediss", "sentinels")
CA_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_ca_data")
# The server's verdict on a client certificate, as an alert (TLS 1.3 sends it
# after the client's side of the handshake is done).
CLIENT_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA",
                             "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE",
                             "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED")
# A plain-text server answering a TLS hello.
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE")
# How long the diagnostic handshake waits for the server's verdict on the
# client certificate (a session ticket, or an alert).
VERDICT_WAIT = 1.0


class _Names:
    """Where each TLS option of the election came from, to name it in a message."""

    def __init__(self, app: Any, settings: LeaderSettings) -> None:
        explicit = setting(app, "leader_redis_url", None) is not None
        self.url_setting = "leader_redis_url" if explicit else "broker_url"
        first = urlsplit(settings.redis_url.split(";", 1)[0])
        self.scheme = first.scheme
        self.host = first.hostname or "localhost"
        self.port = first.port or (26379 if self.scheme.startswith("sentinel") else 6379)
        self.in_url = dict(parse_qsl(first.query))
        self.in_options = dict(settings.redis_options)
        broker_ssl = setting(app, "broker_use_ssl", None)
        self.broker_ssl = dict(broker_ssl) if isinstance(broker_ssl, Mapping) else {}
        self.inherited = not explicit

    def value(self, key: str) -> Any:
        return self.in_options.get(key, self.in_url.get(key))

    def name(self, key: str) -> str:
        if key not in self.in_options and key in self.in_url:
            return f"{key} in {self.url_setting}'s query"
        return f"leader_redis_options[{key!r}]"

    def where(self) -> str:
        """The URL's setting and server, never the URL itself (it may hold a password)."""
        unset = "; leader_redis_url is not set" if self.inherited else ""
        return f"{self.url_setting} ({self.scheme}://{self.host}:{self.port}{unset})"

    def broker_hint(self, *keys: str) -> str:
        """broker_use_ssl configures kombu only: say so when it has what is missing."""
        if any(key in self.broker_ssl and self.value(key) is None for key in keys):
            return ("; broker_use_ssl is for the broker only, give the election the same "
                    "options in leader_redis_options")
        return ""


def check_tls(app: Any, settings: LeaderSettings) -> None:
    """Raise ConfigurationError when the election's TLS settings cannot work."""
    names = _Names(app, settings)
    ssl_keys = sorted(key for key in {**names.in_url, **names.in_options}
                      if key.startswith("ssl_"))
    uses_tls = names.scheme in TLS_SCHEMES or names.in_options.get("ssl") is True
    if not uses_tls:
        if ssl_keys:
            raise ConfigurationError(
                f"{', '.join(names.name(key) for key in ssl_keys)} need TLS, but "
                f"{names.where()} does not use it: use rediss:// (sentinels:// with Sentinel)")
        if names.inherited and names.broker_ssl:
            raise ConfigurationError(
                f"broker_use_ssl makes the broker use TLS, but the election connects to "
                f"{names.where()} without it: set leader_redis_url to its rediss:// URL "
                "and leader_redis_options to the same ssl_* options")
        return
    _load_files(names)
    _connect_once(names, settings)


def _load_files(names: _Names) -> None:
    """Each certificate file loads, or one error names the option that names it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for key in CA_OPTIONS:
        value = names.value(key)
        if value is None:
            continue
        where = {"ssl_ca_certs": "cafile", "ssl_ca_path": "capath", "ssl_ca_data": "cadata"}
        try:
            context.load_verify_locations(**{where[key]: value})
        except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
            shown = "(the data given)" if key == "ssl_ca_data" else repr(value)
            raise ConfigurationError(f"{names.name(key)} {shown} cannot be loaded as CA "
                                     f"certificates: {_reason(exc)}") from None
    certfile, keyfile = names.value("ssl_certfile"), names.value("ssl_keyfile")
    if keyfile is not None and certfile is None:
        raise ConfigurationError(f"{names.name('ssl_keyfile')} is set without "
                                 f"{names.name('ssl_certfile')}: give both for mutual TLS")
    if certfile is not None:
        password = names.value("ssl_password")

        def no_password() -> str:  # never an interactive prompt at start-up
            raise ConfigurationError(f"{names.name('ssl_keyfile')} is encrypted: set "
                                     f"{names.name('ssl_password')}")

        try:
            context.load_cert_chain(certfile, keyfile,
                                    password if password is not None else no_password)
        except ConfigurationError:
            raise
        except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
            files = f"{names.name('ssl_certfile')} {certfile!r}" + (
                f" with {names.name('ssl_keyfile')} {keyfile!r}" if keyfile else "")
            raise ConfigurationError(f"{files} cannot be loaded as this client's "
                                     f"certificate and key: {_reason(exc)}") from None


def _connect_once(names: _Names, settings: LeaderSettings) -> None:
    """One connection as the elector would open it (redis-py, same options), no retries."""
    options = {**settings.redis_options, "retry": Retry(NoBackoff(), 0)}
    client = None
    try:
        client = replace(settings, redis_options=options).redis_client()
        client.ping()
    except Exception as exc:
        failure = _ssl_error(exc)
        if failure is not None:
            _raise_for(failure, names, settings)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):  # the check's own connection
                client.close()


def _raise_for(failure: ssl.SSLError, names: _Names, settings: LeaderSettings) -> None:
    reason = str(failure.reason or "")
    if isinstance(failure, ssl.SSLCertVerificationError):
        message = str(getattr(failure, "verify_message", "") or _reason(failure))
        if "mismatch" in message:
            raise ConfigurationError(
                f"{names.where()}: the server's TLS certificate is not for {names.host!r} "
                f"({message}): connect by a name the certificate lists")
        ca = next((key for key in CA_OPTIONS if names.value(key) is not None), None)
        now = (f"now {names.value(ca)!r}" if ca and ca != "ssl_ca_data"
               else "now the data given" if ca else "unset: the system's default CAs")
        raise ConfigurationError(
            f"{names.where()}: the server's TLS certificate cannot be verified "
            f"({message}): set {names.name(ca or 'ssl_ca_certs')} to the CA certificate "
            f"that signed it ({now}){names.broker_hint(*CA_OPTIONS)}")
    if any(code in reason for code in NOT_TLS_REASONS):
        raise ConfigurationError(
            f"{names.where()}: the server does not answer TLS on that port ({reason}): "
            "use its TLS port, or redis:// for a plain-text one")
    if any(alert in reason for alert in CLIENT_CERTIFICATE_ALERTS):
        _raise_client_certificate(reason, names)
    if isinstance(failure, ssl.SSLEOFError) and names.scheme == "rediss":
        # The server hung up after the handshake: a TLS 1.3 server that rejects the
        # client certificate does that, and the alert saying so may be lost when
        # it resets a connection the client already wrote to.  Ask once more
        # without writing anything, so the alert arrives.
        verdict = _client_certificate_verdict(names, settings.redis_options)
        if verdict is not None:
            _raise_client_certificate(verdict, names)


def _raise_client_certificate(reason: str, names: _Names) -> None:
    certfile = names.value("ssl_certfile")
    if certfile is None:
        raise ConfigurationError(
            f"{names.where()}: the server asks for a client certificate (mutual TLS, "
            f"{reason}): set {names.name('ssl_certfile')} and {names.name('ssl_keyfile')}"
            f"{names.broker_hint('ssl_certfile', 'ssl_keyfile')}")
    raise ConfigurationError(
        f"{names.where()}: the server refused this client's certificate ({reason}): "
        f"{names.name('ssl_certfile')} {certfile!r} must be signed by a CA the server "
        "trusts (its tls-ca-cert-file)")


def _client_certificate_verdict(names: _Names, options: Mapping[str, Any]) -> str | None:
    """The alert reason if the server rejects this client's certificate, else None.

    A diagnostic handshake that does not verify the server (the first connection
    already got past that) and sends nothing: the server's answer to the
    client's certificate is then either a session ticket (accepted) or an alert.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    certfile = names.value("ssl_certfile")
    if certfile is not None:
        password = names.value("ssl_password")
        context.load_cert_chain(certfile, names.value("ssl_keyfile"), password)
    timeout = float(options.get("socket_connect_timeout") or VERDICT_WAIT)
    try:
        with socket.create_connection((names.host, names.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=names.host) as tls:
            tls.setblocking(False)
            deadline = time.monotonic() + VERDICT_WAIT
            while True:
                try:
                    tls.recv(1)
                    return None  # data: the server took this client
                except ssl.SSLWantReadError:
                    session = tls.session
                    if session is not None and session.has_ticket:
                        return None  # a session ticket: accepted
                left = deadline - time.monotonic()
                if left <= 0:
                    return None  # no verdict (a server that sends no tickets): not known
                select.select([tls], [], [], left)
    except ssl.SSLError as exc:
        reason = str(exc.reason or "")
        return reason if any(alert in reason for alert in CLIENT_CERTIFICATE_ALERTS) else None
    except OSError:
        return None
    return None


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a redis-py error, if any (redis-py wraps it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def check_credentials(app: Any, settings: LeaderSettings, lock: RedisLock) -> None:
    """Raise ConfigurationError when the election's Redis refuses its credentials.

    One read of the lease, as the elector's first attempt makes it (a script on
    the lease key): WRONGPASS, NOAUTH and NOPERM are settings to fix, not an
    outage to wait out.  Any other error is left to the elector's retries."""
    try:
        lock.get()
    except Exception as exc:
        if not credentials_refused(exc):
            return
        names = _Names(app, settings)
        where = ("leader_redis_url" if not names.inherited
                 else "leader_redis_url (not set: broker_url's)")
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ConfigurationError(
            f"{where} {redact_url(settings.redis_url)}: Redis refused the election's "
            f"credentials ({reason}); fix the password or the ACL user's grants") from None
