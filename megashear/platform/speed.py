"""Speed patches: rewrites of megatron-core internals that make its CPU path fast.

They change no result (``tests/test_platform.py`` runs pruning steps with and without them and
gets the same numbers). Five replace megatron-core's fallbacks without TE or apex: a per-tensor
Python loop for the gradient norm, ``torch.optim.AdamW`` without ``fused`` or ``foreach`` (on CPU
torch's single-tensor for-loop), weight gradients computed apart and then added into DDP's
``main_grad``, RoPE recomputing its tables and copying q and k, and the zero-filled dummy
gradient of a tied embedding. The sixth lays out DDP's gradient buffer. (The seventh speed
patch, ``host_allocator``, tunes the host allocator: :mod:`megashear.platform.host_memory`.)

``foreach_grad_norm``
    the gradient norm with one ``torch._foreach_norm`` over all gradients (megatron's local
    ``multi_tensor_l2norm`` calls ``torch.norm`` per tensor and builds a tensor of Python floats);
``fused_adam``
    megatron's optimizer module builds torch's fused CPU AdamW (``fused=True``; ``foreach=True``
    where this torch has no fused CPU kernel), probed once on a one-element parameter.
``wgrad_accumulation``
    apex's ``fused_weight_gradient_mlp_cuda`` for megatron's gradient-accumulation fusion:
    ``wgrad_gemm_accum_fp32(input [s*b, in], grad_output [s*b, out], main_grad [out, in])`` as
    one ``main_grad.addmm_(grad_outputᵀ, input)``, a GEMM that accumulates in place, instead of a
    fresh ``[out, in]`` gradient per linear and micro-batch followed by DDP's ``main_grad.add_``.
    :func:`megashear.models.llama.build_transformer_config` sets
    ``gradient_accumulation_fusion`` when :func:`wgrad_accumulation_fusion` says the patch is in.
``rope_tables``
    megatron-core's unfused RoPE (``_apply_rotary_pos_emb_bshd``, used without TE's fused
    kernel) computes ``cos(freqs)`` and ``sin(freqs)`` again for q and k of every layer, and
    ends with ``torch.cat((t, t_pass))`` where ``t_pass`` is empty when RoPE covers the whole
    head (every LLaMA): a full copy of q and k forward, and another in backward. The patch
    computes the tables once per frequency tensor (megatron-core caches that tensor) and skips
    the concatenation; the values are bit-identical. Partial RoPE, MLA and learnt frequencies
    go to megatron-core's function unchanged.
``tied_embedding_wgrad``
    With tied embeddings on one pipeline stage (SmolLM2, LLaMA3.2), megatron marks the shared
    ``[v/tp, h]`` weight ``zero_out_wgrad``: every backward, the output layer, which has
    already accumulated its wgrad into ``main_grad``, hands autograd a fresh ``torch.zeros``
    of the weight's size (TE keeps one such buffer; without TE it is allocated each time),
    autograd adds it to the embedding's dense gradient, and DDP's hook adds that sum into
    ``main_grad``: a 113 MB zero fill and two 113 MB additions per SmolLM2-135M micro-batch.
    The patch marks the weight ``embedding_wgrad_into_main_grad`` instead (under
    gradient-accumulation fusion, outside ``deterministic_mode``), so the output layer's dummy
    is megatron's uninitialised ``torch.empty``, which DDP's hook skips, and the embedding's
    backward index-adds its rows into ``main_grad`` itself (:class:`_EmbeddingIntoMainGrad`).
    The weight's DDP hook still runs after both, once per micro-batch.
``aligned_grad_buffer``
    Without the distributed optimizer, megatron packs every parameter's ``main_grad`` back to
    back in DDP's buffer, in reverse parameter order. A pruning model's masks (46,956 log α
    at the SmolLM2-135M shape, 12 elements past a multiple of 16) are registered last, so
    they come first and put every weight's ``main_grad`` 48 bytes off a 64-byte boundary; each
    in-place weight-gradient GEMM then ran 10-30% slower (about 0.58 s of a pruning step's
    0.83 s of overhead). The patch hands the buffer the parameters whose size is not a
    multiple of 16 elements first, so they land at its end. The gradients are the same
    numbers; only their places in the buffer move.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch

from megashear.platform.patch import Patch


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: ``([total L2 norm], None)`` over every tensor of
    ``tensor_lists``, as a float32 tensor of shape ``[1]``."""
    tensors = [t for tensors in tensor_lists for t in tensors]
    if not tensors:
        return torch.zeros(1), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _patch_foreach_grad_norm() -> None:
    from megatron.core.optimizer import clip_grads

    clip_grads.l2_norm_impl = _foreach_l2_norm


def _fast_cpu_adam_kwargs() -> dict:
    """``{"fused": True}`` if this torch has a fused CPU Adam kernel, else ``{"foreach": True}``."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    try:
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


class _FastCpuAdamW(torch.optim.AdamW):
    """torch's AdamW with the fused (or foreach) CPU implementation unless told otherwise."""

    fast_kwargs: dict = {}

    def __init__(self, params, **kwargs) -> None:
        if "fused" not in kwargs and "foreach" not in kwargs:
            kwargs.update(self.fast_kwargs)
        super().__init__(params, **kwargs)


class _FastCpuAdam(torch.optim.Adam):
    """torch's Adam (coupled weight decay), fused or foreach like :class:`_FastCpuAdamW`."""

    def __init__(self, params, **kwargs) -> None:
        if "fused" not in kwargs and "foreach" not in kwargs:
            kwargs.update(_FastCpuAdamW.fast_kwargs)
        super().__init__(params, **kwargs)


class _OptimWithFastAdam(types.ModuleType):
    """``torch.optim`` with ``AdamW`` / ``Adam`` replaced by their fast CPU forms."""

    def __init__(self) -> None:
        super().__init__("torch.optim(cpu-fast-adam)")
        self.AdamW, self.Adam = _FastCpuAdamW, _FastCpuAdam

    def __getattr__(self, name: str):
        return getattr(torch.optim, name)


class _TorchForOptimizer(types.ModuleType):
    """The ``torch`` of ``megatron.core.optimizer``: the CPU proxy with a fast ``optim``."""

    def __init__(self, base: types.ModuleType) -> None:
        super().__init__("torch(cpu, fast adam)")
        self._base = base
        self.optim = _OptimWithFastAdam()

    def __getattr__(self, name: str):
        return getattr(self._base, name)


def _patch_fused_adam() -> None:
    import megatron.core.optimizer as mcore_optimizer

    _FastCpuAdamW.fast_kwargs = _fast_cpu_adam_kwargs()
    if not isinstance(mcore_optimizer.torch, _TorchForOptimizer):
        mcore_optimizer.torch = _TorchForOptimizer(mcore_optimizer.torch)


class _CpuWgradAccumulation(types.ModuleType):
    """``fused_weight_gradient_mlp_cuda`` on CPU: ``main_grad += grad_outputᵀ · input``."""

    def __init__(self) -> None:
        super().__init__("fused_weight_gradient_mlp_cuda(cpu)")

    @staticmethod
    def wgrad_gemm_accum_fp32(
        total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor
    ) -> None:
        # [out, in] += [s*b, out]ᵀ · [s*b, in], one GEMM with beta = 1
        dtype = main_grad.dtype
        main_grad.addmm_(grad_output.t().to(dtype), total_input.to(dtype))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _patch_wgrad_accumulation() -> None:
    from megatron.core.tensor_parallel import layers

    if not isinstance(
        getattr(layers, "fused_weight_gradient_mlp_cuda", None), _CpuWgradAccumulation
    ):
        layers.fused_weight_gradient_mlp_cuda = _CpuWgradAccumulation()
    layers._grad_accum_fusion_available = True


class _RopeTables:
    """``cos(freqs) * mscale`` and ``sin(freqs) * mscale`` in a dtype, computed once per
    ``freqs`` tensor. megatron-core's ``RotaryEmbedding.forward`` is ``lru_cache``d, so every
    layer and step sees the same ``freqs`` object (``[s, 1, 1, hn]``); an entry holds that
    tensor, so its ``id`` cannot be reused while the entry lives, and its ``_version`` guards
    against in-place changes."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, freqs: torch.Tensor, mscale: float, dtype: torch.dtype):
        key = (id(freqs), freqs._version, float(mscale), dtype)
        hit = self.entries.get(key)
        if hit is None or hit[0] is not freqs:
            if len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            cos = (torch.cos(freqs) * mscale).to(dtype)
            sin = (torch.sin(freqs) * mscale).to(dtype)
            hit = self.entries[key] = (freqs, cos, sin)
        return hit[1], hit[2]


_ROPE_TABLES = _RopeTables()


def _rope_bshd(
    t: torch.Tensor,
    freqs: torch.Tensor,
    rotary_interleaved: bool = False,
    multi_latent_attention: bool = False,
    mscale: float = 1.0,
) -> torch.Tensor:
    """megatron's ``_apply_rotary_pos_emb_bshd`` (``t [s, b, n, hn]``, ``freqs [s, 1, 1, hn]``)
    when RoPE covers the whole head: ``t·cos + rotate_half(t)·sin`` with cached tables and no
    concatenation of an empty pass-through part. Anything else goes to megatron's own."""
    from megatron.core.models.common.embeddings import rope_utils

    if multi_latent_attention or t.shape[-1] != freqs.shape[-1] or freqs.requires_grad:
        return _MEGATRON_ROPE_BSHD(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
    cos, sin = _ROPE_TABLES(freqs, mscale, t.dtype)
    return (t * cos) + (rope_utils._rotate_half(t, rotary_interleaved) * sin)


_MEGATRON_ROPE_BSHD: Callable | None = None


def _patch_rope_tables() -> None:
    global _MEGATRON_ROPE_BSHD
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils._apply_rotary_pos_emb_bshd is not _rope_bshd:
        _MEGATRON_ROPE_BSHD = rope_utils._apply_rotary_pos_emb_bshd
        rope_utils._apply_rotary_pos_emb_bshd = _rope_bshd


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward index-adds the weight gradient straight into
    ``weight.main_grad`` (DDP's fp32 buffer) and hands autograd none.

    ids ``[b, s]`` (any shape), weight ``[v/tp, h]`` -> ``[b, s, h]``. Without ``main_grad``
    (a weight DDP does not own) it returns the plain dense gradient instead."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad.reshape(-1, grad.shape[-1])  # [b*s, h]
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            return None, torch.zeros_like(weight).index_add_(0, ids.reshape(-1), rows)
        main_grad.index_add_(0, ids.reshape(-1), rows.to(main_grad.dtype))
        return None, None


class _FunctionalWithMainGradEmbedding(types.ModuleType):
    """``torch.nn.functional`` for megatron's ``tensor_parallel.layers``: ``embedding`` of a
    weight marked ``embedding_wgrad_into_main_grad`` goes through
    :class:`_EmbeddingIntoMainGrad` while gradients are recorded."""

    def __init__(self) -> None:
        super().__init__("torch.nn.functional(main_grad embedding)")

    @staticmethod
    def embedding(ids: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (
            not args
            and not kwargs
            and getattr(weight, "embedding_wgrad_into_main_grad", False)
            and weight.requires_grad
            and torch.is_grad_enabled()
        ):
            return _EmbeddingIntoMainGrad.apply(ids, weight)
        return torch.nn.functional.embedding(ids, weight, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)


def _setup_tied_weight(setup: Callable) -> Callable:
    """Wrap ``LanguageModule.setup_embeddings_and_output_layer``: where megatron marks the
    shared embedding / output weight ``zero_out_wgrad`` (both on one pipeline stage), mark it
    ``embedding_wgrad_into_main_grad`` instead, under gradient-accumulation fusion."""

    @functools.wraps(setup)
    def wrapper(self, *args, **kwargs):
        result = setup(self, *args, **kwargs)
        config = self.config
        weight = self.shared_embedding_or_output_weight() if self.pre_process else None
        if (
            weight is not None
            and getattr(weight, "zero_out_wgrad", False)
            and config.gradient_accumulation_fusion
            and not config.deterministic_mode
        ):
            weight.zero_out_wgrad = False  # the output layer's dummy wgrad: torch.empty
            weight.embedding_wgrad_into_main_grad = True
        return result

    wrapper.megashear_tied_weight = True
    return wrapper


def _patch_tied_embedding_wgrad() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import layers

    if not isinstance(layers.F, _FunctionalWithMainGradEmbedding):
        layers.F = _FunctionalWithMainGradEmbedding()
    setup = LanguageModule.setup_embeddings_and_output_layer
    if not getattr(setup, "megashear_tied_weight", False):
        LanguageModule.setup_embeddings_and_output_layer = _setup_tied_weight(setup)


GRAD_ALIGN = 16  # elements: a 64-byte boundary in an fp32 gradient buffer


def _aligned_grad_buffer(init: Callable) -> Callable:
    """Wrap ``_ParamAndGradBuffer.__init__``: without the distributed optimizer (which pads
    every start itself), hand it the parameters whose size is not a multiple of
    :data:`GRAD_ALIGN` first. The buffer is filled in reverse order, so they land at its end
    and every other parameter's ``main_grad`` starts on a 64-byte boundary."""
    import inspect

    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        params = bound.arguments["params"]
        if not bound.arguments["ddp_config"].use_distributed_optimizer:
            order = sorted(range(len(params)), key=lambda i: params[i].numel() % GRAD_ALIGN == 0)
            bound.arguments["params"] = [params[i] for i in order]
            indices = bound.arguments.get("param_indices")
            if indices is not None:
                bound.arguments["param_indices"] = [indices[i] for i in order]
        return init(*bound.args, **bound.kwargs)

    wrapper.megashear_aligned = True
    return wrapper


def _patch_aligned_grad_buffer() -> None:
    from megatron.core.distributed import param_and_grad_buffer

    buffer = param_and_grad_buffer._ParamAndGradBuffer
    if not getattr(buffer.__init__, "megashear_aligned", False):
        buffer.__init__ = _aligned_grad_buffer(buffer.__init__)


SPEED: tuple[Patch, ...] = (
    Patch(
        "foreach_grad_norm",
        "speed",
        _patch_foreach_grad_norm,
        "a per-tensor Python loop (speed)",
    ),
    Patch(
        "fused_adam",
        "speed",
        _patch_fused_adam,
        "torch's single-tensor AdamW loop on CPU (speed)",
    ),
    Patch(
        "wgrad_accumulation",
        "speed",
        _patch_wgrad_accumulation,
        "a fresh weight gradient per linear, then added into main_grad (speed)",
    ),
    Patch(
        "rope_tables",
        "speed",
        _patch_rope_tables,
        "cos/sin of the rotary frequencies per layer and call, and a copy of q and k (speed)",
    ),
    Patch(
        "tied_embedding_wgrad",
        "speed",
        _patch_tied_embedding_wgrad,
        "a zero-filled [v, h] dummy gradient and two [v, h] additions per step for tied "
        "embeddings (speed)",
    ),
    Patch(
        "aligned_grad_buffer",
        "speed",
        _patch_aligned_grad_buffer,
        "weight gradients accumulated into main_grad off a 64-byte boundary, after the "
        "pruning masks' odd-sized parameters (speed)",
    ),
)
"""The speed patches of megatron-core internals, in install order."""
