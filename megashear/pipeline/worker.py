"""The pipeline's own stage process: work whose result is a value, written to a file.

    python -m megashear.pipeline.worker evaluate CONFIG.yaml RESULT.json

``evaluate``: the per-domain loss of ``checkpoint.load`` on ``data.eval_split`` of
``data.manifest`` (a pruning checkpoint under its deterministic masks), as ``megashear evaluate``
computes it, at the layout ``parallel.*`` (launch it under torchrun for several ranks). The
model is the checkpoint's, with the config's ``model.seq_length``. Rank 0 writes ``{domain:
loss}`` to RESULT.json through a temporary name and a rename (the file a model card reads, too);
with ``data.write_reference`` the losses also become the manifest's reference losses.

CONFIG.yaml is a run config (:class:`megashear.config.RunConfig`, YAML), checked as the
commands check theirs. Bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from megashear import config_io
from megashear.atomic_file import write_json_atomic
from megashear.config import RunConfig

logger = logging.getLogger(__name__)


def load_run_config(path: str) -> RunConfig:
    """A run config from YAML, its model the checkpoint's (``checkpoint.load``) with the
    YAML's ``model.seq_length``."""
    from megashear.checkpoint.format import read_meta, resolve
    from megashear.model_config import ModelConfig

    data = config_io.load_yaml(path)
    cfg = config_io.from_dict(RunConfig, data)
    if cfg.checkpoint.load:
        saved = ModelConfig.from_dict(read_meta(resolve(cfg.checkpoint.load))["model"])
        cfg.model = dataclasses.replace(saved, seq_length=cfg.model.seq_length)
    return cfg


def evaluate(cfg: RunConfig) -> dict[str, float]:
    """Per-domain loss of ``cfg.checkpoint.load`` on ``cfg.data.eval_split``: the job of
    ``megashear evaluate`` (:mod:`megashear.jobs.evaluate`)."""
    from megashear.jobs.evaluate import run

    return run(cfg)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def write_result(path: str, value: object) -> None:
    """Rank 0 writes ``value`` as JSON to ``path`` (temporary name, then rename)."""
    if _is_rank0():
        write_json_atomic(path, value)


TASKS = {"evaluate": evaluate}


def main(argv: list[str] | None = None) -> int:
    """``TASK CONFIG.yaml RESULT.json``; exit code 0, or 2 with one ``error:`` line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in TASKS:
        sys.stderr.write(f"error: usage: worker {{{','.join(TASKS)}}} CONFIG.yaml RESULT.json\n")
        return 2
    task, config, result = args
    from megashear import platform
    from megashear.config_checks import check_run_config
    from megashear.parallel import destroy

    try:
        cfg = load_run_config(config)
        check_run_config(cfg, task, platform.cuda_available())
        write_result(result, TASKS[task](cfg))
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return 2
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
