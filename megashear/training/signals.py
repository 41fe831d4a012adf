"""Stop a run cleanly on SIGTERM / SIGINT (what Slurm and Ctrl-C send), as megatron's
``--exit-signal-handler`` does.

:class:`ExitSignals` records the first such signal instead of dying in the middle of a step.
The trainer asks :meth:`ExitSignals.agreed` after every step: one ``MAX`` all-reduce of the
recorded signal number over all ranks, so every rank stops after the same step even when only
one of them was signalled. The command then saves a checkpoint, writes one line naming the
signal and the step, and exits with ``train.signal_exit_code``: 0 by default, as megatron's,
or e.g. 143 for a scheduler that should see the run as interrupted. A relaunch with the same
command line resumes from that step. A second signal restores the default handler and
re-raises it (a forced stop).
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitSignals:
    """Context manager: while active, SIGTERM / SIGINT are recorded, not fatal."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received:  # the second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning(
            "received %s: stopping after this step and saving a checkpoint",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> ExitSignals:
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self) -> int:
        """The signal number any rank received (0: none); a collective over the world."""
        flag = torch.tensor([self.received], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
