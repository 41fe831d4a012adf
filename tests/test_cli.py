"""The megashear command refuses bad input with one line and exit code 2."""

from __future__ import annotations

import subprocess

import pytest

from tests.launch import megashear_cli


def megashear(*args: str) -> subprocess.CompletedProcess:
    return megashear_cli(*args, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "prune",
                "--model_preset=tiny-gqa",
                "--data.synthetic=true",
                "--pruning.target_hidden_size=128",
            ],
            "error: target hidden size 128 is larger than the source's 64",
        ),
        (
            ["train", "--model_preset=tiny-gqa", "--train.lr=fast"],
            "error: config key 'train.lr': expected a number, got 'fast'",
        ),
        (["train", "--model_preset=llama9"], "error: config key 'model_preset': unknown model"),
        (["train", "--model_preset=tiny-gqa"], "error: no training data"),
        (
            ["train", "--model_preset=tiny-gqa", "--data.synthetic=true", "--parallel.tp=3"],
            "error: tp*pp=3 (tp=3, pp=1) does not divide the world size 1",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = megashear(*args)
    assert proc.returncode == 2, proc.stderr[-1000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last


# ---------------------------------------------------------------- the model travels with a checkpoint

CKPT_SHAPE = {
    "num_layers": 3,
    "hidden_size": 48,
    "num_attention_heads": 4,
    "ffn_hidden_size": 96,
    "vocab_size": 384,
}


@pytest.fixture(scope="module")
def shaped_ckpt(tmp_path_factory) -> str:
    """One training step of a non-default shape, saved (the only run that writes a checkpoint)."""
    root = tmp_path_factory.mktemp("shaped")
    ckpt = str(root / "ckpt")
    proc = megashear(
        "train",
        "--train.train_iters=1",
        "--train.global_batch_size=2",
        "--data.synthetic=true",
        f"--checkpoint.save={ckpt}",
        f"--logging.dir={root / 'logs'}",
        "--logging.tensorboard=false",
        *(f"--model.{k}={v}" for k, v in CKPT_SHAPE.items()),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ckpt


def resolved(*argv: str):
    from megashear.cli import build_parser, resolve_config

    return resolve_config(build_parser().parse_args(["evaluate", *argv]))


def saved_model(ckpt: str):
    from megashear.checkpoint.format import read_meta, resolve
    from megashear.model_config import ModelConfig

    return ModelConfig.from_dict(read_meta(resolve(ckpt))["model"])


def test_checkpoint_supplies_the_model(shaped_ckpt):
    model = resolved(f"--checkpoint.load={shaped_ckpt}").model
    assert model == saved_model(shaped_ckpt)
    assert {k: getattr(model, k) for k in CKPT_SHAPE} == CKPT_SHAPE


def test_seq_length_overrides_the_checkpoint(shaped_ckpt):
    from dataclasses import replace

    model = resolved(f"--checkpoint.load={shaped_ckpt}", "--model.seq_length=32").model
    assert model == replace(saved_model(shaped_ckpt), seq_length=32)
    # restating the checkpoint's own values is fine
    model = resolved(
        f"--checkpoint.load={shaped_ckpt}", "--model.hidden_size=48", "--model.num_query_groups=4"
    ).model
    assert model == saved_model(shaped_ckpt)


def test_contradicting_flag_is_one_line_and_exit_2(shaped_ckpt):
    proc = megashear(
        "train", f"--checkpoint.load={shaped_ckpt}", "--data.synthetic=true", "--model.num_layers=4"
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: --model.num_layers=4 contradicts checkpoint {shaped_ckpt} (num_layers 3)"
    ]
    assert "Traceback" not in proc.stderr


def test_every_contradiction_is_named(shaped_ckpt, tmp_path):
    from megashear.config_io import ConfigError

    with pytest.raises(ConfigError) as info:
        resolved(
            f"--checkpoint.load={shaped_ckpt}",
            "--model.num_layers=4",
            "--model.vocab_size=256",
            "--model.tie_word_embeddings=true",
            "--model.seq_length=16",
        )
    assert str(info.value) == (
        "--model.num_layers=4, --model.vocab_size=256, --model.tie_word_embeddings=true "
        f"contradict checkpoint {shaped_ckpt} (num_layers 3, vocab_size 384, "
        "tie_word_embeddings false)"
    )
    with pytest.raises(ConfigError, match=r"^model_preset=tiny-gqa contradicts checkpoint .*"):
        resolved(f"--checkpoint.load={shaped_ckpt}", "--model_preset=tiny-gqa")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError) as info:
        resolved("--config", str(bad), f"--checkpoint.load={shaped_ckpt}")
    assert str(info.value).startswith(f"model.hidden_size=64 ({bad}) contradicts checkpoint")
    # a flag wins over the file, so an agreeing flag rescues it
    assert resolved(
        "--config", str(bad), f"--checkpoint.load={shaped_ckpt}", "--model.hidden_size=48"
    )


def test_agreeing_yaml_model_section_is_accepted(shaped_ckpt, tmp_path):
    from dataclasses import replace

    path = tmp_path / "run.yaml"
    path.write_text(
        f"checkpoint:\n  load: {shaped_ckpt}\n"
        "model:\n  num_layers: 3\n  hidden_size: 48\n  vocab_size: 384\n  rotary_base: 1e4\n"
        "  seq_length: 48\n"
    )
    cfg = resolved("--config", str(path))
    assert cfg.model == replace(saved_model(shaped_ckpt), seq_length=48)


def test_missing_checkpoint_and_no_checkpoint(tmp_path):
    from megashear.model_config import ModelConfig, get_preset

    with pytest.raises(ValueError, match="^no checkpoint found: "):
        resolved(f"--checkpoint.load={tmp_path / 'nothing'}", "--model.num_layers=4")
    # without a checkpoint: the defaults, a preset, and flags over it, as before
    assert resolved().model == ModelConfig()
    model = resolved("--model_preset=tiny-gqa", "--model.num_layers=2").model
    assert model == ModelConfig(**{**get_preset("tiny-gqa").to_dict(), "num_layers": 2})
