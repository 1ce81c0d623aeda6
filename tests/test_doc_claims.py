"""Claims of the docs and of the messages users read, checked against what the
code does (issue 21, item 8): how to install a package that is on no index,
what the systemd unit runs, what the health port serves and asks for, and the
Prometheus scrape configs of docs/metrics.md, run against real replicas.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
from celery import Celery

import celery_leader
from celery_leader.election.healthz import HealthzAdaptor, serve_healthz
from celery_leader.election.metrics import METRICS_EXTRA_MISSING
from celery_leader.status import StatusSource
from celery_leader.testing import free_port
from tests.promtool import binary_or_skip
from tests.sched_procs import Replicas
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted((ROOT / "celery_leader").rglob("*.py"))
TOKEN = "scrape-token"


def section(path: Path, title: str) -> str:
    text = path.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def test_every_install_line_names_a_checkout_or_a_wheel() -> None:
    """The package is on no index: `pip install 'celery-leader[...]'` fails for
    everyone; a path to a checkout with an extra the package defines works."""
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])
    for path in [*DOCS, *SOURCES]:
        text = path.read_text()
        wrong = re.findall(r"pip install\s+['\"]?celery-leader\b|(?<![/\w-])celery-leader\[", text)
        assert not wrong, f"{path.relative_to(ROOT)} tells to install from an index: {wrong}"
        for extra in re.findall(r"/path/to/celery-leader\[(\w+)\]", text):
            assert extra in extras, f"{path.relative_to(ROOT)}: no extra {extra!r}"
    assert "pip install prometheus-client" in METRICS_EXTRA_MISSING
    assert "/path/to/celery-leader[metrics]" in METRICS_EXTRA_MISSING


def test_the_systemd_unit_runs_an_app_a_wheel_install_has() -> None:
    """The wheel holds celery_leader only (tests/test_plain_install.py), so a unit
    on a host with the wheel cannot run the example project."""
    unit = section(ROOT / "docs" / "deployment.md", "systemd")
    [app] = re.findall(r"ExecStart=\S+ -A (\S+) worker", unit)
    assert app == "proj"
    assert "example_project" not in unit


def test_watching_it_names_the_token_and_each_endpoint_once() -> None:
    text = section(ROOT / "docs" / "deployment.md", "Watching it")
    assert "asks who is calling" not in text.replace("never asks who\n  is calling", "")
    assert "leader_healthz_token" in text and "?token=<token>" in text
    for endpoint in ("`GET /healthz`", "`GET /metrics`", "`GET /status`", "`GET /`",
                     "`GET /leader`"):
        assert text.count(endpoint) == 1, (endpoint, text)
    assert "celery beat -S leader" in text


def test_the_healthz_port_option_names_every_route_it_serves() -> None:
    app = celery_leader.install(Celery("claims", set_as_current=False))
    [option] = [o for o in app.user_options["worker"] if o.name == "leader_healthz_port"]
    source = StatusSource.__new__(StatusSource)  # only its route tables are read
    served = {"/healthz", "/leader", *source.routes(), *source.pages()}
    for route in served:
        shown = "(/)" if route == "/" else route
        assert shown in (option.help or ""), (route, option.help)


def test_the_401_reply_says_how_to_give_the_token() -> None:
    server = serve_healthz(HealthzAdaptor(), 0, routes={"/status": lambda: (200, {})},
                           token=TOKEN)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/status", timeout=5)
        body = refused.value.read().decode()
        assert refused.value.code == 401
        assert "Authorization: Bearer <token>" in body and "?token=<token>" in body, body
        assert "leader_healthz_token" in body
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/status?token={TOKEN}",
                                    timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.close()


def scrape_config() -> str:
    text = (ROOT / "docs" / "metrics.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    [found] = [block for block in blocks if "scrape_configs:" in block]
    return found


def runnable(config: str, token_file: Path, targets: list[str]) -> str:
    """The doc's config with this test's token file and targets, scraping every second."""
    config = re.sub(r"credentials_file: \S+", f"credentials_file: {token_file}", config)
    config = re.sub(r"- targets: \[.*\]", "- targets: " + json.dumps(targets), config)
    return "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n" + config


def test_the_scrape_config_passes_promtool_check_config(tmp_path: Path) -> None:
    promtool = binary_or_skip()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = tmp_path / "prometheus.yml"
    config.write_text(runnable(scrape_config(), token_file, ["127.0.0.1:9808"]))
    result = subprocess.run([promtool, "check", "config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{config.read_text()}"
    assert "type: Bearer" in scrape_config()


@contextlib.contextmanager
def prometheus(tmp_path: Path, config: str) -> Iterator[int]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus server: `make test` installs Debian's prometheus package "
                    "(apt-get install -y prometheus, as root); it could not here")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(config)
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def api(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return json.loads(reply.read())["data"]
    except OSError:
        return None


@pytest.mark.integration
def test_prometheus_scrapes_a_worker_and_a_beat_with_the_documented_config(
        tmp_path: Path, redis_url: str, election_name: str) -> None:
    """A real Prometheus, configured as docs/metrics.md says, scrapes a worker and
    a standalone beat that ask for a token; both targets are up and every
    replica's first-leadership counter is there before any leadership ends."""
    ports = [free_port(), free_port()]
    env = [{"LEADER_HEALTHZ_PORT": str(port), "LEADER_HEALTHZ_TOKEN": TOKEN} for port in ports]
    replicas = Replicas(tmp_path, redis_url, election_name)
    try:
        replicas.worker(env={**env[0], "LEADER_BEAT": "0"})
        replicas.beat(env=env[1])
        replicas.wait_workers_ready()
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        targets = [f"127.0.0.1:{port}" for port in ports]
        with prometheus(tmp_path, runnable(scrape_config(), token_file, targets)) as port:
            def up() -> list[dict[str, Any]] | None:
                data = api(port, "/api/v1/targets")
                active = (data or {}).get("activeTargets", [])
                healthy = [t for t in active if t["health"] == "up"]
                return active if len(healthy) == 2 else None

            wait_until(up, 60, "prometheus to scrape both replicas with the token",
                       lambda: f"{api(port, '/api/v1/targets')}\n"
                               f"{(tmp_path / 'prometheus.log').read_text()}\n{replicas.logs()}")

            def acquired() -> set[str] | None:
                data = api(port, "/api/v1/query?query=celery_leader_transitions_total"
                                 "%7Breason%3D%22acquired%22%7D")
                found = {r["metric"]["instance"] for r in (data or {}).get("result", [])}
                return found if found == set(targets) else None

            wait_until(acquired, 30, "both replicas' acquired counters in prometheus",
                       lambda: str(api(port, "/api/v1/query?query=celery_leader_is_leader")))
    finally:
        replicas.stop()
