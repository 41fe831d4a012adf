"""The checkpoint directory format: names, tracker, ``megashear.json`` and resolving a path.

Directory layout::

    SAVE/
      iter_0000020/                  one dist checkpoint (torch_dist) + megashear.json
      iter_0000040/
      latest_checkpointed_iteration.txt   written last, by rename

``megashear.json`` records the model shape, the layout and what the checkpoint contains (and,
for a pruning checkpoint, the mask settings); loading a checkpoint of another model shape is an
error.
"""

from __future__ import annotations

import hashlib
import json
import os

from megashear.atomic_file import write_text_atomic
from megashear.model_config import ModelConfig, model_differences

TRACKER = "latest_checkpointed_iteration.txt"
META = "megashear.json"
# How much of each checkpoint file the fingerprint reads at its start and end.
FINGERPRINT_BYTES = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run."""


def iteration_dir(root: str, iteration: int) -> str:
    """The directory of checkpoint ``iteration`` under ``root``: ``root/iter_NNNNNNN``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int:
    """The iteration of the newest complete checkpoint under ``root``."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint found: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        text = "<binary data>"
    if not text.isdigit():
        raise CheckpointError(f"{path} does not hold an iteration number: {text!r}")
    return int(text)


def write_tracker(root: str, iteration: int) -> None:
    """Point ``root``'s tracker at ``iteration`` (atomically)."""
    write_text_atomic(os.path.join(root, TRACKER), str(iteration))


def resolve(root: str) -> str:
    """A checkpoint directory from a root (via the tracker) or an ``iter_N`` directory itself."""
    if os.path.isfile(os.path.join(root, META)):
        return root
    return iteration_dir(root, read_tracker(root))


def read_json_object(path: str, error: type[Exception]) -> dict:
    """The JSON object in the file ``path``; ``error`` (one line naming the file) when the file
    is missing, is not UTF-8 JSON, or holds something other than an object."""
    if not os.path.isfile(path):
        raise error(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise error(f"{path} does not hold a JSON object")
    return value


def read_meta(ckpt_dir: str) -> dict:
    """The ``megashear.json`` of the checkpoint directory ``ckpt_dir``, checked to describe a
    model."""
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} is not a megashear checkpoint ({META} missing)")
    meta = read_json_object(path, CheckpointError)
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path} does not describe a model (no 'model' mapping)")
    return meta


def write_meta(ckpt_dir: str, meta: dict) -> None:
    """Write ``megashear.json`` into ``ckpt_dir`` (atomically)."""
    write_text_atomic(os.path.join(ckpt_dir, META), json.dumps(meta, indent=2))


def model_meta(
    cfg: ModelConfig, layout: dict, iteration: int, contents: list[str], **extra
) -> dict:
    """The ``megashear.json`` of a checkpoint of ``cfg`` saved at ``layout``."""
    return {
        "model": cfg.to_dict(),
        "layout": layout,
        "iteration": iteration,
        "contents": contents,
        **extra,
    }


def check_model_config(meta: dict, cfg: ModelConfig, ckpt_dir: str) -> None:
    """Raise :class:`CheckpointError` if the checkpoint's model differs from ``cfg`` in any
    weight-defining field (every field but ``seq_length``)."""
    saved = ModelConfig.from_dict(meta["model"])
    diffs = []
    for diff in model_differences(saved, cfg):  # "field: saved != cfg"
        name, values = diff.split(": ", 1)
        in_ckpt, in_cfg = values.split(" != ", 1)
        diffs.append(f"{name}: checkpoint {in_ckpt} != config {in_cfg}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is of another model shape ({'; '.join(diffs)})"
        )


def fingerprint(path: str) -> str:
    """A cheap identity of a checkpoint directory: sha256 over every file's relative name, size
    and first / last MiB (the weights of a different model differ there)."""
    ckpt_dir = resolve(path)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(ckpt_dir):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            digest.update(f"{os.path.relpath(full, ckpt_dir)}\0{size}\0".encode())
            with open(full, "rb") as f:
                digest.update(f.read(FINGERPRINT_BYTES))
                if size > 2 * FINGERPRINT_BYTES:
                    f.seek(size - FINGERPRINT_BYTES)
                    digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]
