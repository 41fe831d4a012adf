"""Hard-concrete masks on megatron-core LLaMA: a mask bank per model chunk and masked leaves.

The big modules (``GPTModel``, ``TransformerLayer``, ``SelfAttention``, ``MLP``) keep their
megatron-core forwards. Only leaves of megatron-core's own local spec are swapped:

==================  =====================================================================
leaf                what it multiplies
==================  =====================================================================
``linear_proj``     input ``[s, b, np*hn]`` by ``z_head`` per head; output ``[s, b, h]`` by
                    ``z_head_layer * z_layer * z_hidden``
``linear_fc2``      input ``[s, b, f/tp]`` by ``z_intermediate``; output by
                    ``z_mlp * z_layer * z_hidden``
RMSNorm (all)       variance over the kept hidden dims only, then ``* weight * z_hidden``
embedding           output ``[s, b, h]`` by ``z_hidden`` (a forward hook on the embedding)
==================  =====================================================================

The log α parameters of one chunk live in its :class:`MaskBank` (``chunk.mask_bank``), sharded
like the weights they mask:

=================  ==============  ==================================  =========================
kind               local shape     tensor parallel                     pipeline parallel
=================  ==============  ==================================  =========================
``hidden``         ``[h]``         replicated                          replicated on every stage
``head``           ``[Ll, a/tp]``  split like the query heads of QKV   this stage's layers
``intermediate``   ``[Ll, f/tp]``  split like ``linear_fc2``'s input   this stage's layers
``head_layer``,    ``[Ll]``        replicated                          this stage's layers
``mlp``, ``layer``
=================  ==============  ==================================  =========================

``Ll`` is the number of layers on this stage. Sampling noise is drawn over the full unsharded
length from a generator keyed on (seed, iteration, global micro-batch, global layer, kind) and
then sliced, so the sampled masks are the same for every TP/PP/DP layout.

Under sequence parallelism the ``[s, b, h]`` activations above (embedding, norm and projection
outputs) are ``[s/tp, b, h]`` on each TP rank; the masks are the same ``[h]`` / per-layer
values on every rank (the noise does not depend on the TP rank), and the log α of ``hidden``,
``head_layer``, ``mlp`` and ``layer`` and every norm weight are marked ``sequence_parallel``, so
that megatron-core sums their gradients over the TP group.

Virtual pipeline stages are not supported with masks (a rank would hold two replicas of the
hidden mask).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from megashear.models.llama import RMSNorm
from megashear.pruning import hard_concrete as hc

logger = logging.getLogger(__name__)

ALL_KINDS = hc.ALL_KINDS
HIDDEN_LAYER_KEY = -1  # the "global layer" of the hidden mask in the noise key
# Kinds whose masks scale the [s, b, h] activations (the embedding, norm and projection outputs),
# which sequence parallelism splits to [s/tp, b, h]; head and intermediate scale TP-split
# [s, b, np*hn] / [s, b, f/tp] inputs of the full sequence.
SEQUENCE_REGION_KINDS = ("hidden", "head_layer", "mlp", "layer")


class MaskBank(nn.Module):
    """The log α of one model chunk and the mask values of the current forward pass.

    Args:
        kinds: the pruned mask kinds.
        hidden_size, num_heads, ffn_hidden_size: full (unsharded) sizes ``h``, ``a``, ``f``.
        layer_numbers: global 0-based indices of this chunk's layers.
        tp_rank, tp_size: this rank's tensor-parallel position.
        seed: keys the sampling noise.
        init_mean: mean of the log α initialisation (docs/method.md §2: N(5, 0.01)).
        pinned_hidden: hidden channels whose training sample is always exactly 1 (the pinned
            massive-activation channels, docs/method.md §8).
        sequence_parallel: the model runs with megatron's sequence parallelism; the kinds that
            scale sequence-split activations ``[s/tp, b, h]`` (:data:`SEQUENCE_REGION_KINDS`)
            mark their log α ``sequence_parallel``, so that megatron-core sums their gradients
            over the TP group (each rank sees ``s/tp`` tokens of them).
        log_alpha_min: the clamp's floor (:func:`~megashear.pruning.hard_concrete.
            log_alpha_floor`: the paper's ln 0.01, or ln 1e-4 for importance-initialised masks).
    """

    def __init__(
        self,
        kinds: tuple[str, ...],
        hidden_size: int,
        num_heads: int,
        ffn_hidden_size: int,
        num_layers: int,
        layer_numbers: list[int],
        tp_rank: int = 0,
        tp_size: int = 1,
        seed: int = 0,
        init_mean: float = hc.INIT_MEAN,
        pinned_hidden: list[int] | tuple[int, ...] = (),
        sequence_parallel: bool = False,
        log_alpha_min: float = hc.LOG_ALPHA_MIN,
    ) -> None:
        super().__init__()
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown mask kinds {sorted(unknown)}; allowed: {list(ALL_KINDS)}")
        self.kinds = tuple(k for k in ALL_KINDS if k in kinds)
        self.full = {"hidden": hidden_size, "head": num_heads, "intermediate": ffn_hidden_size}
        self.num_layers = num_layers
        self.layer_numbers = list(layer_numbers)
        self.tp_rank, self.tp_size, self.seed = tp_rank, tp_size, seed
        self.log_alpha_min = log_alpha_min
        shapes = hc.log_alpha_shapes(
            hidden_size, num_heads // tp_size, ffn_hidden_size // tp_size, len(layer_numbers)
        )
        for kind in self.kinds:
            param = nn.Parameter(torch.empty(shapes[kind]))
            param.mask_kind = kind
            if kind in ("head", "intermediate"):
                # megatron's grad-norm and optimizer treat it like a TP-split weight.
                param.tensor_model_parallel = True
                param.partition_dim = 1
                param.partition_stride = 1
            elif sequence_parallel and kind in SEQUENCE_REGION_KINDS:
                param.sequence_parallel = True
            self.register_parameter(f"{kind}_log_alpha", param)
        self.load_full_log_alpha(self.initial_log_alpha(num_layers, init_mean))
        self.z: dict[str, torch.Tensor] | None = None
        self.pinned_hidden = sorted(int(i) for i in pinned_hidden)
        if self.pinned_hidden and "hidden" not in self.kinds:
            raise ValueError("pinned hidden channels need the hidden mask kind")
        pinned = torch.zeros(hidden_size, dtype=torch.bool)
        pinned[self.pinned_hidden] = True
        self.register_buffer("_pinned", pinned, persistent=False)

    def initial_log_alpha(self, num_layers: int, mean: float) -> dict[str, torch.Tensor]:
        """The full initial log α of every kind (``hidden [h]``, ``head [L, a]``, ...), drawn
        from N(mean, 0.01) by a generator keyed on (seed, kind) alone: every TP / PP layout
        starts from the same values, each rank keeping its share."""
        shapes = hc.log_alpha_shapes(
            self.full["hidden"], self.full["head"], self.full["intermediate"], num_layers
        )
        out = {}
        for kind in self.kinds:
            gen = torch.Generator().manual_seed(self.seed * len(ALL_KINDS) + ALL_KINDS.index(kind))
            out[kind] = hc.init_log_alpha(shapes[kind], mean=mean, generator=gen)
        return out

    @torch.no_grad()
    def load_full_log_alpha(self, full: dict[str, torch.Tensor]) -> None:
        """Set this chunk's log α from full tensors (``hidden [h]``, ``head [L, a]``, ...): each
        kind takes its TP / PP share (e.g. ``pruning.init=importance``)."""
        for kind, value in self.local_slices(full).items():
            self.log_alpha(kind).copy_(value)

    @torch.no_grad()
    def hold_pinned(self) -> None:
        """Keep the pinned channels' log α at the clamp's top, so that the expected sparsity
        counts them as kept (call after every optimizer step)."""
        if self.pinned_hidden:
            self.hidden_log_alpha[self._pinned] = hc.LOG_ALPHA_MAX

    # ----------------------------------------------------------------- mask values

    def log_alpha(self, kind: str) -> torch.Tensor:
        return getattr(self, f"{kind}_log_alpha")

    def _tp_slice(self, kind: str) -> slice:
        n = self.full[kind] // self.tp_size
        return slice(self.tp_rank * n, (self.tp_rank + 1) * n)

    def sample(self, iteration: int, microbatch: int) -> None:
        """Draw training masks for one forward pass (differentiable in log α)."""
        z = {}
        for kind in self.kinds:
            la = self.log_alpha(kind)
            if kind == "hidden":
                u = hc.mask_noise(
                    self.seed, iteration, microbatch, HIDDEN_LAYER_KEY, kind, self.full[kind]
                )
                z[kind] = hc.sample_mask(la, u.to(la), self.log_alpha_min)
                if self.pinned_hidden:
                    z[kind] = torch.where(self._pinned, 1.0, z[kind])  # [h]
            elif kind in ("head", "intermediate"):
                sl = self._tp_slice(kind)
                rows = [
                    hc.mask_noise(self.seed, iteration, microbatch, layer, kind, self.full[kind])[
                        sl
                    ]
                    for layer in self.layer_numbers
                ]
                z[kind] = hc.sample_mask(la, torch.stack(rows).to(la), self.log_alpha_min)
            else:
                u = torch.stack(
                    [
                        hc.mask_noise(self.seed, iteration, microbatch, layer, kind, 1)[0]
                        for layer in self.layer_numbers
                    ]
                )
                z[kind] = hc.sample_mask(la, u.to(la), self.log_alpha_min)
        self.z = z

    def set_masks(self, z: dict[str, torch.Tensor] | None) -> None:
        """Use fixed mask values (this chunk's local slices), e.g. deterministic masks."""
        self.z = z

    def local_slices(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This chunk's part of full masks (``hidden [h]``, ``head [L, a]``, ... ``layer [L]``)."""
        out = {}
        rows = torch.tensor(self.layer_numbers, dtype=torch.long)
        for kind in self.kinds:
            value = full[kind]
            if kind == "hidden":
                out[kind] = value
            elif kind in ("head", "intermediate"):
                out[kind] = value[rows][:, self._tp_slice(kind)]
            else:
                out[kind] = value[rows]
        return {k: v.to(self.log_alpha(k)) for k, v in out.items()}

    def value(self, kind: str, local_layer: int | None = None) -> torch.Tensor | None:
        """The current mask of ``kind`` (for one local layer), or None when not pruned/set."""
        if self.z is None or kind not in self.z:
            return None
        v = self.z[kind]
        return v if local_layer is None or kind == "hidden" else v[local_layer]

    # ----------------------------------------------------------------- checkpointing

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Declare every log α with its TP axis and its layer axis (see module docstring)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        pp_rank, pp = (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(),
        )
        dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        out = {}
        for kind in self.kinds:
            key = f"{prefix}{kind}_log_alpha"
            t = self.log_alpha(kind)
            if kind == "hidden":
                out[key] = ShardedTensor.from_rank_offsets(
                    key, t, replica_id=(pp_rank, self.tp_rank, dp_rank)
                )
            elif kind in ("head", "intermediate"):
                out[key] = ShardedTensor.from_rank_offsets(
                    key, t, (0, pp_rank, pp), (1, self.tp_rank, self.tp_size), replica_id=dp_rank
                )
            else:
                out[key] = ShardedTensor.from_rank_offsets(
                    key, t, (0, pp_rank, pp), replica_id=(self.tp_rank, dp_rank)
                )
        return out


def _bank_of(module: nn.Module) -> MaskBank | None:
    return module.__dict__.get("_mask_bank")


def _attach(module: nn.Module, bank: MaskBank, local_layer: int | None) -> None:
    # Plain attributes: the bank must not become a child (its parameters would be counted twice).
    module.__dict__["_mask_bank"] = bank
    module.__dict__["_mask_layer"] = local_layer


def masked_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, z_hidden: torch.Tensor | None
) -> torch.Tensor:
    """RMSNorm over ``[..., h]``; under a hidden mask the variance is over kept dims only.

    With ``k`` kept dims, ``x / sqrt(sum_kept(x²) / k + eps)`` is torch's fused ``rms_norm`` of
    ``x · keep`` (mean over all ``h``) with ``eps · k / h``, times ``sqrt(k / h)``; the pruned dims
    are zeroed by ``z_hidden`` in the weight. One fused kernel instead of six elementwise ops.
    """
    h = x.shape[-1]
    if z_hidden is None:
        return torch.nn.functional.rms_norm(x, (h,), weight, eps)
    keep = (z_hidden != 0).to(x.dtype)  # [h]
    frac = keep.sum().clamp(min=1) / h  # k / h
    scale = (weight * z_hidden * frac.sqrt()).to(x.dtype)  # [h]; fp32 masks, bf16 weights
    return torch.nn.functional.rms_norm(x * keep, (h,), scale, eps * float(frac))


class MaskedRMSNorm(RMSNorm):
    """:class:`~megashear.models.llama.RMSNorm` (same ``weight [h]``, marked for sequence
    parallelism likewise) that honours the hidden mask on ``[s, b, h]`` (``[s/tp, b, h]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = _bank_of(self)
        z = bank.value("hidden") if bank is not None else None
        return masked_rms_norm(x, self.weight, self.eps, z)


def _row_parallel_base() -> type:
    from megatron.core.tensor_parallel import RowParallelLinear

    return RowParallelLinear


_MASKED_ROW_PARALLEL: type | None = None


def _masked_row_parallel_class() -> type:
    """``MaskedRowParallelLinear``: megatron's ``RowParallelLinear`` that masks its input and
    gates its output, configured through ``ModuleSpec(params=...)`` (see
    :func:`masked_layer_spec`):

    - ``input_mask_kind``: ``"head"`` (input ``[s, b, np*hn]``, one mask value per head of
      ``head_dim`` channels) or ``"intermediate"`` (input ``[s, b, f/tp]``, one per channel);
    - ``output_gate_kind``: ``"head_layer"`` or ``"mlp"``, multiplied into the output
      ``[s, b, h]`` together with ``z_layer`` and ``z_hidden``.

    Defined on first use, as megatron-core is imported lazily in this package; the module
    attribute ``MaskedRowParallelLinear`` is the same class.
    """
    global _MASKED_ROW_PARALLEL
    if _MASKED_ROW_PARALLEL is not None:
        return _MASKED_ROW_PARALLEL
    base = _row_parallel_base()

    class _Masked(base):
        def __init__(
            self,
            *args,
            input_mask_kind: str,
            output_gate_kind: str,
            head_dim: int = 1,
            **kwargs,
        ) -> None:
            super().__init__(*args, **kwargs)
            if input_mask_kind not in ("head", "intermediate"):
                raise ValueError(f"input_mask_kind must be head or intermediate: {input_mask_kind}")
            self.input_mask_kind = input_mask_kind
            self.output_gate_kind = output_gate_kind
            self.head_dim = head_dim

        def forward(self, input_: torch.Tensor):
            bank = _bank_of(self)
            if bank is None or bank.z is None:
                return super().forward(input_)
            layer = self.__dict__["_mask_layer"]
            z_in = bank.value(self.input_mask_kind, layer)
            if z_in is not None:
                s, b, width = input_.shape
                if self.input_mask_kind == "head":
                    # [s, b, np*hn] -> [s, b, np, hn] * z[np] -> [s, b, np*hn]
                    z_in = z_in.to(input_.dtype)  # fp32 masks into a bf16 GEMM
                    input_ = (input_.view(s, b, -1, self.head_dim) * z_in[:, None]).view(
                        s, b, width
                    )
                else:
                    input_ = input_ * z_in.to(input_.dtype)  # [s, b, f/tp] * [f/tp]
            output, bias = super().forward(input_)
            scale = None
            for kind, idx in ((self.output_gate_kind, layer), ("layer", layer), ("hidden", None)):
                v = bank.value(kind, idx)
                if v is not None:
                    scale = v if scale is None else scale * v
            if scale is not None:
                output = output * scale.to(output.dtype)  # [s, b, h] * ([h] or scalar)
            return output, bias

    _Masked.__name__ = _Masked.__qualname__ = "MaskedRowParallelLinear"
    _MASKED_ROW_PARALLEL = _Masked
    return _Masked


def __getattr__(name: str):
    if name == "MaskedRowParallelLinear":
        return _masked_row_parallel_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def masked_layer_spec(head_dim: int):
    """megatron-core's local LLaMA spec with the masked leaves swapped in (see module doc)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megashear.models.llama import layer_spec

    spec = layer_spec(use_te=False)
    sub = spec.submodules
    sub.input_layernorm = MaskedRMSNorm
    sub.pre_mlp_layernorm = MaskedRMSNorm
    sub.self_attention.submodules.linear_proj = ModuleSpec(
        module=_masked_row_parallel_class(),
        params={"input_mask_kind": "head", "output_gate_kind": "head_layer", "head_dim": head_dim},
    )
    sub.mlp.submodules.linear_fc2 = ModuleSpec(
        module=_masked_row_parallel_class(),
        params={"input_mask_kind": "intermediate", "output_gate_kind": "mlp"},
    )
    return spec


def masked_block_spec(tconfig, head_dim: int):
    """A block spec for this pipeline stage, so that the final norm is masked too."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = masked_layer_spec(head_dim)
    n_local = get_num_layers_to_build(tconfig)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_local, layer_norm=MaskedRMSNorm)


def attach_mask_bank(chunk: nn.Module, bank: MaskBank) -> None:
    """Register ``bank`` on a ``GPTModel`` chunk and point every masked leaf at it."""
    chunk.mask_bank = bank
    position = {g: i for i, g in enumerate(bank.layer_numbers)}
    for layer in chunk.decoder.layers:
        local = position[layer.layer_number - 1]
        for module in layer.modules():
            if isinstance(module, MaskedRMSNorm) or hasattr(module, "input_mask_kind"):
                _attach(module, bank, local)
    final_norm = getattr(chunk.decoder, "final_layernorm", None)
    if final_norm is not None:
        _attach(final_norm, bank, None)
    if getattr(chunk, "embedding", None) is not None and "hidden" in bank.kinds:

        def scale_embedding(module, args, output):
            z = bank.value("hidden")
            return output if z is None else output * z.to(output.dtype)  # [s, b, h] * [h]

        chunk.embedding.register_forward_hook(scale_embedding)
