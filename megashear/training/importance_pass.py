"""The calibration pass of activation importance, at any TP × PP × DP (× virtual stage) layout.

Forward hooks on a plain (unmasked) megatron-core LLaMA collect the per-sample statistics of
:mod:`megashear.pruning.importance` while megatron's forward-only schedule runs a calibration
batch; no gradient is computed. Where each statistic lives and how it is made whole:

================  ==========================  ===============================================
statistic         local layout                made whole
================  ==========================  ===============================================
``head``          ``[Ll, a/tp]`` sums of sq.  columns placed by TP rank, rows by global layer;
                                              summed over TP, PP and DP
``intermediate``  ``[Ll, f/tp]`` sums of sq.  the same
``hidden``        ``[n, h]`` sums of squares  one row per RMSNorm of this stage (replicated
                                              over TP); summed over DP, ``sqrt``, summed over
                                              the stage's norms, then over PP
``layer``         ``[Ll]`` sums and tokens    rows by global layer; summed over PP and DP
================  ==========================  ===============================================

Every rank of the DP group sees its own slice of the samples, every TP rank the same samples,
so the scores are the same for every layout (to float rounding of the forward pass). Under
sequence parallelism a norm's output and a layer's input and output are ``[s/tp, b, h]``: the
norm outputs are all-gathered over TP before their statistic (a mean over ``s``), and the
block sums and token counts of ``layer`` are summed over TP too.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megashear.pruning import importance as imp

logger = logging.getLogger(__name__)


def _gpt(chunk: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside a chunk's DDP / Float16Module wrappers."""
    while not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


class _Collector:
    """The hooks of every chunk of this rank and the sums they fill, keyed by global layer."""

    def __init__(
        self, chunks: list[torch.nn.Module], head_dim: int, sequence_parallel: bool = False
    ) -> None:
        self.head_dim = head_dim
        self.sequence_parallel = sequence_parallel
        self.head: dict[int, torch.Tensor] = {}
        self.intermediate: dict[int, torch.Tensor] = {}
        self.layer: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        self.hidden: list[torch.Tensor] = []  # one per norm of this rank
        self.handles = []
        for chunk in chunks:
            gpt = _gpt(chunk)
            for layer in gpt.decoder.layers:
                self._hook_layer(layer, layer.layer_number - 1)
            if getattr(gpt.decoder, "final_layernorm", None) is not None:
                self._hook_norm(gpt.decoder.final_layernorm)

    def _add(self, store: dict, key: int, value: torch.Tensor) -> None:
        value = value.double()
        store[key] = value if key not in store else store[key] + value

    def _hook_norm(self, norm: torch.nn.Module) -> None:
        slot = len(self.hidden)
        self.hidden.append(None)

        def hook(module, args, output):
            if self.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                output = gather_from_sequence_parallel_region(output)
            sq = imp.channel_statistic(output).double().pow(2).sum(0)  # [h]
            prev = self.hidden[slot]
            self.hidden[slot] = sq if prev is None else prev + sq

        self.handles.append(norm.register_forward_hook(hook))

    def _hook_layer(self, layer: torch.nn.Module, index: int) -> None:
        attention, mlp = layer.self_attention, layer.mlp

        def proj_input(module, args):
            stat = imp.head_statistic(args[0], self.head_dim)  # [b, a/tp]
            self._add(self.head, index, stat.pow(2).sum(0))

        def fc2_input(module, args):
            stat = imp.channel_statistic(args[0])  # [b, f/tp]
            self._add(self.intermediate, index, stat.pow(2).sum(0))

        seen: dict[str, torch.Tensor] = {}

        def layer_input(module, args, kwargs):
            seen["in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def layer_output(module, args, kwargs, output):
            x_in, x_out = seen.pop("in"), output[0]  # [s, b, h] ([s/tp, b, h] under SP)
            self._add(self.layer, index, imp.block_statistic(x_in, x_out))
            tokens = torch.tensor(float(x_in.shape[0] * x_in.shape[1]))
            self._add(self.tokens, index, tokens)

        self.handles += [
            attention.linear_proj.register_forward_pre_hook(proj_input),
            mlp.linear_fc2.register_forward_pre_hook(fc2_input),
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.register_forward_hook(layer_output, with_kwargs=True),
        ]
        self._hook_norm(layer.input_layernorm)
        self._hook_norm(layer.pre_mlp_layernorm)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _rows(store: dict[int, torch.Tensor], num_layers: int, width: int | None, col0: int = 0):
    """Full ``[L, width_total]`` (or ``[L]``) float64 zeros with this rank's entries placed."""
    out = None
    for layer, value in store.items():
        if out is None:
            shape = (num_layers,) if width is None else (num_layers, width)
            out = torch.zeros(shape, dtype=torch.float64)
        if width is None:
            out[layer] = value
        else:
            out[layer, col0 : col0 + value.numel()] = value
    if out is None:
        out = torch.zeros(
            (num_layers,) if width is None else (num_layers, width), dtype=torch.float64
        )
    return out


def _all_reduce(t: torch.Tensor, *groups) -> torch.Tensor:
    from megashear import platform

    t = t.to(platform.default_device())
    for group in groups:
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
    return t.cpu()


@torch.no_grad()
def calibrate(trainer, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Importance scores of ``trainer``'s model on the global ``batch`` (``tokens [B, s]``), the
    same full scores on every rank (see :mod:`megashear.pruning.importance` for the layouts).

    ``trainer`` is a :class:`~megashear.training.trainer.Trainer` of the plain LLaMA spec with
    its weights loaded; ``B`` must be divisible by DP × the micro-batch size.
    """
    from megatron.core import parallel_state as ps

    cfg = trainer.model_cfg
    sp = trainer.par.sequence_parallel
    collector = _Collector(trainer.model, cfg.head_dim, sp)
    try:
        trainer.run_schedule_eval(batch)
    finally:
        collector.remove()
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    dp_group = ps.get_data_parallel_group()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    a, f, L = cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.num_layers
    head = _rows(collector.head, L, a, tp_rank * (a // tp))
    intermediate = _rows(collector.intermediate, L, f, tp_rank * (f // tp))
    head = _all_reduce(head, tp_group, pp_group, dp_group)
    intermediate = _all_reduce(intermediate, tp_group, pp_group, dp_group)
    # under SP each TP rank holds the block sums and token counts of its s/tp tokens
    token_groups = (tp_group, pp_group, dp_group) if sp else (pp_group, dp_group)
    layer = _all_reduce(_rows(collector.layer, L, None), *token_groups)
    tokens = _all_reduce(_rows(collector.tokens, L, None), *token_groups)
    norms = [h for h in collector.hidden if h is not None]
    hidden = torch.zeros(len(norms), cfg.hidden_size, dtype=torch.float64)
    for i, h in enumerate(norms):
        hidden[i] = h
    hidden = _all_reduce(hidden, dp_group)  # [n, h]: sums of squares over every sample
    hidden_l2 = _all_reduce(hidden.sqrt().sum(0), pp_group)  # [h]: L2 per norm, summed
    return imp.finish(head, intermediate, hidden_l2, layer, tokens)
