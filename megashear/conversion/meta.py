"""Meta's original LLaMA format (``params.json`` + ``consolidated.NN.pth``) <-> canonical weights.

Model-parallel shards (LLaMA2-13B has 2, 70B has 8) are split as Meta's code splits them:
``tok_embeddings`` on dim 1; ``wq``, ``wk``, ``wv``, ``w1`` (gate), ``w3`` (up) and ``output``
on dim 0; ``wo`` and ``w2`` (down) on dim 1; norms replicated.

Rotary order: Meta's q/k rows pair dimensions ``(2j, 2j+1)`` (interleaved); HF and megatron-core
(``rotary_interleaved=False``) pair ``(j, j + hn/2)``. :func:`meta_to_hf_rows` is the permutation
HF's conversion script applies (per head: ``view(n, hn/2, 2, h).transpose(1, 2)``);
:func:`hf_to_meta_rows` is its inverse.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from megashear.checkpoint.format import read_json_object
from megashear.layout import canonical_shapes
from megashear.model_config import ModelConfig

PARAMS_KEYS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
    "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor",
    "max_seq_len", "max_batch_size",
}  # fmt: skip

SPLIT_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w3": 0,
    "feed_forward.w2": 1,
}
LAYER = {
    "input_norm": "attention_norm",
    "q": "attention.wq",
    "k": "attention.wk",
    "v": "attention.wv",
    "o": "attention.wo",
    "post_attn_norm": "ffn_norm",
    "gate": "feed_forward.w1",
    "up": "feed_forward.w3",
    "down": "feed_forward.w2",
}
GLOBAL = {"embedding": "tok_embeddings", "final_norm": "norm", "lm_head": "output"}


def meta_to_hf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """``[heads*hn, h]`` from Meta's interleaved rotary order to HF's half-split order."""
    rows, h = w.shape
    return w.view(heads, rows // heads // 2, 2, h).transpose(1, 2).reshape(rows, h)


def hf_to_meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`meta_to_hf_rows`."""
    rows, h = w.shape
    return w.view(heads, 2, rows // heads // 2, h).transpose(1, 2).reshape(rows, h)


def ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA's FFN width rule."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_name(canonical: str) -> str:
    if canonical in GLOBAL:
        return GLOBAL[canonical] + ".weight"
    _, i, key = canonical.split(".", 2)
    return f"layers.{i}.{LAYER[key]}.weight"


def _split_dim(meta_name: str) -> int | None:
    base = meta_name.rsplit(".weight", 1)[0]
    base = base.split(".", 2)[2] if base.startswith("layers.") else base
    return SPLIT_DIM.get(base)


class MetaReader:
    """Canonical tensors (HF rotary order) of a Meta checkpoint directory, one at a time.

    The ``consolidated.NN.pth`` shards are memory-mapped; ``reader(key)`` concatenates the
    model-parallel pieces of one tensor and applies the rotary permutation to q and k.
    Construction checks names and merged shapes against ``params.json``.
    """

    def __init__(self, path: str, dtype: torch.dtype | None = None) -> None:
        from megashear.conversion.hf import ConversionError, load_torch_file

        params_path = os.path.join(path, "params.json")
        p = read_json_object(params_path, ConversionError)
        unknown = sorted(set(p) - PARAMS_KEYS)
        if unknown:
            raise ConversionError(
                f"{params_path}: key {unknown[0]!r} is not understood and may change the model"
            )
        files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
        if not files:
            raise ConversionError(f"no consolidated.NN.pth shards in {path}")
        self.shards = [load_torch_file(f, map_location="cpu", mmap=True) for f in files]
        for s in self.shards:
            s.pop("rope.freqs", None)
        names = set(self.shards[0])
        if any(set(s) != names for s in self.shards):
            raise ConversionError("model-parallel shards hold different tensor names")
        # Llama-3.2 1B/3B ship no ``output`` tensor: the LM head is the embedding.
        tied = "output.weight" not in names
        rows = self.shards[0]["tok_embeddings.weight"].shape[0]
        self.cfg = config_from_params(p, params_path, rows, tied)
        shapes = canonical_shapes(self.cfg)
        expected = {_meta_name(k): k for k in shapes}
        unknown = sorted(names - set(expected))
        if unknown:
            raise ConversionError(f"unknown tensor {unknown[0]} in {path}")
        missing = sorted(set(expected) - names)
        if missing:
            raise ConversionError(f"tensor {missing[0]} is missing from {path}")
        for name, key in expected.items():
            shape = list(self.shards[0][name].shape)
            split = _split_dim(name)
            if split is not None:
                shape[split] = sum(s[name].shape[split] for s in self.shards)
            if tuple(shape) != shapes[key]:
                raise ConversionError(
                    f"{name}: shape {tuple(shape)} does not match params.json {shapes[key]}"
                )
        self.source_dtype = self.shards[0]["tok_embeddings.weight"].dtype
        self.dtype = dtype or self.source_dtype

    def __call__(self, key: str) -> torch.Tensor:
        name = _meta_name(key)
        dim = _split_dim(name)
        parts = [s[name] for s in self.shards]
        t = parts[0].clone() if dim is None else torch.cat(parts, dim=dim)
        if key.endswith(".q"):
            t = meta_to_hf_rows(t, self.cfg.num_attention_heads)
        elif key.endswith(".k"):
            t = meta_to_hf_rows(t, self.cfg.num_query_groups)
        return t.to(self.dtype)


def config_from_params(p: dict, where: str, embedding_rows: int, tied: bool) -> ModelConfig:
    """ModelConfig from Meta's ``params.json`` (``p``, read from ``where``), checked value by
    value: sizes are positive integers, ``norm_eps``, ``rope_theta``, ``ffn_dim_multiplier`` and
    ``rope_scaling_factor`` finite numbers above 0, ``use_scaled_rope`` a bool; a bad one is a
    one-line :class:`~megashear.conversion.hf.ConversionError`. ``embedding_rows`` (of the
    ``tok_embeddings`` tensor) is the vocabulary when ``vocab_size`` is -1 or absent; ``tied``:
    the shards hold no ``output`` tensor."""
    from megashear.conversion.hf import ConversionError, checked, positive_float, positive_int

    for key in ("dim", "n_layers", "n_heads"):
        if key not in p:
            raise ConversionError(f"{where}: {key} is missing")
        positive_int(p[key], key, where)
    dim, heads = p["dim"], p["n_heads"]
    groups = positive_int(p.get("n_kv_heads"), "n_kv_heads", where, heads)
    if heads % groups:
        raise ConversionError(f"{where}: n_heads={heads} is not a multiple of n_kv_heads={groups}")
    if dim % heads:  # Meta's head dimension is dim // n_heads
        raise ConversionError(f"{where}: dim={dim} is not a multiple of n_heads={heads}")
    vocab = p.get("vocab_size", -1)
    if vocab is None or vocab == -1:  # Meta's "-1: from the tokenizer"
        vocab = embedding_rows
    multiplier = p.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = positive_float(multiplier, "ffn_dim_multiplier", where)
    scaled = p.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise ConversionError(f"{where}: use_scaled_rope must be true or false, got {scaled!r}")
    rope = {}
    if scaled:
        # llama3 scaling with Meta's reference constants (low 1, high 4, original context 8192)
        factor = positive_float(p.get("rope_scaling_factor"), "rope_scaling_factor", where, 8.0)
        rope = {
            "rope_scaling": "llama3",
            "rope_scaling_factor": factor,
            "rope_low_freq_factor": 1.0,
            "rope_high_freq_factor": 4.0,
            "rope_original_max_position_embeddings": 8192,
        }
    cfg = ModelConfig(
        num_layers=p["n_layers"],
        hidden_size=dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn_size(
            dim, positive_int(p.get("multiple_of"), "multiple_of", where, 256), multiplier
        ),
        vocab_size=positive_int(vocab, "vocab_size", where),
        seq_length=positive_int(p.get("max_seq_len"), "max_seq_len", where, 4096),
        rotary_base=positive_float(p.get("rope_theta"), "rope_theta", where, 10000.0),
        norm_epsilon=positive_float(p.get("norm_eps"), "norm_eps", where, 1e-5),
        tie_word_embeddings=tied,
        **rope,
    )
    checked(cfg, where)
    return cfg


def read_meta(path: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Canonical weights (HF rotary order) and config of a Meta checkpoint directory."""

    reader = MetaReader(path)
    return {k: reader(k) for k in canonical_shapes(reader.cfg)}, reader.cfg


def write_meta(weights: dict[str, torch.Tensor], cfg: ModelConfig, path: str, shards: int) -> None:
    """Write canonical weights in Meta's format, split into ``shards`` model-parallel files."""
    os.makedirs(path, exist_ok=True)
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for key, t in weights.items():
        if key.endswith(".q"):
            t = hf_to_meta_rows(t, cfg.num_attention_heads)
        elif key.endswith(".k"):
            t = hf_to_meta_rows(t, cfg.num_query_groups)
        name = _meta_name(key)
        dim = _split_dim(name)
        pieces = [t] * shards if dim is None else torch.chunk(t, shards, dim=dim)
        for i, piece in enumerate(pieces):
            parts[i][name] = piece.clone()
    for i, part in enumerate(parts):
        torch.save(part, os.path.join(path, f"consolidated.{i:02d}.pth"))
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_query_groups,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 1,
        "norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        # with multiple_of 1, int(multiplier * base) must give the FFN width exactly
        "ffn_dim_multiplier": (cfg.ffn_hidden_size + 0.5) / int(2 * (4 * cfg.hidden_size) / 3),
    }
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
