"""Errors a training run raises that are not bad input."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite: the run stops before that
    step's update is saved anywhere, so the last checkpoint stays the last good state."""
