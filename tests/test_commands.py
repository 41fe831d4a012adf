"""``megashear convert``, ``preprocess`` and ``fit-reference``: the installed commands that the
tools ``convert_checkpoint.py``, ``preprocess_data.py`` and ``fit_reference_loss.py`` are thin
aliases of.

- ``megashear --help`` lists them and each one's ``--help`` documents every field of its config;
- a tool under its old flags and the command under its own give the same result;
- bad input is one ``error:`` line (exit code 2), naming the flag as the caller spelled it;
- the HF export writes a model card of what the checkpoint records, and nothing else.

Everything runs in this process (``megashear.cli.main``, each tool's ``main``) on tiny inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import typing
from pathlib import Path

import pytest

from megashear import config_io

ROOT = Path(__file__).resolve().parents[1]
NEW_COMMANDS = ("convert", "preprocess", "fit-reference")


@functools.cache
def tool(name: str):
    """``tools/NAME.py`` as a module."""
    spec = importlib.util.spec_from_file_location(
        f"megashear_tool_{name}", ROOT / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(entry, argv: list[str]) -> int:
    """Run ``entry(argv)`` (``megashear.cli.main`` or a tool's ``main``) in this process; its
    exit code (argparse's SystemExit included). The environment is restored afterwards
    (``init_distributed`` sets ``RANK``, ``MASTER_PORT`` ... for a world of one)."""
    saved = dict(os.environ)
    try:
        return entry(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)


def megashear(argv: list[str]) -> int:
    from megashear.cli import main

    return call(main, argv)


def one_error(capfd) -> tuple[str, str]:
    """(stdout, the single ``error:`` line, which must be the last line of stderr)."""
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    assert "Traceback" not in out + err
    return out, errors[0]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- --help


def test_megashear_help_lists_the_commands(capsys):
    assert megashear(["--help"]) == 0
    out = capsys.readouterr().out
    for name in NEW_COMMANDS:
        assert f"    {name} " in out or f"    {name}\n" in out, out


@pytest.mark.parametrize("name", NEW_COMMANDS)
def test_each_command_help_documents_every_field(name, capsys):
    from megashear.cli import COMMANDS

    command = COMMANDS[name]
    assert megashear([name, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    keys = config_io.leaf_keys(command.config)
    assert keys
    for key, _ in keys:
        owner = command.config
        *sections, field = key.split(".")
        for section in sections:
            owner = typing.get_type_hints(owner)[section]
        doc = config_io.field_docs(owner).get(field)
        assert doc, f"{name}: field {key} has no docstring"
        assert f"--{key}" in help_text
        assert doc[:40] in help_text, (key, doc)


# ---------------------------------------------------------------------------------- convert


def _checkpoint(path: Path, extra_meta: dict | None = None, iteration: int | None = None) -> None:
    """A tiny-gqa checkpoint of random weights; ``extra_meta`` added to its megashear.json,
    ``iteration`` recorded there as if a run had saved it at that step."""
    import torch

    from megashear.checkpoint.dist_stream import full_shapes, write_checkpoint
    from megashear.checkpoint.format import read_meta, resolve, write_meta
    from megashear.model_config import get_preset

    cfg = get_preset("tiny-gqa")
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=gen) * 0.02 for k, s in full_shapes(cfg).items()}
    write_checkpoint(str(path), cfg, weights.__getitem__, torch.float32, progress=False,
                     extra_meta=extra_meta)  # fmt: skip
    if iteration is not None:
        ckpt = resolve(str(path))
        meta = read_meta(ckpt)
        write_meta(ckpt, {**meta, "iteration": iteration})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ck"
    _checkpoint(path)
    return path


def test_convert_tool_flags_and_command_flags_agree(ckpt, tmp_path, capfd):
    """The same reshard through the tool (``reshard --tp 2``) and the command
    (``--direction=reshard --parallel.tp=2``): the same result and the same megashear.json."""
    from megashear.checkpoint.format import read_meta, resolve

    old = tool("convert_checkpoint").main
    assert (
        call(old, ["reshard", "--load", str(ckpt), "--save", str(tmp_path / "a"), "--tp", "2"]) == 0
    )
    by_tool = last_json(capfd.readouterr().out)
    argv = ["convert", "--direction=reshard", f"--load={ckpt}", f"--save={tmp_path / 'b'}",
            "--parallel.tp=2"]  # fmt: skip
    assert megashear(argv) == 0
    by_command = last_json(capfd.readouterr().out)
    assert {**by_tool, "saved": None} == {**by_command, "saved": None}
    assert by_command["tp"] == 2
    meta_a, meta_b = (read_meta(resolve(str(tmp_path / n))) for n in "ab")
    assert meta_a == meta_b and meta_a["layout"]["tp"] == 2
    # the positional word and the bare --overwrite of the tool still work
    again = ["reshard", "--load", str(ckpt), "--save", str(tmp_path / "a"), "--overwrite"]
    assert call(old, again) == 0


def test_convert_takes_the_direction_as_a_word(ckpt, tmp_path, capfd):
    """``megashear convert reshard ...`` is ``megashear convert --direction=reshard ...``."""
    from megashear.checkpoint.format import read_meta, resolve

    word = ["convert", "reshard", f"--load={ckpt}", f"--save={tmp_path / 'w'}", "--parallel.tp=2"]
    flag = ["convert", f"--load={ckpt}", f"--save={tmp_path / 'f'}", "--parallel.tp=2",
            "--direction=reshard"]  # fmt: skip
    both = ["convert", "reshard", "--direction=reshard", f"--load={ckpt}",
            f"--save={tmp_path / 'b'}", "--parallel.tp=2"]  # fmt: skip
    results = []
    for argv in (word, flag, both):
        assert megashear(argv) == 0
        results.append({**last_json(capfd.readouterr().out), "saved": None})
    assert results[0] == results[1] == results[2] and results[0]["tp"] == 2
    metas = [read_meta(resolve(str(tmp_path / n))) for n in "wfb"]
    assert metas[0] == metas[1] == metas[2]


def test_plan_takes_prunes_target_flags(capfd):
    """``megashear plan`` takes ``--pruning.target*`` / ``--pruning.kinds`` as prune spells them,
    and its own ``--target*`` still."""
    common = ["plan", "--source=llama2-7b", "--gpus=8"]
    prune_spelling = ["--pruning.target=sheared-llama-1.3b", "--pruning.target_num_layers=20",
                      "--pruning.kinds=[head,hidden,intermediate,layer]"]  # fmt: skip
    plan_spelling = ["--target=sheared-llama-1.3b", "--target_num_layers=20",
                     "--kinds=[head,hidden,intermediate,layer]"]  # fmt: skip
    outs = []
    for flags in (prune_spelling, plan_spelling):
        assert megashear([*common, *flags]) == 0
        outs.append(last_json(capfd.readouterr().out))
    assert outs[0] == outs[1] and outs[0]["target"]["num_layers"] == 20


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "--load=X", "--save=Y"], "convert needs a direction: megashear convert"),
        (["convert", "--direction=sideways"], "config key 'direction': expected one of"),
        (["convert", "sideways", "--load=X"], "config key 'direction': expected one of"),
        (["convert", "reshard", "--direction=hf-to-megatron"],
         "reshard and --direction=hf-to-megatron disagree"),
        (["convert", "--direction=reshard", "--load={ckpt}", "--save={t}/o", "--tokenizer=t"],
         "tokenizer applies to megatron-to-hf only"),
        (["convert", "--direction=megatron-to-hf", "--load={ckpt}", "--save={t}/o",
          "--parallel.tp=2"], "parallel.tp and parallel.pp do not apply to megatron-to-hf"),
        (["convert", "--direction=hf-to-megatron", "--load={t}/none", "--save={t}/o"],
         "--load {t}/none does not exist"),
        (["convert", "--direction=reshard", "--load={ckpt}", "--save={t}/o", "--parallel.tp=3"],
         "is not divisible by tensor parallel size 3"),
        (["convert", "--direction=megatron-to-hf", "--load={ckpt}", "--save={t}/o",
          "--losses={t}/none.json"], "losses {t}/none.json does not exist"),
        (["convert", "--direction=reshard", "--load={ckpt}", "--save={t}/o", "--dtype=fp8"],
         "config key 'dtype': expected one of fp32, bf16, fp16"),
    ],
)  # fmt: skip
def test_convert_bad_input_is_one_line(argv, message, ckpt, tmp_path, capfd):
    argv = [a.format(ckpt=ckpt, t=tmp_path) for a in argv]
    assert megashear(argv) == 2
    _, error = one_error(capfd)
    assert message.format(t=tmp_path) in error, error
    assert not (tmp_path / "o").exists()


def test_convert_tool_refuses_a_flag_the_direction_does_not_take(ckpt, tmp_path, capfd):
    """An old-tool flag of another direction is argparse's one line, exit 2."""
    old = tool("convert_checkpoint").main
    argv = ["megatron-to-hf", "--load", str(ckpt), "--save", str(tmp_path / "o"), "--tp", "2"]
    assert call(old, argv) == 2
    _, error = one_error(capfd)
    assert "--tp" in error


# ------------------------------------------------------------------------------ model card


def _card(path: Path) -> str:
    return (path / "README.md").read_text(encoding="utf-8")


def test_model_card_says_what_the_checkpoint_records(tmp_path, capfd):
    from megashear.model_config import get_preset

    source = get_preset("tiny-mha")
    one_shot = {
        "method": "importance",
        "source": "/runs/source-ckpt",
        "importance": "/runs/source-ckpt/importance.pt",
        "source_model": source.to_dict(),
    }
    distill = {"teacher": "/runs/teacher", "fingerprint": "abc", "alpha": 0.5, "temperature": 2.0,
               "top_k": None}  # fmt: skip
    ck = tmp_path / "ck"
    _checkpoint(ck, {"one_shot": one_shot, "distill": distill}, iteration=7)
    (tmp_path / "l.json").write_text(json.dumps({"web": 3.25, "code": 2.5}))
    (tmp_path / "s.json").write_text(json.dumps({"web": 3.0, "code": 2.25}))
    out = tmp_path / "my-model"
    argv = ["convert", "--direction=megatron-to-hf", f"--load={ck}", f"--save={out}",
            f"--losses={tmp_path / 'l.json'}",
            f"--source_losses={tmp_path / 's.json'}"]  # fmt: skip
    assert megashear(argv) == 0
    result = last_json(capfd.readouterr().out)
    card = _card(out)
    model = get_preset("tiny-gqa")
    assert result["parameters"] == model.num_parameters()
    assert card.startswith("---\n") and "# my-model" in card
    # the shape, beside the recorded source's, with both parameter counts
    assert f"{model.num_parameters():,}" in card and f"{source.num_parameters():,}" in card
    assert f"| key/value heads | {model.num_query_groups} | {source.num_query_groups} |" in card
    # the recipe: the one-shot cut, the teacher, the step
    assert "One-shot cut" in card and "`importance`" in card and "/runs/source-ckpt" in card
    assert "/runs/teacher" in card and "alpha 0.5" in card and "temperature 2.0" in card
    assert "step 7" in card
    # the losses beside the source's
    assert "| web | 3.2500 | 3.0000 | +0.2500 |" in card
    assert "| code | 2.5000 | 2.2500 | +0.2500 |" in card
    # the command line that made it, in the command's own spelling
    assert f"megashear convert megatron-to-hf --load={ck} --save={out}" in card


def test_model_card_of_a_bare_checkpoint_claims_nothing(ckpt, tmp_path, capfd):
    """A converted (or finalised) checkpoint records no recipe: the card says so and has no
    source column, no loss section and no 'pruned' tag; the tool writes the same card."""
    out = tmp_path / "hf"
    old = tool("convert_checkpoint").main
    assert call(old, ["megatron-to-hf", "--load", str(ckpt), "--save", str(out)]) == 0
    card = _card(out)
    assert "records no one-shot cut, distillation or training steps" in card
    for absent in ("pruned", "| source |", "Validation loss", "teacher", "One-shot"):
        assert absent not in card, absent
    assert "megashear convert megatron-to-hf" in card


def test_reshard_keeps_the_records(tmp_path, capfd):
    from megashear.checkpoint.format import read_meta, resolve

    record = {"method": "leading", "source": "/src", "source_model": {}}
    _checkpoint(tmp_path / "ck", {"one_shot": record})
    argv = ["convert", "--direction=reshard", f"--load={tmp_path / 'ck'}",
            f"--save={tmp_path / 'r'}"]  # fmt: skip
    assert megashear(argv) == 0
    assert read_meta(resolve(str(tmp_path / "r")))["one_shot"] == record


# ------------------------------------------------------------------------------- preprocess


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from tests.tiny_tokenizer import save_tiny_bpe

    d = tmp_path_factory.mktemp("corpus")
    save_tiny_bpe(d / "tok", 300, ["<eos>"])
    for name, word in (("alpha", "cats and dogs"), ("beta", "rivers and hills")):
        with open(d / f"{name}.jsonl", "w") as f:
            for i in range(40):
                f.write(json.dumps({"text": f"{word} {i} " * 5}) + "\n")
    return d


def test_preprocess_command_and_tool_agree(corpus, tmp_path, capfd):
    from megashear.data.manifest import load_manifest

    inputs = [str(corpus / "alpha.jsonl"), str(corpus / "beta.jsonl")]
    argv = ["preprocess", f"--input=[{','.join(inputs)}]", f"--tokenizer={corpus / 'tok'}",
            f"--output_dir={tmp_path / 'a'}", "--valid_tokens_per_domain=50", "--workers=1",
            "--weights={alpha: 3, beta: 1}"]  # fmt: skip
    assert megashear(argv) == 0
    result = last_json(capfd.readouterr().out)
    assert result["manifest"] == str(tmp_path / "a" / "manifest.yaml")
    assert set(result["domains"]) == {"alpha", "beta"}
    old = ["--input", *inputs, "--tokenizer", str(corpus / "tok"), "--output-dir",
           str(tmp_path / "b"), "--valid-tokens-per-domain", "50", "--workers", "1",
           "--weights", "alpha=3,beta=1"]  # fmt: skip
    assert call(tool("preprocess_data").main, old) == 0
    out = capfd.readouterr().out
    assert out.strip().splitlines()[-1] == str(tmp_path / "b" / "manifest.yaml")
    stats = result["domains"]["alpha"]
    assert f"alpha: {stats['documents']} documents, {stats['train_tokens']} train" in out
    a, b = (load_manifest(str(tmp_path / n / "manifest.yaml")) for n in "ab")
    assert [d.weight for d in a.domains] == [d.weight for d in b.domains]
    assert a.domains[0].weight == pytest.approx(3 * a.domains[1].weight)
    for name in ("alpha_train.bin", "beta_valid.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize(
    ("extra", "new_message", "old_extra", "old_message"),
    [
        (["--workers=0"], "--workers must be at least 1, got 0",
         ["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--valid_tokens_per_domain=-5"], "--valid_tokens_per_domain must be 0 or more, got -5",
         ["--valid-tokens-per-domain", "-5"], "--valid-tokens-per-domain must be 0 or more"),
        (["--weights={gamma: 1}"], "--weights names unknown domains ['gamma']",
         ["--weights", "gamma=1"], "--weights names unknown domains ['gamma']"),
        (["--max_bad_fraction=2"], "--max_bad_fraction must be a fraction in [0, 1], got 2.0",
         ["--max-bad-fraction", "2"], "--max-bad-fraction must be a fraction in [0, 1]"),
    ],
)  # fmt: skip
def test_preprocess_bad_input_names_the_flag_as_spelled(
    extra, new_message, old_extra, old_message, corpus, tmp_path, capfd
):
    base = [f"--input={corpus / 'alpha.jsonl'}", f"--tokenizer={corpus / 'tok'}",
            f"--output_dir={tmp_path / 'o'}", "--workers=1"]  # fmt: skip
    assert megashear(["preprocess", *base, *extra]) == 2
    assert new_message in one_error(capfd)[1]
    old = ["--input", str(corpus / "alpha.jsonl"), "--tokenizer", str(corpus / "tok"),
           "--output-dir", str(tmp_path / "o"), "--workers", "1", *old_extra]  # fmt: skip
    assert call(tool("preprocess_data").main, old) == 2
    assert old_message in one_error(capfd)[1]
    assert not (tmp_path / "o").exists()


def test_preprocess_needs_its_inputs(tmp_path, capfd):
    assert megashear(["preprocess", f"--output_dir={tmp_path / 'o'}"]) == 2
    assert "preprocess needs --input" in one_error(capfd)[1]


# ---------------------------------------------------------------------------- fit-reference


def test_fit_reference_command_and_tool_agree(tmp_path, capfd):
    from megashear.data.reference_loss import reference_losses

    points = {"alpha": [[1e8, 3.0], [1e9, 2.5], [7e9, 2.0]], "beta": [[1e8, 2.0], [1e9, 1.7],
                                                                      [7e9, 1.5]]}  # fmt: skip
    path = tmp_path / "p.json"
    path.write_text(json.dumps(points))
    assert megashear(["fit-reference", f"--points={path}", "--target_params=1.3e9"]) == 0
    by_command = last_json(capfd.readouterr().out)
    assert call(tool("fit_reference_loss").main, [str(path), "--target-params", "1.3e9"]) == 0
    by_tool = last_json(capfd.readouterr().out)
    assert by_command == by_tool == pytest.approx(reference_losses(points, 1.3e9))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--points={p}", "--target_params=nan"],
         "--target_params must be a positive parameter count, got nan"),
        (["--points={p}", "--target_params=1e9", "--target_preset=sheared-llama-1.3b"],
         "give --target_params or --target_preset, not both"),
        (["--points={p}"], "fit-reference needs --target_params or --target_preset"),
        (["--points={t}/none.json", "--target_params=1e9"], "{t}/none.json does not exist"),
        (["--points={p}", "--target_preset=sheared-9b"], "unknown target preset 'sheared-9b'"),
        (["--target_params=1e9"], "fit-reference needs --points"),
    ],
)  # fmt: skip
def test_fit_reference_bad_input_is_one_line(argv, message, tmp_path, capfd):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"alpha": [[1e8, 3.0], [1e9, 2.5], [7e9, 2.0]]}))
    argv = [a.format(p=p, t=tmp_path) for a in argv]
    assert megashear(["fit-reference", *argv]) == 2
    assert message.format(t=tmp_path) in one_error(capfd)[1]


def test_fit_reference_tool_names_its_own_flags(tmp_path, capfd):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"alpha": [[1e8, 3.0], [1e9, 2.5], [7e9, 2.0]]}))
    assert call(tool("fit_reference_loss").main, [str(p), "--target-params", "-1"]) == 2
    assert "--target-params must be a positive parameter count" in one_error(capfd)[1]
