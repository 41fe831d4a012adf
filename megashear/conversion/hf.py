"""Hugging Face LLaMA directories <-> canonical weights (layout in :mod:`megashear.layout`).

Reading is strict: ``config.json`` must describe a LLaMA this code reproduces exactly (every key
understood and every value checked: tied or untied embeddings, the RoPE base from
``rope_theta`` or transformers 5's ``rope_parameters``, default or ``llama3`` rope scaling; no
biases), every tensor must be present with the shape the config implies, and no unknown tensor
may appear (a tied model may still carry a redundant ``lm_head.weight``, which is not read). Weights come from safetensors or
``.bin``, single or sharded with an index. Writing produces what ``transformers`` loads as it
is: ``config.json`` (the checkpoint's own sizes, ``head_dim``, the tie and the rope settings),
safetensors shards with an index (one embedding tensor when tied, the vocabulary unpadded),
``generation_config.json`` and, when given, the tokenizer (sentencepiece or ``tokenizer.json``).
Output goes to a temporary directory renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import torch

from megashear.checkpoint.format import read_json_object
from megashear.checkpoint.publish import publish_dir
from megashear.conversion.safetensors_io import TensorInfo, read_header, read_tensor, write_file
from megashear.layout import canonical_order, canonical_shapes
from megashear.model_config import ModelConfig, check_model_values

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


# config.json keys that change the model and that megashear reproduces exactly.
MODEL_KEYS = {
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "hidden_act", "attention_bias",
    "mlp_bias", "max_position_embeddings", "pretraining_tp",
}  # fmt: skip
# Keys that do not change the weights' meaning: token ids, dtype, bookkeeping, training-only
# dropout, generation and output switches of transformers' PretrainedConfig.
IGNORED_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "unk_token_id", "_model_name_or_path", "initializer_range", "use_cache", "attention_dropout",
    "_name_or_path", "id2label", "label2id", "problem_type", "return_dict", "output_attentions",
    "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder", "torchscript",
    "tie_encoder_decoder", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    "add_cross_attention", "is_decoder", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "_attn_implementation_autoset", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
}  # fmt: skip
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def _rope_settings(c: dict, where: str) -> dict:
    """ModelConfig RoPE fields from either ``rope_parameters`` (transformers 5) or the older
    top-level ``rope_theta`` + ``rope_scaling``; both spellings must agree when both are given."""
    params = dict(c.get("rope_parameters") or {})
    legacy = dict(c.get("rope_scaling") or {})
    if "rope_theta" in c:
        legacy.setdefault("rope_theta", c["rope_theta"])
    if "type" in legacy and "rope_type" not in legacy:
        legacy["rope_type"] = legacy.pop("type")
    for key in set(params) & set(legacy):
        if params[key] != legacy[key]:
            raise ConversionError(
                f"{where}: rope_parameters.{key}={params[key]!r} contradicts the top-level "
                f"rope settings ({legacy[key]!r})"
            )
    rope = {**legacy, **params}
    rope_type = rope.pop("rope_type", "default") or "default"
    # transformers' LlamaConfig default when neither spelling gives a base
    out = {"rotary_base": positive_float(rope.pop("rope_theta", None), "rope_theta", where, 1e4)}
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
        if missing:
            raise ConversionError(f"{where}: rope_scaling llama3 lacks {missing}")
        out.update(
            rope_scaling="llama3",
            rope_scaling_factor=positive_float(rope.pop("factor"), "rope factor", where),
            rope_low_freq_factor=positive_float(
                rope.pop("low_freq_factor"), "rope low_freq_factor", where
            ),
            rope_high_freq_factor=positive_float(
                rope.pop("high_freq_factor"), "rope high_freq_factor", where
            ),
            rope_original_max_position_embeddings=positive_int(
                rope.pop("original_max_position_embeddings"),
                "rope original_max_position_embeddings",
                where,
            ),
        )
    elif rope_type != "default":
        raise ConversionError(
            f"{where}: rope type {rope_type!r} is not supported (supported: default, llama3)"
        )
    if rope:
        raise ConversionError(f"{where}: rope setting {sorted(rope)[0]!r} is not understood")
    return out


def config_from_hf(path: str) -> ModelConfig:
    """ModelConfig from an HF ``config.json``.

    Strict: every key must be one megashear reproduces (``MODEL_KEYS``) or one that does not
    change the model (``IGNORED_KEYS``); anything else, and any unsupported value (biases, an
    activation other than silu, a rope type other than default/llama3), is a one-line
    :class:`ConversionError`, so that no config converts silently into a different model.
    Values are checked as run settings are: sizes are integers of at least 1, ``rms_norm_eps``,
    the RoPE base and the llama3 factors finite numbers above 0, ``tie_word_embeddings`` true
    or false; null takes transformers' default, nothing else is converted.
    """
    cfg_path = os.path.join(path, "config.json")
    c = read_json_object(cfg_path, ConversionError)
    if c.get("model_type") != "llama":
        raise ConversionError(f"{cfg_path}: model_type {c.get('model_type')!r} is not 'llama'")
    unknown = sorted(set(c) - MODEL_KEYS - IGNORED_KEYS)
    if unknown:
        raise ConversionError(
            f"{cfg_path}: key {unknown[0]!r} is not understood and may change the model "
            f"({len(unknown)} unknown: {unknown[:5]})"
        )
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConversionError(
            f"{cfg_path}: attention/MLP biases are not supported (LLaMA has none)"
        )
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(
            f"{cfg_path}: hidden_act {c['hidden_act']!r} is not supported (SwiGLU/silu)"
        )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):  # fmt: skip
        positive_int(c.get(key), key, cfg_path)
    # transformers slices the projections into pretraining_tp parts: the same maths at any value
    positive_int(c.get("pretraining_tp"), "pretraining_tp", cfg_path, 1)
    heads = c["num_attention_heads"]
    groups = positive_int(c.get("num_key_value_heads"), "num_key_value_heads", cfg_path, heads)
    if heads % groups:
        raise ConversionError(
            f"{cfg_path}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={groups}"
        )
    if c.get("head_dim") is None and c["hidden_size"] % heads:
        # transformers would floor hidden_size / heads: a model of other shapes than it states
        raise ConversionError(
            f"{cfg_path}: hidden_size={c['hidden_size']} is not a multiple of "
            f"num_attention_heads={heads} (and head_dim is not given)"
        )
    head_dim = positive_int(c.get("head_dim"), "head_dim", cfg_path, c["hidden_size"] // heads)
    tied = c.get("tie_word_embeddings", False)  # LlamaConfig's default
    if not isinstance(tied, bool):
        raise ConversionError(
            f"{cfg_path}: tie_word_embeddings must be true or false, got {tied!r}"
        )
    cfg = ModelConfig(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        kv_channels=None if head_dim * heads == c["hidden_size"] else head_dim,
        seq_length=positive_int(
            c.get("max_position_embeddings"), "max_position_embeddings", cfg_path, 4096
        ),
        # LlamaConfig's default
        norm_epsilon=positive_float(c.get("rms_norm_eps"), "rms_norm_eps", cfg_path, 1e-6),
        tie_word_embeddings=tied,
        **_rope_settings(c, cfg_path),
    )
    checked(cfg, cfg_path)
    return cfg


def positive_int(value, key: str, where: str, default: int | None = None) -> int:
    """``value`` (a config's ``key``) as a size: an integer of at least 1 (a JSON ``1.0`` or
    ``true`` is not one). An absent or null value is ``default`` when one is given."""
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConversionError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def positive_float(value, key: str, where: str, default: float | None = None) -> float:
    """``value`` (a config's ``key``) as a finite number above 0 (a string such as ``"1e-5"``
    is not one). An absent or null value is ``default`` when one is given."""
    if value is None and default is not None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConversionError(f"{where}: {key} must be a finite number above 0, got {value!r}")
    return float(value)


def checked(cfg: ModelConfig, where: str) -> None:
    """The last check of a model read from ``where``: every value one a model can have
    (:func:`megashear.model_config.check_model_values`), as a :class:`ConversionError`."""
    try:
        check_model_values(cfg)
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def load_torch_file(path: str, **kwargs) -> dict:
    """``torch.load(path, weights_only=True, **kwargs)``; an unreadable file (truncated, not a
    PyTorch file, not a state dict) is a one-line :class:`ConversionError` naming it."""
    try:
        out = torch.load(path, weights_only=True, **kwargs)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"{path} is not a readable PyTorch state dict ({first})") from None
    if not isinstance(out, dict):
        raise ConversionError(f"{path} does not hold a state dict (a {type(out).__name__})")
    return out


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> file holding it."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    mapping = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(
                    f"{index} is not an index with a weight_map ({exc})"
                ) from None
            for shard in sorted(set(mapping.values())):
                if not os.path.isfile(os.path.join(path, shard)):
                    raise ConversionError(f"shard {shard} named in {index_name} is missing")
            return {k: os.path.join(path, v) for k, v in mapping.items()}
        file = os.path.join(path, single)
        if os.path.isfile(file):
            if single.endswith(".safetensors"):
                return {k: file for k in read_header(file)}
            return {k: file for k in load_torch_file(file, map_location="meta")}
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
        ignored = IGNORED + ((HF_GLOBAL["lm_head"],) if self.cfg.tie_word_embeddings else ())
        unknown = sorted(k for k in files if k not in wanted and not k.endswith(ignored))
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
                    self._bins[file] = load_torch_file(file, mmap=True)
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


def hf_rope_parameters(cfg: ModelConfig) -> dict:
    """transformers 5's ``rope_parameters`` of ``cfg``."""
    if cfg.rope_scaling == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": cfg.rotary_base,
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        }
    return {"rope_type": "default", "rope_theta": cfg.rotary_base}


def hf_config_dict(
    cfg: ModelConfig, dtype: torch.dtype, bos_token_id: int | None = 1, eos_token_id: int | None = 2
) -> dict:
    """``config.json`` of ``cfg``: transformers 5's ``rope_parameters`` and, for older readers,
    the same base and scaling as top-level ``rope_theta`` / ``rope_scaling``."""
    rope = hf_rope_parameters(cfg)
    legacy_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
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
        "rope_parameters": rope,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": legacy_scaling if cfg.rope_scaling != "none" else None,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


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
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write an HF LLaMA directory, pulling one canonical tensor at a time from ``get``.

    The safetensors shards are laid out from the shapes first and then filled tensor by
    tensor, so memory holds one tensor. ``extra_files`` (file name -> text, e.g. the model
    card ``README.md``) are written beside them. Everything goes to ``PATH.tmp-hf``, renamed
    at the end.
    """
    if os.path.exists(path) and not overwrite:
        raise ConversionError(f"output {path} exists (pass --overwrite to replace it)")
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
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

    def fill(tmp: str) -> None:
        os.makedirs(tmp)
        _fill_hf_dir(tmp, get, cfg, dtype, shards, tokenizer, progress)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)

    publish_dir(path, fill, suffix=".tmp-hf")


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
    special = {"bos_token_id": None, "eos_token_id": None}
    if tokenizer is not None:
        from megashear.data.tokenizer import export_tokenizer

        info = export_tokenizer(tokenizer, tmp, cfg.seq_length)
        special = {k: info.get(k) for k in special}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype, **special), f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({**special, "do_sample": False}, f, indent=2)


def check_tokenizer(tokenizer: str, cfg: ModelConfig) -> None:
    """Raise :class:`ConversionError` unless ``tokenizer`` loads and covers exactly ``cfg``'s
    vocabulary (a sentencepiece ``.model``, a ``tokenizer.json`` or a directory holding one)."""
    from megashear.data.tokenizer import load_tokenizer

    if not os.path.exists(tokenizer):
        raise ConversionError(f"tokenizer {tokenizer} does not exist")
    try:
        vocab = load_tokenizer(tokenizer).vocab_size
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if vocab != cfg.vocab_size:
        raise ConversionError(
            f"tokenizer {tokenizer} has {vocab} tokens, the model's vocab_size is "
            f"{cfg.vocab_size} (tokenizer/model mismatch)"
        )
