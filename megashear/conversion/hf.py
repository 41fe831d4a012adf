"""Hugging Face LLaMA directories <-> canonical weights (see :mod:`.megatron_layout`).

Reading is strict: ``config.json`` must describe a LLaMA this code reproduces exactly (no tied
embeddings, no biases, no rope scaling), every tensor must be present with the shape the config
implies, and no unknown tensor may appear. Weights come from safetensors or ``.bin``, single or
sharded with an index. Writing produces what ``transformers`` loads as it is: ``config.json``
(the checkpoint's own sizes, ``head_dim`` included), safetensors shards with an index,
``generation_config.json`` and, when given, the sentencepiece tokenizer. Output goes to a
temporary directory renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch

from megashear.conversion.safetensors_io import TensorInfo, read_header, read_tensor, write_file
from megashear.model_config import ModelConfig
from megashear.pruning.reference_forward import canonical_shapes

HF_LAYER = {
    "input_norm": "model.layers.{}.input_layernorm.weight",
    "q": "model.layers.{}.self_attn.q_proj.weight",
    "k": "model.layers.{}.self_attn.k_proj.weight",
    "v": "model.layers.{}.self_attn.v_proj.weight",
    "o": "model.layers.{}.self_attn.o_proj.weight",
    "post_attn_norm": "model.layers.{}.post_attention_layernorm.weight",
    "gate": "model.layers.{}.mlp.gate_proj.weight",
    "up": "model.layers.{}.mlp.up_proj.weight",
    "down": "model.layers.{}.mlp.down_proj.weight",
}
HF_GLOBAL = {
    "embedding": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
IGNORED = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """Input that cannot be converted faithfully (one-line message)."""


def hf_name(canonical: str) -> str:
    if canonical in HF_GLOBAL:
        return HF_GLOBAL[canonical]
    _, i, key = canonical.split(".", 2)
    return HF_LAYER[key].format(i)


def config_from_hf(path: str) -> ModelConfig:
    """ModelConfig from an HF ``config.json``; unsupported features are errors."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{cfg_path} does not exist")
    with open(cfg_path) as f:
        c = json.load(f)
    if c.get("model_type") != "llama":
        raise ConversionError(f"model_type {c.get('model_type')!r} is not 'llama'")
    if c.get("tie_word_embeddings", False):
        raise ConversionError("tied input/output embeddings are not supported (LLaMA unties them)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConversionError("attention/MLP biases are not supported (LLaMA has none)")
    scaling = c.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConversionError(
            f"rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} is not supported"
        )
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {c['hidden_act']!r} is not supported (SwiGLU/silu)")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return ModelConfig(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads,
        ffn_hidden_size=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        kv_channels=None if head_dim * heads == c["hidden_size"] else head_dim,
        seq_length=c.get("max_position_embeddings", 4096),
        rotary_base=float(c.get("rope_theta", 10000.0)),
        norm_epsilon=float(c.get("rms_norm_eps", 1e-5)),
    )


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> file holding it."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                mapping = json.load(f)["weight_map"]
            for shard in sorted(set(mapping.values())):
                if not os.path.isfile(os.path.join(path, shard)):
                    raise ConversionError(f"shard {shard} named in {index_name} is missing")
            return {k: os.path.join(path, v) for k, v in mapping.items()}
        file = os.path.join(path, single)
        if os.path.isfile(file):
            if single.endswith(".safetensors"):
                return {k: file for k in read_header(file)}
            return {k: file for k in torch.load(file, map_location="meta", weights_only=True)}
    raise ConversionError(f"no model.safetensors / pytorch_model.bin (or index) in {path}")


class HFReader:
    """Canonical tensors of an HF LLaMA directory, read one at a time.

    Construction checks everything that needs no tensor data: ``config.json``, the presence of
    every shard, unknown and missing tensors, and every shape against the config. ``reader(key)``
    then reads one canonical tensor (``layers.3.q`` ...) from its file. safetensors files are
    read with plain file reads (:mod:`.safetensors_io`); ``.bin`` files are memory-mapped.
    """

    def __init__(self, path: str, dtype: torch.dtype | None = None) -> None:
        self.path = path
        self.cfg = config_from_hf(path)
        files = _weight_files(path)
        shapes = canonical_shapes(self.cfg)
        wanted = {hf_name(k): k for k in shapes}
        unknown = sorted(k for k in files if k not in wanted and not k.endswith(IGNORED))
        if unknown:
            raise ConversionError(f"unknown tensor {unknown[0]} in {path} ({len(unknown)} unknown)")
        missing = sorted(set(wanted) - set(files))
        if missing:
            raise ConversionError(
                f"tensor {missing[0]} is missing from {path} ({len(missing)} missing)"
            )
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        self._infos: dict[str, TensorInfo] = {}
        headers: dict[str, dict[str, TensorInfo]] = {}
        dtypes = set()
        for name, key in wanted.items():
            file = files[name]
            if file.endswith(".safetensors"):
                if file not in headers:
                    headers[file] = read_header(file)
                if name not in headers[file]:
                    raise ConversionError(f"tensor {name} is not in {os.path.basename(file)}")
                info = headers[file][name]
                self._infos[key] = info
                shape, t_dtype = info.shape, info.dtype
            else:
                if file not in self._bins:
                    self._bins[file] = torch.load(file, mmap=True, weights_only=True)
                t = self._bins[file][name]
                shape, t_dtype = tuple(t.shape), t.dtype
            if tuple(shape) != shapes[key]:
                raise ConversionError(
                    f"{name}: shape {tuple(shape)} does not match config.json {shapes[key]}"
                )
            dtypes.add(t_dtype)
        self._files = {key: files[name] for name, key in wanted.items()}
        self.source_dtype = torch.float32 if len(dtypes) > 1 else dtypes.pop()
        self.dtype = dtype or self.source_dtype

    def __call__(self, key: str) -> torch.Tensor:
        if key in self._infos:
            t = read_tensor(self._infos[key])
        else:
            t = self._bins[self._files[key]][hf_name(key)].clone()
        return t.to(self.dtype)


def read_hf(
    path: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Canonical weights and config of an HF LLaMA directory (strict keys and shapes)."""
    reader = HFReader(path, dtype)
    return {k: reader(k) for k in canonical_shapes(reader.cfg)}, reader.cfg


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_length,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": None,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def canonical_order(cfg: ModelConfig) -> list[str]:
    """Canonical keys layer by layer, the order HF files are written in."""
    per_layer = ["input_norm", "q", "k", "v", "o", "post_attn_norm", "gate", "up", "down"]
    layers = [f"layers.{i}.{k}" for i in range(cfg.num_layers) for k in per_layer]
    return ["embedding", *layers, "final_norm", "lm_head"]


def write_hf(
    weights: dict[str, torch.Tensor],
    cfg: ModelConfig,
    path: str,
    tokenizer: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    dtype: torch.dtype | None = None,
) -> None:
    """Write in-memory canonical weights as an HF LLaMA directory (see :func:`write_hf_stream`)."""
    if set(weights) != set(canonical_shapes(cfg)):
        raise ConversionError("weights do not match the config's tensor set")
    out_dtype = dtype or next(iter(weights.values())).dtype
    write_hf_stream(
        weights.__getitem__, cfg, path, out_dtype, tokenizer, overwrite, max_shard_bytes
    )


def write_hf_stream(
    get: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    path: str,
    dtype: torch.dtype,
    tokenizer: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = False,
) -> None:
    """Write an HF LLaMA directory, pulling one canonical tensor at a time from ``get``.

    The safetensors shards are laid out from the shapes first and then filled tensor by
    tensor, so memory holds one tensor. Everything goes to ``PATH.tmp-hf``, renamed at the end.
    """
    if os.path.exists(path) and not overwrite:
        raise ConversionError(f"output {path} exists (pass --overwrite to replace it)")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise ConversionError(f"tokenizer {tokenizer} does not exist")
    shapes = canonical_shapes(cfg)
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for key in canonical_order(cfg):
        nbytes = torch.Size(shapes[key]).numel() * item
        if size and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    tmp = path.rstrip("/") + ".tmp-hf"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _fill_hf_dir(tmp, get, cfg, dtype, shards, tokenizer, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _fill_hf_dir(
    tmp: str,
    get: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    dtype: torch.dtype,
    shards: list[list[str]],
    tokenizer: str | None,
    progress: bool,
) -> None:
    from tqdm import tqdm

    shapes = canonical_shapes(cfg)
    item = torch.empty((), dtype=dtype).element_size()
    by_hf_name = {hf_name(k): k for k in shapes}
    weight_map = {}
    total = 0
    total_bytes = sum(torch.Size(s).numel() for s in shapes.values()) * item
    with tqdm(
        total=total_bytes, desc="write hf", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for i, keys in enumerate(shards):
            name = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            total += write_file(
                os.path.join(tmp, name),
                [(hf_name(k), dtype, shapes[k]) for k in keys],
                lambda n: get(by_hf_name[n]).to(dtype),
                on_tensor=bar.update,
            )
            weight_map.update({hf_name(k): name for k in keys})
    if len(shards) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, f, indent=2)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": False,
                    "model_max_length": cfg.seq_length,
                },
                f,
                indent=2,
            )
        with open(os.path.join(tmp, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
