"""``promtool test rules`` over the shipped alert rules (docs/prometheus-rules.yaml).

The shipped file is a prometheus-operator ``PrometheusRule``; its ``spec`` is a
plain Prometheus rules file, cut out here by indentation (no YAML library is a
dependency).  Unit-test files are written as JSON, which YAML reads as is.

``make promtool`` installs Debian's ``prometheus`` package (which ships
promtool) where it is missing; :func:`binary_or_skip` skips with one line only
where it could not be installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "prometheus-rules.yaml"


def binary_or_skip() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("no promtool: `make test` installs Debian's prometheus package "
                    "(apt-get install -y prometheus, as root); it could not here")
    return path


def plain_rules(target: Path) -> Path:
    """The ``spec:`` block of the PrometheusRule, dedented: a Prometheus rules file."""
    lines = RULES.read_text().splitlines()
    start = lines.index("spec:") + 1
    body = [line[2:] if line.startswith("  ") else line for line in lines[start:]]
    target.write_text("\n".join(body) + "\n")
    return target


def storm_sum() -> str:
    """The storm alert's expression without its threshold (as shipped)."""
    match = re.search(r"expr: (sum by \(name\) \(increase\(celery_leader_transitions_total"
                      r".*\)) > 5$", RULES.read_text(), re.MULTILINE)
    assert match, "CeleryLeaderTransitionsStorm's expression changed: update this test"
    return match.group(1)


def series(values: list[float | None]) -> str:
    """A promtool values string; None is a missing sample (``_``)."""
    return " ".join("_" if value is None else repr(float(value)) for value in values)


def run_rule_tests(tmp_path: Path, tests: list[dict[str, Any]],
                   evaluation_interval: str = "15s") -> None:
    """Run ``promtool test rules`` with these test groups; fail with its output."""
    binary = binary_or_skip()
    rules = plain_rules(tmp_path / "rules.yaml")
    spec = tmp_path / "rules-test.yaml"
    spec.write_text(json.dumps({"rule_files": [rules.name],
                                "evaluation_interval": evaluation_interval,
                                "tests": tests}, indent=1))
    result = subprocess.run([binary, "test", "rules", spec.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (f"promtool test rules failed:\n{result.stdout}\n"
                                    f"{result.stderr}\n--- {spec.name} ---\n"
                                    f"{spec.read_text()}")
