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

import contextlib
import io
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from megashear.checkpoint.dist_files import ChunkReader, write_backend_files
from megashear.checkpoint.format import (
    CheckpointError,
    iteration_dir,
    model_meta,
    read_meta,
    resolve,
    write_meta,
    write_tracker,
)
from megashear.checkpoint.megatron_layout import FC1, GLOBAL_KEYS, LAYER_KEYS, QKV
from megashear.checkpoint.model_state import LOG_ALPHA_SUFFIX, MASK_PREFIX
from megashear.checkpoint.pruning_record import is_pruning_checkpoint
from megashear.checkpoint.publish import check_new_output, publish_dir
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


def _write_items(
    cfg: ModelConfig, dtype: torch.dtype, tp: int, extra: dict[str, torch.Tensor] | None = None
) -> list:
    """Every DCP write item of the checkpoint, layer-major so that a layer is produced once;
    the ``extra`` tensors (sharded key -> full tensor) last, each as one chunk."""
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
    for key, t in (extra or {}).items():
        zeros = torch.Size([0] * t.dim())
        items.append(
            WriteItem(
                index=MetadataIndex(key, zeros),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=zeros, sizes=t.shape),
                    properties=TensorProperties(dtype=t.dtype),
                    size=t.shape,
                ),
            )
        )
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


@contextlib.contextmanager
def _dcp_events_off():
    """DCP logs a failed save as an ``exception`` event whose text is the whole traceback
    (``torch.distributed.checkpoint.logger._dcp_logger``, a logger that is meant to have a
    NullHandler and not to propagate, but was seen reaching the log in a CI run). The writer
    reports its failures itself, in one line, so the event logger is off while it saves."""
    from torch.distributed.checkpoint import logger as dcp_logging

    log = getattr(dcp_logging, "_dcp_logger", None)
    if log is None:
        yield
        return
    was, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = was


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
    extra_tensors: dict[str, torch.Tensor] | None = None,
    read_ahead: int = 0,
) -> None:
    """Write a model-only megashear checkpoint, pulling each full tensor from ``get``.

    Args:
        get: full megatron state dict name -> tensor of :func:`full_shapes`; called about once
            per name (the last two tensors are kept for the TP slices of the same tensor).
        dtype: the stored dtype; tensors are cast to it.
        tp, pp: the layout the chunks are cut for (any layout loads the checkpoint).
        extra_tensors: sharded key -> full tensor stored whole in its own dtype, besides the
            model's (e.g. the ``mask_bank.*_log_alpha`` of a pruning checkpoint).
        read_ahead: when > 0, ``get`` runs in a background thread (:class:`ReadAhead`) that many
            names ahead of the file writer, in the order the chunks are written, so that
            producing the next tensors overlaps writing this one.

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
    extra = dict(extra_tensors or {})
    items = _write_items(cfg, dtype, tp, extra)
    cache: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(items), desc="write megatron", unit="chunk", disable=not progress)

    def name_of(item) -> str | None:  # the full tensor a model chunk is cut from
        if item.type.name == "BYTE_IO" or item.index.fqn in extra:
            return None
        sk = key_of[item.index.fqn]
        return sk.name.format(item.tensor_data.chunk.offsets[0] if sk.per_layer else None)

    def checked(name: str) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {shapes[name]}")
        return t.to(dtype)

    fetch = checked
    if read_ahead:
        order = list(dict.fromkeys(n for n in map(name_of, items) if n is not None))
        fetch = ReadAhead(checked, order, read_ahead, "checkpoint-write")

    def full(name: str) -> torch.Tensor:
        if name not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[name] = fetch(name)
        return cache[name]

    def produce(item):
        bar.update()
        if item.type.name == "BYTE_IO":
            return _extra_state_bytes()
        if item.index.fqn in extra:
            return extra[item.index.fqn].contiguous()
        sk = key_of[item.index.fqn]
        chunk = item.tensor_data.chunk
        offsets, sizes = list(chunk.offsets), list(chunk.sizes)
        if sk.per_layer:
            offsets.pop(0)
            sizes.pop(0)
        t = full(name_of(item))
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            t = t.narrow(dim, o, s)
        return t.unsqueeze(0).contiguous() if sk.per_layer else t.contiguous()

    def fill(tmp_root: str) -> None:
        ckpt = iteration_dir(tmp_root, 0)
        os.makedirs(ckpt)
        try:
            with _dcp_events_off():
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
            if read_ahead:
                fetch.close()
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


PREFETCH_DEPTH = 3  # tensors read ahead: a norm, qkv and proj, or a norm, fc1 and fc2


class ReadAhead:
    """``get(name)`` computed in one background thread, ``depth`` names ahead of the caller,
    for a caller that asks for ``order`` in that order.

    Every call of ``get`` runs in that one thread, one at a time, so ``get`` need not be
    thread-safe; file reads, numpy and torch ops release the GIL, so the caller's own work (a
    write, the previous tensor's maths) overlaps the next ``get``. At most ``depth + 1`` results
    are alive. A name outside ``order``, or asked out of order, is computed when asked (the same
    result; what was computed ahead waits, or is computed again). An error of ``get`` is raised
    to the caller that asks for that name.
    """

    def __init__(
        self, get: Callable[[str], torch.Tensor], order: list[str], depth: int, name: str
    ) -> None:
        self._get, self._names, self._depth = get, list(order), depth
        self._at = {n: i for i, n in enumerate(self._names)}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pending: dict[str, Future] = {}
        if self._names:
            self._pending[self._names[0]] = self._pool.submit(get, self._names[0])

    def __call__(self, name: str) -> torch.Tensor:
        future = self._pending.pop(name, None) or self._pool.submit(self._get, name)
        at = self._at.get(name)
        if at is not None:  # keep the next names on their way while the caller waits or works
            for nxt in self._names[at + 1 : at + 1 + self._depth]:
                if nxt not in self._pending:
                    self._pending[nxt] = self._pool.submit(self._get, nxt)
        return future.result()

    def close(self) -> None:
        """Stop the thread; pending work is dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = {}


class CheckpointReader:
    """Full megatron tensors of a megashear checkpoint, one layer in memory at a time.

    ``reader(name)`` returns the full (TP1) tensor of a full-state-dict name; the first name of
    a layer reads that whole layer (every sharded key), a non-layer name only itself. The files
    are read through :class:`~megashear.checkpoint.dist_files.ChunkReader` (DCP's metadata, no
    process group, one buffer per tensor), whatever TP/PP layout saved them.
    """

    def __init__(self, path: str, dtype: torch.dtype | None = None, masked: bool = False) -> None:
        self.dir = resolve(path)
        meta = read_meta(self.dir)
        if is_pruning_checkpoint(meta) != masked:
            raise CheckpointError(
                f"{self.dir} is a pruning checkpoint (masked model): run `megashear finalize` "
                "on it first"
                if not masked
                else f"{self.dir} is not a pruning checkpoint (no mask settings in megashear.json)"
            )
        self.meta = meta
        self.cfg = ModelConfig.from_dict(meta["model"])
        self.chunks = ChunkReader(self.dir)  # damage is refused before any output is written
        stored = self.chunks.tensors
        self.keys = sharded_keys(self.cfg)
        self.extra_keys = {
            k: md for k, md in stored.items() if k.startswith(MASK_PREFIX)
        }  # mask parameters (log α) of a pruning checkpoint
        missing = [sk.key for sk in self.keys if sk.key not in stored]
        if missing:
            raise CheckpointError(f"{self.dir} holds no tensor {missing[0]}")
        self.stored_dtype = stored[SHARDED_KEYS[0].key].properties.dtype
        self.dtype = dtype or self.stored_dtype
        self.shapes = full_shapes(self.cfg)
        self._tensors: dict[str, torch.Tensor] = {}
        self._ahead: ReadAhead | None = None  # prefetch mode

    def _read(self, sk: ShardedKey, layer: int | None) -> torch.Tensor:
        name = sk.name.format(layer)
        shape = list(self.shapes[name])
        stored = list(self.chunks.tensors[sk.key].size)
        want = shape if layer is None else [self.cfg.num_layers, *shape]
        if stored != want:
            raise CheckpointError(f"{self.dir}: {sk.key} is {stored}, the model needs {want}")
        if layer is None:
            return self.chunks.region(sk.key, [0] * len(shape), shape)
        return self.chunks.region(sk.key, [layer] + [0] * len(shape), [1, *shape])[0]

    def _load(self, layer: int | None, only: str | None = None) -> None:
        """Read every tensor of ``layer``, or the one non-layer tensor ``only``."""
        self._tensors = {}  # the previous layer goes before the next one is read
        for sk in self.keys:
            if sk.per_layer != (layer is not None):
                continue
            name = sk.name.format(layer)
            if only is None or name == only:
                self._tensors[name] = self._read(sk, layer).to(self.dtype)

    def _sharded_key(self, name: str) -> tuple[ShardedKey, int | None]:
        if name not in self.shapes:
            raise KeyError(f"no tensor {name} in a model of this shape")
        layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else None
        for sk in self.keys:
            if sk.per_layer == (layer is not None) and sk.name.format(layer) == name:
                return sk, layer
        raise KeyError(name)

    def _read_name(self, name: str) -> torch.Tensor:
        return self._read(*self._sharded_key(name)).to(self.dtype)

    def prefetch(self, names: list[str]) -> None:
        """Switch to reading one tensor at a time in the order ``names`` (the order they will be
        asked for), :data:`PREFETCH_DEPTH` ahead of the caller in a background thread
        (:class:`ReadAhead`). Memory holds the current tensor and those ahead. A name outside
        ``names`` is read when asked; asking out of order costs memory or time, not results."""
        self._tensors = {}
        self._ahead = ReadAhead(self._read_name, names, PREFETCH_DEPTH, "checkpoint-read")

    def close(self) -> None:
        """Stop the prefetching thread (pending reads are dropped)."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def __call__(self, name: str) -> torch.Tensor:
        if self._ahead is not None:
            if name not in self._tensors:
                self._tensors = {}  # the caller is done with the previous tensor
                self._tensors = {name: self._ahead(name)}
            return self._tensors[name]
        if name not in self._tensors:
            _, layer = self._sharded_key(name)
            self._load(layer, None if layer is not None else name)
        return self._tensors[name]

    def mask_parameters(self) -> dict[str, torch.Tensor]:
        """The full log α of a pruning checkpoint: kind -> tensor (``hidden [h]``, ``head
        [L, a]``, ``intermediate [L, f]``, layer-level kinds ``[L]``), as stored (fp32)."""
        n = len(MASK_PREFIX)
        out = {}
        for key, md in self.extra_keys.items():
            if key.endswith(LOG_ALPHA_SUFFIX):
                size = list(md.size)
                out[key[n : -len(LOG_ALPHA_SUFFIX)]] = self.chunks.region(
                    key, [0] * len(size), size
                )
        return out
