"""``megashear shear examples/smollm2_demo/tiny_recipe.yaml`` on a tiny random LLaMA: every stage
runs; a run killed (SIGKILL) while pruning resumes from its last checkpoint and ends with the
uninterrupted run's losses without redoing the finished stages; a bad or changed recipe is one
``error:`` line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megashear.paths import corpus_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "smollm2_demo" / "tiny_recipe.yaml"
ENV = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
STAGES = ["convert", "preprocess", "reference", "importance", "prune", "finalize", "continue",
          "export"]  # fmt: skip
pytestmark = pytest.mark.dist


def shear(out: Path, source: Path, *extra: str) -> list[str]:
    inputs = ", ".join(str(corpus_dir() / f"{d}.jsonl.xz") for d in ("web", "wikipedia"))
    return [
        sys.executable, "-m", "megashear.cli", "shear", str(RECIPE),
        f"--source={source}", f"--output={out}", f"--data.inputs=[{inputs}]", *extra,
    ]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from tests.test_experiment import tiny_source

    return tiny_source(tmp_path_factory.mktemp("shear") / "source_hf")


@pytest.fixture(scope="module")
def finished(source) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run of the whole job."""
    out = source.parent / "uninterrupted"
    proc = run(shear(out, source))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_every_stage_runs(finished):
    from megashear.pipeline.shear import read_job

    out, proc = finished
    named = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith(f"[{out.name}] ")]
    assert named[:-1] == [s for s in named[:-1] if s in STAGES] and sorted(named[:-1]) == sorted(
        STAGES
    ), named  # every stage once (convert and preprocess in either order), then "done:"
    job = read_job(out)
    assert list(job.seconds) == STAGES
    assert set(job.losses) == {"reference", "prune", "finalize", "continue"}
    assert all(set(row) == {"web", "wikipedia"} for row in job.losses.values())
    assert job.parameters < job.source_parameters and job.prune_loss and job.continue_loss
    # the export: the target shape, tied, with the tokenizer and a model card of the losses
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 48, 64)
    assert (out / "hf" / "tokenizer.json").is_file()
    assert "wikipedia" in (out / "hf" / "README.md").read_text()
    # the reference losses are the source's, in the job's manifest
    manifest = (out / "data" / "manifest.yaml").read_text()
    assert manifest.count("reference_loss: ") == 2 and "reference_loss: null" not in manifest
    # pruning started from importance, continued pre-training distilled from the source
    meta = json.loads(next((out / "ckpt" / "continue").glob("iter_*/megashear.json")).read_text())
    assert meta["distill"]["teacher"] == str(out / "ckpt" / "source")
    prune_cfg = (out / "runs" / "prune" / "config.yaml").read_text()
    assert "init: importance" in prune_cfg and str(out / "importance") in prune_cfg


def test_killed_while_pruning_resumes_to_the_same_losses(finished, source):
    """The early stages of the finished run are copied into a new folder (their records are
    the same recipe's), pruning there is killed after its first checkpoint, and the same
    command run again ends with the uninterrupted run's losses."""
    from megashear.pipeline.shear import read_job
    from megashear.training.run_log import read_events

    done, _ = finished
    out = done.parent / "killed"
    shutil.copytree(done, out, symlinks=True)
    for stage in STAGES[4:]:
        (out / "stages" / f"{stage}.json").unlink()
    for path in ("ckpt/prune", "ckpt/cut", "ckpt/continue", "runs", "hf", "eval/prune",
                 "eval/finalize", "eval/continue", "summary.json", "logs/prune.log"):  # fmt: skip
        target = out / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    records = {s: (out / "stages" / f"{s}.json").stat().st_mtime_ns for s in STAGES[:4]}

    proc = subprocess.Popen(
        shear(out, source), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    tracker = out / "ckpt" / "prune" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while not tracker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended first: the assertions below say so
        pass
    proc.wait()
    assert tracker.is_file(), "pruning saved no checkpoint before the end"
    saved = int(tracker.read_text())
    assert 0 < saved < 6 and not (out / "stages" / "prune.json").exists()

    again = run(shear(out, source))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # the finished stages were not run again; pruning resumed from its checkpoint
    for stage in STAGES[:4]:
        assert f"{stage:<11} recorded, skipped" in again.stdout
        assert (out / "stages" / f"{stage}.json").stat().st_mtime_ns == records[stage]
    assert (out / "logs" / "convert.log").read_text().count("$ ") == 1
    assert "resuming from" in (out / "logs" / "prune.log").read_text()
    steps = [e["step"] for e in read_events(str(out / "runs" / "prune"), "prune")]
    assert steps == list(range(1, 7))
    a, b = read_job(done), read_job(out)
    assert b.prune_loss == pytest.approx(a.prune_loss, abs=1e-6)
    assert b.continue_loss == pytest.approx(a.continue_loss, abs=1e-6)
    for stage, row in a.losses.items():
        assert b.losses[stage] == pytest.approx(row, abs=1e-6), stage

    # a changed recipe for a finished stage is refused in one line; nothing is touched
    before = sorted(p.stat().st_mtime_ns for p in (out / "stages").iterdir())
    code, err = in_process(shear(out, source, "--continuation.steps=5"))
    assert code == 2 and err.count("error:") == 1
    assert "stage continue finished" in err and "continuation.steps" in err
    assert sorted(p.stat().st_mtime_ns for p in (out / "stages").iterdir()) == before


def in_process(cmd: list[str]) -> tuple[int, str]:
    """``megashear ...`` run in this process (for the errors before any stage starts):
    the exit code and what went to stderr."""
    import contextlib
    import io

    from megashear.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(cmd[3:])
        except SystemExit as exc:  # argparse's errors
            code = exc.code
    return code, err.getvalue()


def test_bad_recipe_is_one_line_and_writes_nothing(tmp_path, source):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text() + "\npruning_steps: 3\n")
    out = tmp_path / "out"
    proc = run([*shear(out, source)[:4], str(bad), f"--source={source}", f"--output={out}"])
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pruning_steps" in lines[0]
    assert not out.exists()
    # a bad value, and recipes the job could not run
    for extra, words in (
        (["--pruning.method=cut"], "pruning.method"),
        (["--continuation.lr=-1"], "continuation.lr"),
        (["--data.inputs=[]"], "data.inputs"),
        (["--target.num_layers=null", "--target.hidden_size=null", "--target.ffn_hidden_size=null",
          "--target.num_attention_heads=null", "--target.num_query_groups=null"], "no target"),
        ([f"--tokenizer={tmp_path / 'missing'}"], "tokenizer"),
    ):  # fmt: skip
        code, err = in_process(shear(out, source, *extra))
        lines = [ln for ln in err.strip().splitlines() if not ln[:4].isdigit()]  # no log lines
        assert code == 2 and len(lines) == 1 and words in lines[0], err
        assert lines[0].startswith("error: ") and not out.exists()


def test_a_failing_stage_is_one_line_and_unrecorded(tmp_path, source):
    """A stage whose process fails ends the job with one ``error:`` line naming its log (exit
    code 1), after the log's tail; it leaves no record, so a rerun does it again."""
    broken = tmp_path / "broken_hf"
    shutil.copytree(source, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    proc = run(shear(out, broken))
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage convert failed") and "logs/convert.log" in last
    assert not (out / "stages" / "convert.json").exists()
    assert (out / "stages" / "convert.started.json").is_file()
