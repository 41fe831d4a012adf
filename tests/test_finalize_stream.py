"""Streaming finalisation (one source layer at a time, no model built) writes, tensor by tensor,
the model that in-memory finalisation of the whole masked model gives: a pruning checkpoint of
a masked megatron-core model is loaded whole, cut to canonical weights, finalised by
:func:`megashear.pruning.finalize.finalize` and compared with what ``finalize_checkpoint``
wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    # GQA, every kind, untied
    "gqa": {
        "model": dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4),
        "target": dict(num_layers=3, hidden_size=48, num_attention_heads=4, num_query_groups=2),
        "kinds": ["hidden", "head", "head_layer", "intermediate", "mlp", "layer"],
    },
    # tied embeddings (the hidden mask on the shared matrix) and a padded vocabulary
    "tied": {
        "model": dict(
            num_layers=3,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            tie_word_embeddings=True,
        ),
        "target": dict(num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1),
        "kinds": ["hidden", "head", "intermediate", "layer"],
    },
}


def _in_memory_vs_stream(case: str, workdir: str) -> dict:
    """Run in a subprocess (it initialises torch.distributed and megatron's parallel state)."""
    import dataclasses
    import os

    import torch

    from megashear.checkpoint.dist_stream import CheckpointReader
    from megashear.checkpoint.megatron_layout import canonical_to_megatron, megatron_to_canonical
    from megashear.checkpoint.model_state import save_model_checkpoint
    from megashear.config import ParallelConfig
    from megashear.jobs.finalize import finalize_checkpoint
    from megashear.model_config import ModelConfig
    from megashear.models.llama import build_model, build_transformer_config
    from megashear.models.masked import MaskBank, attach_mask_bank, masked_block_spec
    from megashear.parallel import init_distributed, init_model_parallel
    from megashear.pruning.finalize import finalization_masks, finalize

    spec = CASES[case]
    source = ModelConfig(**spec["model"], ffn_hidden_size=96, vocab_size=100, seq_length=32)
    target = dataclasses.replace(
        source, **spec["target"], ffn_hidden_size=40, kv_channels=source.head_dim
    )
    kinds = tuple(spec["kinds"])
    init_distributed()
    par = ParallelConfig()
    init_model_parallel(source, par)
    tconfig = build_transformer_config(source, par)
    chunk = build_model(source, tconfig, masked_block_spec(tconfig, source.head_dim))[0]
    bank = MaskBank(
        kinds,
        source.hidden_size,
        source.num_attention_heads,
        source.ffn_hidden_size,
        source.num_layers,
        list(range(source.num_layers)),
    )
    attach_mask_bank(chunk, bank)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in chunk.named_parameters():
            # weights of norm-like size away from 1, log α spread so that the masks are soft
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 if "log_alpha" in name else 0.2))
    load = os.path.join(workdir, "masked")
    meta = {"pruning": {"kinds": list(kinds), "target": target.to_dict()}}
    save_model_checkpoint([chunk], source, load, extra_meta=meta)

    # today's in-memory finalisation: the whole masked model, canonical, finalised, megatron
    weights = {
        k: v.detach().clone()
        for k, v in chunk.state_dict().items()
        if not k.endswith("_extra_state") and not k.startswith("mask_bank.")
    }
    log_alpha = {kind: bank.log_alpha(kind).detach().clone() for kind in kinds}
    masks = finalization_masks(log_alpha, source, target)
    with torch.no_grad():
        pruned, cfg = finalize(megatron_to_canonical(weights, source), source, masks, target)
    expected = canonical_to_megatron(pruned, cfg)

    save = os.path.join(workdir, "final")
    streamed_cfg = finalize_checkpoint(load, save)
    reader = CheckpointReader(save)
    return {
        "configs_equal": streamed_cfg == cfg == reader.cfg,
        "keys_equal": set(reader.shapes) == set(expected),
        "unequal": [k for k in expected if not torch.equal(reader(k), expected[k])],
        "dtype": str(reader.stored_dtype),
        "soft_masks": any(bool(((m != 0) & (m != 1)).any()) for m in masks.values() if m.dim() > 0),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_finalisation_equals_in_memory(case, tmp_path):
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_finalize_stream import _in_memory_vs_stream as f;"
        "print(json.dumps(f(sys.argv[2], sys.argv[3])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), case, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["soft_masks"], "the masks must carry soft values for the folding to be tested"
    assert out["configs_equal"] and out["keys_equal"]
    assert out["unequal"] == []
    assert out["dtype"] == "torch.float32"
