"""The Lagrangian toward a target shape (docs/method.md §3), its optimizer, and E[N] for logging.

``L_lag = Σ_m mean_rows[λ1_m (ŝ_m - t_m(step)) + λ2_m (ŝ_m - t_m(step))²]`` with one scalar
(λ1, λ2) pair per mask kind, both starting at 0, and the warm-up
``t_m(step) = t_m · min(1, step / warmup_steps)``.

Inputs are global expected sparsities per kind (already reduced over TP/PP by the caller):
``head``/``intermediate`` ``[L]`` (one value per layer), ``hidden`` and the layer-level kinds
scalars ``[]``. The Lagrangian is a pure function of those values and λ.

Gradient ascent on λ: λ's gradient stays the true ``∂L_lag/∂λ``; the ascent is the sign flip of
torch's AdamW ``maximize=True`` in λ's own parameter group (no negative learning rate, no
gradient hook). The model and ``log α`` minimise ``LM loss + L_lag`` in their own groups.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)

BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


class Lagrangian(nn.Module):
    """λ parameters and the penalty for a set of mask kinds.

    Args:
        targets: kind -> final target sparsity ``t_m`` (:func:`~.targets.target_sparsities`).
        warmup_steps: linear warm-up of the target from 0 (0 disables the warm-up).
    """

    def __init__(self, targets: dict[str, float], warmup_steps: int = 0) -> None:
        super().__init__()
        self.targets = {k: float(v) for k, v in targets.items()}
        self.warmup_steps = int(warmup_steps)
        self.lambda_1 = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in targets})
        self.lambda_2 = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in targets})

    def target_at(self, kind: str, step: int) -> float:
        """``t_m(step) = t_m · min(1, step / warmup_steps)``."""
        t = self.targets[kind]
        if self.warmup_steps <= 0:
            return t
        return t * min(1.0, step / self.warmup_steps)

    def terms(self, sparsity: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """Per-kind penalty ``mean_rows[λ1 (ŝ - t) + λ2 (ŝ - t)²]`` (scalars)."""
        out = {}
        for kind in self.targets:
            if kind not in sparsity:
                raise KeyError(f"expected sparsity of pruned kind {kind!r} is missing")
            diff = sparsity[kind] - self.target_at(kind, step)  # [L] or []
            out[kind] = (self.lambda_1[kind] * diff + self.lambda_2[kind] * diff.pow(2)).mean()
        return out

    def forward(self, sparsity: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """``L_lag`` (scalar) from global expected sparsities (see module docstring)."""
        terms = self.terms(sparsity, step)
        if not terms:
            return torch.zeros(())
        return torch.stack(list(terms.values())).sum()

    def lambda_values(self) -> dict[str, float]:
        """``{"lambda_1/<kind>": value, "lambda_2/<kind>": value}`` for logging."""
        out = {}
        for kind in self.targets:
            out[f"lambda_1/{kind}"] = float(self.lambda_1[kind].detach())
            out[f"lambda_2/{kind}"] = float(self.lambda_2[kind].detach())
        return out

    def make_optimizer(
        self, lr: float = 1.0, betas: tuple[float, float] = BETAS, eps: float = ADAM_EPS
    ) -> torch.optim.AdamW:
        """A stand-alone AdamW that takes gradient-ASCENT steps on λ (``maximize=True``)."""
        return torch.optim.AdamW(
            self.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0, maximize=True
        )


def expected_num_parameters(
    cfg: ModelConfig, keep: dict[str, torch.Tensor], include_embeddings: bool = False
) -> torch.Tensor:
    """Expected parameter count ``E[N]`` from full keep probabilities ``P(z≠0)`` per kind.

    docs/method.md §3, generalised: with ``s_d`` hidden, ``s_l`` layer-level and ``s_{l,j}`` head /
    intermediate keep probabilities (absent kinds count as 1), and ``E[h] = Σ_d s_d``,

    - attention of layer ``l``: ``hn · E[h] · s_l^attn · (2 Σ_j s_{l,j} + 2 Σ_groups P(alive))``
      where ``P(alive) = 1 - Π_{j in group} (1 - s_{l,j})`` (heads independent) is the chance a
      key/value group keeps a query head; for MHA this is ``4 hn E[h] s_l Σ_j s_{l,j}``;
    - MLP of layer ``l``: ``3 · E[h] · s_l^mlp · Σ_i s_{l,i}``;
    - with ``include_embeddings``: ``2 v E[h]`` (embeddings, LM head), the final norm ``E[h]``
      and two norms ``E[h]`` per expected kept layer (``Σ_l s_l^layer``).

    ``s_l^attn = s_layer · s_head_layer``, ``s_l^mlp = s_layer · s_mlp``.

    Args:
        cfg: the source shape.
        keep: kind -> ``P(z≠0)``: ``hidden [h]``, ``head [L, a]``, ``intermediate [L, f]``,
            layer-level kinds ``[L]``.
    """
    n_layers, h, a = cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads
    g, f, hn = cfg.num_query_groups, cfg.ffn_hidden_size, cfg.head_dim
    ref = next(iter(keep.values())) if keep else torch.zeros(())
    ones = dict(dtype=ref.dtype, device=ref.device)
    s_h = keep["hidden"].sum() if "hidden" in keep else torch.tensor(float(h), **ones)
    s_layer = keep.get("layer", torch.ones(n_layers, **ones))  # [L]
    s_attn = s_layer * keep.get("head_layer", torch.ones(n_layers, **ones))  # [L]
    s_mlp = s_layer * keep.get("mlp", torch.ones(n_layers, **ones))  # [L]
    s_head = keep.get("head", torch.ones(n_layers, a, **ones))  # [L, a]
    s_int = keep.get("intermediate", torch.ones(n_layers, f, **ones))  # [L, f]
    alive = 1 - (1 - s_head.view(n_layers, g, a // g)).prod(-1)  # [L, g]
    attn = hn * s_h * (s_attn * (2 * s_head.sum(-1) + 2 * alive.sum(-1))).sum()
    mlp = 3 * s_h * (s_mlp * s_int.sum(-1)).sum()
    total = attn + mlp
    if include_embeddings:
        total = total + 2 * cfg.vocab_size * s_h + s_h + 2 * s_h * s_layer.sum()
    return total
