"""The typed pruning record of ``megashear.json``: one writer, one reader, old checkpoints."""

from __future__ import annotations

import json

import pytest

from megashear.checkpoint.format import CheckpointError, model_meta, read_meta, write_meta
from megashear.checkpoint.pruning_record import (
    PruningRecord,
    is_pruning_checkpoint,
    read_pruning_record,
)
from megashear.model_config import get_preset
from megashear.pruning.targets import TARGET_FIELDS, make_target


def _shapes():
    source = get_preset("tiny-gqa")
    target = make_target(source, num_layers=source.num_layers - 1, hidden_size=32)
    return source, target


def test_round_trip_through_megashear_json(tmp_path):
    source, target = _shapes()
    record = PruningRecord(source, target, ("head", "hidden"), "importance", (5, 1, 3))
    assert record.pinned_hidden == (1, 3, 5)
    meta = model_meta(source, {"tp": 1, "pp": 1}, 4, ["model"], **record.to_meta())
    write_meta(str(tmp_path), meta)
    meta = read_meta(str(tmp_path))
    assert json.loads((tmp_path / "megashear.json").read_text())["pruning"] == record.to_dict()
    assert is_pruning_checkpoint(meta)
    assert read_pruning_record(meta) == record
    again = read_pruning_record(meta)
    assert {f: getattr(again.target, f) for f in TARGET_FIELDS} == {
        f: getattr(target, f) for f in TARGET_FIELDS
    }


def test_old_checkpoints_without_init_and_pinned_channels_still_load():
    source, target = _shapes()
    meta = {"model": source.to_dict(), "pruning": {"kinds": ["head"], "target": target.to_dict()}}
    record = read_pruning_record(meta)
    assert record == PruningRecord(source, target, ("head",), "paper", ())


def test_a_plain_checkpoint_has_no_record():
    source, _ = _shapes()
    assert read_pruning_record({"model": source.to_dict()}) is None


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"kinds": ["head"]}, "lacks 'target'"),
        ("head", "not an object"),
        ({"kinds": ["head"], "target": {"layers": 2}}, "unknown model config keys"),
        ({"kinds": ["head"], "target": None, "init": "random"}, "random"),
    ],
)
def test_a_damaged_record_is_one_checkpoint_error(entry, message):
    source, target = _shapes()
    if isinstance(entry, dict) and entry.get("target", 0) is None:
        entry = {**entry, "target": target.to_dict()}
    with pytest.raises(CheckpointError, match=message) as info:
        read_pruning_record({"model": source.to_dict(), "pruning": entry}, "ckpt/iter_0000004")
    assert str(info.value).startswith("ckpt/iter_0000004: ") and "\n" not in str(info.value)
