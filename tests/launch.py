"""Start a worker script under torchrun in a subprocess with a timeout.

The plan (a list of job dicts) goes to the worker as a ``torch.save`` file; rank 0 writes the
results the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
DIST_WORKER = HERE / "dist_worker.py"
PRUNE_WORKER = HERE / "prune_worker.py"


def megashear_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m megashear.cli ARGS`` on CPU in a subprocess; the completed process (text
    stdout/stderr captured), whatever its exit code."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "megashear.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def torchrun(
    nproc: int,
    plan: list[dict],
    workdir: Path,
    worker: Path = DIST_WORKER,
    timeout: float = 900,
    env: dict[str, str] | None = None,
    launcher: bool | None = None,
) -> dict:
    """Run ``plan`` on ``nproc`` CPU ranks (``env``: extra environment variables); return rank
    0's results (raises on failure). One rank runs the worker as a plain process (unless
    ``launcher=True``), a world of one on a free port (:func:`megashear.parallel.init_distributed`),
    without torchrun's start-up and shut-down."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan_path = workdir / f"plan_{worker.stem}_{nproc}.pt"
    out_path = workdir / f"out_{worker.stem}_{nproc}.pt"
    torch.save(plan, plan_path)
    base = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    env = {**base, **(env or {})}  # the caller's variables win, OMP_NUM_THREADS included
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    if nproc == 1 and not launcher:  # None or False
        cmd = [sys.executable]
    cmd += [str(worker), str(plan_path), str(out_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"torchrun failed with code {proc.returncode}:\n{tail}")
    return torch.load(out_path, weights_only=False)


def prune_torchrun(
    nproc: int,
    plan: list[dict],
    workdir: Path,
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> dict:
    """:func:`torchrun` with ``tests/prune_worker.py``."""
    return torchrun(nproc, plan, workdir, PRUNE_WORKER, timeout, env)


def serve_plan(run_job) -> None:
    """The worker side of :func:`torchrun` for a test module that is its own worker: run every
    job of the plan file ``argv[1]`` with ``run_job``; rank 0 saves ``{name: result}`` to
    ``argv[2]``."""
    import torch.distributed as dist

    plan = torch.load(sys.argv[1], weights_only=False)
    results = {job["name"]: run_job(job) for job in plan}
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[2])
    dist.barrier()
    dist.destroy_process_group()
