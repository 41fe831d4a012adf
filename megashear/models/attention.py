"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in a
pre-allocated buffer and runs its own masked softmax. This leaf keeps its constructor (so it
drops into the local spec in place of ``core_attention``) and replaces the forward with torch's
fused SDPA kernel (flash / memory-efficient on GPU, a fused kernel on CPU). GQA is handled by
SDPA's ``enable_gqa`` rather than by materialising repeated key/value heads.

Layouts (megatron notation): query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``;
output ``[sq, b, np * hn]`` where ``np``/``ng`` are the heads/groups on this TP rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    """``DotProductAttention`` with torch SDPA as its kernel; falls back for unsupported cases."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        dropout = self.attention_dropout.p if self.training else 0.0
        if (
            packed_seq_params is not None
            or attention_bias is not None
            or self.softmax_offset is not None
        ):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, np_, hn = query.shape
        # [sq, b, np, hn] -> [b, np, sq, hn]
        q = query.permute(1, 2, 0, 3)
        # [sk, b, ng, hn] -> [b, ng, sk, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        # megatron masks are True where attention is NOT allowed; SDPA's bool mask is the opposite.
        sdpa_mask = None if attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=sdpa_mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=k.size(1) != np_,
        )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
