"""The package's layers point one way, and loading a config has no side effects.

Layers, lowest first (a module may import its own package and the packages listed for it, nothing else):

- ``algorithms/``: pure torch maths; imports no other package module.
- ``comm/``: process groups by purpose, channels, the table codec; imports no other package module.
- ``models/``, ``rollout/``: at most ``algorithms/`` and ``comm/``; ``rewards/``: at most ``algorithms/``.
- ``data/``: at most ``algorithms/`` and ``rewards/`` (answer extraction for GSM8K-style gold answers).
- ``refit/``: at most ``algorithms/``, ``comm/``, ``models/`` and ``rollout/`` (it joins the trainer's model to the
  engine).
- ``trainer/``, ``eval/``, ``cli.py``, ``demo.py``, ``__main__.py``: anything.

Two leaves sit beside the layers: ``config_loader.py`` (generic YAML -> dataclass loading) and ``hf_checkpoint.py``
(safetensors files of an HF checkpoint). Every module may import them; they import no package module.
``config.py`` assembles the run's config tree: it imports ``algorithms/``, ``config_loader`` and each component's
*config module* (``models/config.py``, ``rollout/config.py``, ``refit/config.py``, ``trainer/config.py``) and nothing
else, and only the top layer (trainer, eval, cli, demo) imports ``config.py``. Imports inside functions and
``TYPE_CHECKING`` blocks count: a lazy import is still a dependency.

Within and across layers, package modules import each other without cycles (module granularity, the same edges as
above): a cycle means neither module can be understood, tested or replaced without the other, and a lazy import that
hides one is still one.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "megatron_dispo"
ROOT = Path(__file__).resolve().parents[1]

LEAVES = frozenset({"config_loader", "hf_checkpoint", "lifetime"})
"""Modules every layer may import; they import nothing from the package."""
TOP = frozenset({"trainer", "eval", "cli", "demo", "__main__", "plan", "plan_cli"})
"""The top layer: may import anything."""
LOWER: dict[str, frozenset[str]] = {
    "algorithms": frozenset(),
    "comm": frozenset(),
    "models": frozenset({"algorithms", "comm"}),
    "rollout": frozenset({"algorithms", "comm"}),
    "rewards": frozenset({"algorithms"}),
    "data": frozenset({"algorithms", "rewards"}),
    "refit": frozenset({"algorithms", "comm", "models", "rollout"}),
}
"""Each lower layer -> the other layers it may import."""
CONFIG_SOURCES = frozenset({"models", "rollout", "refit", "trainer", "data", "rewards", "eval"})
"""Components whose ``<component>.config`` module config.py may import."""

KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()
"""(file, imported module) edges that break the rules and are being fixed elsewhere; a stale entry fails the test."""
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset()
"""Import cycles (the modules of one strongly connected component) tolerated while being removed; a stale entry
fails the test. Empty: the package has none."""


@dataclass(frozen=True)
class Edge:
    """One import statement: ``file`` (relative to the repository), its line, and the package module it imports."""

    file: str
    line: int
    source: str
    target: str

    def describe(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Absolute module of a ``from`` import (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(root: Path, package: str = PACKAGE) -> list[Edge]:
    """Every import of a ``package`` module by a ``package`` module under ``root``, wherever the statement stands.

    ``from a.b import c`` where ``a/b/c.py`` (or ``a/b/c/``) exists counts as importing ``a.b.c``.
    """
    edges: list[Edge] = []
    for path in sorted((root / package).rglob("*.py")):
        module = _module_name(path, root)
        is_package = path.name == "__init__.py"
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, is_package)
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    sub = root / Path(*candidate.split("."))
                    targets.append(candidate if sub.with_suffix(".py").is_file() or sub.is_dir() else base)
            for target in targets:
                if target == package or target.startswith(package + "."):
                    edges.append(Edge(rel, node.lineno, module, target))
    return edges


def _component(module: str) -> str:
    """``megatron_dispo.models.policy`` -> ``models``; ``megatron_dispo.config`` -> ``config``; the root -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violation(edge: Edge) -> str | None:
    """Why ``edge`` breaks the layering rules (see the module docstring), or None when it is allowed."""
    source, target = _component(edge.source), _component(edge.target)
    if source == target or target == "":
        return None  # within one component, or the root package's __version__
    if source in LEAVES or source == "":
        return f"{source or PACKAGE} is a leaf and imports no package module"
    if target in LEAVES:
        return None
    if target == "config":
        return None if source in TOP else "only the top layer (trainer/, eval/, cli, demo, plan) imports config.py"
    if source == "config":
        parts = edge.target.split(".")
        if target == "algorithms" or (target in CONFIG_SOURCES and parts[2:] == ["config"]):
            return None
        return "config.py imports only algorithms/, config_loader and <component>.config modules"
    if source in TOP:
        return None
    if source in LOWER:
        return None if target in LOWER[source] else f"{source}/ may import only {sorted(LOWER[source]) or 'nothing'}"
    return f"{source} is not placed in the layering rules; add it to tests/test_layering.py"


def violations(root: Path) -> list[tuple[Edge, str]]:
    return [(edge, why) for edge in import_edges(root) if (why := violation(edge)) is not None]


def test_layers_point_one_way() -> None:
    found = violations(ROOT)
    known = [(edge, why) for edge, why in found if (edge.file, edge.target) in KNOWN_VIOLATIONS]
    unexpected = [f"{edge.describe()} ({why})" for edge, why in found if (edge, why) not in known]
    assert not unexpected, "layering violations:\n  " + "\n  ".join(unexpected)
    stale = KNOWN_VIOLATIONS - {(edge.file, edge.target) for edge, _ in found}
    assert not stale, f"KNOWN_VIOLATIONS entries no longer occur; delete them: {sorted(stale)}"


def import_cycles(edges: list[Edge]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), i.e. every import cycle; a
    module that imports itself is not a cycle."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set())
        graph.setdefault(edge.target, set())
        if edge.source != edge.target:
            graph[edge.source].add(edge.target)
    order: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def visit(module: str) -> None:
        order[module] = lowest[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in order:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in on_stack:
                lowest[module] = min(lowest[module], order[target])
        if lowest[module] == order[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return sorted(components, key=sorted)


def describe_cycle(component: frozenset[str], edges: list[Edge]) -> str:
    """The modules of one cycle and the import statements that close it."""
    inside = sorted({edge for edge in edges if edge.source in component and edge.target in component}, key=_edge_key)
    return f"{sorted(component)}:\n    " + "\n    ".join(edge.describe() for edge in inside)


def _edge_key(edge: Edge) -> tuple[str, int, str]:
    return edge.file, edge.line, edge.target


def cycle_problems(root: Path, known: frozenset[frozenset[str]] = KNOWN_CYCLES) -> list[str]:
    """Every import cycle under ``root`` that is not in ``known``, and every ``known`` entry that no longer occurs."""
    edges = import_edges(root)
    cycles = import_cycles(edges)
    problems = [f"import cycle {describe_cycle(cycle, edges)}" for cycle in cycles if cycle not in known]
    problems += [
        f"KNOWN_CYCLES entry {sorted(stale)} no longer occurs; delete it"
        for stale in sorted(known - set(cycles), key=sorted)
    ]
    return problems


def test_package_modules_import_each_other_without_cycles() -> None:
    problems = cycle_problems(ROOT)
    assert not problems, "\n  ".join(["import cycles (lazy and TYPE_CHECKING imports count):", *problems])


def test_every_component_is_placed_in_the_rules() -> None:
    components = {_component(_module_name(path, ROOT)) for path in (ROOT / PACKAGE).rglob("*.py")}
    placed = LEAVES | TOP | set(LOWER) | {"config", ""}
    assert components <= placed, f"components missing from the layering rules: {sorted(components - placed)}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_checker_flags_synthetic_violations(tmp_path: Path) -> None:
    """Lazy, TYPE_CHECKING and relative imports of a higher layer are all found, with file and line."""
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "config.py": "from megatron_dispo.models.parallel import ParallelConfig\n",
            "config_loader.py": "",
            "algorithms/__init__.py": "",
            "algorithms/losses.py": """\
                from typing import TYPE_CHECKING

                from megatron_dispo.algorithms import registry

                if TYPE_CHECKING:
                    from megatron_dispo.models.policy import Policy


                def loss() -> None:
                    import megatron_dispo.trainer.loop
                """,
            "algorithms/registry.py": "",
            "models/__init__.py": "",
            "models/parallel.py": "from ..config_loader import ConfigError\nfrom ..rollout import engine\n",
            "models/policy.py": "from megatron_dispo.config import Config\n",
            "rollout/__init__.py": "",
            "rollout/engine.py": "from megatron_dispo.models.config import ParallelConfig\n",
            "trainer/__init__.py": "",
            "trainer/loop.py": "from megatron_dispo import config, models\nfrom megatron_dispo.refit import refit\n",
        },
    )
    found = {(edge.file, edge.line, edge.target) for edge, _ in violations(tmp_path)}
    assert found == {
        ("megatron_dispo/algorithms/losses.py", 6, "megatron_dispo.models.policy"),
        ("megatron_dispo/algorithms/losses.py", 10, "megatron_dispo.trainer.loop"),
        ("megatron_dispo/config.py", 1, "megatron_dispo.models.parallel"),
        ("megatron_dispo/models/parallel.py", 2, "megatron_dispo.rollout.engine"),
        ("megatron_dispo/models/policy.py", 1, "megatron_dispo.config"),
        ("megatron_dispo/rollout/engine.py", 1, "megatron_dispo.models.config"),
    }


def test_cycle_checker_finds_lazy_and_type_checking_cycles_and_stale_entries(tmp_path: Path) -> None:
    """A cycle closed by a lazy import, one closed by a TYPE_CHECKING import, one through a package ``__init__``; a
    one-way chain is no cycle; a known entry that does not occur is reported."""
    _write(
        tmp_path,
        {
            "__init__.py": "",
            "algorithms/__init__.py": "from megatron_dispo.algorithms.losses import loss\n",
            "algorithms/losses.py": "from megatron_dispo.algorithms import registry\n\n\ndef loss() -> None: ...\n",
            "algorithms/registry.py": "def names() -> None:\n    from megatron_dispo.algorithms.losses import loss\n",
            "algorithms/presets.py": "from megatron_dispo.algorithms import losses, registry\n",
            "rollout/__init__.py": "",
            "rollout/engine.py": """\
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from megatron_dispo.rollout.replicas import Replicas
                """,
            "rollout/replicas.py": "from megatron_dispo.rollout.engine import Engine\n",
            "data/__init__.py": "from megatron_dispo.data.sources import load\n",
            "data/sources.py": "from megatron_dispo.data import Problem\n",
        },
    )
    assert import_cycles(import_edges(tmp_path)) == [
        frozenset({"megatron_dispo.algorithms.losses", "megatron_dispo.algorithms.registry"}),
        frozenset({"megatron_dispo.data", "megatron_dispo.data.sources"}),
        frozenset({"megatron_dispo.rollout.engine", "megatron_dispo.rollout.replicas"}),
    ]
    known = frozenset(
        {
            frozenset({"megatron_dispo.rollout.engine", "megatron_dispo.rollout.replicas"}),
            frozenset({"megatron_dispo.refit.transports", "megatron_dispo.refit.vllm_worker"}),
        }
    )
    problems = cycle_problems(tmp_path, known)
    assert len(problems) == 3
    assert problems[0].startswith(
        "import cycle ['megatron_dispo.algorithms.losses', 'megatron_dispo.algorithms.registry']"
    )
    lazy_edge = "algorithms/registry.py:2: megatron_dispo.algorithms.registry imports megatron_dispo.algorithms.losses"
    assert lazy_edge in problems[0]
    assert problems[1].startswith("import cycle ['megatron_dispo.data', 'megatron_dispo.data.sources']")
    assert problems[2] == (
        "KNOWN_CYCLES entry ['megatron_dispo.refit.transports', 'megatron_dispo.refit.vllm_worker'] no longer occurs; "
        "delete it"
    )


_SIDE_EFFECT_PROBE = """
import json, os, sys
before = dict(os.environ)
import megatron_dispo.config as config
config.load_run_config(sys.argv[1])
print(json.dumps({
    "env_changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
    "heavy": sorted(m for m in ("vllm", "megatron", "megatron_dispo.rollout.engine") if m in sys.modules),
    "package": os.path.dirname(config.__file__),
}))
"""


def test_loading_a_config_has_no_side_effects() -> None:
    """A fresh process that loads the tiny CPU config keeps its environment and imports neither vLLM nor Megatron."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    config_file = ROOT / "examples" / "configs" / "tiny_cpu_dispo.yaml"
    result = subprocess.run(
        [sys.executable, "-c", _SIDE_EFFECT_PROBE, str(config_file)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package"] == str(ROOT / PACKAGE)
    assert report["env_changed"] == []
    assert report["heavy"] == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
