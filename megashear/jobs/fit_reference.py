"""``megashear fit-reference``: per-domain reference losses at a target size from a scaling law.

Fits ``L(N) = a·N^(-b) + c`` per domain to the validation losses of a family of source models
(:mod:`megashear.data.reference_loss`, docs/method.md §5) and evaluates it at the target's total
parameter count (embeddings, LM head and norms included): the reference losses that dynamic
batch loading compares a pruned model's losses with. ``write_manifest`` stores them in a domain
manifest as its ``reference_loss``.

``tools/fit_reference_loss.py`` is the same function under its old flags (``FILE.json
--target-params N``); error messages name the flags the way the caller spelled them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from megashear.jobs.common import UsageError


@dataclass
class FitReferenceConfig:
    """``megashear fit-reference``: reference losses at the target size, as JSON."""

    points: str = ""
    """JSON file {domain: [[params, loss], ...]}: the validation losses of three or more source
    models per domain. Required."""
    target_params: float | None = None
    """The target's parameter count (embeddings, LM head and norms included); give it or
    target_preset."""
    target_preset: str = ""
    """A pruning target preset (sheared-llama-2.7b, sheared-llama-1.3b, sheared-llama-370m)
    whose parameter count is the target's; give it or target_params."""
    source_preset: str = "llama2-7b"
    """The source shape target_preset inherits its vocabulary and head dimension from (a
    model preset)."""
    write_manifest: str = ""
    """Also store the losses as reference_loss in this domain manifest ("": do not)."""


def command_flag(name: str) -> str:
    """A config field as ``megashear fit-reference`` spells it: ``--target_params``."""
    return f"--{name}"


def _target_params(cfg: FitReferenceConfig, flag: Callable[[str], str]) -> float:
    if cfg.target_preset and cfg.target_params is not None:
        raise UsageError(f"give {flag('target_params')} or {flag('target_preset')}, not both")
    if cfg.target_preset:
        from megashear.model_config import get_preset
        from megashear.pruning.targets import make_target

        source = get_preset(cfg.source_preset)
        return float(make_target(source, cfg.target_preset).num_parameters())
    n = cfg.target_params
    if n is None:
        raise UsageError(f"fit-reference needs {flag('target_params')} or {flag('target_preset')}")
    if not (n > 0 and math.isfinite(n)):
        raise UsageError(f"{flag('target_params')} must be a positive parameter count, got {n:g}")
    return n


def run(cfg: FitReferenceConfig, flag: Callable[[str], str] = command_flag) -> dict:
    """``{domain: reference loss}`` at the target's size (what the CLI prints as one JSON
    line); with ``write_manifest`` also stored in that manifest.

    Args:
        flag: how error messages name a config field (the caller's spelling of its flag).
    """
    from megashear.data.reference_loss import reference_losses

    if not cfg.points:
        raise UsageError(f"fit-reference needs {flag('points')}")
    if not os.path.isfile(cfg.points):
        raise UsageError(f"{cfg.points} does not exist")
    try:
        with open(cfg.points, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{cfg.points} is not valid JSON ({exc})") from None
    n = _target_params(cfg, flag)
    try:
        losses = reference_losses(data, n)
    except RuntimeError as exc:  # scipy's curve_fit found no fit
        raise UsageError(f"{cfg.points}: {exc}") from None
    if cfg.write_manifest:
        from megashear.data.manifest import load_manifest, save_manifest

        manifest = load_manifest(cfg.write_manifest, check_files=False)
        manifest.set_reference_losses(losses)
        save_manifest(manifest, cfg.write_manifest)
    return losses
