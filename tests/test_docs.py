"""Every ```python block of README.md and docs/*.md is executed, or checked.

- A plain block runs on its own, in a fresh interpreter started from the
  repository root, with REDIS_URL (and EXAMPLE_REDIS_URL) naming a flushed
  database of the test Redis; blocks that mention REDIS_SENTINEL_URL or
  REDIS_CLUSTER_URL also get a real Sentinel or a one-node Redis Cluster, and
  blocks that mention REDIS_TLS_URL a TLS-only Redis requiring client
  certificates, with REDIS_TLS_CERTS naming the directory of ca.pem, client.pem
  and client.key (tests/tlsredis.py); POD_IP is 127.0.0.1.
- ``<!-- excerpt: example_project/x.py -->`` just before the fence: the block
  must appear verbatim in that file (which the demo test runs), so what the
  README shows is what the example project does.
- ``<!-- no-test -->`` just before the fence: a fragment that cannot run on
  its own; used sparingly (see MAX_NO_TEST).

The documented Redis ACL rule is also tried for real: workers of the example
project, a standalone beat and the command line run as a user limited by it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from celery_leader.embedded import EmbeddedRedis, free_port, redis_server_binary
from example_project import audit
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*(no-test|excerpt:\s*(\S+))\s*-->$")
MAX_NO_TEST = 3
SNIPPET_TIMEOUT = 60
SENTINEL_MASTER = "mymaster"


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    marker: str | None  # None, "no-test" or "excerpt"
    excerpt_of: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: Path) -> list[Snippet]:
    lines = path.read_text().splitlines()
    found: list[Snippet] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        start = index
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "```"), None)
        assert end is not None, f"{path.name}:{start + 1}: unclosed ```python block"
        marker = excerpt_of = None
        previous = next((lines[i].strip() for i in range(start - 1, -1, -1)
                         if lines[i].strip()), "")
        match = MARKER.match(previous)
        if match:
            marker = "excerpt" if match.group(2) else "no-test"
            excerpt_of = match.group(2)
        code = "\n".join(lines[start + 1:end]) + "\n"
        found.append(Snippet(path, start + 1, code, marker, excerpt_of))
        index = end + 1
    return found


SNIPPETS = [snippet for path in DOCS for snippet in parse(path)]
RUNNABLE = [s for s in SNIPPETS if s.marker is None]
EXCERPTS = [s for s in SNIPPETS if s.marker == "excerpt"]


# ----------------------------------------------------------------- servers

@pytest.fixture(scope="session")
def sentinel_url(redis_server: str) -> Iterator[str]:
    """A real redis-server in Sentinel mode watching the test Redis as SENTINEL_MASTER."""
    primary = urlparse(redis_server)
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="celery-leader-sentinel-")
    config = Path(workdir) / "sentinel.conf"
    config.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                      f"sentinel monitor {SENTINEL_MASTER} {primary.hostname} "
                      f"{primary.port} 1\n")
    process = subprocess.Popen([redis_server_binary(), str(config), "--sentinel"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                          SENTINEL_MASTER):
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the Sentinel did not start"
            time.sleep(0.05)
        client.close()
        yield f"sentinel://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A one-node Redis Cluster owning every slot."""
    server = EmbeddedRedis(extra_args=["--cluster-enabled", "yes",
                                       "--cluster-config-file", "nodes.conf"])
    server.start()
    try:
        client = redis.Redis(port=server.port)
        client.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster did not become ready"
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{server.port}"
    finally:
        server.cleanup()


def snippet_env(request: pytest.FixtureRequest, redis_url: str, code: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("EXAMPLE_", "CELERY_", "REDIS_"))}
    env.update(REDIS_URL=redis_url, EXAMPLE_REDIS_URL=redis_url, PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))
    if "REDIS_SENTINEL_URL" in code:
        db = redis_url.rsplit("/", 1)[1]
        env["REDIS_SENTINEL_URL"] = f"{request.getfixturevalue('sentinel_url')}/{db}"
    if "REDIS_CLUSTER_URL" in code:
        env["REDIS_CLUSTER_URL"] = request.getfixturevalue("cluster_url")
    if "POD_IP" in code:  # the downward API's status.podIP, in docs/deployment.md
        env["POD_IP"] = "127.0.0.1"
    if "REDIS_TLS_URL" in code:
        server = request.getfixturevalue("mtls_server")
        env["REDIS_TLS_URL"] = server.fresh_url().split("?", 1)[0]
        env["REDIS_TLS_CERTS"] = str(server.certs.directory)
    return env


# ----------------------------------------------------------------- snippets

@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.id for s in RUNNABLE])
def test_snippet_runs(snippet: Snippet, request: pytest.FixtureRequest, redis_url: str,
                      tmp_path: Path) -> None:
    script = tmp_path / f"{snippet.path.stem}_{snippet.line}.py"
    script.write_text(snippet.code)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT,
                            env=snippet_env(request, redis_url, snippet.code),
                            capture_output=True, text=True, timeout=SNIPPET_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (
        f"{snippet.id} failed ({result.returncode}):\n{snippet.code}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")


@pytest.mark.parametrize("snippet", EXCERPTS, ids=[s.id for s in EXCERPTS])
def test_excerpt_is_verbatim_from_the_example_project(snippet: Snippet) -> None:
    assert snippet.excerpt_of is not None
    source = ROOT / snippet.excerpt_of
    assert source.is_file(), f"{snippet.id}: no such file {snippet.excerpt_of}"
    wanted = [line.rstrip() for line in snippet.code.splitlines()]
    have = [line.rstrip() for line in source.read_text().splitlines()]
    starts = [i for i in range(len(have) - len(wanted) + 1)
              if have[i:i + len(wanted)] == wanted]
    assert starts, f"{snippet.id} is not a verbatim excerpt of {snippet.excerpt_of}"


def test_every_doc_has_runnable_snippets_and_opt_outs_are_rare() -> None:
    assert {s.path.name for s in RUNNABLE} >= {"README.md", "migration.md", "deployment.md"}
    no_test = [s.id for s in SNIPPETS if s.marker == "no-test"]
    assert len(no_test) <= MAX_NO_TEST, f"too many <!-- no-test --> blocks: {no_test}"
    for path in DOCS:  # a marker must sit right before a python fence
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if MARKER.match(line.strip()):
                following = next((lines[i].strip() for i in range(number + 1, len(lines))
                                  if lines[i].strip()), "")
                assert following == "```python", \
                    f"{path.name}:{number + 1}: marker not followed by a python block"


def test_the_example_project_modules_import_cleanly(request: pytest.FixtureRequest,
                                                    redis_url: str) -> None:
    code = ("import example_project.app, example_project.tasks, example_project.receivers\n"
            "from celery_leader.settings import read_settings\n"
            "from celery_leader.entries import entries_from_config\n"
            "app = example_project.app.app\n"
            "read_settings(app)\n"
            "assert set(entries_from_config(app)) >= {'audit-heartbeat', 'daily-report'}\n")
    for variant in ("", "django"):
        env = snippet_env(request, redis_url, code)
        env["EXAMPLE_SETTINGS"] = variant
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=SNIPPET_TIMEOUT)
        assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------- ACL rule

def documented_acl_rule() -> str:
    text = (ROOT / "docs" / "deployment.md").read_text()
    match = re.search(r"^user celery-leader (.+)$", text, re.M)
    assert match, "docs/deployment.md has no 'user celery-leader ...' ACL line"
    return match.group(1)


def documented_broker_grant(queues: str) -> list[str]:
    """The optional grant's ACL rules, for queues named ``<queues>...``."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    match = re.search(r"^ACL SETUSER celery-leader (.+)$", text, re.M)
    assert match, "docs/deployment.md has no 'ACL SETUSER celery-leader ...' grant line"
    rules = match.group(1).split()
    assert "~celery*" in rules, rules
    return [f"~{queues}*" if rule == "~celery*" else rule for rule in rules]


# Denials the page documents as optional (or as refused on purpose): redis-py's
# CLIENT SETINFO / MAINT_NOTIFICATIONS on connect, the start-up CONFIG GET, the
# SCAN of `celery leader status --all`; and, by key, the fenced pushes to the
# broker's queues (named after the election in this test).
OPTIONAL_DENIALS = (b"client", b"config", b"scan")


@pytest.mark.integration
@pytest.mark.parametrize("broker_grant", [False, True], ids=["rule", "rule-and-broker-grant"])
def test_documented_acl_rule_is_enough_for_workers_beat_and_the_cli(
        redis_url: str, tmp_path: Path, broker_grant: bool) -> None:
    """Everything celery-leader runs, as a user limited by the documented rule
    (the broker on the default user): two workers that lead, dispatch, hand over
    on `celery leader step-down` and fail over after SIGKILL; a standalone
    `celery beat -S leader` that takes over the schedule and steps down; and the
    command line (status, status --all, schedule, schedule add/remove, step-down).
    Redis denies nothing but the optional calls the page lists, so a new script
    or command that needs more fails here until the rule (and its table) says so.
    With the documented optional grant of the broker's queue keys, nothing falls
    back: ticks are pushed in their fenced script, and tracked until they start."""
    admin = redis.Redis.from_url(redis_url)
    user = f"celery-leader-{uuid.uuid4().hex[:8]}"
    name = f"acl-{uuid.uuid4().hex[:6]}"
    rule = documented_acl_rule().replace(">CHANGE-ME", ">s3cret").split()
    admin.execute_command("ACL", "SETUSER", user, "reset", *rule)
    if broker_grant:  # the page's line, for queues named after this election
        admin.execute_command("ACL", "SETUSER", user, *documented_broker_grant(name))
    admin.execute_command("ACL", "LOG", "RESET")
    parsed = urlparse(redis_url)
    leader_url = f"redis://{user}:s3cret@{parsed.hostname}:{parsed.port}{parsed.path}"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("EXAMPLE_", "CELERY_"))}
    env.update(EXAMPLE_REDIS_URL=redis_url, EXAMPLE_LEADER_REDIS_URL=leader_url,
               EXAMPLE_LEADER_NAME=name, EXAMPLE_LEASE_DURATION="2",
               EXAMPLE_RENEW_DEADLINE="1.4", EXAMPLE_RETRY_PERIOD="0.3",
               EXAMPLE_TASK_QUEUE=name, EXAMPLE_LEADER_QUEUE=f"{name}-leader",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    celery = [sys.executable, "-m", "celery", "-A", "example_project.app"]
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(label: str, *args: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{label}.log", "wb") as out:
            processes[label] = subprocess.Popen(
                [*celery, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        return processes[label]

    def logs() -> str:
        return "\n".join(f"===== {label} (exit {process.poll()}) =====\n"
                         + (tmp_path / f"{label}.log").read_text(errors="replace")
                         for label, process in processes.items())

    def holder(election: str) -> tuple[str, int] | None:
        key = (f"celery-leader:{{{name}}}:lease" if election == name
               else f"celery-leader:{{{name}}}:{election}:lease")
        raw = admin.get(key)
        record = json.loads(raw) if raw else {}
        identity = record.get("holderIdentity")
        return (identity, int(record["term"])) if identity else None

    def new_holder(election: str, than: str = "", after_term: int = 0) -> tuple[str, int]:
        def found() -> tuple[str, int] | None:
            current = holder(election)
            return current if current and current[0] != than and current[1] > after_term \
                else None
        return wait_until(found, 30, f"a leader of {election} other than {than!r}", logs)

    def worker_of(identity: str) -> str:
        return next(label for label, process in processes.items()
                    if identity.endswith(f":{process.pid}"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*celery, "leader", *args], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

    def ok(result: subprocess.CompletedProcess[str], *expected: str) -> str:
        output = result.stdout + result.stderr
        assert result.returncode == 0 and all(text in output for text in expected), \
            f"{result.args}: exit {result.returncode}\n{output}"
        outputs.append(output)
        return output

    outputs: list[str] = []
    try:
        # Two workers: one leads and its embedded scheduler sends the heartbeats.
        for label in ("w1", "w2"):
            start(label, "worker", "--pool", "solo", "-n", f"{label}@%h", "-l", "info",
                  "--without-mingle", "--without-gossip")
        first, term = new_holder(name)
        wait_until(lambda: len(audit.heartbeats(admin, name)) >= 2, 45, "two heartbeats", logs)

        ok(cli("status"), first)
        # --all lists elections with SCAN, which the rule leaves out: one clear line.
        listing = cli("status", "--all")
        assert listing.returncode == 2 and listing.stdout == "", listing.stdout + listing.stderr
        [line] = [line for line in listing.stderr.splitlines() if line.strip()]
        assert line.startswith("Error: Redis refused a command for the election's user: "
                               "this user has no permissions to run the 'scan' command"), line
        ok(cli("schedule", "add", "acl-check", "--task",
               "example_project.tasks.refresh_exchange_rates", "--every", "60",
               "--args", '["EUR", "CHF"]'), "added acl-check")
        ok(cli("schedule"), "acl-check", "dispatched by: worker")
        ok(cli("schedule", "remove", "acl-check"), "removed acl-check")

        # A graceful hand-over to the other worker, then a crash of that one.
        ok(cli("step-down"), "is stepping down")
        second, term = new_holder(name, than=first, after_term=term)
        processes[worker_of(second)].send_signal(signal.SIGKILL)
        third, term = new_holder(name, than=second, after_term=term)
        assert third == first
        wait_until(lambda: any(run["term"] >= term for run in audit.recent(admin, name)), 30,
                   f"a heartbeat sent under term {term}", logs)

        # A standalone beat: it takes over the schedule once no worker leads.
        beat = start("beat", "beat", "-S", "leader", "-l", "info",
                     "-s", str(tmp_path / "beat-schedule"))
        beat_holder, _ = new_holder(f"{name}-beat")
        assert beat_holder.endswith(f":{beat.pid}")
        processes[worker_of(first)].send_signal(signal.SIGTERM)
        wait_until(lambda: "dispatched by: standalone beat" in cli("schedule").stdout, 30,
                   "the standalone beat to dispatch the schedule", logs, interval=0.5)
        wait_until(lambda: admin.llen(name) > 0, 30, "a tick the beat sent", logs)
        ok(cli("status", "--name", f"{name}-beat"), beat_holder)
        ok(cli("step-down", "--name", f"{name}-beat"), "is stepping down")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    everything = logs() + "\n".join(outputs)
    # Apart from the documented fallbacks' own warnings (counted below), nothing
    # anywhere says Redis refused something.
    refused = [line for line in everything.splitlines()
               if ("NOPERM" in line or "no permissions" in line.lower())
               and "may not push to the broker's queue" not in line]
    assert not refused, everything
    if broker_grant:
        # Nothing fell back: ticks were pushed in their fenced script (and tracked
        # until they started), the leader queue taken in its own.
        assert "may not" not in everything, everything
    else:
        # Without the optional +lpush on the queue keys each process that dispatched
        # warns once, and publishes the tick after its claim.
        first_leader = worker_of(first)  # whichever worker won the first election
        for label in (first_leader, "beat"):
            text = (tmp_path / f"{label}.log").read_text()
            assert text.count("may not push to the broker's queue") == 1, logs()
        # Nor may the leader take from the leader queue: one warning, kombu consumes it.
        first_log = (tmp_path / f"{first_leader}.log").read_text()
        assert first_log.count("may not take from the leader queue") == 1, first_log
        for label in processes:  # a later leader warns once too, never twice
            text = (tmp_path / f"{label}.log").read_text()
            assert text.count("may not push to the broker's queue") <= 1, logs()
            assert text.count("may not take from the leader queue") <= 1, logs()
    denied = [entry for entry in admin.execute_command("ACL", "LOG")
              if entry[b"username"].decode() == user]
    admin.execute_command("ACL", "DELUSER", user)
    allowed_keys = () if broker_grant else (name.encode(), f"{name}-leader".encode())
    unexpected = [entry for entry in denied if entry[b"object"] not in OPTIONAL_DENIALS
                  and not (entry[b"reason"] == b"key" and entry[b"object"] in allowed_keys)]
    assert not unexpected, [(entry.get(b"object"), entry.get(b"client-info"))
                            for entry in unexpected]
