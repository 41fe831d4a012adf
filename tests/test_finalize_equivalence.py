"""Under deterministic masks at the target sizes, the masked model's logits equal the logits of
the model ``megashear finalize`` makes, at TP1PP1 and TP2PP2, for MHA, GQA and a tied GQA model
with a padded vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megashear.model_config import ModelConfig
from tests.launch import megashear_cli
from tests.launch import prune_torchrun as torchrun
from tests.test_masked_model import GQA_TARGET, MHA_TARGET

pytestmark = pytest.mark.dist
MODELS = {
    "mha": {"model": "tiny-mha", "target": MHA_TARGET},
    "gqa": {
        "model": "tiny-gqa-8h",
        "target": GQA_TARGET,
        "kinds": ["hidden", "head", "head_layer", "intermediate", "mlp", "layer"],
    },
    # tied embeddings (the hidden mask on the one shared matrix; under PP2 the last stage holds
    # megatron-core's copy of it) and a padded vocabulary
    "tied": {
        "model": "tiny-gqa-tied",
        "target": GQA_TARGET,
        "kinds": ["hidden", "head", "intermediate", "layer"],
    },
}


def finalize(load: str, save: str) -> dict:
    proc = megashear_cli("finalize", f"--checkpoint.load={load}", f"--checkpoint.save={save}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("finalize")
    masked = {m: str(d / f"masked_{m}") for m in MODELS}
    final = {m: str(d / f"final_{m}") for m in MODELS}
    out = torchrun(
        4,
        [
            {
                "name": f"masked_{m}_tp2pp2",
                **spec,
                "tp": 2,
                "pp": 2,
                "mode": "logits",
                "log_alpha_seed": 5,
                "save_masked": masked[m],
            }
            for m, spec in MODELS.items()
        ],
        d / "a",
    )
    out["finalized"] = {m: finalize(masked[m], final[m]) for m in MODELS}
    out.update(
        torchrun(
            4,
            [
                {
                    "name": f"final_{m}_tp2pp2",
                    "mode": "plain_logits",
                    "tp": 2,
                    "pp": 2,
                    "load_model": final[m],
                }
                for m in MODELS
            ],
            d / "b",
        )
    )
    out.update(
        torchrun(
            1,
            [
                {"name": f"final_{m}_tp1pp1", "mode": "plain_logits", "load_model": final[m]}
                for m in MODELS
            ]
            + [
                {"name": f"masked_{m}_tp1pp1", **spec, "mode": "logits", "init": masked[m]}
                for m, spec in MODELS.items()
            ],
            d / "c",
        )
    )
    out["final_dirs"] = final
    return out


@pytest.mark.parametrize("model", list(MODELS))
def test_finalized_export_loads_in_transformers_with_equal_logits(runs, model, tmp_path):
    """The finalised (pruned) checkpoint -> HF via the converter; transformers loads it with
    ``from_pretrained`` alone, and its logits equal the megatron model's."""
    from transformers import LlamaForCausalLM

    from megashear.training.batches import SyntheticBatches

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py"),
            "megatron-to-hf",
            "--load",
            runs["final_dirs"][model],
            "--save",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf, info = LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    cfg = ModelConfig.from_dict(runs["finalized"][model]["model"])
    assert hf.config.num_key_value_heads == cfg.num_query_groups
    tokens = SyntheticBatches(cfg.vocab_size, cfg.seq_length, 5).next_global_batch(4)["tokens"]
    with torch.no_grad():
        theirs = hf.eval()(input_ids=tokens).logits
    torch.testing.assert_close(
        theirs, runs[f"final_{model}_tp1pp1"]["logits"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("model", list(MODELS))
def test_finalized_shape_is_the_target(runs, model):
    got = ModelConfig.from_dict(runs["finalized"][model]["model"])
    target = MODELS[model]["target"]
    for key, value in target.items():
        if key != "kv_channels":
            assert getattr(got, key) == value, (key, got)
    assert got.head_dim == target["kv_channels"]
    assert runs["finalized"][model]["parameters"] == got.num_parameters()


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp2"])
def test_masked_logits_equal_finalized_logits(runs, model, layout):
    masked = runs[f"masked_{model}_{layout}"]["logits"]
    final = runs[f"final_{model}_{layout}"]["logits"]
    assert masked.shape == final.shape
    torch.testing.assert_close(final, masked, rtol=1e-5, atol=1e-5)
    # the masks really prune: the masked logits are not the dense model's
    assert runs[f"masked_{model}_{layout}"]["masks"]["hidden"].eq(0).sum() > 0


def test_layouts_agree(runs):
    for model in MODELS:
        torch.testing.assert_close(
            runs[f"masked_{model}_tp1pp1"]["logits"],
            runs[f"masked_{model}_tp2pp2"]["logits"],
            rtol=1e-5,
            atol=1e-5,
        )
