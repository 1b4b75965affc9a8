"""The package's shape, read from its source: only `sparsepo.engine` imports DeepSpeed, no import
cycle among sparsepo modules, no file over the house limit, and importing the trainer pulls no
DeepSpeed importer from outside the engine package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PKG = Path(__file__).resolve().parent.parent / "sparsepo"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = modules()


def imported(name: str, path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (function-level imports included; those
    under `if TYPE_CHECKING:` are for type checkers only and never run)."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import submodule` names the submodule, not the package
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = MODULES
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imp in imported(name, path):
            parts = imp.split(".")
            for k in range(len(parts), 0, -1):  # the longest sparsepo module the import names
                cand = ".".join(parts[:k])
                if cand in mods:
                    if cand != name:
                        targets.add(cand)
                    break
        edges[name] = targets
    return edges


def test_only_the_engine_package_imports_deepspeed():
    offenders = [name for name, path in modules().items() if not name.startswith("sparsepo.engine")
                 and any(i == "deepspeed" or i.startswith("deepspeed.") for i in imported(name, path))]
    assert offenders == []


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    assert not any(state.get(n) is None and visit(n, [n]) for n in sorted(edges)), " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above must be able to fail: a two-module cycle is reported."""
    fake = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: fake)
    with pytest.raises(AssertionError, match="a -> b -> a"):
        test_no_import_cycle()


def test_no_file_over_the_limit():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_importing_the_trainer_reaches_deepspeed_only_through_the_engine():
    code = ("import sys, sparsepo.trainer, sparsepo.train, sparsepo.reference_role.server\n"
            "print('\\n'.join(m for m in sys.modules if m.startswith('sparsepo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = out.stdout.split()
    mods = MODULES
    importers = [m for m in loaded if m in mods and any(i.split(".")[0] == "deepspeed" for i in imported(m, mods[m]))]
    assert importers and all(m.startswith("sparsepo.engine") for m in importers), importers


ROOMS = (  # bottom to top: a module may import its own room and the rooms listed before it
    ("lean_imports", "logprobs"), ("losses",), ("atomic", "hashing", "rng_state", "follow", "trackers", "lora", "config", "launch"), ("data", "schedule", "padding"), ("models",),
    ("reference",), ("sae",), ("bridge", "liveness", "preemption"), ("engine",),
    ("rundir", "rundata", "checkpoint_integrity", "checkpoint_config", "checkpoint", "preflight", "generation", "guard"),
    ("reference_role",), ("policy_samples", "metrics", "prelaunch", "pair_loss", "evaluation"), ("trainer",), ("train",),
    ("model_card", "export", "recipe", "oracle_train", "demo", "cli"),
)


def room_of(name: str) -> int:
    top = name.split(".")[1] if "." in name else name
    for level, rooms in enumerate(ROOMS):
        if top in rooms:
            return level
    raise AssertionError(f"{name}: room {top!r} is not in ROOMS (add it where it belongs)")


def test_imports_point_down_only():
    """No module imports a room above its own (docs/architecture.md: the rooms, bottom to top)."""
    up = sorted(f"{m} -> {t}" for m, targets in graph().items() if m != "sparsepo" for t in targets
                if t != "sparsepo" and room_of(t) > room_of(m))
    assert up == []
