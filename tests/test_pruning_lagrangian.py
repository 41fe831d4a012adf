"""Lagrangian value, warm-up, ascent/descent directions, convergence, and E[N]."""

from __future__ import annotations

import pytest
import torch

from megashear.model_config import ModelConfig
from megashear.pruning import hard_concrete as hc
from megashear.pruning.finalize import finalization_masks
from megashear.pruning.lagrangian import ADAM_EPS, BETAS, Lagrangian, expected_num_parameters
from megashear.pruning.targets import make_target


def test_warmup_schedule():
    lag = Lagrangian({"head": 0.5, "layer": 0.25}, warmup_steps=10)
    assert [lag.target_at("head", s) for s in (0, 5, 10, 20)] == [0.0, 0.25, 0.5, 0.5]
    assert lag.target_at("layer", 4) == pytest.approx(0.1)
    assert Lagrangian({"head": 0.5}, warmup_steps=0).target_at("head", 0) == 0.5


def test_value_by_hand():
    lag = Lagrangian({"head": 0.5, "layer": 0.25})
    assert lag({"head": torch.tensor([0.1, 0.3]), "layer": torch.tensor(0.2)}, 0).item() == 0.0
    with torch.no_grad():
        lag.lambda_1["head"].fill_(2.0)
        lag.lambda_2["head"].fill_(3.0)
        lag.lambda_1["layer"].fill_(1.0)
    # head rows: 2(-0.4) + 3(0.16) = -0.32, 2(-0.2) + 3(0.04) = -0.28 -> mean -0.30;
    # layer: 1(-0.05) = -0.05.
    value = lag({"head": torch.tensor([0.1, 0.3]), "layer": torch.tensor(0.2)}, 0)
    assert value.item() == pytest.approx(-0.35)
    terms = lag.terms({"head": torch.tensor([0.1, 0.3]), "layer": torch.tensor(0.2)}, 0)
    assert terms["head"].item() == pytest.approx(-0.30)
    with pytest.raises(KeyError):
        lag({"head": torch.tensor([0.1])}, 0)
    assert lag.lambda_values()["lambda_1/head"] == 2.0


class _Optimizers:
    """The pruning trainer's two optimizers: log α descends in a group without weight decay
    (megatron's optimizer there, a plain AdamW here); λ ascends through its own AdamW from
    :meth:`Lagrangian.make_optimizer` (``maximize=True``)."""

    def __init__(self, log_alphas, lag: Lagrangian, lr: float) -> None:
        self.log_alpha = torch.optim.AdamW(
            list(log_alphas), lr=lr, betas=BETAS, eps=ADAM_EPS, weight_decay=0.0
        )
        self.lam = lag.make_optimizer(lr=lr)

    def zero_grad(self) -> None:
        self.log_alpha.zero_grad()
        self.lam.zero_grad()

    def step(self) -> None:
        self.lam.step()
        self.log_alpha.step()


def _setup():
    la = torch.nn.Parameter(torch.full((2, 4), 2.0))  # head mask [L=2, a=4]
    lag = Lagrangian({"head": 0.5})
    return la, lag, _Optimizers([la], lag, lr=0.1)


def _value(lag, la):
    with torch.no_grad():
        return lag({"head": hc.expected_sparsity(la)}, 0).item()


def test_lambda_ascends_and_log_alpha_descends():
    la, lag, opt = _setup()
    assert [g["maximize"] for g in opt.log_alpha.param_groups] == [False]
    assert [g["maximize"] for g in opt.lam.param_groups] == [True]
    groups = opt.log_alpha.param_groups + opt.lam.param_groups
    assert all(g["weight_decay"] == 0.0 for g in groups)
    # Step 1 from λ = 0: L_lag = 0 and only λ moves, in the direction that increases L_lag.
    before = _value(lag, la)
    loss = lag({"head": hc.expected_sparsity(la)}, 0)
    opt.zero_grad()
    loss.backward()
    s_minus_t = (hc.expected_sparsity(la) - 0.5).mean().item()
    assert lag.lambda_1["head"].grad.item() == pytest.approx(s_minus_t)  # the true gradient
    la_before = la.detach().clone()
    opt.step()
    assert torch.equal(la.detach(), la_before)  # zero gradient at λ = 0
    assert _value(lag, la) > before
    assert lag.lambda_1["head"].item() < 0 < lag.lambda_2["head"].item()  # ŝ < t
    # Step 2: λ is now non-zero. Check each group's effect with the other held fixed.
    lam = {k: p.detach().clone() for k, p in lag.named_parameters()}
    la_before = la.detach().clone()
    base = _value(lag, la)
    loss = lag({"head": hc.expected_sparsity(la)}, 0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    la_after = la.detach().clone()
    lam_after = {k: p.detach().clone() for k, p in lag.named_parameters()}
    with torch.no_grad():
        for k, p in lag.named_parameters():
            p.copy_(lam[k])
    assert _value(lag, la_after) < base  # log α descended
    with torch.no_grad():
        for k, p in lag.named_parameters():
            p.copy_(lam_after[k])
    assert _value(lag, la_before) > base  # λ ascended


def test_make_optimizer_ascends():
    lag = Lagrangian({"hidden": 0.5})
    opt = lag.make_optimizer(lr=0.5)
    s = torch.tensor(0.1)
    loss = lag({"hidden": s}, 0)
    loss.backward()
    opt.step()
    assert lag({"hidden": s}, 0).item() > loss.item()
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    (group,) = lag.make_optimizer().param_groups  # defaults: lr 1.0, eps 1e-8, no decay
    assert (group["lr"], group["eps"], group["weight_decay"]) == (1.0, 1e-8, 0.0)


def test_optimisation_reaches_targets_after_warmup():
    torch.manual_seed(0)
    shapes = {"hidden": (32,), "head": (4, 8), "intermediate": (4, 64), "layer": (4,)}
    targets = {"hidden": 0.5, "head": 0.5, "intermediate": 0.5, "layer": 0.25}
    la = {k: torch.nn.Parameter(hc.init_log_alpha(s)) for k, s in shapes.items()}
    lag = Lagrangian(targets, warmup_steps=100)
    opt = _Optimizers(la.values(), lag, lr=0.1)
    for step in range(250):
        loss = lag({k: hc.expected_sparsity(v) for k, v in la.items()}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for v in la.values():
            hc.clamp_log_alpha_(v)
    with torch.no_grad():
        for kind, v in la.items():
            s = hc.expected_sparsity(v)  # [L] per layer or scalar
            assert (s - targets[kind]).abs().max() < 0.02, (kind, s)


# ----------------------------------------------------------------------------- E[N]


def _expected_params_mha_formula(cfg: ModelConfig, keep: dict[str, torch.Tensor]) -> float:
    """docs/method.md §3's MHA formula for E[N], literally (oracle for the general one)."""
    h = cfg.hidden_size
    s_d = float(keep["hidden"].sum()) if "hidden" in keep else float(h)
    s_l = keep.get("layer", torch.ones(cfg.num_layers))
    s_lh = keep.get("head", torch.ones(cfg.num_layers, cfg.num_attention_heads))
    s_li = keep.get("intermediate", torch.ones(cfg.num_layers, cfg.ffn_hidden_size))
    head_term = float((s_l[:, None] * s_lh).sum())
    int_term = float((s_l[:, None] * s_li).sum())
    return 4 * (h / cfg.num_attention_heads) * s_d * head_term + 3 * s_d * int_term


def test_expected_params_all_kept_equals_block_count():
    cfg = ModelConfig(3, 32, 8, 2, 48, 100)
    keep = {"hidden": torch.ones(32), "head": torch.ones(3, 8), "layer": torch.ones(3)}
    n = float(expected_num_parameters(cfg, keep))
    blocks = cfg.num_parameters() - 2 * 100 * 32 - 32 - 3 * 2 * 32
    assert n == blocks
    assert (
        float(expected_num_parameters(cfg, keep, include_embeddings=True)) == cfg.num_parameters()
    )


def test_expected_params_matches_reference_formula_for_mha():
    cfg = ModelConfig(3, 32, 4, 4, 48, 100)
    g = torch.Generator().manual_seed(0)
    keep = {
        "hidden": torch.rand(32, generator=g, dtype=torch.float64),
        "head": torch.rand(3, 4, generator=g, dtype=torch.float64),
        "intermediate": torch.rand(3, 48, generator=g, dtype=torch.float64),
        "layer": torch.rand(3, generator=g, dtype=torch.float64),
    }
    assert float(expected_num_parameters(cfg, keep)) == pytest.approx(
        _expected_params_mha_formula(cfg, keep), rel=1e-12
    )


@pytest.mark.parametrize(
    "source,target_fields",
    [
        (ModelConfig(4, 64, 4, 4, 160, 256), dict(num_layers=3, hidden_size=40,
                                                  num_attention_heads=2, ffn_hidden_size=96)),
        (ModelConfig(4, 64, 8, 4, 160, 256), dict(num_layers=2, hidden_size=48,
                                                  num_attention_heads=4, num_query_groups=2,
                                                  ffn_hidden_size=80)),
    ],
)  # fmt: skip
def test_expected_params_of_a_final_mask_is_the_target_count(source, target_fields):
    target = make_target(source, **target_fields)
    g = torch.Generator().manual_seed(1)
    L = source.num_layers
    shapes = {"hidden": (64,), "head": (L, source.num_attention_heads), "layer": (L,),
              "intermediate": (L, 160), "head_layer": (L,), "mlp": (L,)}  # fmt: skip
    la = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    masks = finalization_masks(la, source, target)
    keep = {k: (v != 0).double() for k, v in masks.items()}  # P(z≠0) of a decided mask
    n = float(expected_num_parameters(source, keep, include_embeddings=True))
    assert n == target.num_parameters()
