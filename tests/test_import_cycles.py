"""Modules of one component import each other one way (issue 24): no circle inside ``refit/`` or ``rollout/``.

A circle (``transports`` <-> ``vllm_worker``, ``engine`` <-> ``replicas``) worked only through a lazy import inside a
function, so which module may be imported first depended on call order. Lazy and ``TYPE_CHECKING`` imports count,
as in :mod:`tests.test_layering` (whose edge finder this uses). The replicas also use only the engine's public API.
"""

from __future__ import annotations

import ast

from tests.test_layering import PACKAGE, ROOT, import_edges

NUM_GPUS = 0


def _cycles(component: str) -> list[list[str]]:
    """Strongly connected groups of more than one module among ``megatron_dispo.<component>.*`` (Tarjan)."""
    prefix = f"{PACKAGE}.{component}."
    graph: dict[str, set[str]] = {}
    for edge in import_edges(ROOT):
        if edge.source.startswith(prefix) and edge.target.startswith(prefix) and edge.source != edge.target:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_gpu_contract_no_import_cycles_in_refit_and_rollout() -> None:
    found = {component: _cycles(component) for component in ("refit", "rollout")}
    assert found == {"refit": [], "rollout": []}, f"import circles: {found}"


def test_gpu_contract_replicas_use_only_the_engine_public_api() -> None:
    """replicas.py reads no private name of engine.py (module constants or RolloutEngine members)."""
    engine_tree = ast.parse((ROOT / PACKAGE / "rollout" / "engine.py").read_text())
    private = {
        node.attr
        for node in ast.walk(engine_tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
    }
    private |= {
        node.name
        for node in ast.walk(engine_tree)
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name.startswith("_") and "__" not in node.name
    }
    private |= {
        target.id
        for node in engine_tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id.startswith("_")
    }
    replicas_tree = ast.parse((ROOT / PACKAGE / "rollout" / "replicas.py").read_text())
    used = sorted(
        {
            node.attr
            for node in ast.walk(replicas_tree)
            if isinstance(node, ast.Attribute)
            and node.attr in private
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        }
        | {
            alias.name
            for node in ast.walk(replicas_tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("rollout.engine")
            for alias in node.names
            if alias.name.startswith("_")
        }
    )
    assert used == [], f"replicas.py uses private names of engine.py: {used}"
