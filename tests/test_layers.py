"""The layers contract (docs/design.md, "Layers"): every import in celery_leader/,
read from the source (function-level and ``TYPE_CHECKING`` imports too: none
may hide an arrow), must point down, and no modules may import each other in
a cycle.

    glue (celery_leader.*)  ->  schedule (celery_leader.schedule.*)  ->  election
                                                                 (celery_leader.election.*)

- election imports neither schedule, glue, Celery nor kombu;
- schedule imports no glue module (it is told what it needs through
  ``ScheduleOptions``, never the ``leader_*`` settings); it may use Celery's
  schedule types and kombu (the fenced publish);
- the glue may import anything below it.

A subprocess in which importing ``celery`` or ``kombu`` fails then shows the
election layer (and ``import celery_leader``) works without them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = "celery_leader"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

ELECTION = f"{PACKAGE}.election"
SCHEDULE = f"{PACKAGE}.schedule"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").is_file()


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, wherever it stands."""
    package = name if is_package(name) else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import module`` is an arrow to that module; to ``pkg``
            # itself only if a name is taken from its ``__init__``.
            submodules = [f"{target}.{alias.name}" for alias in node.names
                          if f"{target}.{alias.name}" in known]
            if len(submodules) < len(node.names):
                found.append((node.lineno, target))
            found += [(node.lineno, submodule) for submodule in submodules]
    return found


def layer(name: str) -> str:
    if name == ELECTION or name.startswith(ELECTION + "."):
        return "election"
    if name == SCHEDULE or name.startswith(SCHEDULE + "."):
        return "schedule"
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return "glue"
    return "external"


def top(name: str) -> str:
    return name.split(".", 1)[0]


def reversed_arrows(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    wrong = []
    for source, targets in graph.items():
        for line, target in targets:
            where = f"{source} (line {line}) imports {target}"
            if layer(source) == "election" and (layer(target) in ("schedule", "glue")
                                                or top(target) in ("celery", "kombu")):
                wrong.append(f"{where}: the election layer imports only itself, never "
                             "the schedule, the glue, Celery or kombu")
            elif layer(source) == "schedule" and layer(target) == "glue":
                wrong.append(f"{where}: the schedule layer never imports the Celery glue")
    return wrong


def cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module
    importing itself): Tarjan's algorithm."""
    edges = {source: sorted({t for _, t in targets if t in graph})
             for source, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, list[tuple[int, str]]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def test_every_import_points_down_the_layers() -> None:
    graph = import_graph()
    assert any(layer(name) == "election" for name in graph)  # the test reads the tree
    assert any(layer(name) == "schedule" for name in graph)
    assert reversed_arrows(graph) == []


def test_no_import_cycles_among_the_modules() -> None:
    assert cycles(import_graph()) == []


def test_the_contract_catches_a_reversed_arrow_and_a_cycle() -> None:
    """The checks themselves can fail (on a made-up graph)."""
    graph = {
        "celery_leader.election.elector": [(1, "celery_leader.schedule.runner")],
        "celery_leader.election.config": [(1, "celery.schedules")],
        "celery_leader.schedule.runner": [(2, "celery_leader.settings"),
                                          (3, "celery_leader.election.elector")],
        "celery_leader.settings": [(4, "celery_leader.schedule.runner")],
    }
    assert len(reversed_arrows(graph)) == 3
    assert cycles(graph) == [["celery_leader.election.elector",
                              "celery_leader.schedule.runner", "celery_leader.settings"]]


def test_the_election_layer_works_where_celery_cannot_be_imported() -> None:
    """``import celery_leader`` and the whole election layer, with an import hook
    that makes ``celery`` and ``kombu`` fail, as on a machine without them."""
    election_modules = sorted(name for name in modules() if layer(name) == "election")
    code = textwrap.dedent(f"""
        import importlib, sys

        class NoCelery:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("celery", "kombu"):
                    raise ImportError(f"{{name}} is not installed (test)")
                return None

        sys.meta_path.insert(0, NoCelery())
        import celery_leader
        for name in {election_modules!r} + ["celery_leader.testing", "celery_leader.state"]:
            importlib.import_module(name)
        from celery_leader import LeaderElector, RedisLock, FakeClock, is_leader  # noqa
        lazy = {{"install", "leader_only", "NotLeaderError", "cron"}}
        for name in set(celery_leader.__all__) - lazy:
            getattr(celery_leader, name)
        try:
            celery_leader.leader_only
        except ImportError:
            pass
        else:
            raise SystemExit("leader_only loaded without Celery?")
        assert not any(m.split(".")[0] in ("celery", "kombu") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_old_module_names_import_as_the_moved_modules() -> None:
    """Every module that moved keeps its old name: the same module object, so
    existing imports (and patches of its attributes) still work."""
    import importlib

    import celery_leader

    assert celery_leader.MOVED_MODULES
    for old, new in celery_leader.MOVED_MODULES.items():
        assert not (ROOT.parent / (old.replace(".", "/") + ".py")).exists(), old
        assert importlib.import_module(old) is importlib.import_module(new), old
    assert isinstance(celery_leader.cron, type)  # the class, not the old module
