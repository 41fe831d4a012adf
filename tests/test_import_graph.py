"""The import graph of ``megashear/`` and ``tools/`` flows one way, down the layer table.

Every import counts, at module level or inside a function (``ast`` reads them all, so a lazy
import cannot hide an upward dependency). A module may import its own unit (the package or
top-level module it belongs to) and any unit in a lower layer; never a unit in its own layer or
above. The table below is the one stated in docs/architecture.md ("Layout of the code").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Top to bottom. A unit is a package (every module under it) or a top-level module.
LAYERS: tuple[tuple[str, ...], ...] = (
    # scripts: conversion, preprocessing, experiments, benchmarks (they share the cli's parser)
    ("tools",),
    # the megashear command: parsing and dispatch
    ("megashear.cli",),
    # megashear shear: the whole job from one recipe, its stages launched as processes
    ("megashear.pipeline",),
    # the jobs the commands run (train, prune, finalize, evaluate, importance, one-shot, ...)
    ("megashear.jobs",),
    # plots of training's run logs; the downstream (lm-eval) task and score of exported models
    ("megashear.plots", "megashear.evaluation"),
    # the trainers and the checkpoint converters: siblings, neither imports the other
    ("megashear.training", "megashear.conversion"),
    # torch.distributed + megatron parallel_state (checks the layout against the model)
    ("megashear.parallel",),
    # LLaMA on megatron-core; the masked leaves use pruning's hard-concrete distributions
    ("megashear.models",),
    # pure-torch pruning maths; the data pipeline; numpy/scipy scaling laws (P² law);
    # the memory planner's arithmetic (no torch)
    ("megashear.pruning", "megashear.data", "megashear.scaling", "megashear.planning"),
    # the canonical weight layout, RoPE, the checkpoint format (and its streaming reader and
    # writer, which finalisation and conversion share), run-config checks
    ("megashear.layout", "megashear.rope", "megashear.checkpoint", "megashear.config_checks"),
    # run settings and their YAML / flag parsing
    ("megashear.config", "megashear.config_io"),
    # model shapes
    ("megashear.model_config",),
    # the CPU / GPU switch, data paths, megatron-core's jit_fuser compiled on first call, files
    # written whole (temporary name, then rename)
    ("megashear.platform", "megashear.paths", "megashear.lazy_compile", "megashear.atomic_file"),
)
# ``megashear/__init__.py`` belongs to no layer. It may import only this module (its import hook
# must be in place before any megashear module imports megatron-core); anything else is a
# violation.
PACKAGE_INIT_IMPORTS = ("megashear.lazy_compile",)

# Imports the layers would allow but the design does not.
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("megashear.training", "megashear.conversion", "training and conversion are siblings"),
    ("megashear.conversion", "megashear.training", "training and conversion are siblings"),
    ("megashear.conversion", "megashear.pruning", "conversion knows no pruning"),
)

LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str | None:
    """The unit of the table that ``module`` belongs to (the longest matching prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYER_OF:
            return prefix
    return None


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``megashear/`` and ``tools/``."""
    out = {}
    for path in sorted([*ROOT.glob("megashear/**/*.py"), *ROOT.glob("tools/*.py")]):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(module: str, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every ``megashear`` / ``tools`` import in ``source``,
    module-level and function-level alike; ``from a import b`` names ``a.b`` when that is a
    module, and a tool's bare import of another tool names ``tools.<name>``."""
    is_package = any(k.startswith(module + ".") for k in known)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            if module.startswith("tools.") and f"tools.{name.split('.')[0]}" in known:
                name = f"tools.{name}"
            if name.split(".")[0] in ("megashear", "tools"):
                out.append((node.lineno, name))
    return out


def violations(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Every import of ``graph`` (module -> its imports) that goes sideways, up, or across a
    forbidden pair, as ``module:line imports target (why)``."""
    bad = []
    for module, imports in sorted(graph.items()):
        src = unit_of(module)
        for line, target in imports:
            if module == "megashear" and target in PACKAGE_INIT_IMPORTS:
                continue
            dst = unit_of(target)
            if src is None or dst is None:
                bad.append(f"{module}:{line} imports {target} (not in the layer table)")
                continue
            for a, b, why in FORBIDDEN:
                if src == a and dst == b:
                    bad.append(f"{module}:{line} imports {target} ({why})")
            if src != dst and LAYER_OF[dst] <= LAYER_OF[src]:
                where = (
                    "the same layer as" if LAYER_OF[dst] == LAYER_OF[src] else "a higher layer than"
                )
                bad.append(f"{module}:{line} imports {target} ({dst} is in {where} {src})")
    return bad


def repo_graph() -> dict[str, list[tuple[int, str]]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(m, p.read_text(encoding="utf-8"), known) for m, p in files.items()}


def test_every_module_is_in_the_layer_table():
    files = module_files()
    assert "megashear.training.trainer" in files and "tools.convert_checkpoint" in files
    unplaced = sorted(m for m in files if unit_of(m) is None and m != "megashear")
    assert not unplaced, f"modules outside the layer table (add them to LAYERS): {unplaced}"
    units = {unit_of(m) for m in files}
    stale = sorted(set(LAYER_OF) - units)
    assert not stale, f"units in LAYERS without a module: {stale}"


def test_imports_flow_down_the_layers():
    graph = repo_graph()
    # the reader sees function-level imports too (cli imports training inside its commands)
    assert (
        any(t.startswith("megashear.training.") for _, t in graph["megashear.cli"])
        and sum(len(v) for v in graph.values()) > 100
    )
    bad = violations(graph)
    assert not bad, "imports against the layer table:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        # module-level upward import
        ("megashear.layout", "import megashear.training.trainer", "a higher layer than"),
        # function-level upward import
        (
            "megashear.checkpoint.format",
            "def f():\n    from megashear.models.llama import build_model",
            "a higher layer than",
        ),
        # `from package import module`
        ("megashear.platform", "from megashear import cli", "a higher layer than"),
        # relative import, upward
        ("megashear.pruning.targets", "from ..models import masked", "a higher layer than"),
        # siblings of one layer
        ("megashear.training.trainer", "from megashear.conversion import hf", "siblings"),
        ("megashear.conversion.hf", "from megashear.training.trainer import x", "siblings"),
        ("megashear.data.loader", "import megashear.pruning.targets", "the same layer"),
        # allowed by the layers, refused by design
        ("megashear.conversion.meta", "from megashear.pruning import finalize", "no pruning"),
        # a module the table does not know, and an import in the package's __init__
        ("megashear.layout", "import megashear.newthing", "not in the layer table"),
        ("megashear", "from megashear import platform", "not in the layer table"),
    ],
)
def test_the_checker_refuses(module, source, expected):
    known = set(module_files()) | {module}
    found = violations({module: imports_of(module, source, known)})
    assert any(expected in v for v in found), found


@pytest.mark.parametrize(
    "module, source",
    [
        ("megashear.training.trainer", "from megashear.checkpoint.format import resolve"),
        ("megashear.training.trainer", "from .checkpointing import save_checkpoint"),
        ("megashear.conversion.megatron_model", "from megashear.models.llama import build_model"),
        ("megashear.jobs.finalize", "def f():\n    from megashear.conversion import hf"),
        (
            "megashear.jobs.finalize",
            "from megashear.checkpoint.dist_stream import write_checkpoint",
        ),
        (
            "megashear.conversion.hf",
            "from megashear.checkpoint.dist_stream import CheckpointReader",
        ),
        ("tools.demo", "from stage_runner import StageRunner"),
        ("megashear.cli", "import torch\nfrom megatron.core import parallel_state"),
    ],
)
def test_the_checker_allows(module, source):
    known = set(module_files())
    assert violations({module: imports_of(module, source, known)}) == []
