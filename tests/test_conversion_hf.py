"""HF <-> megatron-core conversion with a tiny random transformers LlamaForCausalLM as the
real client: logits parity at TP2PP2, bit-exact round trip, exports transformers loads, errors.

The shapes cover what today's LLaMA families add: tied embeddings with Llama-3.2's rope scaling
(``llama3``, factor 32) in a config saved by transformers 5 (the base only under
``rope_parameters``), and a vocabulary of 32001 that TP2 splits only after padding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import prune_torchrun as torchrun

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")
SHAPES = {
    # MHA with odd sizes: FFN not a multiple of 64, vocab not a multiple of 128
    "mha": dict(
        vocab_size=250,
        hidden_size=64,
        intermediate_size=150,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "gqa": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # Llama-3.2 style: tied, GQA, llama3 rope scaling (factor 32), base 500000
    "tied-llama3": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    # a LLaMA-2 fine-tune's vocabulary: TP2 needs the padding to 32128 rows
    "vocab-32001": dict(
        vocab_size=32001,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    ),
}


def make_hf(path: Path, shape: dict, seed: int = 0, **save) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{"tie_word_embeddings": False, **shape}, max_position_embeddings=64, rms_norm_eps=1e-5
    )
    LlamaForCausalLM(cfg).save_pretrained(path, **save)


def convert(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300, env=env
    )


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    out = {}
    for name, shape in SHAPES.items():
        make_hf(d / f"hf_{name}", shape)
        proc = convert(
            "hf-to-megatron",
            "--load",
            str(d / f"hf_{name}"),
            "--save",
            str(d / f"mg_{name}"),
            "--tp",
            "2",
            "--pp",
            "2",
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = torchrun(
        4,
        [
            {"name": n, "mode": "plain_logits", "tp": 2, "pp": 2, "load_model": str(d / f"mg_{n}")}
            for n in SHAPES
        ],
        d / "w",
    )
    for name in SHAPES:
        out[name] = runs[name]
    return d, out


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers_at_tp2pp2(converted, name):
    from megashear.training.batches import SyntheticBatches

    d, runs = converted
    vocab = SHAPES[name]["vocab_size"]
    tokens = SyntheticBatches(vocab, 64, 5).next_global_batch(4)["tokens"]
    ref = hf_logits(d / f"hf_{name}", tokens)
    torch.testing.assert_close(runs[name]["logits"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_is_bit_identical(converted, name):
    from safetensors.torch import load_file

    d, _ = converted
    back = d / f"back_{name}"
    proc = convert("megatron-to-hf", "--load", str(d / f"mg_{name}"), "--save", str(back))
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load_file(d / f"hf_{name}" / "model.safetensors")
    b = load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_sharded_and_bin_inputs(tmp_path):
    from megashear.conversion.hf import read_hf

    make_hf(tmp_path / "sharded", SHAPES["gqa"], max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    make_hf(tmp_path / "single", SHAPES["gqa"])
    a, _ = read_hf(str(tmp_path / "sharded"))
    b, _ = read_hf(str(tmp_path / "single"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    make_hf(tmp_path / "bin", SHAPES["gqa"], safe_serialization=False)
    c, _ = read_hf(str(tmp_path / "bin"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_pruned_shape_export_loads_in_transformers(tmp_path):
    """A non-LLaMA2 shape (head_dim 16 with hidden 48 and 4 heads) exports and loads as is."""
    from transformers import LlamaForCausalLM

    from megashear.conversion.hf import read_hf, write_hf
    from megashear.layout import init_canonical_weights
    from megashear.model_config import ModelConfig
    from megashear.pruning.reference_forward import llama_forward

    cfg = ModelConfig(2, 48, 4, 2, 96, 128, kv_channels=16, seq_length=32)
    weights = init_canonical_weights(cfg, generator=torch.Generator().manual_seed(1))
    write_hf(weights, cfg, str(tmp_path / "hf"))
    model, info = LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = llama_forward(weights, cfg, tokens)
        theirs = model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    back, back_cfg = read_hf(str(tmp_path / "hf"))
    assert back_cfg == cfg and all(torch.equal(back[k], weights[k]) for k in weights)


def test_bad_inputs_are_clear_errors(tmp_path):
    make_hf(tmp_path / "ok", SHAPES["gqa"], max_shard_size="100KB")
    # missing index shard
    idx = json.loads((tmp_path / "ok" / "model.safetensors.index.json").read_text())
    os.remove(tmp_path / "ok" / sorted(set(idx["weight_map"].values()))[0])
    p = convert("hf-to-megatron", "--load", str(tmp_path / "ok"), "--save", str(tmp_path / "o1"))
    assert p.returncode == 2 and "missing" in p.stderr and not (tmp_path / "o1").exists()
    # config/weight mismatch
    make_hf(tmp_path / "mm", SHAPES["gqa"])
    cfg = json.loads((tmp_path / "mm" / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (tmp_path / "mm" / "config.json").write_text(json.dumps(cfg))
    p = convert("hf-to-megatron", "--load", str(tmp_path / "mm"), "--save", str(tmp_path / "o2"))
    assert p.returncode == 2 and "does not match config.json" in p.stderr
    # an unknown rope type, and a config key that would change the model
    for key, value, message in (
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
         "rope type 'yarn' is not supported"),
        ("sliding_window", 16, "key 'sliding_window' is not understood"),
    ):  # fmt: skip
        make_hf(tmp_path / key, SHAPES["gqa"])
        cfg = json.loads((tmp_path / key / "config.json").read_text())
        cfg[key] = value
        (tmp_path / key / "config.json").write_text(json.dumps(cfg))
        p = convert("hf-to-megatron", "--load", str(tmp_path / key), "--save", str(tmp_path / "x"))
        assert p.returncode == 2 and message in p.stderr, p.stderr[-500:]
        assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    # unknown key
    from safetensors.torch import load_file, save_file

    make_hf(tmp_path / "uk", SHAPES["gqa"])
    sd = load_file(tmp_path / "uk" / "model.safetensors")
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "uk" / "model.safetensors", metadata={"format": "pt"})
    p = convert("hf-to-megatron", "--load", str(tmp_path / "uk"), "--save", str(tmp_path / "o3"))
    assert p.returncode == 2 and "unknown tensor model.extra.weight" in p.stderr
    # existing output without --overwrite
    (tmp_path / "exists").mkdir()
    p = convert(
        "hf-to-megatron", "--load", str(tmp_path / "mm"), "--save", str(tmp_path / "exists")
    )
    assert p.returncode == 2 and "exists (pass --overwrite" in p.stderr
    assert all(ln.startswith("error:") for ln in p.stderr.strip().splitlines()[-1:])
    # --overwrite onto its own input (or a folder inside it) is refused before anything is touched
    ok = convert("hf-to-megatron", "--load", str(tmp_path / "sd"), "--save", str(tmp_path / "m"))
    assert ok.returncode == 2  # no such input
    make_hf(tmp_path / "src", SHAPES["gqa"])
    ok = convert("hf-to-megatron", "--load", str(tmp_path / "src"), "--save", str(tmp_path / "m"))
    assert ok.returncode == 0, ok.stderr[-500:]
    before = sorted(p.name for p in (tmp_path / "m").rglob("*"))
    for save in (tmp_path / "m", tmp_path / "m" / "sub"):
        p = convert("reshard", "--load", str(tmp_path / "m"), "--save", str(save), "--overwrite")
        assert p.returncode == 2 and "overlaps --load" in p.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "m").rglob("*")) == before


def test_rotary_permutation_is_inverted():
    from megashear.conversion.meta import hf_to_meta_rows, meta_to_hf_rows

    w = torch.arange(4 * 8 * 3, dtype=torch.float32).view(32, 3)  # 4 heads x hn 8, h 3
    meta = hf_to_meta_rows(w, 4)
    assert torch.equal(meta_to_hf_rows(meta, 4), w)
    # head 0: Meta row 2j pairs with row 2j+1; in HF order they are rows j and j + hn/2
    assert torch.equal(meta[0], w[0]) and torch.equal(meta[1], w[4])
    assert torch.equal(meta[2], w[1]) and torch.equal(meta[3], w[5])


@pytest.mark.parametrize("name", list(SHAPES))
def test_meta_checkpoint_converts_to_the_same_model(tmp_path, name):
    """A Meta-format checkpoint made from the tiny HF model (inverse rotary permutation, two
    model-parallel shards split the way Meta splits) converts to megatron weights identical to
    the HF model's, hence to the same losses."""
    from safetensors.torch import load_file

    from megashear.conversion.hf import read_hf
    from megashear.conversion.meta import write_meta

    make_hf(tmp_path / "hf", SHAPES[name])
    weights, cfg = read_hf(str(tmp_path / "hf"))
    write_meta(weights, cfg, str(tmp_path / "meta"), shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (cfg.vocab_size, cfg.hidden_size // 2)
    p = convert(
        "meta-to-megatron",
        "--load",
        str(tmp_path / "meta"),
        "--save",
        str(tmp_path / "mg"),
        "--tp",
        "2",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    # resharding TP2 -> TP1PP1 -> TP2PP1 keeps every tensor
    for src, dst, tp, pp in (("mg", "mg11", "1", "1"), ("mg11", "mg21", "2", "1")):
        p = convert(
            "reshard",
            "--load",
            str(tmp_path / src),
            "--save",
            str(tmp_path / dst),
            "--tp",
            tp,
            "--pp",
            pp,
        )
        assert p.returncode == 0, p.stderr[-2000:]
    p = convert(
        "megatron-to-hf", "--load", str(tmp_path / "mg21"), "--save", str(tmp_path / "back")
    )
    assert p.returncode == 0, p.stderr[-2000:]
    a = load_file(tmp_path / "hf" / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_config(path: Path, **overrides) -> Path:
    base = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**base, **overrides}))
    return path


def test_config_reading_takes_rope_settings_from_either_place(tmp_path):
    """transformers 5's ``rope_parameters`` and the older top-level ``rope_theta`` +
    ``rope_scaling`` (with ``type`` or ``rope_type``) give the same config."""
    from megashear.conversion.hf import config_from_hf

    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    new = config_from_hf(
        str(_write_config(tmp_path / "new", rope_parameters={"rope_type": "llama3",
                                                             "rope_theta": 5e5, **scaling}))
    )  # fmt: skip
    old = config_from_hf(
        str(_write_config(tmp_path / "old", rope_theta=5e5,
                          rope_scaling={"rope_type": "llama3", **scaling}))
    )  # fmt: skip
    older = config_from_hf(
        str(_write_config(tmp_path / "older", rope_theta=5e5,
                          rope_scaling={"type": "llama3", **scaling}))
    )  # fmt: skip
    assert new == old == older
    assert (new.rotary_base, new.rope_scaling, new.rope_scaling_factor) == (5e5, "llama3", 32.0)
    base_only = config_from_hf(
        str(_write_config(tmp_path / "b", rope_parameters={"rope_type": "default",
                                                           "rope_theta": 1e5}))
    )  # fmt: skip
    assert base_only.rotary_base == 1e5 and base_only.rope_scaling == "none"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
         "contradicts the top-level rope settings"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
         "rope_scaling llama3 lacks"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
         "rope type 'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope": [1]}},
         "rope setting 'mrope' is not understood"),
        ({"sliding_window": 128}, "key 'sliding_window' is not understood"),
        ({"attention_bias": True}, "biases are not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"model_type": "mistral"}, "is not 'llama'"),
    ],
)  # fmt: skip
def test_config_that_would_change_the_model_is_refused(tmp_path, overrides, message):
    from megashear.conversion.hf import ConversionError, config_from_hf

    with pytest.raises(ConversionError, match=message) as info:
        config_from_hf(str(_write_config(tmp_path, **overrides)))
    assert "\n" not in str(info.value)


def test_export_refuses_a_tokenizer_of_another_vocabulary(tmp_path, smollm2_hf):
    """A 49152-token tokenizer shipped with a 256-token model: one line, nothing written."""
    from megashear.conversion.hf import ConversionError, write_hf
    from megashear.layout import init_canonical_weights
    from megashear.model_config import ModelConfig

    cfg = ModelConfig(2, 32, 2, 2, 64, 256)
    with pytest.raises(ConversionError, match="has 49152 tokens, the model's vocab_size is 256"):
        write_hf(init_canonical_weights(cfg), cfg, str(tmp_path / "out"), tokenizer=str(smollm2_hf))
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
