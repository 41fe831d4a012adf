"""Finalisation: masked forward under deterministic masks == plain forward of the pruned weights."""

from __future__ import annotations

import pytest
import torch

from megashear.layout import canonical_shapes, init_canonical_weights
from megashear.model_config import ModelConfig, get_preset
from megashear.pruning import hard_concrete as hc
from megashear.pruning.finalize import finalization_masks, finalization_plan, finalize
from megashear.pruning.reference_forward import llama_forward, masked_llama_forward
from megashear.pruning.targets import make_target

MHA = ModelConfig(4, 64, 4, 4, 160, 256)  # hn 16
GQA = ModelConfig(4, 64, 8, 4, 160, 256)  # hn 8, 2 query heads per group

# (source, target fields): MHA; GQA removing groups; GQA keeping every group.
CASES = {
    "mha": (MHA, dict(num_layers=3, hidden_size=40, num_attention_heads=2, ffn_hidden_size=96)),
    "gqa-fewer-groups": (GQA, dict(num_layers=3, hidden_size=40, num_attention_heads=4,
                                   num_query_groups=2, ffn_hidden_size=96)),
    "gqa-all-groups": (GQA, dict(num_layers=2, hidden_size=48, num_attention_heads=4,
                                 num_query_groups=4, ffn_hidden_size=112)),
}  # fmt: skip
KIND_SETS = {
    "paper": hc.PAPER_KINDS,
    "all-six": hc.ALL_KINDS,
    "attn-mlp-gates": ("head", "intermediate", "hidden", "head_layer", "mlp"),
    "head": ("head", "layer"),
    "hidden": ("hidden", "layer"),
    "intermediate": ("intermediate",),
}


def _log_alpha(cfg: ModelConfig, kinds, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = hc.log_alpha_shapes(
        cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.num_layers
    )
    return {k: torch.randn(shapes[k], generator=g, dtype=torch.float64) * 2 + 1 for k in kinds}


def _target_for(source: ModelConfig, fields: dict, kinds) -> ModelConfig:
    """The case's target, keeping the source size of every dim no pruned kind can shrink."""
    f = dict(fields)
    if "hidden" not in kinds:
        f["hidden_size"] = source.hidden_size
    if "head" not in kinds:
        f["num_attention_heads"] = source.num_attention_heads
        f["num_query_groups"] = source.num_query_groups
    if "intermediate" not in kinds:
        f["ffn_hidden_size"] = source.ffn_hidden_size
    if "layer" not in kinds and not {"head_layer", "mlp"} <= set(kinds):
        f["num_layers"] = source.num_layers
    return make_target(source, **f)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kinds_name", list(KIND_SETS))
def test_finalised_model_equals_masked_model(case, kinds_name):
    source, fields = CASES[case]
    kinds = KIND_SETS[kinds_name]
    target = _target_for(source, fields, kinds)
    g = torch.Generator().manual_seed(7)
    weights = init_canonical_weights(source, g, torch.float64, std=0.2)
    masks = finalization_masks(_log_alpha(source, kinds, seed=11), source, target)
    pruned, cfg = finalize(weights, source, masks, target)
    assert cfg.num_parameters() == target.num_parameters()
    assert {k: tuple(v.shape) for k, v in pruned.items()} == finalization_plan(source, target)
    tokens = torch.randint(0, source.vocab_size, (2, 16), generator=g)
    masked = masked_llama_forward(weights, source, masks, tokens)
    plain = llama_forward(pruned, cfg, tokens)
    torch.testing.assert_close(plain, masked, rtol=0, atol=1e-9)
    # The masks matter: the source model's own logits are far from these.
    assert (llama_forward(weights, source, tokens) - masked).abs().max() > 1e-2


def test_finalised_model_float32():
    source, fields = CASES["gqa-fewer-groups"]
    target = make_target(source, **fields)
    g = torch.Generator().manual_seed(3)
    weights = init_canonical_weights(source, g, torch.float32, std=0.2)
    masks = finalization_masks(_log_alpha(source, hc.ALL_KINDS, 5), source, target)
    masks = {k: v.float() for k, v in masks.items()}
    pruned, cfg = finalize(weights, source, masks, target)
    tokens = torch.randint(0, source.vocab_size, (2, 16), generator=g)
    torch.testing.assert_close(
        llama_forward(pruned, cfg, tokens),
        masked_llama_forward(weights, source, masks, tokens),
        rtol=0,
        atol=1e-5,
    )


def test_finalise_evaluation_masks_with_half_layers():
    """Non-target masks (rounded expected counts): a layer may lose only its attention."""
    source = MHA
    la = _log_alpha(source, ("head_layer", "intermediate"), seed=2)
    la["head_layer"] = torch.tensor([5.0, -5.0, 5.0, 5.0], dtype=torch.float64)
    masks = hc.deterministic_masks(la)
    assert masks["head_layer"].tolist()[1] == 0
    g = torch.Generator().manual_seed(0)
    weights = init_canonical_weights(source, g, torch.float64, std=0.2)
    n_ffn = int((masks["intermediate"][0] != 0).sum())
    masks["intermediate"] = hc.deterministic_mask(la["intermediate"], keep=n_ffn)
    pruned, cfg = finalize(weights, source, masks)
    assert cfg.num_layers == 4 and cfg.ffn_hidden_size == n_ffn
    assert torch.count_nonzero(pruned["layers.1.o"]) == 0  # attention folded away
    tokens = torch.randint(0, source.vocab_size, (1, 12), generator=g)
    torch.testing.assert_close(
        llama_forward(pruned, cfg, tokens),
        masked_llama_forward(weights, source, masks, tokens),
        rtol=0,
        atol=1e-9,
    )


@pytest.mark.parametrize("cfg", [MHA, GQA])
def test_all_ones_masks_equal_plain_forward(cfg):
    g = torch.Generator().manual_seed(1)
    weights = init_canonical_weights(cfg, g, torch.float64, std=0.2)
    ones = {k: torch.ones_like(v) for k, v in _log_alpha(cfg, hc.ALL_KINDS, 0).items()}
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=g)
    torch.testing.assert_close(
        masked_llama_forward(weights, cfg, ones, tokens),
        llama_forward(weights, cfg, tokens),
        rtol=0,
        atol=1e-10,
    )
    pruned, new_cfg = finalize(weights, cfg, ones)
    assert new_cfg == cfg
    assert all(torch.equal(pruned[k], weights[k]) for k in weights)


def test_non_uniform_masks_are_rejected():
    source, fields = CASES["gqa-fewer-groups"]
    target = make_target(source, **fields)
    weights = init_canonical_weights(source, device="meta")
    masks = finalization_masks(_log_alpha(source, hc.PAPER_KINDS, 4), source, target)
    bad = {k: v.clone() for k, v in masks.items()}
    kept_layer = int(torch.nonzero(bad["layer"])[0])
    row = bad["intermediate"][kept_layer]
    row[torch.nonzero(row)[0]] = 0.0  # one FFN unit fewer in one kept layer
    with pytest.raises(ValueError, match="differ in"):
        finalize(weights, source, bad)
    bad = {k: v.clone() for k, v in masks.items()}
    bad["head"][kept_layer] = torch.tensor([1.0, 1.0, 1.0, 0, 0, 0, 0, 0])  # groups of 2 and 1
    with pytest.raises(ValueError, match="same number in every kept group"):
        finalize(weights, source, bad)
    with pytest.raises(ValueError, match="target"):
        finalize(weights, source, masks, make_target(source, **{**fields, "num_layers": 2}))


def test_bad_inputs_are_rejected():
    weights = init_canonical_weights(MHA, device="meta")
    del weights["layers.0.q"]
    with pytest.raises(ValueError, match="missing"):
        finalize(weights, MHA, {})
    with pytest.raises(ValueError, match="larger than the source"):
        finalization_plan(MHA, make_target(GQA, num_layers=5))


def count_parameters(cfg: ModelConfig) -> int:
    return sum(torch.Size(s).numel() for s in canonical_shapes(cfg).values())


@pytest.mark.parametrize(
    "name", ["llama2-7b", "llama2-70b", "llama3-8b", "llama3.2-1b", "smollm2-135m", "tiny-gqa"]
)
def test_canonical_layout_matches_parameter_formula(name):
    """The layout's shapes and ModelConfig's closed formula agree (the tie counted once)."""
    cfg = get_preset(name)
    assert count_parameters(cfg) == cfg.num_parameters()
    assert ("lm_head" in canonical_shapes(cfg)) == (not cfg.tie_word_embeddings)


def test_published_parameter_counts():
    assert get_preset("smollm2-135m").num_parameters() == 134_515_008
    assert get_preset("llama3.2-1b").num_parameters() == 1_235_814_400


def _hn128(*fields: int) -> ModelConfig:
    return ModelConfig(*fields, kv_channels=128)


@pytest.mark.parametrize(
    "source_name,preset,expected_cfg",
    [
        ("llama2-7b", "sheared-llama-1.3b", _hn128(24, 2048, 16, 16, 5504, 32000)),
        ("llama2-7b", "sheared-llama-2.7b", _hn128(32, 2560, 20, 20, 6912, 32000)),
        ("llama3-8b", "sheared-llama-1.3b", _hn128(24, 2048, 16, 4, 5504, 128256)),
    ],
)  # fmt: skip
def test_7b_plan_on_meta_has_exact_parameter_counts(source_name, preset, expected_cfg):
    source = get_preset(source_name)
    target = make_target(source, preset)
    weights = init_canonical_weights(source, device="meta")  # no memory for 7B
    masks = finalization_masks(_log_alpha(source, hc.PAPER_KINDS, 9), source, target)
    pruned, cfg = finalize(weights, source, masks, target)
    shapes = {k: tuple(v.shape) for k, v in pruned.items()}
    assert all(v.device.type == "meta" for v in pruned.values())
    assert shapes == finalization_plan(source, target) == canonical_shapes(expected_cfg)
    n = sum(v.numel() for v in pruned.values())
    assert n == count_parameters(cfg) == expected_cfg.num_parameters()
    if preset == "sheared-llama-1.3b" and source_name == "llama2-7b":
        assert n == 1_345_423_360
