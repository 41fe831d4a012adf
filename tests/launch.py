"""Start ``tests/dist_worker.py`` under torchrun in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(nproc: int, plan: list[dict], workdir: Path, timeout: float = 900) -> dict:
    """Run ``plan`` on ``nproc`` CPU ranks; return rank 0's results (raises on failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan_path = workdir / f"plan_{nproc}_{len(plan)}.json"
    out_path = workdir / f"out_{nproc}_{len(plan)}.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        str(plan_path),
        str(out_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"torchrun failed with code {proc.returncode}:\n{tail}")
    return json.loads(out_path.read_text())
