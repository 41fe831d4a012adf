"""Applies the CPU patches except the ones named on the command line, then runs one probe per
patch and prints a JSON map ``{patch: "ok" | "ExceptionType: message"}``."""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist


def probe_cuda_namespace():
    from megashear.config import ParallelConfig
    from megashear.model_config import get_preset
    from megashear.models.llama import build_model_chunk, build_transformer_config

    cfg = get_preset("tiny-gqa")
    model = build_model_chunk(cfg, build_transformer_config(cfg, ParallelConfig()))
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(tokens, torch.arange(8).expand(2, 8), None, labels=tokens)
    assert out.shape == (2, 8)


def probe_tensor_cuda():
    from megatron.core.tensor_parallel.data import broadcast_data

    out = broadcast_data(["x"], {"x": torch.arange(4)}, torch.int64)
    assert out["x"].tolist() == [0, 1, 2, 3]


def probe_rng_tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    with get_cuda_rng_tracker().fork():
        torch.rand(1)


def probe_clip_grads():
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((3,), 0.5), atol=1e-5)


def probe_optimizer_type_names():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _tiny_ddp_model(dist_opt=True)
    config = OptimizerConfig(optimizer="adam", lr=0.1, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, [model])
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad_buffer()
    optimizer.zero_grad()
    model(tokens, torch.arange(8).expand(2, 8), None, labels=tokens).sum().backward()
    model.finish_grad_sync()
    update_ok, grad_norm, _ = optimizer.step()
    assert update_ok and grad_norm > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def probe_optimizer_step_state():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _tiny_ddp_model(dist_opt=True)
    config = OptimizerConfig(optimizer="adam", lr=0.1, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, [model]).chained_optimizers[0]
    for p in model.parameters():
        p.main_grad.fill_(1.0)
    optimizer.step()  # Adam's state exists, with torch's per-parameter step
    param = next(iter(model.parameters()))
    index, order = optimizer.model_param_group_index_map[param]
    main = optimizer.optimizer.param_groups[index]["params"][order]
    saved = {"param": torch.full_like(main, 3.0), "exp_avg": torch.full_like(main, 1.0),
             "exp_avg_sq": torch.full_like(main, 2.0)}  # fmt: skip
    try:  # what load_parameter_state_from_fully_reshardable hands over, under no_grad
        with torch.no_grad():
            optimizer._set_main_param_and_optimizer_states(param, saved)
    except KeyError as exc:
        raise AssertionError(
            f"KeyError {exc}: megatron-core loads the Adam state of CUDA's FusedAdam only"
        ) from exc
    state = optimizer.optimizer.state[main]
    assert torch.equal(main, saved["param"]) and torch.equal(
        state["exp_avg_sq"], saved["exp_avg_sq"]
    )
    optimizer.load_state_dict(optimizer.state_dict())  # as its sharded_state_dict does to load
    steps = [s["step"] for s in optimizer.optimizer.state.values()]
    assert len({id(t) for t in steps}) == len(steps), (
        "one step tensor shared by every parameter (megatron-core loads the Adam state of "
        "CUDA's FusedAdam only), incremented once per parameter by torch's Adam"
    )


def probe_checkpoint_writer():
    import multiprocessing
    import tempfile

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    started = []
    real_start = multiprocessing.process.BaseProcess.start

    def counting_start(self):
        started.append(type(self).__name__)
        return real_start(self)

    multiprocessing.process.BaseProcess.start = counting_start
    try:
        with tempfile.TemporaryDirectory() as d:
            x = torch.arange(6.0)
            dist_checkpointing.save({"x": ShardedTensor.from_rank_offsets("x", x)}, d)
            back = dist_checkpointing.load(
                {"x": ShardedTensor.from_rank_offsets("x", torch.empty(6))}, d
            )
            assert torch.equal(back["x"], x)
    finally:
        multiprocessing.process.BaseProcess.start = real_start
    left = multiprocessing.active_children()
    assert not started and not left, (
        f"child processes: the save started {started}; alive after it: {left}"
    )


def probe_foreach_grad_norm():
    from megatron.core.optimizer import clip_grads

    grads = [torch.full((3,), 2.0), torch.full((4, 2), 1.0)]
    total = clip_grads.get_grad_norm_fp32(grads)
    assert abs(float(total) - (12.0 + 8.0) ** 0.5) < 1e-5
    name = getattr(clip_grads.l2_norm_impl, "__name__", "")
    assert name == "_foreach_l2_norm", f"slow path: megatron's l2 norm is {name}"


def probe_fused_adam():
    import megatron.core.optimizer as mcore_optimizer

    p = torch.nn.Parameter(torch.zeros(2))
    opt = mcore_optimizer.torch.optim.AdamW([p], lr=0.1)
    fast = opt.defaults.get("fused") or opt.defaults.get("foreach")
    assert fast, "slow path: megatron builds torch's single-tensor AdamW"


def probe_wgrad_accumulation():
    from megatron.core.tensor_parallel import layers

    from megashear import platform

    assert layers._grad_accum_fusion_available, (
        "slow path: no gradient-accumulation fusion, a fresh weight gradient per linear"
    )
    x, g = torch.randn(6, 3), torch.randn(6, 4)  # input [s*b, in], grad_output [s*b, out]
    main_grad = torch.ones(4, 3)
    layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x, g, main_grad)
    assert torch.allclose(main_grad, 1 + g.t() @ x, atol=1e-6)
    assert platform.wgrad_accumulation_fusion()


def probe_rope_tables():
    from megatron.core.models.common.embeddings import rope_utils
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    freqs = torch.randn(5, 1, 1, 8, generator=gen)  # [s, 1, 1, hn]
    q, k = torch.randn(5, 2, 3, 8, generator=gen), torch.randn(5, 2, 1, 8, generator=gen)
    x1, x2 = torch.chunk(q, 2, dim=-1)
    expected = q * torch.cos(freqs) + torch.cat((-x2, x1), dim=-1) * torch.sin(freqs)
    with Ops() as ops:
        out_q = rope_utils._apply_rotary_pos_emb_bshd(q, freqs)
        rope_utils._apply_rotary_pos_emb_bshd(k, freqs)
    assert torch.equal(out_q, expected)
    copies = ops.names.count("cat") - 2  # rotate_half's own cat, once per call
    tables = ops.names.count("cos")
    assert copies == 0 and tables <= 1, (
        f"slow path: {tables} cos tables and {copies} extra copies for two RoPE calls"
    )


def _tiny_ddp_model(tied: bool = False, odd_param: bool = False, dist_opt: bool = False):
    """A one-layer LLaMA (h 16, vocab 64) wrapped in megatron's DDP, as the trainers wrap it;
    ``odd_param`` registers a 3-element parameter last, like a pruning model's mask bank;
    ``dist_opt`` lays the buffers out for the distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megashear.config import ParallelConfig
    from megashear.model_config import ModelConfig
    from megashear.models.llama import build_model_chunk, build_transformer_config

    cfg = ModelConfig(1, 16, 2, 2, 32, 64, seq_length=8, tie_word_embeddings=tied)
    tconfig = build_transformer_config(cfg, ParallelConfig())
    chunk = build_model_chunk(cfg, tconfig)
    if odd_param:
        chunk.odd = torch.nn.Module()
        chunk.odd.log_alpha = torch.nn.Parameter(torch.zeros(3))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt
    )
    return DistributedDataParallel(tconfig, ddp_config, chunk)


def probe_tied_embedding_wgrad():
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _tiny_ddp_model(tied=True)
    weight = model.module.embedding.word_embeddings.weight  # [v, h], shared with the output
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 8), generator=gen)  # [b, s]
    position_ids = torch.arange(8).expand(2, 8)

    class FullSizeOps(TorchDispatchMode):
        """Counts ops that write a fresh tensor of the embedding's shape."""

        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(weight.shape):
                self.names.append(func.overloadpacket.__name__)
            return out

    def main_grad_of_one_step(ops=None):
        model.zero_grad_buffer()
        with ops if ops is not None else torch.enable_grad():
            model(tokens, position_ids, None, labels=tokens).sum().backward()
        return weight.main_grad.clone()

    ops = FullSizeOps()
    fast = main_grad_of_one_step(ops)
    marked = getattr(weight, "embedding_wgrad_into_main_grad", False)
    weight.embedding_wgrad_into_main_grad, weight.zero_out_wgrad = False, True  # megatron's path
    reference = main_grad_of_one_step()
    weight.embedding_wgrad_into_main_grad, weight.zero_out_wgrad = marked, not marked
    assert torch.allclose(fast, reference, atol=1e-5), "the tied weight's gradient differs"
    slow = [n for n in ops.names if n in ("zeros", "zero_", "fill_", "add", "add_", "new_zeros")]
    assert not slow, f"slow path: [v, h] tensors written per backward: {slow}"


def probe_aligned_grad_buffer():
    model = _tiny_ddp_model(odd_param=True)
    sized = [p for p in model.module.parameters() if p.numel() % 16 == 0]
    off = [p for p in sized if p.main_grad.data_ptr() % 64]
    assert all(p.main_grad.shape == p.shape for p in model.module.parameters())
    assert not off, f"slow path: {len(off)} of {len(sized)} main_grads start off a 64-byte boundary"


def probe_host_allocator():
    import resource

    def faults_of_one_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MiB: above glibc's mmap threshold
        block[::4096] = 1  # touch every page once
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # torch asks for 64-byte-aligned blocks, a little more than the hole a freed block of the
    # same size leaves while small chunks sit after it (glibc's tcache holds them and never
    # coalesces them). So the heap grows by a block a few times (three to five in a fresh
    # process) before a hole is big enough. Four tries were too few once in CI, after the
    # probes before this one had left no big hole. Without the patch every try is an mmap.
    faults = min(faults_of_one_block() for _ in range(16))
    pages = (64 << 20) // 4096
    assert faults < pages // 4, (
        f"slow path: a reused 64 MiB block faults {faults} of its {pages} pages"
    )


def main() -> None:
    skip = [s for s in sys.argv[1:] if s]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29555"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1, 1)
    from megashear import platform

    platform.install("training", skip=skip)
    results = {}
    for patch in platform.PATCHES:
        name = patch.name
        try:
            globals()[patch.probe]()
            results[name] = "ok"
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1].line
            results[name] = f"{type(exc).__name__}: {exc} [at: {where}]"
    print("PROBE " + json.dumps(results))


if __name__ == "__main__":
    main()
