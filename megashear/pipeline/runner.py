"""Launch the stages of a pipeline as processes, each logged and timed.

Every stage runs in a process of its own (megatron-core's parallel state is per process):
``python -m megashear.cli COMMAND ...``, under torchrun for several ranks, or the pipeline's
worker (``python -m megashear.pipeline.worker``). A process's output goes to
``OUT/logs/STAGE.log``; a failing one raises :class:`StageError` naming the log, with its tail.

Progress lines (``[OUT] STAGE done in 12.3 s``) go to the runner's reporter. Inside
:meth:`StageRunner.stage` the commands of one stage report nothing themselves: the stage's one
line is written when it ends, so every stage is named once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megashear.atomic_file import write_json_atomic

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage's process failed; ``tail`` holds the last lines of its log."""

    def __init__(self, stage: str, log: Path, code: int, tail: str) -> None:
        super().__init__(f"stage {stage} failed (exit code {code}; log: {log})")
        self.stage, self.log, self.code, self.tail = stage, log, code, tail


def stdout_reporter(line: str) -> None:
    """The default reporter: one line on stdout, flushed (progress of a long job)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class StageRunner:
    """Runs and times the stages of one pipeline under ``out``.

    Args:
        out: the pipeline's output folder (logs go to ``out/logs``).
        threads: the CPU threads the stages share (``OMP_NUM_THREADS`` of a one-process stage;
            a stage of n ranks gets ``threads // n`` per rank).
        quiet: report nothing.
        cwd: the working directory of the processes (None: this process's).
        report: where progress lines go (default: stdout).
    """

    def __init__(
        self,
        out: Path,
        threads: int = 2,
        quiet: bool = False,
        cwd: Path | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.out = Path(out)
        self.quiet = quiet
        self.cwd = cwd
        self.threads = threads
        self.report = report or stdout_reporter
        self.times: dict[str, float] = {}
        self.env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
        self._local = threading.local()  # the stage a thread is in (stages may overlap)

    def say(self, line: str) -> None:
        """A progress line, prefixed with ``[OUT]`` (nothing when quiet)."""
        if not self.quiet:
            self.report(f"[{self.out.name}] {line}")

    @contextmanager
    def stage(self, name: str, summary: Callable[[], str] | None = None) -> Iterator[None]:
        """One named stage: the commands run inside are timed under ``name`` and report one
        line when it ends (with ``summary()`` appended, when given)."""
        self._local.stage = name
        start = time.time()
        try:
            yield
        finally:
            self._local.stage = None
        seconds = time.time() - start
        self.times[name] = self.times.get(name, 0.0) + seconds
        extra = f"  {summary()}" if summary is not None else ""
        self.say(f"{name:<11} done in {seconds:6.1f} s{extra}")

    def run(self, stage: str, cmd: list[str], env: dict[str, str] | None = None) -> str:
        """Run one command; its output goes to ``OUT/logs/STAGE.log``; its stdout is returned.

        Raises:
            StageError: the command failed (the message names the log).
        """
        log = self.out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=f,
                env={**self.env, **(env or {})},
                cwd=self.cwd,
                text=True,
            )
            f.write(proc.stdout)
        if proc.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise StageError(stage, log, proc.returncode, tail)
        if getattr(self._local, "stage", None) is None:
            self.times[stage] = self.times.get(stage, 0.0) + time.time() - start
            self.say(f"{stage:<11} done in {time.time() - start:6.1f} s")
        return proc.stdout

    def launcher(self, module: str, nproc: int = 1) -> list[str]:
        """``python -m MODULE``, or torchrun of it on ``nproc`` local ranks."""
        if nproc > 1:
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                module,
            ]
        return [sys.executable, "-m", module]

    def megashear(self, stage: str, command: str, *args: str, nproc: int = 1) -> str:
        """``megashear COMMAND ARGS`` in one process, or under torchrun on ``nproc`` ranks
        (``OMP_NUM_THREADS`` split between them)."""
        env = {"OMP_NUM_THREADS": str(max(1, int(self.env["OMP_NUM_THREADS"]) // nproc))}
        return self.run(stage, [*self.launcher("megashear.cli", nproc), command, *args], env)

    def worker(self, stage: str, task: str, *args: str, nproc: int = 1) -> None:
        """``python -m megashear.pipeline.worker TASK ARGS`` (see that module), on ``nproc``
        ranks; it writes its result to a file named in ``args``."""
        env = {"OMP_NUM_THREADS": str(max(1, int(self.env["OMP_NUM_THREADS"]) // nproc))}
        self.run(stage, [*self.launcher("megashear.pipeline.worker", nproc), task, *args], env)


def flags(prefix: str, values: dict) -> list[str]:
    """``{"a": 1}`` -> ``["--prefix.a=1"]``."""
    return [f"--{prefix}.{k}={v}" for k, v in values.items()]


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (kept for scripts that read a command's
    printed result; the pipeline reads result files instead)."""
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


def cached(path: Path, make: Callable[[], Any]) -> Any:
    """The JSON at ``path``, or ``make()``'s value, written there first (a stage done once)."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    write_json_atomic(path, value)
    return value
