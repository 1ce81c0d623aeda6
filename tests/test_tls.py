"""TLS end to end, against a real TLS-only redis-server (tests/tlsredis.py).

- Two real ``celery worker`` replicas whose broker and election both use
  ``rediss://`` with CA verification and a client certificate (the server has
  ``tls-auth-clients yes``) elect, dispatch a worker-embedded beat entry, and
  fail over after SIGKILL; one replica is configured with the options as
  settings, the other with them in the URL (docs/deployment.md shows both);
  ``celery leader status`` reads the lease over TLS.
- A certificate problem is one ``celery-leader: configuration error: ...`` line
  naming the setting, and exit status 2, at worker start (celery_leader/tlscheck.py),
  not a connection error retried forever; each kind is checked on its own
  against the real server, without a worker.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from celery import Celery

from celery_leader.config import ConfigurationError
from celery_leader.embedded import free_port
from celery_leader.settings import read_settings
from celery_leader.tlscheck import check_tls
from tests.celery_procs import FAILOVER_BOUND, Cluster
from tests.tlsredis import TLSRedis

TLS_APP = "tests.apps.tls_app"


def without_root_warning(stderr: str) -> list[str]:
    """stderr lines, minus Celery's own SecurityWarning block when tests run as root."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if any("SecurityWarning" in line for line in lines):
        first = next(i for i, line in enumerate(lines) if "SecurityWarning" in line)
        # The block ends with the source line warnings shows: the call that warned
        # (Celery 5.3: warnings.warn(SecurityWarning(...; later: its helper's call).
        last = next(i for i, line in enumerate(lines) if i > first and (
            "_warn_or_raise_security_error" in line or "warnings.warn(SecurityWarning" in line))
        lines = lines[:first] + lines[last + 1:]
    return lines


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, mtls_server: TLSRedis,
            election_name: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, mtls_server.fresh_url(), election_name, app=TLS_APP)
    failed_before = request.session.testsfailed
    try:
        yield cluster
    finally:
        cluster.stop()
        if request.session.testsfailed > failed_before:
            print(f"worker output ({tmp_path}):\n{cluster.logs()}\n{cluster.events.dump()}")


# ---------------------------------------------------------------- real workers

@pytest.mark.integration
def test_two_replicas_elect_dispatch_and_fail_over_over_mutual_tls(cluster: Cluster) -> None:
    forms = {"w1": "options", "w2": "url"}
    cluster.start(2, "prefork", per_worker=lambda name: {"env": {"TLS_FORM": forms[name]}})
    leader, started = cluster.wait_leader(timeout=45)
    term = started["term"]
    # The leader's scheduler dispatches the per-second entry; a replica runs it.
    cluster.events.wait_kind("tick", 20, where=lambda e: e["term"] == term,
                             what=f"a tick sent under term {term}")

    leader.signal(signal.SIGKILL)
    assert leader.wait_exit(10) == -signal.SIGKILL
    [survivor] = cluster.live()
    new_leader, taken = cluster.wait_leader(timeout=FAILOVER_BOUND + 15, after_term=term,
                                            among=[survivor])
    assert new_leader is survivor
    cluster.events.wait_kind("tick", 20, where=lambda e: e["term"] == taken["term"],
                             what=f"a tick sent by the new leader (term {taken['term']})")
    # The command line reads the lease over TLS too.
    status = cluster.celery("leader", "status")
    assert status.returncode == 0 and taken["identity"] in status.stdout, \
        status.stdout + status.stderr
    logs = cluster.logs()
    for problem in ("Traceback", "CERTIFICATE", "SSL", "configuration error",
                    # the fenced publish and the leader queue see the broker and the
                    # lease as one Redis over TLS too
                    "not the broker's Redis"):
        assert problem not in logs, f"{problem!r} in the logs:\n{logs}"


@pytest.mark.integration
def test_a_wrong_ca_stops_the_worker_with_one_line_naming_the_setting(
        cluster: Cluster, tls_certificates: Any) -> None:
    # The broker's options are right; the election's CA is another one.
    [worker] = cluster.start(1, "prefork", split_stderr=True,
                             env={"TLS_FORM": "options",
                                  "LEASE_SSL_CA_CERTS": str(tls_certificates.wrong_ca)})
    code = worker.wait_exit(30)
    assert worker.stderr_path is not None
    lines = without_root_warning(worker.stderr_path.read_text())
    assert code == 2, worker.log()
    assert len(lines) == 1, lines
    port = urlsplit(cluster.redis_url).port
    assert lines[0] == (
        f"celery-leader: configuration error: leader_redis_url (rediss://127.0.0.1:{port}): "
        "the server's TLS certificate cannot be verified (self-signed certificate in "
        "certificate chain): set leader_redis_options['ssl_ca_certs'] to the CA certificate "
        f"that signed it (now {str(tls_certificates.wrong_ca)!r})"), lines
    assert "Traceback" not in worker.log()
    assert cluster.events.all() == []


# ---------------------------------------------------------------- the check alone

def check(**conf: Any) -> str | None:
    """check_tls on an app with ``conf``: the error message, or None."""
    app = Celery("tls-check")
    app.conf.update(conf)
    try:
        check_tls(app, read_settings(app))
    except ConfigurationError as exc:
        return str(exc)
    return None


def test_right_settings_pass_in_every_form(tls_server: TLSRedis, mtls_server: TLSRedis) -> None:
    for server, client_certificate in ((tls_server, False), (mtls_server, True)):
        options = server.tls_options(client_certificate)
        assert check(leader_redis_url=server.url, leader_redis_options=options) is None
        assert check(broker_url=server.url, broker_use_ssl=options,
                     leader_redis_url=server.url, leader_redis_options=options) is None
        assert check(broker_url=server.fresh_url(client_certificate)) is None


def test_a_redis_that_is_down_is_left_to_the_elector(tls_server: TLSRedis) -> None:
    down = f"rediss://127.0.0.1:{free_port()}/0"
    assert check(leader_redis_url=down, leader_redis_options=tls_server.tls_options()) is None


def test_a_wrong_ca_names_the_option_where_it_was_given(mtls_server: TLSRedis,
                                                       tls_certificates: Any) -> None:
    wrong = str(tls_certificates.wrong_ca)
    options = {**mtls_server.tls_options(), "ssl_ca_certs": wrong}
    message = check(leader_redis_url=mtls_server.url, leader_redis_options=options)
    assert message is not None and message.startswith(
        f"leader_redis_url (rediss://127.0.0.1:{mtls_server.port}): the server's TLS "
        "certificate cannot be verified"), message
    assert f"set leader_redis_options['ssl_ca_certs'] to the CA certificate that signed it " \
           f"(now {wrong!r})" in message
    # All in the broker's URL, which the election falls back to.
    url = f"{mtls_server.base_url()}/0?{urlencode(options)}"
    message = check(broker_url=url)
    assert message is not None and message.startswith(
        f"broker_url (rediss://127.0.0.1:{mtls_server.port}; leader_redis_url is not set): "
        "the server's TLS certificate cannot be verified"), message
    assert "set ssl_ca_certs in broker_url's query" in message


def test_broker_use_ssl_alone_is_named_as_the_broker_s_only(tls_server: TLSRedis) -> None:
    options = tls_server.tls_options(client_certificate=False)
    message = check(broker_url=tls_server.url, broker_use_ssl=options)
    assert message is not None and "(unset: the system's default CAs); broker_use_ssl is " \
        "for the broker only, give the election the same options in leader_redis_options" \
        in message, message
    plain = tls_server.url.replace("rediss://", "redis://")
    message = check(broker_url=plain, broker_use_ssl=options)
    assert message is not None and message.startswith(
        "broker_use_ssl makes the broker use TLS, but the election connects to broker_url "
        f"(redis://127.0.0.1:{tls_server.port}; leader_redis_url is not set) without it"), message


def test_ssl_options_on_a_plain_url_are_refused(tls_server: TLSRedis) -> None:
    message = check(leader_redis_url=tls_server.url.replace("rediss://", "redis://"),
                    leader_redis_options={"ssl_ca_certs": str(tls_server.certs.ca)})
    assert message == (f"leader_redis_options['ssl_ca_certs'] need TLS, but leader_redis_url "
                       f"(redis://127.0.0.1:{tls_server.port}) does not use it: use rediss:// "
                       "(sentinels:// with Sentinel)")


def test_mutual_tls_without_a_client_certificate_names_both_options(
        mtls_server: TLSRedis) -> None:
    # The server's alert races its reset of the connection: ask several times.
    for _ in range(5):
        message = check(leader_redis_url=mtls_server.url,
                        leader_redis_options=mtls_server.tls_options(client_certificate=False))
        assert message == (
            f"leader_redis_url (rediss://127.0.0.1:{mtls_server.port}): the server asks for "
            "a client certificate (mutual TLS, TLSV13_ALERT_CERTIFICATE_REQUIRED): set "
            "leader_redis_options['ssl_certfile'] and leader_redis_options['ssl_keyfile']")


def test_a_client_certificate_the_server_does_not_trust_is_named(
        mtls_server: TLSRedis, tls_certificates: Any) -> None:
    options = {**mtls_server.tls_options(), "ssl_certfile": str(tls_certificates.stranger_cert),
               "ssl_keyfile": str(tls_certificates.stranger_key)}
    for _ in range(3):
        message = check(leader_redis_url=mtls_server.url, leader_redis_options=options)
        assert message is not None and message.startswith(
            f"leader_redis_url (rediss://127.0.0.1:{mtls_server.port}): the server refused "
            "this client's certificate"), message
        assert (f"leader_redis_options['ssl_certfile'] {str(tls_certificates.stranger_cert)!r} "
                "must be signed by a CA the server trusts") in message


def test_certificate_files_that_do_not_load_are_named(tls_server: TLSRedis,
                                                      tls_certificates: Any,
                                                      tmp_path: Path) -> None:
    url = tls_server.url
    missing = str(tmp_path / "nope.pem")
    assert check(leader_redis_url=url, leader_redis_options={"ssl_ca_certs": missing}) == (
        f"leader_redis_options['ssl_ca_certs'] {missing!r} cannot be loaded as CA "
        "certificates: No such file or directory")
    mismatched = {**tls_server.tls_options(), "ssl_keyfile": str(tls_certificates.server_key)}
    message = check(leader_redis_url=url, leader_redis_options=mismatched)
    assert message is not None and message.startswith(
        f"leader_redis_options['ssl_certfile'] {str(tls_certificates.client_cert)!r} with "
        f"leader_redis_options['ssl_keyfile'] {str(tls_certificates.server_key)!r} cannot be "
        "loaded as this client's certificate and key"), message
    keyless = {"ssl_keyfile": str(tls_certificates.client_key)}
    assert check(leader_redis_url=url, leader_redis_options=keyless) == (
        "leader_redis_options['ssl_keyfile'] is set without "
        "leader_redis_options['ssl_certfile']: give both for mutual TLS")


def test_no_message_shows_the_password(tls_server: TLSRedis, tls_certificates: Any) -> None:
    url = f"rediss://someone:s3cret@127.0.0.1:{tls_server.port}/0"
    message = check(leader_redis_url=url,
                    leader_redis_options={"ssl_ca_certs": str(tls_certificates.wrong_ca)})
    assert message is not None and "cannot be verified" in message
    assert "s3cret" not in message and "someone" not in message


def test_an_encrypted_key_without_its_password_is_named(tls_server: TLSRedis,
                                                        tls_certificates: Any,
                                                        tmp_path: Path) -> None:
    """Never an interactive passphrase prompt at start-up: an error naming ssl_password."""
    encrypted = tmp_path / "client-encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(tls_certificates.client_key), "-aes256",
                    "-passout", "pass:s3cret", "-out", str(encrypted)], check=True,
                   capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    options = {**tls_server.tls_options(), "ssl_keyfile": str(encrypted)}
    assert check(leader_redis_url=tls_server.url, leader_redis_options=options) == (
        "leader_redis_options['ssl_keyfile'] is encrypted: set "
        "leader_redis_options['ssl_password']")
    assert check(leader_redis_url=tls_server.url,
                 leader_redis_options={**options, "ssl_password": "s3cret"}) is None
