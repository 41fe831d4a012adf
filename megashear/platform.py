"""CPU mode: the small, named set of patches that let megatron-core 0.16 run without CUDA.

This is the only module in megashear that knows the difference between CPU and GPU. On a
machine with CUDA, :func:`install_cpu_support` does nothing. Without CUDA it applies these
patches, each a few lines, each recorded in :data:`PATCHES` with the failure it prevents:

``cuda_namespace``
    megatron-core modules reach CUDA through their module-global ``torch``: they call
    ``torch.cuda.current_device()`` and use it as a device (layers, RoPE, DDP buffers, the
    attention workspace buffer, p2p receive buffers), hard-code ``device="cuda"`` (the three
    pipeline schedules, the optimizer's scale, grad clipping, the causal-mask helpers,
    dist_checkpointing's exchange), and call ``torch.cuda.synchronize`` and
    ``torch.cuda.current_stream``. Every loaded ``megatron.core`` module gets a
    :class:`_TorchOnCpu` proxy as its ``torch`` instead: it forwards everything to the real
    ``torch`` except that ``torch.cuda`` is a CPU shim and tensor factories map a CUDA device
    to the CPU. Unlike a ``TorchFunctionMode`` it costs nothing per op, and it is active during
    activation recompute too. Code outside megatron-core sees the real ``torch``.
``tensor_cuda``
    ``Tensor.cuda()`` (optimizer and dist_checkpointing loads) returns the tensor itself.
``rng_tracker``
    megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read CUDA generators directly;
    they are pointed at the CPU default generator, so ``model_parallel_cuda_manual_seed`` and
    the RNG tracker's ``fork()`` work (and fork the CPU generator).
``clip_grads``
    ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``; the
    replacement checks the dtype instead (and scales with ``torch._foreach_mul_``).
``optimizer_type_names``
    megatron-core's distributed optimizer (and its mixed-precision optimizer) sorts the
    parameters into fp32 and 16-bit groups by their type name, ``param.type() ==
    'torch.cuda.FloatTensor'``, and raises ``TypeError: Wrapped parameters must be one of
    torch.cuda.FloatTensor, ...`` for a CPU tensor (``torch.FloatTensor``). While those two
    constructors run, a CPU tensor's ``type()`` reports the CUDA name of its dtype (every other
    use of ``Tensor.type`` is passed through): the parameters land in the same groups as on a
    GPU. The optimizer's collectives (``reduce_scatter_tensor`` and ``all_gather_into_tensor``
    over the DP group) run on gloo as they are.
``optimizer_step_state``
    Loading the distributed optimizer's ``fully_reshardable`` checkpoint (the format that
    moves between DP sizes and to and from the plain optimizer) copies every entry of a
    parameter's Adam state from the checkpoint, ``step`` included. megatron-core reads that
    format with CUDA's Adam in mind (TE's or apex's ``FusedAdam``, which keep the step in the
    parameter groups); torch's Adam, the one on CPU, keeps a ``step`` per parameter, which the
    checkpoint does not hold per parameter: ``KeyError: 'step'``. And ``load_state_dict`` sets
    that per-parameter step to one tensor shared by every parameter, which torch's foreach and
    fused Adam then increment in place once per parameter: after a resume, the bias correction
    of every later step is wrong (the loss leaves the uninterrupted run's at the second step).
    The patch copies the main parameter and the moments and leaves ``step`` to
    ``load_state_dict``, then gives every parameter a step tensor of its own.

``checkpoint_writer``
    ``dist_checkpointing.save`` (torch_dist) forks one writer process per bucket and, on first
    use, spawns a ``multiprocessing.Manager`` server for its results queue that lives as long
    as the program. A rank killed with ``kill -9`` (or a node's OOM killer) leaves that server,
    and a writer caught mid-save, behind (about 290 MB each). The patch writes the buckets in
    the calling process, one after the other, into a plain in-process queue: no child process
    exists to outlive its parent. The checkpoint files are byte-for-byte the same.

Seven more patches are for speed, not correctness. Five replace megatron-core's fallbacks
without TE or apex: a per-tensor Python loop for the gradient norm, ``torch.optim.AdamW``
without ``fused`` or ``foreach`` (on CPU torch's single-tensor for-loop), weight gradients
computed apart and then added into DDP's ``main_grad``, RoPE recomputing its tables and
copying q and k, and the zero-filled dummy gradient of a tied embedding. The sixth lays out
DDP's gradient buffer, the seventh tunes the host allocator:

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
``host_allocator``
    On CPU every activation comes from glibc's ``malloc``, which serves blocks above its
    (dynamic, at most 32 MiB) mmap threshold with a fresh ``mmap`` and returns freed memory at
    the top of the heap to the kernel. A training step then page-faults its whole working set
    back in every step (about 110k faults, 430 MiB zero-filled, per SmolLM2-135M step at 4 x 256
    tokens), and the faults land inside the matmuls that write fresh outputs. The patch keeps
    blocks up to 1 GiB on the heap and the heap's freed memory in the process
    (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD, -1)``): about 3k faults per
    step. The peak RSS of a training step is unchanged, but the process no longer gives memory
    back below its peak. So only the trainers apply it (``install_cpu_support(training=True)``),
    and ``megashear finalize`` (:func:`keep_freed_host_memory` with one malloc arena: its
    7B -> 1.3B run took 5.8M page faults and 21 s of system time without it, 0.4M and 6 s with
    it, for a peak RSS of 1.7 GB instead of 1.3 GB; with one arena per thread it kept 1.9 GB and
    still took 4M faults). Where the C library is not glibc, it does nothing (and says so at
    debug level).

Model configs must also set ``use_cpu_initialization=True`` and ``batch_p2p_sync=False`` on
CPU; :func:`megashear.models.llama.build_transformer_config` does that.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def cuda_available() -> bool:
    """True when a usable CUDA device is present (then no patch is applied)."""
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The device megashear computes on: the current CUDA device, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if cuda_available()
        else (torch.device("cpu"))
    )


def distributed_backend() -> str:
    """``nccl`` with CUDA, ``gloo`` without."""
    return "nccl" if cuda_available() else "gloo"


# --------------------------------------------------------------------------------------------
# cuda_namespace: a `torch` proxy for megatron-core modules
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "eye",
    "linspace",
)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: a stream on which everything is already done."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullEvent(_NullStream):
    def record(self, stream=None) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


class _CudaOnCpu(types.ModuleType):
    """Stands in for ``torch.cuda`` inside megatron-core modules on a CPU-only machine."""

    def __init__(self) -> None:
        super().__init__("torch.cuda(cpu)")
        self.current_device = lambda: torch.device("cpu")
        self.device_count = lambda: 0
        self.is_available = lambda: False
        self.synchronize = lambda *a, **k: None
        self.empty_cache = lambda: None
        self.Stream = _NullStream
        self.Event = _NullEvent
        self.current_stream = lambda *a, **k: _NullStream()
        self.default_stream = lambda *a, **k: _NullStream()
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.device = lambda *a, **k: contextlib.nullcontext()
        self.set_device = lambda *a, **k: None
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        self.manual_seed_all = self.manual_seed
        self.memory_allocated = lambda *a, **k: 0
        self.max_memory_allocated = lambda *a, **k: 0
        self.memory_reserved = lambda *a, **k: 0
        self.nvtx = types.SimpleNamespace(
            range_push=lambda *a, **k: None,
            range_pop=lambda *a, **k: None,
            range=lambda *a, **k: contextlib.nullcontext(),
        )

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside megatron-core modules: ``torch`` with CUDA mapped to CPU."""

    def __init__(self) -> None:
        super().__init__("torch(cpu)")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later look-ups are plain attribute reads
        return value


_TORCH_ON_CPU: _TorchOnCpu | None = None

# Modules imported (so that they get the proxy) before the sys.modules scan. Other megatron-core
# modules imported later are covered by calling install_cpu_support() again after importing them.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)


def _patch_cuda_namespace() -> None:
    global _TORCH_ON_CPU
    import importlib

    if _TORCH_ON_CPU is None:
        _TORCH_ON_CPU = _TorchOnCpu()
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("megatron.core"):
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = _TORCH_ON_CPU


def _patch_tensor_cuda() -> None:
    def cuda_on_cpu(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = cuda_on_cpu


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_rng_state(device=-1, clone: bool = False, graph_safe: bool = False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_rng_state(new_state, device=-1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_rng_state
    mrandom._set_cuda_rng_state = set_rng_state


def _patch_clip_grads() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(
        parameters, max_norm, total_norm, use_decoupled_grad: bool = False
    ) -> None:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = []
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                if grad.dtype not in (torch.float32, torch.bfloat16):
                    raise TypeError(f"gradient clipping expects fp32/bf16 grads, got {grad.dtype}")
                grads.append(grad.detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


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


def wgrad_accumulation_fusion() -> bool:
    """Whether models should set ``gradient_accumulation_fusion``: on CPU once the
    ``wgrad_accumulation`` patch is in; never with CUDA (the GPU path is left as it was)."""
    return "wgrad_accumulation" in _APPLIED and not cuda_available()


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt (malloc.h)
HEAP_BLOCK_LIMIT = 1 << 30  # blocks up to this size come from the heap, not a fresh mmap


def _glibc():
    """glibc, or None where the C library is another (musl, macOS) or lacks ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_freed_host_memory(single_arena: bool = False) -> bool:
    """Make glibc's ``malloc`` serve blocks up to :data:`HEAP_BLOCK_LIMIT` from the heap and
    keep freed heap memory in the process (the ``host_allocator`` patch; see the module
    docstring), so that host tensors reuse pages instead of faulting fresh ones in. With
    ``single_arena`` every thread shares the main arena (``M_ARENA_MAX`` 1): a process whose
    helper threads allocate tensors would otherwise keep freed memory once per thread's arena.
    Call it before those threads start. Host memory is the same with or without CUDA, so this
    is not a CPU-mode patch by itself. Returns False where the C library is not glibc (then
    nothing changes) or glibc refuses a setting (the ones before it stay)."""
    libc = _glibc()
    if libc is None:
        logger.debug("host_allocator: not glibc, malloc left as it is")
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) and libc.mallopt(_M_TRIM_THRESHOLD, -1)
    if ok and single_arena:
        ok = libc.mallopt(_M_ARENA_MAX, 1)
    if not ok:
        logger.debug("host_allocator: glibc refused mallopt, malloc left as it is")
    return bool(ok)


def _patch_host_allocator() -> None:
    keep_freed_host_memory()


def _write_buckets_in_process(
    transform_list, use_msc: bool, rank: int, write_buckets, global_results_queue
) -> None:
    """megatron's ``FileSystemWriterAsync.write_preloaded_data_multiproc`` without processes:
    every bucket written by ``write_preloaded_data`` here, results as ``{bucket: results}`` (or
    the first exception) into ``global_results_queue``."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    results = {}
    for i, bucket in enumerate(write_buckets):
        local, count = queue.Queue(), queue.Queue()
        count.put(i)  # write_preloaded_data takes it and marks it done
        FileSystemWriterAsync.write_preloaded_data(
            transform_list, i, bucket, local, count, True, use_msc=use_msc
        )
        index, outcome = local.get()
        if isinstance(outcome, Exception):
            global_results_queue.put(outcome)
            return
        results[index] = outcome
    global_results_queue.put(results)


@contextlib.contextmanager
def _cuda_type_names():
    """Within the block, ``cpu_tensor.type()`` (no argument) is the CUDA type name of its dtype,
    ``torch.cuda.FloatTensor`` for ``torch.FloatTensor``; ``type(dtype)`` converts as always."""
    real = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return real(self).replace("torch.", "torch.cuda.", 1)
        return real(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = real


def _patch_optimizer_type_names() -> None:
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for cls in (
        distrib_optimizer.DistributedOptimizer,
        optimizer.Float16OptimizerWithFloat16Params,
    ):
        init = cls.__init__
        if getattr(init, "_cpu_type_names", False):
            continue

        @functools.wraps(init)
        def init_with_cuda_type_names(self, *args, _init=init, **kwargs) -> None:
            with _cuda_type_names():
                _init(self, *args, **kwargs)

        init_with_cuda_type_names._cpu_type_names = True
        cls.__init__ = init_with_cuda_type_names


def _patch_optimizer_step_state() -> None:
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, "_skips_step", False):
        return

    def set_main_param_and_optimizer_states(self, model_param, tensors) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        for key, dst in {"param": main_param, **self.optimizer.state[main_param]}.items():
            if key != "step":  # torch Adam's per-parameter count, set from the groups' step
                dst.copy_(tensors[key])

    set_main_param_and_optimizer_states._skips_step = True
    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    load_state_dict = cls.load_state_dict

    @functools.wraps(load_state_dict)
    def load_state_dict_own_steps(self, state_dict) -> None:
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    cls.load_state_dict = load_state_dict_own_steps


def _patch_checkpoint_writer() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    writer.write_preloaded_data_multiproc = staticmethod(_write_buckets_in_process)
    filesystem_async._get_write_results_queue = queue.Queue  # one per save, in this process


@dataclass(frozen=True)
class Patch:
    """A named CPU patch and the failure it prevents."""

    name: str
    apply: Callable[[], None]
    prevents: str
    training_only: bool = False  # applied by the trainers, not by every process on CPU


PATCHES: tuple[Patch, ...] = (
    Patch(
        "cuda_namespace",
        _patch_cuda_namespace,
        "AssertionError: Torch not compiled with CUDA enabled (torch.cuda.current_device(), "
        "device='cuda' in schedules/optimizer/causal masks, torch.cuda.synchronize)",
    ),
    Patch("tensor_cuda", _patch_tensor_cuda, "Tensor.cuda() in optimizer/checkpoint loading"),
    Patch("rng_tracker", _patch_rng_tracker, "model_parallel_cuda_manual_seed reading CUDA RNG"),
    Patch("clip_grads", _patch_clip_grads, "AssertionError on grad.type() in grad clipping"),
    Patch(
        "optimizer_type_names",
        _patch_optimizer_type_names,
        "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ... (the "
        "distributed optimizer and the bf16 optimizer sort parameters by CUDA type name)",
    ),
    Patch(
        "optimizer_step_state",
        _patch_optimizer_step_state,
        "KeyError: 'step' loading the distributed optimizer's fully_reshardable checkpoint "
        "with torch's Adam, then one step tensor incremented once per parameter (megatron-core "
        "expects CUDA's FusedAdam)",
    ),
    Patch(
        "checkpoint_writer",
        _patch_checkpoint_writer,
        "checkpoint-writer child processes (and a Manager server) outliving a killed rank",
    ),
    Patch("foreach_grad_norm", _patch_foreach_grad_norm, "a per-tensor Python loop (speed)"),
    Patch("fused_adam", _patch_fused_adam, "torch's single-tensor AdamW loop on CPU (speed)"),
    Patch(
        "wgrad_accumulation",
        _patch_wgrad_accumulation,
        "a fresh weight gradient per linear, then added into main_grad (speed)",
    ),
    Patch(
        "rope_tables",
        _patch_rope_tables,
        "cos/sin of the rotary frequencies per layer and call, and a copy of q and k (speed)",
    ),
    Patch(
        "tied_embedding_wgrad",
        _patch_tied_embedding_wgrad,
        "a zero-filled [v, h] dummy gradient and two [v, h] additions per step for tied "
        "embeddings (speed)",
    ),
    Patch(
        "aligned_grad_buffer",
        _patch_aligned_grad_buffer,
        "weight gradients accumulated into main_grad off a 64-byte boundary, after the "
        "pruning masks' odd-sized parameters (speed)",
    ),
    Patch(
        "host_allocator",
        _patch_host_allocator,
        "page faults over the whole working set in every step: malloc's mmap and trim (speed)",
        training_only=True,
    ),
)

_APPLIED: set[str] = set()

SKIP_ENV = "MEGASHEAR_SKIP_CPU_PATCHES"
"""Comma-separated patch names that every :func:`install_cpu_support` call in the process
leaves out, e.g. ``fused_adam,wgrad_accumulation``: megatron-core's own CPU fallback then runs
instead, to rule a speed patch out when a number looks wrong."""


def applied_patches() -> list[str]:
    """The names of the CPU patches applied in this process so far, in :data:`PATCHES` order."""
    return [p.name for p in PATCHES if p.name in _APPLIED]


def install_cpu_support(skip: Iterable[str] = (), training: bool = False) -> list[str]:
    """Apply the CPU patches when CUDA is absent; a no-op with CUDA.

    Safe to call repeatedly: ``cuda_namespace`` re-scans ``sys.modules`` so that megatron-core
    modules imported since the last call are covered too.

    Args:
        skip: names of patches to leave out (tests use this to show what each one prevents);
            the names in the environment variable :data:`SKIP_ENV` are left out too.
        training: also apply the training-only patches (``host_allocator``); the trainers pass
            it, streaming converters and ``finalize`` do not.

    Returns:
        The names of the patches applied in this call.
    """
    if cuda_available():
        return []
    from_env = {name.strip() for name in os.environ.get(SKIP_ENV, "").split(",") if name.strip()}
    skip = set(skip) | from_env
    unknown = skip - {p.name for p in PATCHES}
    if unknown:
        where = f" (in {SKIP_ENV})" if unknown & from_env else ""
        raise ValueError(
            f"unknown CPU patches {sorted(unknown)}{where}; known: {[p.name for p in PATCHES]}"
        )
    applied = []
    for patch in PATCHES:
        if patch.name in skip or patch.training_only and not training:
            continue
        if patch.name in _APPLIED and patch.name != "cuda_namespace":
            continue
        patch.apply()
        _APPLIED.add(patch.name)
        applied.append(patch.name)
    logger.debug("CPU patches applied: %s", applied)
    return applied
