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
SPEED_PATCHES = {"foreach_grad_norm", "fused_adam", "wgrad_accumulation", "host_allocator"}
PROCESS_PATCHES = {"checkpoint_writer"}


def run_probe(skip: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PROBE_PORT=str(port), CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(PROBE), *skip], capture_output=True, text=True, timeout=180, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("PROBE ") :])


@pytest.mark.skipif(platform.cuda_available(), reason="CPU patches are inactive with CUDA")
def test_all_patches_make_every_probe_pass():
    assert run_probe([]) == {name: "ok" for name in PATCHES}


@pytest.mark.skipif(platform.cuda_available(), reason="CPU patches are inactive with CUDA")
@pytest.mark.parametrize("name", PATCHES)
def test_each_patch_is_needed(name):
    result = run_probe([name])[name]
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
        platform.install_cpu_support(skip=["nope"])
