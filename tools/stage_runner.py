"""Run a pipeline of megashear commands as subprocesses, each logged and timed.

Used by ``tools/demo.py`` and ``tools/shear_experiment.py``: every stage is a real command
(``python -m megashear.cli ...``, under torchrun for several ranks, or a tool script), its output
goes to ``OUT/logs/STAGE.log``, and a failing stage ends the pipeline with the log's tail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class StageRunner:
    """Runs and times the stages of one pipeline under ``out``.

    Args:
        out: the pipeline's output folder (logs go to ``out/logs``).
        threads: ``OMP_NUM_THREADS`` of every stage.
        quiet: do not print a line per finished stage.
    """

    def __init__(self, out: Path, threads: int = 2, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.times: dict[str, float] = {}
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))

    def run(self, stage: str, cmd: list[str]) -> str:
        """Run one command; its output goes to ``OUT/logs/STAGE.log``; fail loudly."""
        log = self.out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=f, env=self.env, cwd=ROOT, text=True
            )
            f.write(proc.stdout)
        self.times[stage] = self.times.get(stage, 0.0) + time.time() - start
        if proc.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise SystemExit(f"error: stage {stage} failed (log: {log}):\n{tail}")
        if not self.quiet:
            print(f"[{self.out.name}] {stage:<11} done in {time.time() - start:6.1f} s", flush=True)
        return proc.stdout

    def megashear(self, stage: str, command: str, *args: str, nproc: int = 1) -> str:
        """``megashear COMMAND ARGS`` in one process, or under torchrun on ``nproc`` ranks."""
        if nproc > 1:
            launcher = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "megashear.cli",
            ]
        else:
            launcher = [sys.executable, "-m", "megashear.cli"]
        return self.run(stage, [*launcher, command, *args])

    def tool(self, stage: str, script: str, *args: str) -> str:
        """``python tools/SCRIPT ARGS``."""
        return self.run(stage, [sys.executable, str(ROOT / "tools" / script), *args])


def flags(prefix: str, values: dict) -> list[str]:
    """``{"a": 1}`` -> ``["--prefix.a=1"]``."""
    return [f"--{prefix}.{k}={v}" for k, v in values.items()]


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object."""
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
