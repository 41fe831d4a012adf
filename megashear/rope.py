"""Rotary inverse frequencies ``[hn/2]``, plain or with Llama-3 scaling (pure torch, float64).

Plain RoPE: ``f_i = base^(-2i/hn)`` for ``i < hn/2``. Llama-3 scaling (``rope_type: llama3``,
transformers' ``_compute_llama3_parameters``) rescales each ``f`` by its wavelength
``λ = 2π/f``, with ``orig`` the original context length and ``low``/``high`` the frequency
factors:

- ``λ > orig/low``: ``f / factor`` (long wavelengths are interpolated);
- ``λ < orig/high``: ``f`` unchanged;
- otherwise ``(1 - s)·f/factor + s·f`` with ``s = (orig/λ - low)/(high - low)``.

megatron-core's ``RotaryEmbedding`` hard-codes ``low = 1``, ``high = 4`` and ``orig = 8192``;
megashear computes the frequencies here from the model's own values and installs them into the
model (:func:`megashear.models.llama.build_model_chunk`), so every released config is exact.
"""

from __future__ import annotations

import math

import torch

from megashear.model_config import ModelConfig


def rotary_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies ``[hn/2]`` (float64) of ``cfg``'s rotary embedding."""
    hn = cfg.head_dim
    freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, hn, 2, dtype=torch.float64) / hn))
    if cfg.rope_scaling == "none":
        return freq
    factor = cfg.rope_scaling_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    orig = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / freq
    smooth = (orig / wavelen - low) / (high - low)
    scaled = (1 - smooth) * freq / factor + smooth * freq
    out = torch.where(wavelen > orig / low, freq / factor, scaled)
    return torch.where(wavelen < orig / high, freq, out)
