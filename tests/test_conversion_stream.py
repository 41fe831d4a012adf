"""Streaming conversion: the lazy DCP writer reproduces megatron-core's own save, the reader
returns what was written, safetensors files are written and read tensor by tensor, bf16 stays
bf16, and a failure mid-write leaves nothing behind."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")
SHAPES = {
    "mha": dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=4),
    "gqa": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2),
    # tied: megatron-core saves no output layer; the vocabulary (100) is padded to 128 rows
    "tied": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        tie_word_embeddings=True,
    ),
}


def _storage_layout(root: str) -> dict:
    """Sharded key -> (global size, dtype, sorted chunks) or "bytes", from DCP's .metadata."""
    with open(os.path.join(root, "iter_0000000", ".metadata"), "rb") as f:
        md = pickle.load(f).state_dict_metadata
    out = {}
    for key, value in md.items():
        if hasattr(value, "chunks"):
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in value.chunks)
            out[key] = (tuple(value.size), str(value.properties.dtype), chunks)
        else:
            out[key] = "bytes"
    return out


def _compare_with_megatron_save(name: str, workdir: str) -> dict:
    """Run in a subprocess: one model saved by megatron-core and by the streaming writer."""
    from megashear.checkpoint.dist_stream import CheckpointReader, write_checkpoint
    from megashear.checkpoint.megatron_layout import canonical_to_megatron
    from megashear.conversion.megatron_model import (
        load_megatron_checkpoint,
        save_megatron_checkpoint,
    )
    from megashear.layout import canonical_shapes
    from megashear.model_config import ModelConfig

    cfg = ModelConfig(**SHAPES[name], ffn_hidden_size=96, vocab_size=100, seq_length=32)
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=gen) for k, s in canonical_shapes(cfg).items()}
    full = canonical_to_megatron(weights, cfg)
    ref, ours = os.path.join(workdir, "megatron"), os.path.join(workdir, "stream")
    save_megatron_checkpoint(full, cfg, ref)
    write_checkpoint(ours, cfg, full.__getitem__, torch.float32, progress=False)
    loaded, _ = load_megatron_checkpoint(ours)  # through a real GPTModel
    reader = CheckpointReader(ref)
    # a bf16 checkpoint (a converted LLaMA) loads into the fp32 model exactly
    half = os.path.join(workdir, "bf16")
    write_checkpoint(half, cfg, full.__getitem__, torch.bfloat16, progress=False)
    loaded_half, _ = load_megatron_checkpoint(half)
    return {
        "same_layout": _storage_layout(ref) == _storage_layout(ours),
        "model_load_equal": set(loaded) == set(full)
        and all(torch.equal(loaded[k], full[k]) for k in full),
        "reader_equal": all(torch.equal(reader(k), full[k]) for k in full),
        "bf16_into_fp32_equal": all(
            loaded_half[k].dtype == torch.float32
            and torch.equal(loaded_half[k], full[k].to(torch.bfloat16).float())
            for k in full
        ),
    }


@pytest.mark.parametrize("name", list(SHAPES))
def test_stream_writer_reproduces_megatron_save(tmp_path, name):
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, __file__, name, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "same_layout": True,
        "model_load_equal": True,
        "reader_equal": True,
        "bf16_into_fp32_equal": True,
    }


def test_tp_chunks_cut_each_tensor_like_megatron_ranks():
    from megashear.checkpoint.dist_stream import _write_items
    from megashear.model_config import ModelConfig

    cfg = ModelConfig(2, 64, 4, 2, 96, 100, seq_length=32)
    items = _write_items(cfg, torch.bfloat16, tp=2)
    chunks = {}
    for it in items:
        if it.tensor_data is not None:
            c = it.tensor_data.chunk
            chunks.setdefault(it.index.fqn, []).append((tuple(c.offsets), tuple(c.sizes)))
    # fc1 [L, 2f, h]: gate rows split in two, then up rows split in two, per layer
    fc1 = sorted(chunks["decoder.layers.mlp.linear_fc1.weight"])
    assert fc1[:4] == [
        ((0, 0, 0), (1, 48, 64)),
        ((0, 48, 0), (1, 48, 64)),
        ((0, 96, 0), (1, 48, 64)),
        ((0, 144, 0), (1, 48, 64)),
    ]
    # linear_proj [L, h, a*hn] split on its input columns; the embedding on vocab rows
    proj = sorted(chunks["decoder.layers.self_attention.linear_proj.weight"])
    assert proj[:2] == [((0, 0, 0), (1, 64, 32)), ((0, 0, 32), (1, 64, 32))]
    assert sorted(chunks["embedding.word_embeddings.weight"]) == [
        ((0, 0), (64, 64)),
        ((64, 0), (64, 64)),
    ]  # the vocabulary 100 padded to 128 rows, 64 per TP rank
    # norms are whole per layer
    assert len(chunks["decoder.layers.mlp.linear_fc1.layer_norm_weight"]) == cfg.num_layers


def test_safetensors_written_tensor_by_tensor_read_back(tmp_path):
    from safetensors.torch import load_file

    from megashear.conversion.safetensors_io import read_header, read_tensor, write_file

    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.float32),
        "c": torch.randn(2, 2, 3).to(torch.float16),
    }
    calls = []

    def produce(name):
        calls.append(name)
        return tensors[name]

    path = str(tmp_path / "x.safetensors")
    write_file(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], produce)
    assert calls == ["a", "b", "c"]
    theirs = load_file(path)
    header = read_header(path)
    for k, t in tensors.items():
        assert theirs[k].dtype == t.dtype and torch.equal(theirs[k], t)
        assert torch.equal(read_tensor(header[k]), t)
    with pytest.raises(ValueError, match="expected torch.float32"):
        write_file(path, [("b", torch.float32, (7,))], lambda n: tensors["a"])


def _make_hf(path: Path, dtype: torch.dtype) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)


def _convert(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_bf16_stays_bf16_and_round_trips(tmp_path):
    from safetensors.torch import load_file

    _make_hf(tmp_path / "hf", torch.bfloat16)
    p = _convert("hf-to-megatron", "--load", str(tmp_path / "hf"), "--save", str(tmp_path / "mg"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["dtype"] == "bfloat16"
    layout = _storage_layout(str(tmp_path / "mg"))
    assert {v[1] for v in layout.values() if v != "bytes"} == {"torch.bfloat16"}
    p = _convert("megatron-to-hf", "--load", str(tmp_path / "mg"), "--save", str(tmp_path / "back"))
    assert p.returncode == 0, p.stderr[-2000:]
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == (
        "bfloat16"
    )


def test_failure_mid_write_leaves_nothing(tmp_path):
    from megashear.checkpoint.dist_stream import write_checkpoint
    from megashear.conversion.hf import write_hf_stream
    from megashear.model_config import ModelConfig

    cfg = ModelConfig(2, 64, 4, 2, 96, 100, seq_length=32)
    seen = []

    def failing(name):
        seen.append(name)
        if len(seen) > 3:
            raise OSError("disk full")
        return torch.zeros(64)

    out = tmp_path / "out"
    with pytest.raises((OSError, ValueError)):
        write_checkpoint(str(out), cfg, failing, torch.float32, progress=False)
    assert os.listdir(tmp_path) == []
    seen.clear()
    with pytest.raises((OSError, ValueError)):
        write_hf_stream(failing, cfg, str(out), torch.float32)
    assert os.listdir(tmp_path) == []


def test_conversion_benchmark_runs_on_a_tiny_shape(tmp_path):
    """The 7B benchmark script itself, on a tiny shape: it measures and checks the round trip."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_convert.py"),
            "--preset",
            "tiny-gqa",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["round_trip_bit_identical"] is True
    assert result["hf_to_megatron_peak_rss_gib"] > 0 and result["megatron_to_hf_peak_rss_gib"] > 0
    assert {"copy_s", "hf_to_megatron_ratio", "megatron_to_hf_ratio"} <= result.keys()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # outputs removed, the source kept for reuse


if __name__ == "__main__":
    print(json.dumps(_compare_with_megatron_save(sys.argv[1], sys.argv[2])))
