"""mhpc's own import graph: no cycle, and no import from a lower layer to a higher one.

Every ``import``/``from ... import`` of an mhpc module counts, function-local ones included (a lazy import
is still a dependency); only ``if TYPE_CHECKING:`` blocks are left out (annotations, never run).

The rule, bottom to top (``LAYERS``): a module may import its own layer and the layers below it, never one
above. The layers:
  foundation   no model, no data: errors, the parameter table, keys, checks, timing, output files
  blocks       data, the stages (backbone, features, PCA, whitening, scoring), memory banks, fit state, configs
  procedures   functions that take a model and run it: the fit passes and driver, the Ray executor, the
               deployment graph and export. They see the model only through its attributes
               (``TYPE_CHECKING`` imports; Ray tasks get the model's class as an argument), so the model may
               call them: ``fit``, ``update``, ``fit_distributed`` and ``export`` are methods that delegate
               downwards.
  model        ``MHPatchCore`` and its file (``model_file`` returns a file's parts, ``MHPatchCore.load``
               builds the model from them; presets come from the parameter table)
  engines      what runs a saved model on something: scoring on Ray, evaluation, prediction, reports
  applications serve, the ablation study
  entry points the CLI, ``python -m mhpc`` and the package's public face (``from mhpc import MHPatchCore``);
               mhpc's own modules never import ``mhpc`` itself (the version is in ``mhpc._version``)
A new module must be placed in a layer (the test says so). On failure the offending edges are printed.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mhpc"

LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["mhpc._version", "mhpc.errors", "mhpc.params", "mhpc.keys", "mhpc.validation", "mhpc.row_buffer",
                    "mhpc.core.timing", "mhpc.outputs", "mhpc.metrics"]),
    ("blocks", ["mhpc.data", "mhpc.mahalanobis", "mhpc.memory_bank", "mhpc.fit.state", "mhpc.fit_state", "mhpc.fit",
                "mhpc.core.backbones", "mhpc.core.feature_extractor", "mhpc.core.reduction", "mhpc.core.scoring",
                "mhpc.core.projection", "mhpc.core.threshold", "mhpc.config", "mhpc.weights"]),
    ("procedures", ["mhpc.fit.passes", "mhpc.fit.driver", "mhpc.fit.ray_executor", "mhpc.deploy"]),
    ("model", ["mhpc.core", "mhpc.core.mh_patch_core", "mhpc.core.model_file", "mhpc.core.model_schema"]),
    ("engines", ["mhpc.distributed", "mhpc.evaluation", "mhpc.prediction", "mhpc.report"]),
    ("applications", ["mhpc.serve", "mhpc.ablation"]),
    ("entry points", ["mhpc.cli", "mhpc.__main__", "mhpc"]),
]

# Edges the layering forbids that another branch removes; each must still exist (a stale entry fails).
PENDING: dict[tuple[str, str], str] = {}


def module_names(root: Path = ROOT) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the mhpc modules it imports (a name imported from a package counts as that submodule)."""
    names = module_names(root)

    def owner(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(owner(a.name) for a in node.names if a.name.split(".")[0] == "mhpc")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != "mhpc":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in names else owner(base))
        targets.discard(None)
        targets.discard(module)
        graph[module] = targets  # type: ignore[assignment]
    return graph


def layer_of(module: str) -> int | None:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def test_every_module_has_a_layer():
    missing = sorted(m for m in module_names() if layer_of(m) is None)
    assert not missing, f"place these modules in a layer of tests/test_layering.py: {missing}"


def test_no_import_cycle():
    graph = {a: {b for b in targets if (a, b) not in PENDING} for a, targets in import_graph().items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1][::-1]  # graphlib lists each module before the one that imports it
        edges = "\n  ".join(f"{a} -> {b}" for a, b in zip(cycle, cycle[1:]))
        raise AssertionError(f"import cycle:\n  {edges}") from None


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    upward = sorted(
        (a, b) for a, targets in graph.items() for b in targets
        if layer_of(b) is not None and layer_of(a) is not None and layer_of(b) > layer_of(a)
    )
    offending = [edge for edge in upward if edge not in PENDING]
    assert not offending, "imports from a lower layer to a higher one:\n  " + "\n  ".join(
        f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})" for a, b in offending)
    stale = sorted(set(PENDING) - set(upward))
    assert not stale, f"these PENDING edges are gone; remove them from tests/test_layering.py: {stale}"


def test_the_checker_sees_local_and_relative_imports_and_skips_type_checking(tmp_path):
    package = tmp_path / "mhpc"
    (package / "low").mkdir(parents=True)
    for name in ("__init__.py", "low/__init__.py", "high.py", "other.py"):
        (package / name).write_text("")
    (package / "low" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mhpc.other import X\n"
        "def f():\n    from .. import high\n")
    assert import_graph(package)["mhpc.low.a"] == {"mhpc.high"}
