"""LLaMA on megatron-core: ``TransformerConfig`` from a :class:`ModelConfig`, and the model.

The model is megatron-core's ``GPTModel`` with RMSNorm, SwiGLU, rotary embeddings
(non-interleaved, HF order), grouped-query attention and no biases. The layer spec is
megatron-core's own: the TransformerEngine spec when TE imports, else the local spec with
:class:`SDPACoreAttention` as its core attention and megashear's :class:`RMSNorm` as every norm
(the final one too), which runs under sequence parallelism where megatron-core's torch norm
refuses it.

- Tied embeddings use megatron-core's ``share_embeddings_and_output_weights``: under pipeline
  parallelism the last stage holds a copy of the embedding whose gradient megatron-core
  all-reduces with the first stage's (``finalize_model_grads``).
- The embedding and output layer hold ``padded_vocab_size`` rows ``[v_pad/tp, h]`` per TP rank;
  the logits of the padded rows are set to ``-inf`` by a forward hook on the output layer, so
  they never enter the softmax, the loss or its gradient, and losses equal Hugging Face's.
- Llama-3 RoPE scaling: the inverse frequencies are computed by :mod:`megashear.rope` from the
  model's own factors and installed into megatron-core's ``RotaryEmbedding``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from megashear import platform
from megashear.config import ParallelConfig
from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)


def te_available() -> bool:
    """TransformerEngine importable and usable (a partial install raises RuntimeError)."""
    if not platform.cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401

        return True
    except Exception:
        return False


def validate_layout(cfg: ModelConfig, par: ParallelConfig, world_size: int) -> None:
    """Raise ``ValueError`` with a one-line message if ``par`` cannot shard ``cfg``."""
    if par.tp < 1 or par.pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={par.tp} pp={par.pp}")
    if world_size % (par.tp * par.pp):
        raise ValueError(
            f"tp*pp={par.tp * par.pp} (tp={par.tp}, pp={par.pp}) does not divide the world "
            f"size {world_size}"
        )
    for name, value in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_query_groups", cfg.num_query_groups),
        ("ffn_hidden_size", cfg.ffn_hidden_size),
    ):
        if value % par.tp:
            raise ValueError(f"{name}={value} is not divisible by tensor parallel size {par.tp}")
    if cfg.padded_vocab_size % par.tp:
        raise ValueError(
            f"padded vocabulary {cfg.padded_vocab_size} (vocab_size={cfg.vocab_size} padded to a "
            f"multiple of make_vocab_size_divisible_by={cfg.make_vocab_size_divisible_by}) is "
            f"not divisible by tensor parallel size {par.tp}; set "
            f"model.make_vocab_size_divisible_by to a multiple of {par.tp}"
        )
    if cfg.num_attention_heads % cfg.num_query_groups:
        raise ValueError(
            f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
            f"num_query_groups={cfg.num_query_groups}"
        )
    stages = par.pp * (par.vpp or 1)
    if cfg.num_layers % stages:
        raise ValueError(
            f"num_layers={cfg.num_layers} is not divisible by pipeline stages "
            f"pp={par.pp} x vpp={par.vpp or 1}"
        )
    if par.vpp is not None and par.pp < 2:
        raise ValueError("virtual pipeline stages (vpp) need pp >= 2")
    if par.sequence_parallel and par.tp < 2:
        raise ValueError(
            f"sequence_parallel needs tp >= 2 (it splits the sequence over the TP group), "
            f"got tp={par.tp}"
        )
    if par.sequence_parallel and cfg.seq_length % par.tp:
        raise ValueError(
            f"seq_length={cfg.seq_length} is not divisible by tensor parallel size {par.tp} "
            f"(sequence_parallel splits the sequence over the TP group)"
        )


def build_transformer_config(
    cfg: ModelConfig,
    par: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    init_method_std: float = 0.02,
):
    """Map a :class:`ModelConfig` and layout onto megatron-core's ``TransformerConfig``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not platform.cuda_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        batch_p2p_sync=not on_cpu,
        # gloo matches messages between a pair of ranks by order: batched ops of an interleaved
        # schedule at pp=2 (prev == next) would swap activations and gradients.
        batch_p2p_comm=not on_cpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=platform.wgrad_accumulation_fusion(),
        deallocate_pipeline_outputs=True,
    )


class RMSNorm(torch.nn.Module):
    """The RMSNorm leaf of the local spec: torch's fused ``rms_norm`` over ``h`` of
    ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism), weight ``[h]``.

    It stands in for megatron-core's ``WrappedTorchNorm`` (the same ``weight`` key and values),
    which asserts ``not config.sequence_parallel``. Under sequence parallelism each TP rank
    normalises its own ``s/tp`` tokens, so the weight is marked ``sequence_parallel``: megatron-
    core's ``finalize_model_grads`` then sums its gradient over the TP group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def layer_spec(use_te: bool | None = None):
    """megatron-core's LLaMA layer spec: TE's on GPU when importable, else local + SDPA with
    :class:`RMSNorm` as its norms."""
    if use_te is None:
        use_te = te_available()
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megashear.models.attention import SDPACoreAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def block_spec(tconfig, spec, vp_stage: int | None = None):
    """The decoder spec of one chunk: a layer spec whose norms are :class:`RMSNorm` (or a
    subclass) becomes a block spec whose final norm is that class too (megatron-core would build
    its torch norm there); a TE layer spec or a block spec is returned as it is."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if not isinstance(spec, ModuleSpec):
        return spec
    norm = spec.submodules.input_layernorm
    if not (isinstance(norm, type) and issubclass(norm, RMSNorm)):
        return spec
    n_local = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n_local, layer_norm=norm)


def build_model_chunk(
    cfg: ModelConfig,
    tconfig,
    spec=None,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
):
    """One ``GPTModel`` chunk (this rank's layers of one virtual stage)."""
    from megatron.core.models.gpt import GPTModel

    kwargs = {}
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    spec = block_spec(tconfig, spec if spec is not None else layer_spec(), vp_stage)
    chunk = GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
        **kwargs,
    )
    if cfg.rope_scaling != "none":
        from megashear.rope import rotary_inv_freq

        chunk.rotary_pos_emb.inv_freq = rotary_inv_freq(cfg).float()
    if post_process and cfg.padded_vocab_size != cfg.vocab_size:
        mask_padded_logits(chunk.output_layer, cfg.vocab_size)
    return chunk


class _PaddedLogitsToMinusInf(torch.autograd.Function):
    """Logits ``[s, b, v/tp]`` get ``-inf`` in place from column ``first`` on (the padded
    vocabulary rows of this TP rank's slice); their gradient is 0 there.

    ``masked_fill`` writes a fresh ``[s, b, v/tp]`` copy forward and another backward. Here the
    forward writes only the padded columns. The backward returns the incoming gradient itself
    when it is already 0 there, which it is for any loss of the softmax (cross-entropy, KD:
    ``softmax(-inf) = 0`` and no target is a padded id), and a zeroed copy otherwise."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, first: int) -> torch.Tensor:
        ctx.first = first
        ctx.mark_dirty(logits)
        logits[..., first:] = float("-inf")  # the output layer's GEMM does not keep its output
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        first = ctx.first
        if grad[..., first:].any():
            grad = grad.clone()
            grad[..., first:] = 0
        return grad, None


def mask_padded_logits(output_layer: torch.nn.Module, vocab_size: int) -> None:
    """Set the logits of padded vocabulary rows to ``-inf`` on this TP rank's slice.

    The output layer returns ``(logits, bias)`` with logits ``[s, b, v_pad/tp]`` covering
    vocabulary ids ``[rank * v_pad/tp, (rank + 1) * v_pad/tp)``. On CPU the padded columns are
    filled in place (:class:`_PaddedLogitsToMinusInf`, the same values and gradients); with CUDA
    it is ``masked_fill`` as before, whose backward needs no device sync.
    """
    from megatron.core import parallel_state as ps

    def hook(module, args, output):
        logits, bias = output
        width = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * width
        if start + width <= vocab_size:
            return output
        first = max(vocab_size - start, 0)  # the first padded column of this slice
        if logits.device.type == "cpu":
            return _PaddedLogitsToMinusInf.apply(logits, first), bias
        padded = torch.arange(start, start + width, device=logits.device) >= vocab_size  # [v/tp]
        return logits.masked_fill(padded, float("-inf")), bias

    output_layer.register_forward_hook(hook)


def build_model(cfg: ModelConfig, tconfig, spec=None) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), on the compute device."""
    from megatron.core import parallel_state as ps

    platform.install_cpu_support()
    vpp = tconfig.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp is not None else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk = build_model_chunk(cfg, tconfig, spec, pre, post, stage)
        chunks.append(chunk.to(platform.default_device()))
    return chunks
