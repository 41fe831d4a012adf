"""The one-shot baseline (``tools/one_shot_prune.py``): the target cut from the source by keeping
its leading heads, channels, FFN units and layers, without learned masks.

The oracle is independent of megashear's finalisation: the same cut made directly on the
transformers state dict (rows and columns sliced by hand), loaded into a smaller
``LlamaForCausalLM``. The megashear cut, exported to HF, must give the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_conversion_hf import make_hf

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")
ONE_SHOT = str(ROOT / "tools" / "one_shot_prune.py")
SOURCE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    tie_word_embeddings=True,
)
# keep 3 layers x 48, 4 heads in 2 groups (2 per group of the source's 2), FFN 96
TARGET = dict(num_layers=3, hidden_size=48, num_attention_heads=4, num_query_groups=2)
TARGET_FFN = 96


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *cmd], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def hand_cut(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The leading sub-network of the source's HF state dict (HF key names and layouts)."""
    h, f, hd = TARGET["hidden_size"], TARGET_FFN, SOURCE["head_dim"]
    a, g = SOURCE["num_attention_heads"], SOURCE["num_key_value_heads"]
    r, g2, r2 = a // g, TARGET["num_query_groups"], 2
    q_heads = [j for j in range(a) if j // r < g2 and j % r < r2]
    q_rows = torch.cat([torch.arange(j * hd, (j + 1) * hd) for j in q_heads])
    kv_rows = torch.arange(g2 * hd)
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, :h]}
    out["model.norm.weight"] = sd["model.norm.weight"][:h]
    for i in range(TARGET["num_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"][:h]
        out[p + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"][:h]
        out[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][q_rows, :h]
        for kv in ("k_proj", "v_proj"):
            out[p + f"self_attn.{kv}.weight"] = sd[p + f"self_attn.{kv}.weight"][kv_rows, :h]
        out[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:h, q_rows]
        for up in ("gate_proj", "up_proj"):
            out[p + f"mlp.{up}.weight"] = sd[p + f"mlp.{up}.weight"][:f, :h]
        out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:h, :f]
    return out


def test_one_shot_is_the_leading_subnetwork(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    make_hf(tmp_path / "src_hf", SOURCE)
    proc = run(
        TOOL, "hf-to-megatron", "--load", str(tmp_path / "src_hf"), "--save", str(tmp_path / "src")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    target_flags = [f"--target-{k.replace('_', '-')}={v}" for k, v in TARGET.items()]
    proc = run(
        ONE_SHOT,
        "--load",
        str(tmp_path / "src"),
        "--save",
        str(tmp_path / "cut"),
        *target_flags,
        f"--target-ffn-hidden-size={TARGET_FFN}",
        "--tp=2",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # an output onto its own input is refused, even with --overwrite
    again = run(ONE_SHOT, "--load", str(tmp_path / "src"), "--save", str(tmp_path / "src"),
                *target_flags, "--overwrite")  # fmt: skip
    assert again.returncode == 2 and "overlaps --load" in again.stderr.strip().splitlines()[-1]
    assert result["model"]["num_layers"] == 3 and result["model"]["ffn_hidden_size"] == TARGET_FFN
    proc = run(
        TOOL, "megatron-to-hf", "--load", str(tmp_path / "cut"), "--save", str(tmp_path / "cut_hf")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    exported = LlamaForCausalLM.from_pretrained(tmp_path / "cut_hf").eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # still tied
    source = LlamaForCausalLM.from_pretrained(tmp_path / "src_hf")
    cfg = LlamaConfig.from_pretrained(tmp_path / "src_hf")
    cfg.num_hidden_layers, cfg.hidden_size = TARGET["num_layers"], TARGET["hidden_size"]
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
    cfg.intermediate_size = TARGET_FFN
    oracle = LlamaForCausalLM(cfg).eval()
    missing, unexpected = oracle.load_state_dict(hand_cut(source.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    oracle.tie_weights()
    ids = torch.randint(
        0, SOURCE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, oracle(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target-num-attention-heads=3", "--target-num-query-groups=2"], "head"),
        (["--target-hidden-size=80"], "hidden"),
    ],
)
def test_one_shot_refuses_infeasible_targets(tmp_path, flags, message):
    make_hf(tmp_path / "src_hf", SOURCE)
    assert (
        run(
            TOOL,
            "hf-to-megatron",
            "--load",
            str(tmp_path / "src_hf"),
            "--save",
            str(tmp_path / "src"),
        ).returncode
        == 0
    )
    proc = run(ONE_SHOT, "--load", str(tmp_path / "src"), "--save", str(tmp_path / "cut"), *flags)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1], proc.stderr[-1000:]
    assert not (tmp_path / "cut").exists()
