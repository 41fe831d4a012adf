"""Each CPU patch is needed: without it its probe fails; with all patches every probe passes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megashear import platform

PROBE = Path(__file__).with_name("platform_probe.py")
PATCHES = [p.name for p in platform.PATCHES]
# each patch declares its kind (megashear/platform/patch.py); the tests read it from there
SPEED_PATCHES = {p.name for p in platform.PATCHES if p.kind == "speed"}
PROCESS_PATCHES = {p.name for p in platform.PATCHES if p.kind == "process"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probes(skips: list[list[str]], at_once: int = 2) -> list[dict]:
    """The probe results of one subprocess per skip list, ``at_once`` of them at a time (each
    is mostly a single-threaded megatron-core import)."""
    results: list[dict | None] = [None] * len(skips)
    running: list[tuple[int, subprocess.Popen]] = []
    todo = list(enumerate(skips))

    def finish(i: int, proc: subprocess.Popen) -> None:
        out, err = proc.communicate(timeout=180)
        lines = [ln for ln in out.splitlines() if ln.startswith("PROBE ")]
        assert lines, out[-2000:] + err[-2000:]
        results[i] = json.loads(lines[-1][len("PROBE ") :])

    while todo or running:
        while todo and len(running) < at_once:
            i, skip = todo.pop(0)
            env = dict(os.environ, PROBE_PORT=str(_free_port()), CUDA_VISIBLE_DEVICES="",
                       PYTHONWARNINGS="ignore")  # fmt: skip
            running.append((i, subprocess.Popen(
                [sys.executable, str(PROBE), *skip], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=env,
            )))  # fmt: skip
        finish(*running.pop(0))
    return results  # type: ignore[return-value]


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    """Skipped patch ("" for none) -> the probe results of a process without it."""
    names = ["", *PATCHES]
    return dict(zip(names, run_probes([[n] if n else [] for n in names])))


@pytest.mark.skipif(platform.cuda_available(), reason="CPU patches are inactive with CUDA")
def test_all_patches_make_every_probe_pass(probes):
    assert probes[""] == {name: "ok" for name in PATCHES}


@pytest.mark.skipif(platform.cuda_available(), reason="CPU patches are inactive with CUDA")
@pytest.mark.parametrize("name", PATCHES)
def test_each_patch_is_needed(name, probes):
    result = probes[name][name]
    assert result != "ok", f"probe for {name} passed without the patch"
    if name in SPEED_PATCHES:  # without it megatron-core runs, on its slow CPU fallback
        assert "slow path" in result, result
    elif name in PROCESS_PATCHES:  # without it a save starts processes that can outlive us
        assert "child processes" in result, result
    else:  # without the patch megatron-core hits CUDA (or its CUDA type check)
        assert "CUDA" in result or "cuda" in result, result


def test_unknown_patch_name_is_refused():
    if platform.cuda_available():
        pytest.skip("no-op with CUDA")
    with pytest.raises(ValueError, match="unknown CPU patches"):
        platform.install(skip=["nope"])


@pytest.mark.skipif(platform.cuda_available(), reason="CPU patches are inactive with CUDA")
def test_training_only_patches_wait_for_a_trainer():
    """``install("compute")`` (a converter) keeps glibc's malloc as it is; ``megashear
    finalize`` sets its own (``install("streaming")``: :func:`platform.keep_freed_host_memory`)."""
    code = (
        "import json; from megashear import platform;"
        "first = platform.install();"
        "print(json.dumps([first, platform.install('training')]))"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    training_only = [p.name for p in platform.PATCHES if p.training_only]
    assert training_only == ["host_allocator"]
    assert first == [name for name in PATCHES if name not in training_only]
    assert second == ["cuda_namespace", *training_only]


class _FakeGlibc:
    def __init__(self, refuse: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 0 if param == self.refuse else 1


def test_keep_freed_host_memory_sets_heap_trim_and_one_arena(monkeypatch):
    from megashear.platform import host_memory

    mmap_threshold, trim_threshold, arena_max = -3, -1, -8  # glibc's malloc.h
    libc = _FakeGlibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    assert platform.keep_freed_host_memory() is True
    assert libc.calls == [(mmap_threshold, platform.HEAP_BLOCK_LIMIT), (trim_threshold, -1)]
    libc.calls.clear()
    assert platform.keep_freed_host_memory(single_arena=True) is True
    assert libc.calls[-1] == (arena_max, 1) and len(libc.calls) == 3
    refusing = _FakeGlibc(refuse=arena_max)
    monkeypatch.setattr(host_memory, "_glibc", lambda: refusing)
    assert platform.keep_freed_host_memory(single_arena=True) is False
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert platform.keep_freed_host_memory(single_arena=True) is False
    # finalize's role: one arena, with or without CUDA
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    libc.calls.clear()
    assert platform.install("streaming") == ["host_allocator"]
    assert libc.calls[-1] == (arena_max, 1) and len(libc.calls) == 3


@pytest.mark.skipif(platform.cuda_available(), reason="CPU patches are inactive with CUDA")
def test_speed_patches_leave_the_losses_unchanged(tmp_path):
    """Four pruning steps of a tied GQA model with a padded vocabulary (every speed patch has
    work there: masks, the tied weight, RoPE, wgrad, AdamW, the grad norm with clipping) give
    the same history with the speed patches as with megatron-core's own CPU fallbacks."""
    from tests.launch import prune_torchrun
    from tests.test_masked_model import ALL, GQA_TARGET

    job = {
        "name": "prune",
        "mode": "train",
        "model": "tiny-gqa-tied",
        "target": GQA_TARGET,
        "kinds": ALL,
        "steps": 4,
        "clip_grad": 0.5,
        "warmup": 2,
    }
    fast = prune_torchrun(1, [job], tmp_path / "fast")["prune"]
    env = {platform.SKIP_ENV: ",".join(sorted(SPEED_PATCHES))}
    slow = prune_torchrun(1, [job], tmp_path / "slow", env=env)["prune"]
    assert SPEED_PATCHES <= set(fast["cpu_patches"])
    assert not SPEED_PATCHES & set(slow["cpu_patches"]), slow["cpu_patches"]
    fast, slow = fast["history"], slow["history"]
    assert len(fast) == len(slow) == 4
    timings = {"tokens_per_s", "step_time"}
    for step_fast, step_slow in zip(fast, slow):
        assert step_fast.keys() == step_slow.keys()
        assert {"loss", "grad_norm", "expected_params"} <= step_fast.keys()
        for key in step_fast.keys() - timings:
            assert step_fast[key] == pytest.approx(step_slow[key], abs=1e-6, rel=1e-6), key


def test_patch_names_in_the_environment_are_checked(monkeypatch):
    if platform.cuda_available():
        pytest.skip("no-op with CUDA")
    monkeypatch.setenv(platform.SKIP_ENV, "fused_adam,nope")
    with pytest.raises(ValueError, match=r"unknown CPU patches \['nope'\] \(in MEGASHEAR_SKIP"):
        platform.install()


def test_every_patch_declares_a_known_kind_and_a_probe():
    from tests import platform_probe

    assert {p.kind for p in platform.PATCHES} <= set(platform.KINDS)
    assert len(set(PATCHES)) == len(PATCHES)
    for patch in platform.PATCHES:
        assert callable(getattr(platform_probe, patch.probe)), patch.name
    with pytest.raises(ValueError, match="kind"):
        platform.Patch("x", "fast", lambda: None, "nothing")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown platform role"):
        platform.install("nope")  # type: ignore[arg-type]
