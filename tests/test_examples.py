"""The example configs resolve into RunConfig and their targets fit their sources; the
``megashear shear`` recipes (``*recipe.yaml``) resolve into Recipe; the launch scripts are
valid bash."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from megashear import config_io
from megashear.cli import pruning_target
from megashear.config import RunConfig
from megashear.model_config import get_preset
from megashear.pruning.targets import make_target, validate_target

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(EXAMPLES.glob("*/*recipe.yaml"))
YAMLS = sorted(set(EXAMPLES.glob("*/*.yaml")) - set(RECIPES))
SCRIPTS = sorted(EXAMPLES.glob("*/*.sh")) + sorted(EXAMPLES.glob("common/*"))


def test_there_are_examples():
    names = {p.parent.name for p in YAMLS}
    assert {"llama2_7b_to_1.3b", "llama2_7b_to_2.7b", "llama3_8b_to_gqa_1.3b"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_config_resolves(path):
    data = config_io.load_yaml(str(path))
    base = {"model": get_preset(data["model_preset"]).to_dict()} if "model_preset" in data else {}
    cfg = config_io.resolve(RunConfig, [str(path)], argparse.Namespace(), base=base)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    if path.name == "prune.yaml":
        target = pruning_target(cfg)
        validate_target(cfg.model, target, tp_sizes=(cfg.parallel.tp,), pp_sizes=(1,))
        assert cfg.pruning.lagrangian_warmup_steps == 640 and cfg.train.train_iters == 3200


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_recipe_resolves(path):
    from megashear.pipeline.recipe import Recipe

    recipe = config_io.resolve(Recipe, [str(path)], argparse.Namespace())
    assert recipe.target_fields() and recipe.data.seq_length > 0
    if path.parent.name == "llama3.2_1b":
        source = get_preset("llama3.2-1b")
        assert recipe.pruning.method == "prune" and recipe.layout.nproc == 8
        target = make_target(source, **recipe.target_fields())
        validate_target(source, target, tp_sizes=(1,), pp_sizes=(1,))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_are_valid_bash(path):
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
