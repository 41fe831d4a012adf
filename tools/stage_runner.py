"""Run a pipeline of megashear commands as subprocesses, each logged and timed.

The runner lives in the library now (:mod:`megashear.pipeline.runner`); this module keeps the
scripts' API (``tools/shear_experiment.py``, ``tools/p2_sweep.py``): :class:`StageRunner` runs
in the repository root and adds :meth:`StageRunner.tool`; a failing stage ends the script with
``SystemExit`` carrying the log's tail, as before.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megashear.pipeline import runner as _runner
from megashear.pipeline.runner import flags, last_json

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "StageRunner", "flags", "last_json"]


class StageRunner(_runner.StageRunner):
    """:class:`megashear.pipeline.runner.StageRunner` in the repository root.

    Args:
        out: the pipeline's output folder (logs go to ``out/logs``).
        threads: ``OMP_NUM_THREADS`` of every stage.
        quiet: do not print a line per finished stage.
    """

    def __init__(self, out: Path, threads: int = 2, quiet: bool = False) -> None:
        super().__init__(out, threads=threads, quiet=quiet, cwd=ROOT)

    def run(self, stage: str, cmd: list[str], env: dict[str, str] | None = None) -> str:
        """Run one command (output to ``OUT/logs/STAGE.log``); a failure is ``SystemExit``."""
        try:
            return super().run(stage, cmd, env)
        except _runner.StageError as exc:
            raise SystemExit(f"error: {exc}:\n{exc.tail}") from None

    def tool(self, stage: str, script: str, *args: str) -> str:
        """``python tools/SCRIPT ARGS``."""
        return self.run(stage, [sys.executable, str(ROOT / "tools" / script), *args])
