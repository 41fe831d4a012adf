"""``megashear convert``: checkpoints between Hugging Face / Meta LLaMA and megatron-core.

The direction, the first word after ``convert`` (``megashear convert hf-to-megatron --load=...
--save=...``; ``--direction=hf-to-megatron`` is the same), picks the conversion:

- ``hf-to-megatron``: an HF LLaMA directory (``config.json`` + safetensors or ``.bin``) into a
  megashear checkpoint (megatron-core dist_checkpointing, cut for ``parallel.tp`` ×
  ``parallel.pp``);
- ``meta-to-megatron``: Meta's original format (``params.json`` + ``consolidated.NN.pth``);
- ``megatron-to-hf``: a megashear checkpoint into an HF directory that transformers loads as it
  is, with the tokenizer when ``tokenizer`` is given and a model card (``README.md``) of what the
  checkpoint's ``megashear.json`` records (:mod:`megashear.conversion.model_card`);
- ``reshard``: a megashear checkpoint rewritten for another TP × PP layout.

Conversion streams: no model is built and memory holds about one layer (plus one tensor being
written), whatever the model size. Reading HF checks every key, value and shape before any
output is written; megatron checkpoints are read one layer at a time and written through PyTorch
DCP with each chunk produced on demand. Every tensor is stored by its global shape, so one
checkpoint loads at any TP/PP layout; the layout only decides how the chunks on disk are cut.
The stored dtype is the source's unless ``dtype`` is given. Bad input is one ``ValueError``
line and no partial output (outputs are written under a temporary name and renamed at the end).

``tools/convert_checkpoint.py`` is the same function under the Megatron-style flags
(``hf-to-megatron --load ... --save ... --tp 2 --overwrite``).
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field, fields
from typing import Literal

from megashear.jobs.common import UsageError

logger = logging.getLogger(__name__)

Direction = Literal["hf-to-megatron", "meta-to-megatron", "megatron-to-hf", "reshard"]
DIRECTIONS: tuple[str, ...] = Direction.__args__
DType = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ConvertLayout:
    """The TP × PP layout the output's chunks are cut for (megatron-core stores every tensor by
    its global shape: the checkpoint loads at any layout). Not for megatron-to-hf."""

    tp: int = 1
    """Tensor-parallel size (megatron --tensor-model-parallel-size; tools/convert_checkpoint.py
    --tp); must divide the heads, query groups, FFN width and padded vocabulary."""
    pp: int = 1
    """Pipeline-parallel size (megatron --pipeline-model-parallel-size;
    tools/convert_checkpoint.py --pp); must divide the layers."""


@dataclass
class ConvertConfig:
    """``megashear convert``: one checkpoint conversion (every field a ``--field=value`` flag)."""

    direction: Direction | None = None
    """What to convert: hf-to-megatron, meta-to-megatron (Meta's params.json +
    consolidated.NN.pth), megatron-to-hf (with a model card) or reshard (another TP/PP cut).
    Required."""
    load: str = ""
    """The input: an HF directory, a Meta directory, or a megashear checkpoint (a root, its
    latest iteration, or an iter_N directory). Required."""
    save: str = ""
    """The output directory; it must not exist unless overwrite is set, nor overlap load.
    Required."""
    overwrite: bool = False
    """Replace an existing save directory (never the input or a folder inside it)."""
    dtype: DType | None = None
    """Stored dtype of the output; null: the source's."""
    tokenizer: str = ""
    """megatron-to-hf: the tokenizer to ship, a sentencepiece .model, a tokenizer.json or an HF
    directory holding one; its vocabulary must equal the model's. "": none."""
    losses: str = ""
    """megatron-to-hf: per-domain validation losses of this model (a JSON object
    {domain: loss}, e.g. what megashear evaluate prints) for the model card; "": none."""
    source_losses: str = ""
    """megatron-to-hf: the source model's per-domain losses on the same data (a JSON object),
    shown beside losses in the model card; "": none."""
    parallel: ConvertLayout = field(default_factory=ConvertLayout)
    """The output's TP × PP cut (hf-to-megatron, meta-to-megatron, reshard)."""


def command_line(cfg: ConvertConfig) -> str:
    """The ``megashear convert`` command line of ``cfg``: every field that differs from its
    default, in the command's own spelling (what the model card records)."""
    defaults = ConvertConfig()
    words = ["megashear", "convert", *([cfg.direction] if cfg.direction else [])]
    for f in fields(ConvertConfig):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if f.name == "direction":
            continue
        if f.name == "parallel":
            for g in fields(ConvertLayout):
                if getattr(value, g.name) != getattr(default, g.name):
                    words.append(f"--parallel.{g.name}={getattr(value, g.name)}")
            continue
        if value != default:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            words.append(f"--{f.name}={shown}")
    return shlex.join(words)


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _check(cfg: ConvertConfig) -> None:
    """The one-line usage errors of a config, before anything is read."""
    if cfg.direction is None:
        raise UsageError(
            f"convert needs a direction: megashear convert {{{'|'.join(DIRECTIONS)}}} ..."
        )
    for name in ("load", "save"):
        if not getattr(cfg, name):
            raise UsageError(f"convert needs --{name}")
    if not os.path.exists(cfg.load):
        raise UsageError(f"--load {cfg.load} does not exist")
    if cfg.direction == "megatron-to-hf":
        if (cfg.parallel.tp, cfg.parallel.pp) != (1, 1):
            raise UsageError(
                "parallel.tp and parallel.pp do not apply to megatron-to-hf (an HF directory "
                "has no layout)"
            )
    else:
        for name in ("tokenizer", "losses", "source_losses"):
            if getattr(cfg, name):
                raise UsageError(f"{name} applies to megatron-to-hf only")


def _check_output(cfg: ConvertConfig) -> None:
    from megashear.checkpoint.publish import check_output_path

    check_output_path(cfg.load, cfg.save, cfg.overwrite)


def _check_layout(model, tp: int, pp: int) -> None:
    from megashear.config import ParallelConfig
    from megashear.models.llama import validate_layout

    validate_layout(model, ParallelConfig(tp=tp, pp=pp), tp * pp)


def _write_megatron(cfg: ConvertConfig, model, get_canonical, dtype) -> dict:
    """Stream canonical tensors into a megatron checkpoint cut for ``parallel.tp/pp``."""
    from megashear.checkpoint.dist_stream import write_checkpoint
    from megashear.checkpoint.megatron_layout import megatron_tensor

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _check_layout(model, tp, pp)
    write_checkpoint(
        cfg.save,
        model,
        lambda name: megatron_tensor(name, get_canonical, model),
        dtype,
        tp=tp,
        pp=pp,
        overwrite=cfg.overwrite,
    )
    return {
        "saved": cfg.save,
        "model": model.to_dict(),
        "tp": tp,
        "pp": pp,
        "dtype": str(dtype).replace("torch.", ""),
    }


def hf_to_megatron(cfg: ConvertConfig) -> dict:
    from megashear.conversion.hf import HFReader

    reader = HFReader(cfg.load, _dtype(cfg.dtype))
    return _write_megatron(cfg, reader.cfg, reader, reader.dtype)


def meta_to_megatron(cfg: ConvertConfig) -> dict:
    from megashear.conversion.meta import MetaReader

    reader = MetaReader(cfg.load, _dtype(cfg.dtype))
    return _write_megatron(cfg, reader.cfg, reader, reader.dtype)


def megatron_to_hf(cfg: ConvertConfig) -> dict:
    from megashear.checkpoint.dist_stream import CheckpointReader
    from megashear.checkpoint.megatron_layout import canonical_tensor
    from megashear.conversion.hf import write_hf_stream
    from megashear.conversion.model_card import model_card, read_losses
    from megashear.parallel import init_distributed

    losses = read_losses(cfg.losses, "losses") if cfg.losses else None
    source_losses = read_losses(cfg.source_losses, "source_losses") if cfg.source_losses else None
    init_distributed()
    reader = CheckpointReader(cfg.load, _dtype(cfg.dtype))
    model = reader.cfg
    card = model_card(
        reader.meta,
        reader.dir,
        command_line(cfg),
        os.path.basename(os.path.normpath(cfg.save)),
        losses=losses,
        source_losses=source_losses,
        tokenizer=cfg.tokenizer or None,
    )
    write_hf_stream(
        lambda key: canonical_tensor(key, reader, model),
        model,
        cfg.save,
        reader.dtype,
        tokenizer=cfg.tokenizer or None,
        overwrite=cfg.overwrite,
        progress=True,
        extra_files={"README.md": card},
    )
    return {"saved": cfg.save, "model": model.to_dict(), "parameters": model.num_parameters()}


def reshard(cfg: ConvertConfig) -> dict:
    from megashear.checkpoint.dist_stream import CheckpointReader, write_checkpoint
    from megashear.conversion.model_card import provenance
    from megashear.parallel import init_distributed

    init_distributed()
    reader = CheckpointReader(cfg.load, _dtype(cfg.dtype))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _check_layout(reader.cfg, tp, pp)
    write_checkpoint(
        cfg.save,
        reader.cfg,
        reader,
        reader.dtype,
        tp=tp,
        pp=pp,
        overwrite=cfg.overwrite,
        extra_meta=provenance(reader.meta),
    )
    return {"saved": cfg.save, "tp": tp, "pp": pp}


CONVERSIONS = {
    "hf-to-megatron": hf_to_megatron,
    "meta-to-megatron": meta_to_megatron,
    "megatron-to-hf": megatron_to_hf,
    "reshard": reshard,
}


def run(cfg: ConvertConfig) -> dict:
    """Run the conversion ``cfg.direction``; the result that the CLI prints as one JSON line
    (``saved``, and the model, layout and dtype written)."""
    _check(cfg)
    _check_output(cfg)
    result = CONVERSIONS[cfg.direction](cfg)
    logger.info("%s: %s -> %s", cfg.direction, cfg.load, cfg.save)
    return result
