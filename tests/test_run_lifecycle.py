"""What a cluster does to a run: SIGTERM mid-run saves a checkpoint and exits with
``train.signal_exit_code`` (0 by default), leaving no process behind; the same command line
(``checkpoint.load`` = ``checkpoint.save``) starts fresh on an empty directory and resumes after
a stop, to the losses of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def command(tmp_path: Path, iters: int) -> list[str]:
    ckpt = tmp_path / "ckpt"
    return [
        sys.executable, "-m", "megashear.cli", "train",
        "--model_preset=tiny-gqa", "--data.synthetic=true",
        f"--train.train_iters={iters}", "--train.log_interval=1",
        f"--checkpoint.load={ckpt}", f"--checkpoint.save={ckpt}",
        f"--logging.dir={tmp_path / 'log'}", "--logging.tensorboard=false",
    ]  # fmt: skip


def train_steps(tmp_path: Path) -> list[int]:
    path = tmp_path / "log" / "events.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [e["step"] for e in lines if e["kind"] == "train"]


def test_sigterm_saves_and_the_same_command_line_resumes(tmp_path):
    proc = subprocess.Popen(
        [*command(tmp_path, 100_000), "--train.signal_exit_code=143"], stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while len(train_steps(tmp_path)) < 3:
            assert proc.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 3 and saved == train_steps(tmp_path)[-1]
    assert err.strip().splitlines()[-1].startswith(f"stopped by SIGTERM after step {saved}")

    # the same command line, relaunched, resumes at the saved step and runs to the new end
    done = subprocess.run(
        command(tmp_path, saved + 2), capture_output=True, text=True, timeout=300, env=ENV
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text()) == saved + 2
    assert train_steps(tmp_path)[-2:] == [saved + 1, saved + 2]


def test_resume_trains_at_the_schedule_it_is_given(tmp_path):
    first = subprocess.run(
        command(tmp_path, 4), capture_output=True, text=True, timeout=300, env=ENV
    )
    assert first.returncode == 0, first.stderr[-2000:]
    lrs = {e["step"]: e["lr"] for e in events(tmp_path)}
    assert lrs[4] == pytest.approx(3e-5)  # the cosine of the first run reached min_lr
    # extending train_iters re-plans the cosine over 8 steps; a new peak is used as given
    again = subprocess.run(
        [*command(tmp_path, 8), "--train.lr=1e-3", "--train.min_lr=1e-4"],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "changed LR schedule" in again.stderr
    lrs = {e["step"]: e["lr"] for e in events(tmp_path)}
    # megatron's cosine at step 5 of 8 with warm-up 2, from 1e-3 to 1e-4
    ratio = (5 - 2) / (8 - 2)
    expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * ratio))
    assert lrs[5] == pytest.approx(expected, rel=1e-6)
    assert lrs[8] == pytest.approx(1e-4)


def events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "log" / "events.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [e for e in lines if e["kind"] == "train"]


@pytest.fixture
def own_environment():
    """Restore ``os.environ`` after an in-process run (``init_distributed`` sets ``RANK``,
    ``MASTER_PORT`` ..., which later subprocesses must not inherit)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_resume_drops_the_records_of_re_run_steps(tmp_path, own_environment):
    """The log of a run that resumes at step 2 holds steps 1-2 of the first run and 3-4 of the
    resumed one: the first run's records of steps 3 and 4 (taken after its last checkpoint, here
    by removing the checkpoint of step 4 as if the run had died before saving it) are dropped,
    not logged twice."""
    from megashear.cli import main
    from megashear.training.run_log import read_events

    argv = [
        *command(tmp_path, 4)[3:],
        "--checkpoint.save_interval=2",
        "--train.global_batch_size=2",
        "--train.micro_batch_size=1",
    ]
    assert main(argv) == 0
    log, ckpt = tmp_path / "log", tmp_path / "ckpt"
    first = {e["step"]: e["loss"] for e in read_events(str(log), "train")}
    assert sorted(first) == [1, 2, 3, 4]
    shutil.rmtree(ckpt / "iter_0000004")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    assert main(argv) == 0
    train = read_events(str(log), "train")
    assert [e["step"] for e in train] == [1, 2, 3, 4]
    assert [e["loss"] for e in train[:2]] == [first[1], first[2]]
    assert [e["step"] for e in read_events(str(log), "summary")] == [4]


def test_run_log_resume_rewrites_the_file_atomically(tmp_path):
    from megashear.training.run_log import RunLog, read_events

    path = tmp_path / "events.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "st')  # a line cut off by a crash
    log = RunLog(str(tmp_path), tensorboard=False, resume_from=3)
    log.log("train", 4, {"loss": 0.5})
    log.close()
    assert [(e["step"], e["loss"]) for e in read_events(str(tmp_path))] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5)
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl"]
    # a fresh run (iteration 0) appends to the log as it is
    RunLog(str(tmp_path), tensorboard=False, resume_from=0).close()
    assert len(read_events(str(tmp_path))) == 4


def _children(pid: int) -> set[int]:
    """PIDs of the live processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_after_checkpoint_saves_leaves_no_child_process(tmp_path):
    """megatron-core's checkpoint writer forks writers and spawns a Manager server; after a
    ``kill -9`` of the rank none of its children may be left (the checkpoint_writer patch)."""
    cmd = command(tmp_path, 100_000) + ["--checkpoint.save_interval=1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=ENV)
    seen: set[int] = set()
    tracker = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    try:
        deadline = time.time() + 120
        while not (tracker.is_file() and int(tracker.read_text() or 0) >= 3):
            assert proc.poll() is None and time.time() < deadline, "the run did not save"
            seen |= _children(proc.pid)
            time.sleep(0.05)
        seen |= _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    time.sleep(1.0)
    survivors = sorted(pid for pid in seen if _alive(pid))
    for pid in survivors:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"children of the killed rank still alive: {survivors}"


LAUNCH = Path(__file__).resolve().parents[1] / "examples" / "common" / "launch.sh"


def _launched(tmp_path: Path, iters: int, runner: str, port: int) -> subprocess.Popen:
    """``megashear train`` on 2 ranks (DP2) through the examples' launcher."""
    args = " ".join(command(tmp_path, iters)[3:] + ["--checkpoint.save_interval=1"])
    script = f"source {LAUNCH}; {runner} {args}"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # torchrun
    env = dict(ENV, NPROC_PER_NODE="2", MASTER_PORT=str(port), MAX_RESTARTS="2", PATH=path)
    return subprocess.Popen(
        ["bash", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _train_losses(tmp_path: Path) -> dict[int, float]:
    path = tmp_path / "log" / "events.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {e["step"]: e["loss"] for e in lines if e["kind"] == "train"}


def _rank_pids(root: int) -> list[int]:
    """The megashear ranks among the descendants of ``root``."""
    todo, ranks = [root], []
    while todo:
        for child in _children(todo.pop()):
            todo.append(child)
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"megashear.cli" in argv and not any(b"torchrun" in a for a in argv):
                ranks.append(child)
    return ranks


ITERS = 16


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory) -> dict[int, float]:
    """The losses of the 2-rank run that nothing interrupts."""
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    ref = _launched(ref_dir, ITERS, "megashear_run", 29640)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-2000:]
    return _train_losses(ref_dir)


def _descendants(root: int) -> set[int]:
    todo, out = [root], set()
    while todo:
        for child in _children(todo.pop()):
            out.add(child)
            todo.append(child)
    return out


def test_sigterm_of_one_rank_stops_every_rank_saved_and_resumes(tmp_path, uninterrupted_losses):
    """SIGTERM to one of two ranks: both stop after the same step, save, exit 0 (the default
    train.signal_exit_code) with one line, and leave no process; the same launch line then
    finishes the run with the losses of the uninterrupted run."""
    run = _launched(tmp_path, ITERS, "megashear_run", 29660)
    seen: set[int] = set()
    try:
        deadline = time.time() + 300
        while len(train_steps(tmp_path)) < 4:
            assert run.poll() is None and time.time() < deadline, "the run did not start"
            seen |= _descendants(run.pid)
            time.sleep(0.1)
        ranks = _rank_pids(run.pid)
        assert len(ranks) == 2, ranks
        seen |= _descendants(run.pid)
        os.kill(ranks[0], signal.SIGTERM)
        _, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    time.sleep(1.0)
    survivors = sorted(pid for pid in seen if _alive(pid))
    for pid in survivors:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes of the stopped run still alive: {survivors}"
    assert run.returncode == 0, err[-3000:]
    saved = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert 4 <= saved < ITERS and train_steps(tmp_path)[-1] == saved
    stops = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert stops == [stops[0]] and stops[0].startswith(f"stopped by SIGTERM after step {saved}")

    again = _launched(tmp_path, ITERS, "megashear_run", 29670)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert _train_losses(tmp_path) == uninterrupted_losses


def test_kill_9_of_one_rank_under_the_restart_recipe_resumes_to_the_same_losses(
    tmp_path, uninterrupted_losses
):
    iters = ITERS
    run_dir = tmp_path / "killed"
    run = _launched(run_dir, iters, "megashear_run_restarting", 29650)
    tracker = run_dir / "ckpt" / "latest_checkpointed_iteration.txt"
    try:
        deadline = time.time() + 300
        while not (tracker.is_file() and int(tracker.read_text() or 0) >= 4):
            assert run.poll() is None and time.time() < deadline, "the run did not save"
            time.sleep(0.1)
        ranks = _rank_pids(run.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        _, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, err[-3000:]
    assert "relaunch 1 from checkpoint" in err
    want, got = uninterrupted_losses, _train_losses(run_dir)
    assert sorted(got) == list(range(1, iters + 1))  # each step once: the re-run ones replaced
    assert got == want


def test_checkpoint_init_starts_from_its_weights_then_the_same_line_resumes(tmp_path):
    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "megashear.cli", "train", "--data.synthetic=true",
             "--logging.tensorboard=false", *flags],
            capture_output=True, text=True, timeout=300, env=ENV,
        )  # fmt: skip

    init = run("--model_preset=tiny-gqa", "--train.train_iters=3", "--train.lr=1e-2",
               f"--checkpoint.save={tmp_path / 'init'}", f"--logging.dir={tmp_path / 'l0'}")  # fmt: skip
    assert init.returncode == 0, init.stderr[-2000:]
    fresh = run("--model_preset=tiny-gqa", "--train.train_iters=1",
                f"--logging.dir={tmp_path / 'l1'}")  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    line = [f"--checkpoint.init={tmp_path / 'init'}", f"--checkpoint.save={tmp_path / 'run'}",
            f"--logging.dir={tmp_path / 'log'}"]  # fmt: skip
    first = run(*line, "--train.train_iters=2")
    assert first.returncode == 0, first.stderr[-2000:]
    # the weights of init (the model shape too: no preset given), not its step count or optimizer
    first_steps = [e for e in _events(tmp_path / "log") if e["kind"] == "train"]
    assert [e["step"] for e in first_steps] == [1, 2]
    trained = [e for e in _events(tmp_path / "l0") if e["kind"] == "train"][-1]["loss"]
    untrained = [e for e in _events(tmp_path / "l1") if e["kind"] == "train"][0]["loss"]
    assert abs(first_steps[0]["loss"] - trained) < abs(first_steps[0]["loss"] - untrained)
    again = run(*line, "--train.train_iters=4")  # the same line, later: resumes from save
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    assert [e["step"] for e in _events(tmp_path / "log") if e["kind"] == "train"] == [1, 2, 3, 4]
    both = run(*line, f"--checkpoint.load={tmp_path / 'init'}")
    assert both.returncode == 2 and "not both" in both.stderr.strip().splitlines()[-1]


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
