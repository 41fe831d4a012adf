"""Correctness shims: the CPU patches without which megatron-core 0.16 fails on CPU.

Each is a :class:`~megashear.platform.patch.Patch` of kind ``correctness`` (megatron-core reaches
CUDA, or its CUDA type checks refuse CPU tensors) or ``process`` (it starts processes that can
outlive a killed rank):

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

Model configs must also set ``use_cpu_initialization=True`` and ``batch_p2p_sync=False`` on
CPU; :func:`megashear.models.llama.build_transformer_config` does that.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Callable

import torch

from megashear.platform.patch import Patch

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


SHIMS: tuple[Patch, ...] = (
    Patch(
        "cuda_namespace",
        "correctness",
        _patch_cuda_namespace,
        "AssertionError: Torch not compiled with CUDA enabled (torch.cuda.current_device(), "
        "device='cuda' in schedules/optimizer/causal masks, torch.cuda.synchronize)",
        reinstall=True,
    ),
    Patch(
        "tensor_cuda",
        "correctness",
        _patch_tensor_cuda,
        "Tensor.cuda() in optimizer/checkpoint loading",
    ),
    Patch(
        "rng_tracker",
        "correctness",
        _patch_rng_tracker,
        "model_parallel_cuda_manual_seed reading CUDA RNG",
    ),
    Patch(
        "clip_grads",
        "correctness",
        _patch_clip_grads,
        "AssertionError on grad.type() in grad clipping",
    ),
    Patch(
        "optimizer_type_names",
        "correctness",
        _patch_optimizer_type_names,
        "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ... (the "
        "distributed optimizer and the bf16 optimizer sort parameters by CUDA type name)",
    ),
    Patch(
        "optimizer_step_state",
        "correctness",
        _patch_optimizer_step_state,
        "KeyError: 'step' loading the distributed optimizer's fully_reshardable checkpoint "
        "with torch's Adam, then one step tensor incremented once per parameter (megatron-core "
        "expects CUDA's FusedAdam)",
    ),
    Patch(
        "checkpoint_writer",
        "process",
        _patch_checkpoint_writer,
        "checkpoint-writer child processes (and a Manager server) outliving a killed rank",
    ),
)
"""The correctness and process patches, in install order."""
