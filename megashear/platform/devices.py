"""Device queries: the only place in megashear that asks whether CUDA is there."""

from __future__ import annotations

import torch


def cuda_available() -> bool:
    """True when a usable CUDA device is present (then no patch is applied)."""
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """The device megashear computes on: the current CUDA device, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if cuda_available()
        else (torch.device("cpu"))
    )


def distributed_backend() -> str:
    """``nccl`` with CUDA, ``gloo`` without."""
    return "nccl" if cuda_available() else "gloo"
