"""megatron-core ``torch_dist`` checkpoints written and read one tensor at a time, no model built.

Sharded keys of megatron-core 0.16.1's ``GPTModel`` (local spec), as its own save writes them
(``tests/test_conversion_stream.py`` checks this table against a real save)::

    embedding.word_embeddings.weight                              [v_pad, h]   TP: dim 0
    output_layer.weight                                           [v_pad, h]   TP: dim 0
    decoder.final_layernorm.weight                                [h]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight    [L, h]       input_layernorm
    decoder.layers.self_attention.linear_qkv.weight               [L, (a+2g)*hn, h]  TP: dim 1
    decoder.layers.self_attention.linear_proj.weight              [L, h, a*hn] TP: dim 2
    decoder.layers.mlp.linear_fc1.layer_norm_weight               [L, h]       pre_mlp_layernorm
    decoder.layers.mlp.linear_fc1.weight                          [L, 2f, h]   gate, up: each TP dim 1
    decoder.layers.mlp.linear_fc2.weight                          [L, h, f]    TP: dim 2
    decoder.layers.<linear>._extra_state/shard_{i}_{L}            bytes, ``[None]`` (4 linears)

``v_pad`` is the padded vocabulary; a tied model has no ``output_layer.weight`` (megatron-core
saves the last stage's copy under the embedding's key as a replica, so it is stored once).
Layer tensors carry the layer axis in front; each layer (and each TP slice of it) is one chunk,
as megatron-core's ranks save them. The writer is a PyTorch DCP ``SavePlanner`` that lists those
chunks up front and produces each one only when the file writer asks for it, so memory holds one
layer tensor at a time; the reader asks megatron-core's ``dist_checkpointing.load`` for one
layer at a time. Checkpoints keep megashear's layout (``iter_0000000/`` with ``megashear.json``,
the tracker written last) and are written under a temporary name that is renamed at the end.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megashear.checkpoint.dist_files import dist_load, tensor_metadata, write_backend_files
from megashear.checkpoint.format import (
    CheckpointError,
    iteration_dir,
    model_meta,
    read_meta,
    resolve,
    write_meta,
    write_tracker,
)
from megashear.checkpoint.publish import check_new_output, publish_dir
from megashear.conversion.megatron_layout import FC1, GLOBAL_KEYS, LAYER_KEYS, QKV
from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)

EXTRA_STATE_LINEARS = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


@dataclass(frozen=True)
class ShardedKey:
    """One tensor of the checkpoint: its sharded key, full-state-dict name and TP split."""

    key: str
    name: str  # full megatron state dict name; ``{}`` is the layer number for layer tensors
    tp_dim: int | None  # dim of the (layer-less) tensor split over TP ranks
    tp_groups: int = 1  # fc1 is [gate; up], each half split over TP on its own

    @property
    def per_layer(self) -> bool:
        return "{}" in self.name


SHARDED_KEYS = (
    ShardedKey("embedding.word_embeddings.weight", GLOBAL_KEYS["embedding"], 0),
    ShardedKey("output_layer.weight", GLOBAL_KEYS["lm_head"], 0),
    ShardedKey("decoder.final_layernorm.weight", GLOBAL_KEYS["final_norm"], None),
    ShardedKey(
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        LAYER_KEYS["input_norm"],
        None,
    ),
    ShardedKey("decoder.layers.self_attention.linear_qkv.weight", QKV, 0),
    ShardedKey("decoder.layers.self_attention.linear_proj.weight", LAYER_KEYS["o"], 1),
    ShardedKey(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight", LAYER_KEYS["post_attn_norm"], None
    ),
    ShardedKey("decoder.layers.mlp.linear_fc1.weight", FC1, 0, tp_groups=2),
    ShardedKey("decoder.layers.mlp.linear_fc2.weight", LAYER_KEYS["down"], 1),
)


def sharded_keys(cfg: ModelConfig) -> tuple[ShardedKey, ...]:
    """The sharded keys a checkpoint of ``cfg`` holds (no output layer when tied)."""
    if not cfg.tie_word_embeddings:
        return SHARDED_KEYS
    return tuple(sk for sk in SHARDED_KEYS if sk.name != GLOBAL_KEYS["lm_head"])


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full megatron state dict name -> shape, for every weight of ``cfg``."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size
    hn, a, g = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    per_key = {
        GLOBAL_KEYS["embedding"]: (v, h),
        GLOBAL_KEYS["lm_head"]: (v, h),
        GLOBAL_KEYS["final_norm"]: (h,),
        LAYER_KEYS["input_norm"]: (h,),
        QKV: ((a + 2 * g) * hn, h),
        LAYER_KEYS["o"]: (h, a * hn),
        LAYER_KEYS["post_attn_norm"]: (h,),
        FC1: (2 * f, h),
        LAYER_KEYS["down"]: (h, f),
    }
    out = {}
    for sk in sharded_keys(cfg):
        layers = range(cfg.num_layers) if sk.per_layer else [None]
        for i in layers:
            out[sk.name.format(i)] = per_key[sk.name]
    return out


def _tp_chunks(shape: tuple[int, ...], sk: ShardedKey, tp: int) -> list[tuple[list, list]]:
    """(offsets, sizes) of the TP slices of one (layer-less) tensor."""
    if sk.tp_dim is None or tp == 1 and sk.tp_groups == 1:
        return [([0] * len(shape), list(shape))]
    parts = tp * sk.tp_groups
    if shape[sk.tp_dim] % parts:
        raise ValueError(f"{sk.key}: dim {shape[sk.tp_dim]} does not split over TP {tp}")
    step = shape[sk.tp_dim] // parts
    out = []
    for j in range(parts):
        offsets, sizes = [0] * len(shape), list(shape)
        offsets[sk.tp_dim], sizes[sk.tp_dim] = j * step, step
        out.append((offsets, sizes))
    return out


def _write_items(cfg: ModelConfig, dtype: torch.dtype, tp: int) -> list:
    """Every DCP write item of the checkpoint, layer-major so that a layer is produced once."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    shapes = full_shapes(cfg)
    L = cfg.num_layers

    def tensor_items(sk: ShardedKey, layer: int | None) -> list:
        shape = shapes[sk.name.format(layer)]
        lead = [] if layer is None else [layer]
        lead_size = [] if layer is None else [1]
        size = torch.Size(([L] if layer is not None else []) + list(shape))
        items = []
        for offsets, sizes in _tp_chunks(shape, sk, tp):
            offs = torch.Size(lead + offsets)
            items.append(
                WriteItem(
                    index=MetadataIndex(sk.key, offs),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(
                            offsets=offs, sizes=torch.Size(lead_size + sizes)
                        ),
                        properties=TensorProperties(dtype=dtype),
                        size=size,
                    ),
                )
            )
        return items

    items = []
    keys = sharded_keys(cfg)
    for i in range(L):
        for sk in keys:
            if sk.per_layer:
                items += tensor_items(sk, i)
        for linear in EXTRA_STATE_LINEARS:
            fqn = f"decoder.layers.{linear}._extra_state/shard_{i}_{L}"
            items.append(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
    for sk in keys:
        if not sk.per_layer:
            items += tensor_items(sk, None)
    return items


def _lazy_planner(items: list, produce: Callable):
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

    class LazySavePlanner(SavePlanner):
        """Plans fixed chunks; a chunk's data exists only while the file writer writes it."""

        def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
            pass

        def create_local_plan(self) -> SavePlan:
            return SavePlan(items)

        def create_global_plan(self, all_plans):
            return create_default_global_save_plan(all_plans, rewrite_index_hints=False)

        def finish_plan(self, new_plan):
            return new_plan

        def resolve_data(self, write_item):
            return produce(write_item)

    return LazySavePlanner()


def _first_failure(exc: BaseException) -> BaseException | None:
    """The error a DCP ``CheckpointException`` wraps (e.g. a bad source tensor), if any."""
    for failure in (getattr(exc, "failures", None) or {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, BaseException):
            return cause
    return None


def _extra_state_bytes() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save([None], buf)  # megatron-core's local linears have no extra state
    return buf


def write_checkpoint(
    save_dir: str,
    cfg: ModelConfig,
    get: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
    extra_meta: dict | None = None,
    progress: bool = True,
) -> None:
    """Write a model-only megashear checkpoint, pulling each full tensor from ``get``.

    Args:
        get: full megatron state dict name -> tensor of :func:`full_shapes`; called about once
            per name (the last two tensors are kept for the TP slices of the same tensor).
        dtype: the stored dtype; tensors are cast to it.
        tp, pp: the layout the chunks are cut for (any layout loads the checkpoint).

    Raises:
        CheckpointError: the output exists without ``overwrite``.
        ValueError: ``get`` returns a wrong shape.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from tqdm import tqdm

    check_new_output(save_dir, overwrite)
    shapes = full_shapes(cfg)
    key_of = {sk.key: sk for sk in SHARDED_KEYS}
    items = _write_items(cfg, dtype, tp)
    cache: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(items), desc="write megatron", unit="chunk", disable=not progress)

    def full(name: str) -> torch.Tensor:
        if name not in cache:
            t = get(name)
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {shapes[name]}")
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[name] = t.to(dtype)
        return cache[name]

    def produce(item):
        bar.update()
        if item.type.name == "BYTE_IO":
            return _extra_state_bytes()
        sk = key_of[item.index.fqn]
        chunk = item.tensor_data.chunk
        offsets, sizes = list(chunk.offsets), list(chunk.sizes)
        layer = offsets.pop(0) if sk.per_layer else None
        if sk.per_layer:
            sizes.pop(0)
        t = full(sk.name.format(layer))
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            t = t.narrow(dim, o, s)
        return t.unsqueeze(0).contiguous() if sk.per_layer else t.contiguous()

    def fill(tmp_root: str) -> None:
        ckpt = iteration_dir(tmp_root, 0)
        os.makedirs(ckpt)
        try:
            dcp_save(
                {},
                storage_writer=FileSystemWriter(ckpt, thread_count=1, sync_files=False),
                planner=_lazy_planner(items, produce),
                no_dist=True,
            )
        except BaseException as exc:
            cause = _first_failure(exc)
            if cause is not None:
                raise cause from None
            raise
        finally:
            bar.close()
        _finish_checkpoint(tmp_root, ckpt, cfg, dtype, tp, pp, extra_meta)

    publish_dir(save_dir, fill)
    logger.info("wrote %s (%d chunks)", save_dir, len(items))


def _finish_checkpoint(
    tmp_root: str,
    ckpt: str,
    cfg: ModelConfig,
    dtype: torch.dtype,
    tp: int,
    pp: int,
    extra_meta: dict | None,
) -> None:
    """The files besides the tensors: common state, backend metadata, ``megashear.json`` and
    the tracker (written last)."""
    write_backend_files(ckpt)
    extra = {"dtype": str(dtype).replace("torch.", ""), **(extra_meta or {})}
    write_meta(
        ckpt, model_meta(cfg, {"tp": tp, "pp": pp, "dp": 1, "vpp": None}, 0, ["model"], **extra)
    )
    write_tracker(tmp_root, 0)


class CheckpointReader:
    """Full megatron tensors of a megashear checkpoint, one layer in memory at a time.

    ``reader(name)`` returns the full (TP1) tensor of a full-state-dict name; the first name of
    a layer loads that whole layer (every sharded key) with one ``dist_checkpointing.load``.
    """

    def __init__(self, path: str, dtype: torch.dtype | None = None) -> None:
        self.dir = resolve(path)
        meta = read_meta(self.dir)
        if "pruning" in meta:
            raise CheckpointError(
                f"{self.dir} is a pruning checkpoint (masked model): run `megashear finalize` "
                "on it first"
            )
        self.meta = meta
        self.cfg = ModelConfig.from_dict(meta["model"])
        stored = tensor_metadata(self.dir)  # damage is refused before any output is written
        self.keys = sharded_keys(self.cfg)
        missing = [sk.key for sk in self.keys if sk.key not in stored]
        if missing:
            raise CheckpointError(f"{self.dir} holds no tensor {missing[0]}")
        self.stored_dtype = stored[SHARDED_KEYS[0].key].dtype
        self.dtype = dtype or self.stored_dtype
        self.shapes = full_shapes(self.cfg)
        self._layer: int | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def _load(self, layer: int | None) -> None:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request = {}
        for sk in self.keys:
            if sk.per_layer != (layer is not None):
                continue
            name = sk.name.format(layer)
            if layer is None:
                data = torch.empty(self.shapes[name], dtype=self.stored_dtype)
                request[name] = ShardedTensor.from_rank_offsets(sk.key, data, replica_id=0)
            else:
                # the layer's slice [1, ...] of the stored [L, ...] tensor (no prepended axis:
                # megatron-core then reads an arbitrary chunk in a single process)
                data = torch.empty((1, *self.shapes[name]), dtype=self.stored_dtype)
                request[name] = ShardedTensor.from_rank_offsets(
                    sk.key, data, (0, layer, self.cfg.num_layers), replica_id=0
                )
        # one layer of a whole-model checkpoint: the access check would want every layer
        loaded = dist_load(request, self.dir, validate_access_integrity=False)
        self._layer = layer
        self._tensors = {
            # a training checkpoint also returns its common state (iteration, scheduler, ...)
            k: (loaded[k] if layer is None else loaded[k][0]).to(self.dtype)
            for k in request
        }

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            parts = name.split(".")
            layer = int(parts[2]) if name.startswith("decoder.layers.") else None
            if name not in self.shapes:
                raise KeyError(f"no tensor {name} in a model of this shape")
            self._load(layer)
        return self._tensors[name]
