"""Hard-concrete mask formulas, deterministic masks (incl. GQA) and layout-independent noise."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from megashear.pruning import hard_concrete as hc

# Closed forms used below: with c = 11^(2/3) (= e^{-β log(-l/r)}),
# P(z≠0) = c·α / (1 + c·α); for u, s = u^{1.5} / (u^{1.5} + (1-u)^{1.5}).
C = 11 ** (2 / 3)  # 4.94608744...


def test_constants():
    assert hc.BETA == pytest.approx(2 / 3)
    assert (hc.LIMIT_L, hc.LIMIT_R, hc.EPS) == (-0.1, 1.1, 1e-6)
    assert hc.LOG_ALPHA_MIN == pytest.approx(math.log(0.01))
    assert hc.LOG_ALPHA_MAX == pytest.approx(math.log(100))


def test_keep_probability_hand_values():
    la = torch.tensor([0.0, 3.0, 5.0, 10.0, -10.0], dtype=torch.float64)
    keep = hc.keep_probability(la)
    # log α = 0: c / (1 + c); 3: 99.34/100.34; 5 (the init mean) and 10 clamp to ln 100:
    # 494.6/495.6; -10 clamps to ln 0.01: 0.04946/1.04946.
    expected = [0.8318221839916904, 0.9900343637030719, 0.9979822793454498, 0.9979822793454498,
                0.04712979362783181]  # fmt: skip
    torch.testing.assert_close(keep, torch.tensor(expected, dtype=torch.float64))
    assert expected[0] == pytest.approx(C / (1 + C))


def test_expected_sparsity_rows_and_scalar():
    la = torch.tensor([[0.0, 0.0], [5.0, -10.0]], dtype=torch.float64)  # [L=2, n=2]
    s = hc.expected_sparsity(la)
    assert s.shape == (2,)
    expected = [1 - 0.8318221839916904, 1 - (0.9979822793454498 + 0.04712979362783181) / 2]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))
    assert hc.expected_sparsity(torch.zeros(4)).shape == ()


def test_sample_mask_hand_values_and_gradient():
    la = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    u = torch.tensor([0.5, 0.6, 0.9, 0.1], dtype=torch.float64)
    z = hc.sample_mask(la, u)
    # u=0.5: s=0.5 -> 0.5; u=0.6: s=1.5^1.5/(1+1.5^1.5) -> 0.67703...; u=0.9: s=27/28 -> 1.057 -> 1;
    # u=0.1: s=1/28 -> -0.057 -> 0.
    torch.testing.assert_close(
        z.detach(), torch.tensor([0.5, 0.6770354658926904, 1.0, 0.0], dtype=torch.float64)
    )
    z.sum().backward()
    assert la.grad[0] > 0 and la.grad[1] > 0  # inside (0, 1): differentiable
    assert la.grad[2] == 0 and la.grad[3] == 0  # clamped to 0 / 1


def test_clamp_is_straight_through_and_in_place():
    la = torch.tensor([10.0, -10.0, 1.0], requires_grad=True)
    keep = hc.keep_probability(la)
    torch.testing.assert_close(
        keep[:2], hc.keep_probability(torch.tensor([math.log(100), math.log(0.01)]))
    )
    keep.sum().backward()
    assert (la.grad != 0).all()  # gradient at the clamped value, as after an in-place clamp
    with torch.no_grad():
        hc.clamp_log_alpha_(la)
    torch.testing.assert_close(la.detach(), torch.tensor([math.log(100), math.log(0.01), 1.0]))


def test_init_log_alpha():
    g = torch.Generator().manual_seed(0)
    la = hc.init_log_alpha((100, 100), generator=g)
    assert la.shape == (100, 100)
    assert abs(float(la.mean()) - 5.0) < 1e-3 and abs(float(la.std()) - 0.01) < 1e-3
    assert abs(float(hc.init_log_alpha((1000,), mean=2.0).mean()) - 2.0) < 1e-2


def test_soft_mask_hand_values():
    # σ(log α · 1.2): 0 -> 0.5; 3 -> σ(3.6); 5 clamps to ln 100 -> 100^1.2 / (1 + 100^1.2) = 0.996
    # (the "0.996" survivors of docs/method.md §2).
    soft = hc.soft_mask(torch.tensor([0.0, 3.0, 5.0], dtype=torch.float64))
    expected = [0.5, 0.973403006423134, 0.9960347143808478]
    torch.testing.assert_close(soft, torch.tensor(expected, dtype=torch.float64))


def test_deterministic_mask_target_size_per_row():
    la = torch.tensor([[1.0, -1.0, 3.0, 0.0], [0.5, 2.0, -2.0, 4.0]])
    z = hc.deterministic_mask(la, keep=2)
    soft = hc.soft_mask(la)
    assert (z != 0).tolist() == [[True, False, True, False], [False, True, False, True]]
    torch.testing.assert_close(z[z != 0], soft[z != 0])  # survivors keep their soft values


def test_deterministic_mask_global_and_expected_count():
    la = torch.tensor([[1.0, -1.0, 3.0, 0.0], [0.5, 2.0, -2.0, 4.0]])
    z = hc.deterministic_mask(la, keep=3, per_row=False)
    assert (z != 0).tolist() == [[False, False, True, False], [False, True, False, True]]
    # Expected nonzeros: 0.0471 + 0.0471 + 0.998 + 0.998 = 2.09 -> round(1.91) = 2 zeros.
    lo, hi = math.log(0.01), math.log(100)
    row = torch.tensor([lo, hi, lo, hi])
    assert (hc.deterministic_mask(row) != 0).tolist() == [False, True, False, True]
    # log α = 0 everywhere: expected nonzeros 0.8318 * 10 = 8.318 -> round(1.68) = 2 zeros.
    assert int((hc.deterministic_mask(torch.zeros(10)) == 0).sum()) == 2
    assert int((hc.deterministic_mask(torch.full((3, 10), 5.0)) == 0).sum()) == 0


def test_grouped_head_mask_keeps_uniform_groups():
    # a=8 heads in g=4 groups of r=2. Keep 2 groups x 1 head: group scores are max per group.
    la = torch.tensor([[0.0, 3.0, 1.0, 1.5, -2.0, 4.0, 2.5, 0.5]])  # groups: 3.0 | 1.5 | 4.0 | 2.5
    z = hc.grouped_head_mask(la, num_query_groups=4, keep_groups=2, heads_per_group=1)
    assert _kept(z[0]) == [1, 5]
    # Keep all 4 groups x 1 head: the best head of every group.
    z = hc.grouped_head_mask(la, num_query_groups=4, keep_groups=4, heads_per_group=1)
    assert _kept(z[0]) == [1, 3, 5, 6]
    # Keep 2 groups x 2 heads: scores 3.0+0.0, 1.0+1.5, -2+4, 2.5+0.5 in soft space.
    z = hc.grouped_head_mask(la, num_query_groups=4, keep_groups=2, heads_per_group=2)
    soft = hc.soft_mask(la[0]).view(4, 2).sum(-1)
    best = sorted(torch.topk(soft, 2).indices.tolist())
    assert _kept(z[0]) == [j for grp in best for j in (2 * grp, 2 * grp + 1)]
    with pytest.raises(ValueError):
        hc.grouped_head_mask(la, num_query_groups=4, keep_groups=2, heads_per_group=3)


def _kept(row: torch.Tensor) -> list[int]:
    return torch.nonzero(row).flatten().tolist()


def test_deterministic_masks_dict_sizes_gqa_and_joint_layers():
    g = torch.Generator().manual_seed(3)
    la = {
        "hidden": torch.randn(16, generator=g),
        "head": torch.randn(3, 8, generator=g),
        "intermediate": torch.randn(3, 20, generator=g),
        "layer": torch.randn(3, generator=g),
        "head_layer": torch.randn(3, generator=g),
        "mlp": torch.randn(3, generator=g),
    }
    sizes = {"hidden": 10, "head": 4, "intermediate": 7, "layer": 2, "head_layer": 2, "mlp": 2}
    z = hc.deterministic_masks(la, sizes, num_query_groups=4, target_query_groups=2)
    assert int((z["hidden"] != 0).sum()) == 10
    assert (z["intermediate"] != 0).sum(-1).tolist() == [7, 7, 7]
    for row in z["head"]:
        groups = [j // 2 for j in _kept(row)]
        assert len(groups) == 4 and sorted(groups.count(grp) for grp in set(groups)) == [2, 2]
    kept_layers = [_kept(z[k]) for k in ("layer", "head_layer", "mlp")]
    assert kept_layers[0] == kept_layers[1] == kept_layers[2] and len(kept_layers[0]) == 2
    score = sum(hc.soft_mask(la[k]) for k in ("layer", "head_layer", "mlp"))
    assert kept_layers[0] == sorted(torch.topk(score, 2).indices.tolist())
    # Without sizes: independent, rounded expected counts.
    z = hc.deterministic_masks(la)
    assert set(z) == set(la)
    with pytest.raises(ValueError, match="equal target sizes"):
        hc.deterministic_masks(la, {**sizes, "mlp": 1})


# ----------------------------------------------------------------------------- noise


def test_noise_range_and_shape():
    u = hc.mask_noise(0, 1, 2, 3, "intermediate", 10000)
    assert u.shape == (10000,) and u.dtype == torch.float32
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("stages", [1, 2])
def test_mask_bank_shards_sample_the_full_masks(tp, stages):
    """A MaskBank on TP rank r of a pipeline chunk samples its slice of the masks that one
    unsharded bank of every layer samples (same log alpha, same keyed noise; to float32 rounding
    of the vectorised formula)."""
    from megashear.models.masked import MaskBank

    kinds = ("hidden", "head", "intermediate", "head_layer", "mlp", "layer")
    sizes = dict(hidden_size=16, num_heads=8, ffn_hidden_size=24, num_layers=4)
    full = MaskBank(kinds, **sizes, layer_numbers=list(range(4)), seed=3)
    with torch.no_grad():
        for kind in kinds:
            full.log_alpha(kind).normal_(0.0, 2.0)
    full.sample(iteration=5, microbatch=2)
    per_stage = 4 // stages
    for stage in range(stages):
        layers = list(range(stage * per_stage, (stage + 1) * per_stage))
        shards = []
        for rank in range(tp):
            bank = MaskBank(kinds, **sizes, layer_numbers=layers, tp_rank=rank, tp_size=tp, seed=3)
            local = bank.local_slices({k: full.log_alpha(k).detach() for k in kinds})
            with torch.no_grad():
                for kind in kinds:
                    bank.log_alpha(kind).copy_(local[kind])
            bank.sample(iteration=5, microbatch=2)
            shards.append(bank.z)
        rows = torch.tensor(layers)
        for kind in ("head", "intermediate"):
            got = torch.cat([z[kind] for z in shards], dim=1)
            torch.testing.assert_close(got, full.z[kind][rows], rtol=1e-6, atol=1e-7)
        for z in shards:
            torch.testing.assert_close(z["hidden"], full.z["hidden"], rtol=1e-6, atol=1e-7)
            for kind in ("head_layer", "mlp", "layer"):
                torch.testing.assert_close(z[kind], full.z[kind][rows], rtol=1e-6, atol=1e-7)
    # and the noise really depends on the step: another micro-batch samples other masks
    other = MaskBank(kinds, **sizes, layer_numbers=list(range(4)), seed=3)
    other.load_state_dict(full.state_dict())
    other.sample(iteration=5, microbatch=3)
    assert not torch.equal(other.z["head"], full.z["head"])


@pytest.mark.parametrize("tp,stages", [(2, 1), (4, 2)])
def test_initial_log_alpha_is_the_same_at_every_layout(tp, stages):
    """The paper's N(5, 0.01) start is drawn at full size from (seed, kind): each TP rank and
    pipeline chunk holds its slice of what one unsharded bank draws; another seed differs."""
    from megashear.models.masked import MaskBank

    kinds = ("hidden", "head", "intermediate", "head_layer", "mlp", "layer")
    sizes = dict(hidden_size=16, num_heads=8, ffn_hidden_size=24, num_layers=4)
    full = MaskBank(kinds, **sizes, layer_numbers=list(range(4)), seed=3)
    want = {k: full.log_alpha(k).detach() for k in kinds}
    assert abs(float(want["intermediate"].mean()) - hc.INIT_MEAN) < 0.01
    per_stage = 4 // stages
    for stage in range(stages):
        layers = list(range(stage * per_stage, (stage + 1) * per_stage))
        for rank in range(tp):
            bank = MaskBank(kinds, **sizes, layer_numbers=layers, tp_rank=rank, tp_size=tp, seed=3)
            for kind, value in bank.local_slices(want).items():
                assert torch.equal(bank.log_alpha(kind).detach(), value), (kind, rank, stage)
    other = MaskBank(kinds, **sizes, layer_numbers=list(range(4)), seed=4)
    assert not torch.equal(other.log_alpha("head").detach(), want["head"])


def test_noise_differs_across_keys():
    base = (1, 2, 3, 4, "head")
    ref = hc.mask_noise(*base, 64)
    variants = [
        (9, 2, 3, 4, "head"),
        (1, 9, 3, 4, "head"),
        (1, 2, 9, 4, "head"),
        (1, 2, 3, 9, "head"),
        (1, 2, 3, 4, "intermediate"),
        (1, 2, 3, -1, "head"),
    ]
    for keys in variants:
        assert not torch.equal(hc.mask_noise(*keys, 64), ref), keys
    assert torch.equal(hc.mask_noise(*base, 64), ref)
    # Keys that would collide under naive string joining stay distinct.
    assert hc.noise_seed(1, 23, 4, 5, "x") != hc.noise_seed(12, 3, 4, 5, "x")


def test_noise_seed_is_a_fixed_sha256_derivation():
    # Pinned values: the derivation must never depend on Python's salted hash().
    assert hc.noise_seed(1, 2, 3, 4, "head") == 6586465160073633724
    assert hc.noise_seed(0, 0, 0, -1, "hidden") == 2240260682045334570


def test_noise_stable_across_processes():
    code = (
        "import sys, torch; from megashear.pruning import hard_concrete as hc;"
        "u = hc.mask_noise(5, 6, 7, 8, 'intermediate', 32, dtype=torch.float64);"
        "sys.stdout.write(','.join(repr(x) for x in u.tolist()))"
    )
    here = hc.mask_noise(5, 6, 7, 8, "intermediate", 32, dtype=torch.float64).tolist()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert [float(x) for x in out.split(",")] == here
