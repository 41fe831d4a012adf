"""Every command and tool refuses bad input the same way: a non-zero exit code, exactly one
``error:`` line on stderr (the last one), no traceback, and no partial output (the path it was
told to write does not exist afterwards, nor any ``*.tmp*`` file next to it; an output that
existed before is left as it was).

The entry points run in this process (``megashear.cli.main(argv)``, each tool's ``main(argv)``);
a few cases also run as real subprocesses. The inputs are made once per module: a tokenizer
trained on generated text, the domains preprocess_data makes with it, two random model-only
checkpoints (vocabulary 256 and the tokenizer's 300) and an HF export of one of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300  # the test tokenizer's vocabulary (the 256-token model does not match it)


@functools.cache
def tool(name: str):
    """``tools/NAME.py`` as a module."""
    spec = importlib.util.spec_from_file_location(
        f"megashear_tool_{name}", ROOT / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOLS = {
    "convert": "convert_checkpoint",
    "preprocess": "preprocess_data",
    "fit": "fit_reference_loss",
    "one_shot": "one_shot_prune",
    "tokenizer": "train_tokenizer",
}


def call(kind: str, argv: list[str]) -> int:
    """Run one entry point in this process; its exit code (argparse's SystemExit included).

    The environment is restored afterwards: ``init_distributed`` sets ``RANK``,
    ``MASTER_PORT`` ... for a world of one, which a later subprocess must not inherit."""
    saved = dict(os.environ)
    try:
        if kind == "megashear":
            from megashear.cli import main

            return main(argv)
        return tool(TOOLS[kind]).main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)


def spawn(kind: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run one entry point as its own process (``python -m megashear.cli`` or the tool)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    head = (
        ["-m", "megashear.cli"]
        if kind == "megashear"
        else [str(ROOT / "tools" / f"{TOOLS[kind]}.py")]
    )
    return subprocess.run(
        [sys.executable, *head, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


# ------------------------------------------------------------------------------------ the inputs


def _words(rng: np.random.Generator, n: int) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(n))


def _random_checkpoint(path: Path, vocab_size: int, pruning: bool = False) -> None:
    """A model-only checkpoint of the tiny-gqa shape with random weights; with ``pruning``, a
    pruning checkpoint (log α of hidden, intermediate and layer; target 2 layers, 32 wide,
    FFN 64)."""
    import dataclasses

    import torch

    from megashear.checkpoint.dist_stream import full_shapes, write_checkpoint
    from megashear.model_config import get_preset

    cfg = get_preset("tiny-gqa")
    cfg.vocab_size = vocab_size
    shapes = full_shapes(cfg)
    gen = torch.Generator().manual_seed(vocab_size)
    weights = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    extra, meta = {}, {}
    if pruning:
        from megashear.pruning.hard_concrete import log_alpha_shapes

        shapes_of = log_alpha_shapes(cfg.hidden_size, cfg.num_attention_heads,
                                     cfg.ffn_hidden_size, cfg.num_layers)  # fmt: skip
        kinds = ("hidden", "intermediate", "layer")
        extra = {f"mask_bank.{k}_log_alpha": torch.randn(shapes_of[k], generator=gen)
                 for k in kinds}  # fmt: skip
        target = dataclasses.replace(
            cfg, num_layers=2, hidden_size=32, ffn_hidden_size=64, kv_channels=cfg.head_dim
        )
        meta = {"pruning": {"kinds": list(kinds), "target": target.to_dict()}}
    write_checkpoint(str(path), cfg, weights.__getitem__, torch.float32, progress=False,
                     extra_meta=meta, extra_tensors=extra)  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    corpus = d / "corpus"
    corpus.mkdir()
    for name in ("alpha", "beta"):
        with open(corpus / f"{name}.jsonl", "w") as f:
            for _ in range(80):
                f.write(json.dumps({"text": _words(rng, int(rng.integers(5, 15)))}) + "\n")
    assert call("tokenizer", ["--input", str(corpus), "--vocab-size", str(VOCAB),
                              "--output-prefix", str(d / "tok")]) == 0  # fmt: skip
    data = d / "data"
    assert call("preprocess", ["--input", str(corpus), "--tokenizer", str(d / "tok.model"),
                               "--output-dir", str(data), "--valid-tokens-per-domain", "50",
                               "--workers", "1"]) == 0  # fmt: skip
    _random_checkpoint(d / "ckpt", 256)
    _random_checkpoint(d / "ckpt300", VOCAB)
    _random_checkpoint(d / "pruning", 256, pruning=True)
    hf = d / "hf"
    assert call("convert", ["megatron-to-hf", "--load", str(d / "ckpt"), "--save", str(hf)]) == 0
    points = d / "points.json"
    points.write_text(json.dumps({"alpha": [[1e8, 3.0], [1e9, 2.5], [7e9, 2.0]]}))
    return SimpleNamespace(
        corpus=corpus,
        tok=d / "tok.model",
        data=data,
        manifest=data / "manifest.yaml",
        ckpt=d / "ckpt",
        ckpt300=d / "ckpt300",
        pruning=d / "pruning",
        distcp=next((d / "ckpt" / "iter_0000000").glob("*.distcp")).name,
        hf=hf,
        points=points,
    )


# ------------------------------------------------------------------------- making bad inputs


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage(path: Path, size: int = 256) -> None:
    path.write_bytes(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes())


def bad_data(p, t: Path, edit: Callable[[Path], None]) -> None:
    """A copy of the preprocessed domains at ``t/data`` with one file spoiled."""
    edit(copy(p.data, t / "data"))


def bad_ckpt(p, t: Path, edit: Callable[[Path], None], src: str = "ckpt") -> None:
    """A copy of a checkpoint at ``t/src`` with one file spoiled."""
    edit(copy(getattr(p, src), t / "src") / "iter_0000000")


def write(path: Path, text: str) -> None:
    path.write_text(text)


def hf_bin(p, t: Path, edit: Callable[[Path], None]) -> None:
    """A copy of the HF export at ``t/hf`` with its weights as a spoiled pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    hf = copy(p.hf, t / "hf")
    torch.save(load_file(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    edit(hf / "pytorch_model.bin")


def meta_dir(t: Path) -> None:
    """A Meta checkpoint directory whose one shard is random bytes."""
    (t / "meta").mkdir()
    params = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
              "multiple_of": 32, "norm_eps": 1e-5}  # fmt: skip
    write(t / "meta" / "params.json", json.dumps(params))
    garbage(t / "meta" / "consolidated.00.pth", 4096)


# ----------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One bad input. ``argv`` and ``prep`` get the module's inputs ``p`` and the case's own
    directory ``t``; ``message`` (formatted with ``p``, ``t``) must be in the error line;
    ``outputs`` are paths under ``t`` that must not exist afterwards, ``kept`` ones that existed
    before and must be unchanged."""

    name: str
    kind: str
    argv: Callable[[SimpleNamespace, Path], list[str]]
    message: str
    outputs: tuple[str, ...] = ()
    prep: Callable[[SimpleNamespace, Path], None] | None = None
    kept: tuple[str, ...] = ()
    code: int = 2
    subprocess: bool = False
    disk: str | None = None  # "full" or "read-only": a tiny tmpfs mounted at t/disk for the run


def ms(t: Path, command: str, *args: str) -> list[str]:
    """A megashear command line logging to ``t/log`` (which must not be left behind)."""
    return [command, *args, f"--logging.dir={t / 'log'}", "--logging.tensorboard=false"]


SYN = ("--model_preset=tiny-gqa", "--data.synthetic=true")


def man(p, t: Path, copied: bool = False) -> str:
    return f"--data.manifest={(t / 'data' / 'manifest.yaml') if copied else p.manifest}"


TRAIN = [
    Case("train-unknown-flag", "megashear", lambda p, t: ms(t, "train", *SYN, "--train.nope=1"),
         "unrecognized arguments: --train.nope=1"),
    Case("train-unknown-yaml-key", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--config", str(t / "run.yaml")),
         "'train.nope'", prep=lambda p, t: write(t / "run.yaml", "train:\n  nope: 1\n")),
    Case("train-yaml-missing", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--config", str(t / "none.yaml")),
         "config file {t}/none.yaml does not exist"),
    Case("train-yaml-invalid", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--config", str(t / "run.yaml")),
         "config file {t}/run.yaml is not valid YAML",
         prep=lambda p, t: write(t / "run.yaml", "train: [1,\n  lr: {\n")),
    Case("train-bad-choice", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--train.lr_decay_style=zigzag"),
         "config key 'train.lr_decay_style'"),
    Case("train-bad-type", "megashear", lambda p, t: ms(t, "train", *SYN, "--train.lr=fast"),
         "config key 'train.lr': expected a number, got 'fast'"),
    Case("train-micro-batch-0", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--train.micro_batch_size=0"),
         "config key 'train.micro_batch_size': must be at least 1, got 0"),
    Case("train-iters-0", "megashear", lambda p, t: ms(t, "train", *SYN, "--train.train_iters=0"),
         "config key 'train.train_iters': must be at least 1, got 0"),
    Case("train-bf16-on-cpu", "megashear", lambda p, t: ms(t, "train", *SYN, "--train.bf16=true"),
         "config key 'train.bf16': needs CUDA", subprocess=True),
    Case("train-negative-weight-decay", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--train.weight_decay=-0.1"),
         "config key 'train.weight_decay': must be a finite number, 0 or more"),
    Case("train-negative-workers", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--data.num_workers=-1"),
         "config key 'data.num_workers': must be 0 or more"),
    Case("train-nan-clip-grad", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--train.clip_grad=.nan"),
         "config key 'train.clip_grad': must be a finite number"),
    Case("train-min-lr-above-lr", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--train.min_lr=1"),
         "config key 'train.min_lr': must not exceed train.lr"),
    Case("train-unknown-preset", "megashear", lambda p, t: ms(t, "train", "--model_preset=llama9"),
         "config key 'model_preset': unknown model preset 'llama9'"),
    Case("train-no-data", "megashear", lambda p, t: ms(t, "train", "--model_preset=tiny-gqa"),
         "no training data"),
    Case("train-tp-does-not-divide", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--parallel.tp=3"),
         "tp*pp=3 (tp=3, pp=1) does not divide the world size 1"),
    Case("train-sequence-parallel-without-tp", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--parallel.sequence_parallel=true"),
         "config key 'parallel.sequence_parallel': needs parallel.tp >= 2"),
    Case("train-token-file-missing", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--data.token_file={t}/no.npy"),
         "data.token_file {t}/no.npy does not exist"),
    Case("train-token-file-vocab-mismatch", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--data.token_file={t}/tok.npy"),
         "tokenizer/model mismatch",
         prep=lambda p, t: np.save(t / "tok.npy", np.arange(VOCAB, dtype=np.int32))),
    Case("train-token-file-garbage", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--data.token_file={t}/tok.npy"),
         "data.token_file {t}/tok.npy is not a .npy array of token ids",
         prep=lambda p, t: garbage(t / "tok.npy")),
    Case("train-manifest-missing", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--data.manifest={t}/m.yaml"),
         "manifest {t}/m.yaml does not exist"),
    Case("train-manifest-not-a-mapping", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--data.manifest={t}/m.yaml"),
         "manifest {t}/m.yaml must hold a mapping",
         prep=lambda p, t: write(t / "m.yaml", "- alpha\n- beta\n")),
    Case("train-manifest-invalid-yaml", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--data.manifest={t}/m.yaml"),
         "manifest {t}/m.yaml is not valid YAML",
         prep=lambda p, t: write(t / "m.yaml", "domains: [1,\n  x: {\n")),
    Case("train-tokenizer-vocab-mismatch", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", man(p, t)),
         "tokenizer/model mismatch: the data was tokenized with a vocabulary of 300"),
    Case("train-idx-truncated", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--model.vocab_size={VOCAB}",
                         "--model.seq_length=8", man(p, t, True)),
         "domain alpha: {t}/data/alpha_train.idx is not a megatron-core index file",
         prep=lambda p, t: bad_data(p, t, lambda d: truncate(d / "alpha_train.idx"))),
    Case("train-idx-random-bytes", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--model.vocab_size={VOCAB}",
                         "--model.seq_length=8", man(p, t, True)),
         "domain beta: {t}/data/beta_train.idx is not a megatron-core index file (bad header)",
         prep=lambda p, t: bad_data(p, t, lambda d: garbage(d / "beta_train.idx"))),
    Case("train-bin-truncated", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--model.vocab_size={VOCAB}",
                         "--model.seq_length=8", man(p, t, True)),
         "domain alpha: {t}/data/alpha_train.bin is truncated",
         prep=lambda p, t: bad_data(p, t, lambda d: truncate(d / "alpha_train.bin"))),
    Case("train-bin-missing", "megashear",
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--model.vocab_size={VOCAB}",
                         "--model.seq_length=8", man(p, t, True)),
         "domain beta: {t}/data/beta_valid.bin does not exist",
         prep=lambda p, t: bad_data(p, t, lambda d: (d / "beta_valid.bin").unlink())),
    Case("train-valid-split-too-short", "megashear",
         # the run starts (config.yaml, index_cache/) before the 50 validation tokens are found
         # too few for a window of 65: nothing of it may remain
         lambda p, t: ms(t, "train", "--model_preset=tiny-gqa", f"--model.vocab_size={VOCAB}",
                         man(p, t), f"--checkpoint.save={t}/ckpt"),
         "domain alpha has 50 validation tokens, fewer than seq_length + 1 = 65",
         outputs=("ckpt",)),
    Case("train-load-missing", "megashear",
         lambda p, t: ms(t, "train", "--data.synthetic=true", f"--checkpoint.load={t}/none"),
         "no checkpoint found: {t}/none/latest_checkpointed_iteration.txt does not exist"),
    Case("train-load-wrong-shape", "megashear",
         lambda p, t: ms(t, "train", "--data.synthetic=true", f"--checkpoint.load={p.ckpt}",
                         "--model.num_layers=2"),
         "--model.num_layers=2 contradicts checkpoint {p.ckpt} (num_layers 4)"),
    Case("train-load-truncated-distcp", "megashear",
         lambda p, t: ms(t, "train", "--data.synthetic=true", f"--checkpoint.load={t}/src",
                         f"--checkpoint.save={t}/ckpt"),
         "{t}/src/iter_0000000/{p.distcp} is truncated", outputs=("ckpt",),
         prep=lambda p, t: bad_ckpt(p, t, lambda c: truncate(c / p.distcp))),
    Case("train-load-garbage-meta", "megashear",
         lambda p, t: ms(t, "train", "--data.synthetic=true", f"--checkpoint.load={t}/src"),
         "{t}/src/iter_0000000/megashear.json is not valid JSON",
         prep=lambda p, t: bad_ckpt(p, t, lambda c: garbage(c / "megashear.json"))),
    Case("train-load-bad-tracker", "megashear",
         lambda p, t: ms(t, "train", "--data.synthetic=true", f"--checkpoint.load={t}/src"),
         "does not hold an iteration number: 'last'",
         prep=lambda p, t: bad_ckpt(
             p, t, lambda c: write(c.parent / "latest_checkpointed_iteration.txt", "last"))),
]  # fmt: skip

PRUNE = [
    Case("prune-target-larger-than-source", "megashear",
         lambda p, t: ms(t, "prune", *SYN, "--pruning.target_hidden_size=128"),
         "target hidden size 128 is larger than the source's 64"),
    Case("prune-no-target", "megashear", lambda p, t: ms(t, "prune", *SYN), "no pruning target"),
    Case("prune-unknown-target-preset", "megashear",
         lambda p, t: ms(t, "prune", *SYN, "--pruning.target=tiny-9"),
         "unknown target preset 'tiny-9'"),
    Case("prune-more-groups-than-source", "megashear",
         lambda p, t: ms(t, "prune", *SYN, "--pruning.target_num_query_groups=3",
                         "--pruning.target_num_attention_heads=3"),
         "target query groups 3 is larger than the source's 2"),
    Case("prune-bad-mask-kind", "megashear",
         lambda p, t: ms(t, "prune", *SYN, "--pruning.target_num_layers=2",
                         "--pruning.kinds=[head,neuron]"),
         "config key 'pruning.kinds[1]': expected one of"),
    Case("prune-sequence-parallel-without-tp", "megashear",
         lambda p, t: ms(t, "prune", *SYN, "--pruning.target_num_layers=2",
                         "--parallel.sequence_parallel=true"),
         "config key 'parallel.sequence_parallel': needs parallel.tp >= 2"),
    Case("prune-nan-mask-lr", "megashear",
         lambda p, t: ms(t, "prune", *SYN, "--pruning.target_num_layers=2",
                         "--pruning.lr_log_alpha=.nan"),
         "config key 'pruning.lr_log_alpha': must be a finite number above 0"),
]  # fmt: skip

FINALIZE = [
    Case("finalize-no-save", "megashear",
         lambda p, t: ms(t, "finalize", f"--checkpoint.load={p.ckpt}"),
         "finalize needs checkpoint.load (pruning run) and checkpoint.save"),
    Case("finalize-load-missing", "megashear",
         lambda p, t: ms(t, "finalize", f"--checkpoint.load={t}/none",
                         f"--checkpoint.save={t}/out"),
         "no checkpoint found", outputs=("out",)),
    Case("finalize-not-a-pruning-checkpoint", "megashear",
         lambda p, t: ms(t, "finalize", f"--checkpoint.load={p.ckpt}",
                         f"--checkpoint.save={t}/out"),
         "is not a pruning checkpoint", outputs=("out",)),
    Case("finalize-output-exists", "megashear",
         lambda p, t: ms(t, "finalize", f"--checkpoint.load={p.ckpt}",
                         f"--checkpoint.save={t}/out"),
         "output {t}/out exists (pass --overwrite to replace it)", kept=("out",),
         prep=lambda p, t: (t / "out").mkdir()),
]  # fmt: skip

DISK = [
    Case("finalize-full-disk", "megashear",
         lambda p, t: ms(t, "finalize", f"--checkpoint.load={p.pruning}",
                         f"--checkpoint.save={t}/disk/out"),
         "cannot write {t}/disk/out: No space left on device", outputs=("disk/out",),
         disk="full"),
    Case("finalize-read-only-disk", "megashear",
         lambda p, t: ms(t, "finalize", f"--checkpoint.load={p.pruning}",
                         f"--checkpoint.save={t}/disk/out"),
         "cannot write {t}/disk/out: Read-only file system", outputs=("disk/out",),
         disk="read-only"),
    Case("train-save-full-disk", "megashear",
         lambda p, t: ms(t, "train", *SYN, "--train.train_iters=1",
                         f"--checkpoint.save={t}/disk/ck"),
         "cannot write {t}/disk/ck/iter_0000001: No space left on device",
         outputs=("disk/ck",), disk="full"),
    Case("train-log-read-only-disk", "megashear",
         lambda p, t: ["train", *SYN, "--train.train_iters=1", f"--logging.dir={t}/disk/log"],
         "cannot write {t}/disk/log: Read-only file system", outputs=("disk/log",),
         disk="read-only", code=1),
    Case("convert-full-disk", "convert",
         lambda p, t: ["hf-to-megatron", "--load", str(p.hf), "--save", str(t / "disk" / "out")],
         "cannot write {t}/disk/out: No space left on device", outputs=("disk/out",),
         disk="full"),
    Case("convert-read-only-disk", "convert",
         lambda p, t: ["megatron-to-hf", "--load", str(p.ckpt), "--save", str(t / "disk" / "out")],
         "cannot write {t}/disk/out: Read-only file system", outputs=("disk/out",),
         disk="read-only"),
]  # fmt: skip

EVALUATE = [
    Case("evaluate-no-manifest", "megashear",
         lambda p, t: ms(t, "evaluate", f"--checkpoint.load={p.ckpt300}"),
         "evaluate needs checkpoint.load and data.manifest"),
    Case("evaluate-tokenizer-vocab-mismatch", "megashear",
         lambda p, t: ms(t, "evaluate", f"--checkpoint.load={p.ckpt}", man(p, t)),
         "tokenizer/model mismatch"),
    Case("evaluate-no-test-split", "megashear",
         lambda p, t: ms(t, "evaluate", f"--checkpoint.load={p.ckpt300}", man(p, t),
                         "--data.eval_split=test", "--model.seq_length=8"),
         "has no test split"),
    Case("evaluate-write-reference-of-test-split", "megashear",
         lambda p, t: ms(t, "evaluate", f"--checkpoint.load={p.ckpt300}", man(p, t),
                         "--data.eval_split=test", "--data.write_reference=true"),
         "data.write_reference needs data.eval_split=valid"),
    Case("evaluate-bad-split-choice", "megashear",
         lambda p, t: ms(t, "evaluate", f"--checkpoint.load={p.ckpt300}", man(p, t),
                         "--data.eval_split=train"),
         "config key 'data.eval_split'"),
    Case("evaluate-truncated-distcp", "megashear",
         lambda p, t: ms(t, "evaluate", f"--checkpoint.load={t}/src", man(p, t),
                         "--model.seq_length=8"),
         "{t}/src/iter_0000000/{p.distcp} is truncated",
         prep=lambda p, t: bad_ckpt(p, t, lambda c: truncate(c / p.distcp), "ckpt300")),
]  # fmt: skip


def conv(mode: str, load, t: Path, *args: str) -> list[str]:
    return [mode, "--load", str(load), "--save", str(t / "out"), *args]


CONVERT = [
    Case("convert-load-missing", "convert",
         lambda p, t: conv("hf-to-megatron", t / "none", t), "--load {t}/none does not exist",
         outputs=("out",)),
    Case("convert-hf-garbage-config", "convert",
         lambda p, t: conv("hf-to-megatron", t / "hf", t), "{t}/hf/config.json is not valid JSON",
         outputs=("out",), prep=lambda p, t: garbage(copy(p.hf, t / "hf") / "config.json")),
    Case("convert-hf-truncated-safetensors", "convert",
         lambda p, t: conv("hf-to-megatron", t / "hf", t), "{t}/hf/model.safetensors is truncated",
         outputs=("out",),
         prep=lambda p, t: truncate(copy(p.hf, t / "hf") / "model.safetensors")),
    Case("convert-hf-garbage-bin", "convert",
         lambda p, t: conv("hf-to-megatron", t / "hf", t),
         "{t}/hf/pytorch_model.bin is not a readable PyTorch state dict", outputs=("out",),
         prep=lambda p, t: hf_bin(p, t, garbage)),
    Case("convert-hf-truncated-bin", "convert",
         lambda p, t: conv("hf-to-megatron", t / "hf", t),
         "{t}/hf/pytorch_model.bin is not a readable PyTorch state dict", outputs=("out",),
         prep=lambda p, t: hf_bin(p, t, truncate)),
    Case("convert-meta-garbage-shard", "convert",
         lambda p, t: conv("meta-to-megatron", t / "meta", t),
         "{t}/meta/consolidated.00.pth is not a readable PyTorch state dict", outputs=("out",),
         prep=lambda p, t: meta_dir(t)),
    Case("convert-hf-tp-does-not-divide", "convert",
         lambda p, t: conv("hf-to-megatron", p.hf, t, "--tp", "3"),
         "num_attention_heads=4 is not divisible by tensor parallel size 3", outputs=("out",)),
    Case("convert-negative-tp", "convert",
         lambda p, t: conv("reshard", p.ckpt, t, "--tp", "-2"),
         "tp and pp must be >= 1, got tp=-2", outputs=("out",)),
    Case("convert-output-exists", "convert",
         lambda p, t: conv("hf-to-megatron", p.hf, t),
         "output {t}/out exists (pass --overwrite to replace it)", kept=("out",),
         prep=lambda p, t: write(t / "out", "keep me")),
    Case("convert-bad-dtype", "convert", lambda p, t: conv("reshard", p.ckpt, t, "--dtype", "fp8"),
         "invalid choice: 'fp8'", outputs=("out",)),
    Case("convert-save-overlaps-load", "convert",
         lambda p, t: ["reshard", "--load", str(t / "src"), "--save", str(t / "src" / "sub"),
                       "--overwrite"],
         "overlaps --load", kept=("src",), prep=lambda p, t: copy(p.ckpt, t / "src")),
    Case("convert-meta-no-params", "convert",
         lambda p, t: conv("meta-to-megatron", t / "meta", t),
         "{t}/meta/params.json does not exist", outputs=("out",),
         prep=lambda p, t: (t / "meta").mkdir()),
    Case("to-hf-tokenizer-garbage", "convert",
         lambda p, t: conv("megatron-to-hf", p.ckpt, t, "--tokenizer", str(t / "tok.model")),
         "tokenizer {t}/tok.model is neither a sentencepiece model nor a tokenizer.json",
         outputs=("out",), prep=lambda p, t: garbage(t / "tok.model")),
    Case("to-hf-tokenizer-garbage-json", "convert",
         lambda p, t: conv("megatron-to-hf", p.ckpt, t, "--tokenizer", str(t / "tokenizer.json")),
         "tokenizer {t}/tokenizer.json is not a readable tokenizer.json", outputs=("out",),
         prep=lambda p, t: write(t / "tokenizer.json", '{"model": {"type": "BPE", "vocab": 3}}')),
    Case("to-hf-tokenizer-vocab-mismatch", "convert",
         lambda p, t: conv("megatron-to-hf", p.ckpt, t, "--tokenizer", str(p.tok)),
         "has 300 tokens, the model's vocab_size is 256 (tokenizer/model mismatch)",
         outputs=("out",)),
    Case("to-hf-truncated-distcp", "convert",
         lambda p, t: conv("megatron-to-hf", t / "src", t),
         "{t}/src/iter_0000000/{p.distcp} is truncated", outputs=("out",), subprocess=True,
         prep=lambda p, t: bad_ckpt(p, t, lambda c: truncate(c / p.distcp))),
    Case("reshard-truncated-distcp", "convert",
         lambda p, t: conv("reshard", t / "src", t, "--tp", "2"),
         "{t}/src/iter_0000000/{p.distcp} is truncated", outputs=("out",),
         prep=lambda p, t: bad_ckpt(p, t, lambda c: truncate(c / p.distcp))),
    Case("reshard-truncated-metadata", "convert",
         lambda p, t: conv("reshard", t / "src", t), "{t}/src/iter_0000000/.metadata is unreadable",
         outputs=("out",), prep=lambda p, t: bad_ckpt(p, t, lambda c: truncate(c / ".metadata"))),
]  # fmt: skip


def prep_args(p, t: Path, *args: str, inp=None) -> list[str]:
    return ["--input", str(inp or p.corpus), "--tokenizer", str(p.tok), "--output-dir",
            str(t / "out"), "--valid-tokens-per-domain", "50", "--workers", "1", *args]  # fmt: skip


def malformed(t: Path) -> None:
    with open(t / "gamma.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"document {i}"}) + "\n" if i % 2 else "{not json\n")


PREPROCESS = [
    Case("preprocess-input-missing", "preprocess",
         lambda p, t: prep_args(p, t, inp=t / "none.jsonl"), "input {t}/none.jsonl does not exist",
         outputs=("out",)),
    Case("preprocess-tokenizer-missing", "preprocess",
         lambda p, t: [*prep_args(p, t), "--tokenizer", str(t / "none.model")],
         "tokenizer {t}/none.model does not exist", outputs=("out",)),
    Case("preprocess-tokenizer-garbage", "preprocess",
         lambda p, t: [*prep_args(p, t), "--tokenizer", str(t / "tok.model")],
         "tokenizer {t}/tok.model is neither a sentencepiece model nor a tokenizer.json",
         outputs=("out",), prep=lambda p, t: garbage(t / "tok.model")),
    Case("preprocess-weights-unknown-domain", "preprocess",
         lambda p, t: prep_args(p, t, "--weights", "gamma=1"), "--weights names unknown domains",
         outputs=("out",)),
    Case("preprocess-weights-nan", "preprocess",
         lambda p, t: prep_args(p, t, "--weights", "alpha=nan"),
         "--weights 'alpha=nan': a weight must be a finite number >= 0", outputs=("out",)),
    Case("preprocess-negative-valid-tokens", "preprocess",
         lambda p, t: prep_args(p, t, "--valid-tokens-per-domain", "-5"),
         "--valid-tokens-per-domain must be 0 or more, got -5", outputs=("out",)),
    Case("preprocess-zero-workers", "preprocess", lambda p, t: prep_args(p, t, "--workers", "0"),
         "--workers must be at least 1, got 0", outputs=("out",)),
    Case("preprocess-nan-bad-fraction", "preprocess",
         lambda p, t: prep_args(p, t, "--max-bad-fraction", "nan"),
         "--max-bad-fraction must be a fraction in [0, 1], got nan", outputs=("out",)),
    Case("preprocess-too-many-malformed-lines", "preprocess",
         lambda p, t: prep_args(p, t, "--valid-tokens-per-domain", "5", inp=t / "gamma.jsonl"),
         "too many malformed lines in gamma (10/20 malformed", outputs=("out",), code=1,
         prep=lambda p, t: malformed(t), subprocess=True),
    Case("preprocess-no-training-tokens", "preprocess",
         lambda p, t: prep_args(p, t, "--valid-tokens-per-domain", "100000000"),
         "no training tokens in alpha, beta", outputs=("out",), code=1),
    Case("preprocess-output-dir-is-a-file", "preprocess", lambda p, t: prep_args(p, t),
         "--output-dir {t}/out exists and is not a directory", kept=("out",),
         prep=lambda p, t: write(t / "out", "a file")),
]  # fmt: skip

FIT = [
    Case("fit-points-missing", "fit", lambda p, t: [str(t / "none.json"), "--target-params", "1e9"],
         "{t}/none.json does not exist"),
    Case("fit-points-not-json", "fit", lambda p, t: [str(t / "p.json"), "--target-params", "1e9"],
         "{t}/p.json is not valid JSON", prep=lambda p, t: write(t / "p.json", "{alpha: [1, 2")),
    Case("fit-points-wrong-structure", "fit",
         lambda p, t: [str(t / "p.json"), "--target-params", "1e9"],
         "domain alpha: expected a list of [params, loss] pairs, got 5",
         prep=lambda p, t: write(t / "p.json", '{"alpha": 5}')),
    Case("fit-two-points", "fit", lambda p, t: [str(t / "p.json"), "--target-params", "1e9"],
         "domain alpha: a scaling fit needs at least 3",
         prep=lambda p, t: write(t / "p.json", '{"alpha": [[1e8, 3.0], [1e9, 2.0]]}')),
    Case("fit-nan-loss", "fit", lambda p, t: [str(t / "p.json"), "--target-params", "1e9"],
         "domain alpha: [1000000000.0, nan] is not a [params, loss] pair",
         prep=lambda p, t: write(t / "p.json",
                                           '{"alpha": [[1e8, 3.0], [1e9, NaN], [7e9, 2.0]]}')),
    Case("fit-nan-target-params", "fit", lambda p, t: [str(p.points), "--target-params", "nan"],
         "--target-params must be a positive parameter count"),
    Case("fit-unknown-target-preset", "fit",
         lambda p, t: [str(p.points), "--target-preset", "sheared-9b"],
         "unknown target preset 'sheared-9b'"),
    Case("fit-manifest-missing", "fit",
         lambda p, t: [str(p.points), "--target-params", "1e9", "--write-manifest",
                       str(t / "m.yaml")],
         "manifest {t}/m.yaml does not exist", outputs=("m.yaml",)),
    Case("fit-manifest-unknown-domain", "fit",
         lambda p, t: [str(t / "p.json"), "--target-params", "1e9", "--write-manifest",
                       str(t / "data" / "manifest.yaml")],
         "reference losses for unknown domains ['gamma']", kept=("data",),
         prep=lambda p, t: (copy(p.data, t / "data"),
                            write(t / "p.json", json.dumps({"gamma": json.loads(
                                p.points.read_text())["alpha"]})))),
]  # fmt: skip


def cut(p, t: Path, *args: str, load=None) -> list[str]:
    return ["--load", str(load or p.ckpt), "--save", str(t / "out"), *args]


ONE_SHOT = [
    Case("one-shot-load-missing", "one_shot", lambda p, t: cut(p, t, load=t / "none"),
         "--load {t}/none does not exist", outputs=("out",)),
    Case("one-shot-target-larger", "one_shot",
         lambda p, t: cut(p, t, "--target-hidden-size", "128"),
         "target hidden size 128 is larger than the source's 64", outputs=("out",)),
    Case("one-shot-negative-target", "one_shot",
         lambda p, t: cut(p, t, "--target-num-layers", "-1"),
         "target layers must be positive, got -1", outputs=("out",)),
    Case("one-shot-bad-groups", "one_shot",
         lambda p, t: cut(p, t, "--target-num-query-groups", "3"),
         "target query groups 3 is larger than the source's 2", outputs=("out",)),
    Case("one-shot-output-exists", "one_shot",
         lambda p, t: cut(p, t, "--target-num-layers", "2"),
         "output {t}/out exists (pass --overwrite to replace it)", kept=("out",),
         prep=lambda p, t: (t / "out").mkdir()),
    Case("one-shot-truncated-distcp", "one_shot",
         lambda p, t: cut(p, t, "--target-num-layers", "2", load=t / "src"),
         "{t}/src/iter_0000000/{p.distcp} is truncated", outputs=("out",),
         prep=lambda p, t: bad_ckpt(p, t, lambda c: truncate(c / p.distcp))),
    Case("one-shot-bad-meta", "one_shot",
         lambda p, t: cut(p, t, "--target-num-layers", "2", load=t / "src"),
         "{t}/src/iter_0000000/megashear.json is not valid JSON", outputs=("out",),
         prep=lambda p, t: bad_ckpt(p, t, lambda c: write(c / "megashear.json", "[1, 2"))),
]  # fmt: skip


def tok_args(p, t: Path, *args: str, inp=None) -> list[str]:
    return ["--input", str(inp or p.corpus), "--output-prefix", str(t / "out" / "tok"), *args]


TOKENIZER = [
    Case("tokenizer-input-missing", "tokenizer", lambda p, t: tok_args(p, t, inp=t / "no.jsonl"),
         "input {t}/no.jsonl does not exist", outputs=("out",)),
    Case("tokenizer-vocab-too-small", "tokenizer",
         lambda p, t: tok_args(p, t, "--vocab-size", "10"),
         "Vocabulary size is smaller than required_chars", outputs=("out",)),
    Case("tokenizer-negative-vocab", "tokenizer",
         lambda p, t: tok_args(p, t, "--vocab-size", "-1"), "--vocab-size must be at least 1",
         outputs=("out",)),
    Case("tokenizer-no-text", "tokenizer",
         lambda p, t: tok_args(p, t, inp=t / "bad.jsonl"), "no text to train on in {t}/bad.jsonl",
         outputs=("out",),
         prep=lambda p, t: write(t / "bad.jsonl", "{not json\n[1, 2]\n")),
]  # fmt: skip

CASES = (
    TRAIN + PRUNE + FINALIZE + DISK + EVALUATE + CONVERT + PREPROCESS + FIT + ONE_SHOT + TOKENIZER
)


def shown_logs(kind: str, records: list[logging.LogRecord]) -> str:
    """The log records a user of a real run would see, formatted. ``megashear`` logs INFO and
    up to stderr (``logging.basicConfig``). The tools configure no logging: a WARNING or worse
    reaches stderr through logging's last-resort handler, unless a handler of the record's own
    logger chain (a library's NullHandler) takes it."""
    level = logging.INFO if kind == "megashear" else logging.WARNING
    shown = []
    for r in records:
        if r.levelno < level or (kind != "megashear" and _handled(r.name)):
            continue
        if kind == "megashear" and not _propagates(r.name):
            continue  # e.g. torch's DCP event logger: a NullHandler and propagate=False
        shown.append(logging.Formatter().format(r))
    return "\n".join(shown)


def _propagates(name: str) -> bool:
    """Whether records of logger ``name`` reach stderr in a real run: through the root logger's
    handler, or a stream handler of its own (pytest's capture handlers do not count)."""
    logger = logging.getLogger(name)
    while logger is not None and logger is not logging.root:
        if not logger.propagate:
            return any(
                isinstance(h, logging.StreamHandler) and type(h).__name__ != "LogCaptureHandler"
                for h in logger.handlers
            )
        logger = logger.parent
    return True


def _handled(name: str) -> bool:
    logger = logging.getLogger(name)
    while logger is not None and logger is not logging.root:
        if logger.handlers:
            return True
        if not logger.propagate:
            return True
        logger = logger.parent
    return False


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() if f.is_file() else b"/"
            for f in sorted(path.rglob("*"))}  # fmt: skip


def test_the_table_covers_every_entry_point(tmp_path):
    names = ("corpus", "tok", "data", "manifest", "ckpt", "ckpt300", "pruning", "hf", "points")
    fake = SimpleNamespace(**dict.fromkeys(names, tmp_path), distcp="x.distcp")
    commands = {
        (c.kind, c.argv(fake, tmp_path)[0]) for c in CASES if c.kind in ("megashear", "convert")
    }
    assert commands == {
        *(("megashear", c) for c in ("train", "prune", "finalize", "evaluate")),
        *(
            ("convert", m)
            for m in ("hf-to-megatron", "meta-to-megatron", "megatron-to-hf", "reshard")
        ),
    }
    assert {c.kind for c in CASES} == {"megashear", *TOOLS}
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@contextlib.contextmanager
def mounted_disk(path: Path, kind: str | None):
    """A 64 KiB tmpfs at ``path``, read-only or to be filled up (``kind``); nothing if None.
    Mounting needs CAP_SYS_ADMIN (root on this project's machines); without it the case is
    skipped, and says so."""
    if kind is None:
        yield
        return
    path.mkdir()
    opts = "size=64k" + (",ro" if kind == "read-only" else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, inputs, tmp_path, capfd, caplog):
    t = tmp_path / "case"
    t.mkdir()
    with mounted_disk(t / "disk", case.disk):
        _check_bad_input(case, inputs, t, capfd, caplog)


def _check_bad_input(case: Case, inputs, t: Path, capfd, caplog) -> None:
    if case.prep is not None:
        case.prep(inputs, t)
    outputs = (*case.outputs, *(("log",) if case.kind == "megashear" else ()))
    for name in outputs:
        assert not (t / name).exists(), f"{name} exists before the run"
    before = {name: snapshot(t / name) for name in case.kept}
    argv = case.argv(inputs, t)
    if case.subprocess:
        proc = spawn(case.kind, argv)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code = call(case.kind, argv)
        out, err = capfd.readouterr()
    err_lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in err_lines if line.startswith("error:")]
    assert code == case.code, (code, err[-3000:])
    assert len(errors) == 1 and err_lines[-1] == errors[0], err[-3000:]
    assert case.message.format(p=inputs, t=t) in errors[0], errors[0]
    logs = shown_logs(case.kind, caplog.records)
    assert "Traceback" not in out + err + logs, (out + err + logs)[-3000:]
    for name in outputs:
        assert not (t / name).exists(), f"{name} was left behind: {sorted(os.listdir(t))}"
    for name in case.kept:
        assert snapshot(t / name) == before[name], f"{name} was changed"
    leftovers = [str(f.relative_to(t)) for f in t.rglob("*") if ".tmp" in f.name]
    assert not leftovers, leftovers
