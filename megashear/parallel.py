"""torch.distributed and megatron-core ``parallel_state`` set-up from the torchrun environment.

torchrun (single node with ``--standalone``, several nodes with ``--nnodes/--node_rank/
--master_addr`` or a rendezvous endpoint) exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. A plain ``python`` run (no torchrun) is a world of one on a
free local port. The backend is NCCL with CUDA and gloo without. megatron-core orders ranks
TP-fastest, then DP, then PP.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from megashear import platform
from megashear.config import ParallelConfig
from megashear.model_config import ModelConfig
from megashear.models.llama import validate_layout

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 10.0) -> tuple[int, int]:
    """Initialise the default process group (idempotent). Returns ``(rank, world_size)``."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    platform.install("compute")
    if platform.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=platform.distributed_backend(),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return dist.get_rank(), dist.get_world_size()


def init_model_parallel(cfg: ModelConfig, par: ParallelConfig, seed: int = 1234) -> int:
    """Set up TP/PP/DP groups for ``par`` and seed every RNG. Returns the DP size.

    Raises:
        ValueError: the layout does not fit the world size or the model shape.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    _, world = init_distributed()
    validate_layout(cfg, par, world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
    )
    platform.install("compute")
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return ps.get_data_parallel_world_size()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's CPU generator (CUDA too when present)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if platform.cuda_available():
        torch.cuda.manual_seed_all(seed)


def destroy() -> None:
    """Tear down model-parallel groups and the default process group."""
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
