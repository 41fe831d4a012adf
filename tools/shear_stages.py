"""The stages of shearing a real model, as commands: shared by ``tools/demo.py``,
``tools/shear_experiment.py``, ``tools/p2_sweep.py`` and ``tools/target_sizes.py``.

The stages live in the library now (:mod:`megashear.pipeline.stages`, typed results read from
the files each stage writes); this module keeps the scripts' API: :class:`ShearStages` returns
the dictionaries the scripts read (``converted["model"]``, ``final["parameters"]``),
:func:`load_fetcher` loads ``tools/fetch_smollm2.py``, and the atomic writers and
:func:`cached` are re-exported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megashear.atomic_file import write_json_atomic, write_text_atomic
from megashear.pipeline import stages as _stages
from megashear.pipeline.runner import cached
from megashear.pipeline.stages import DOMAINS, SMOLLM2_EOS, manifest_with_weights

__all__ = [
    "DOMAINS",
    "SMOLLM2_EOS",
    "ShearStages",
    "cached",
    "corpus_files",
    "load_fetcher",
    "manifest_with_weights",
    "write_json_atomic",
    "write_text_atomic",
]


def corpus_files(corpus: Path) -> list[str]:
    """The six domains' files; a one-line ``SystemExit`` naming the missing ones."""
    try:
        return _stages.corpus_files(corpus)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def load_fetcher():
    """``tools/fetch_smollm2.py`` as a module (its ``ensure_smollm2`` caches the model)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "megashear_fetch_smollm2", Path(__file__).resolve().parent / "fetch_smollm2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ShearStages(_stages.ShearStages):
    """:class:`megashear.pipeline.stages.ShearStages` with the scripts' return values: the
    checkpoint stages return ``{"path", "model", "parameters"}`` dictionaries."""

    def prepare(self, *args, **kwargs) -> tuple[dict, Path]:
        """See :meth:`megashear.pipeline.stages.ShearStages.prepare`; a missing corpus domain
        is a one-line ``SystemExit``."""
        corpus = kwargs.get("corpus", args[1] if len(args) > 1 else None)
        corpus_files(Path(corpus))
        converted, manifest = super().prepare(*args, **kwargs)
        return dataclasses.asdict(converted), manifest

    def finalize(self, *args, **kwargs) -> dict:
        return dataclasses.asdict(super().finalize(*args, **kwargs))

    def one_shot(self, *args, **kwargs) -> dict:
        return dataclasses.asdict(super().one_shot(*args, **kwargs))

    def importance(self, *args, **kwargs) -> dict:
        return {"importance": str(super().importance(*args, **kwargs))}

    def prune(self, *args, **kwargs) -> None:
        super().prune(*args, **kwargs)

    def train(self, *args, **kwargs) -> None:
        super().train(*args, **kwargs)

    def export(self, stage: str, load: Path, hf_dir: Path, tokenizer: Path, **kwargs) -> str:
        super().export(stage, load, hf_dir, tokenizer, **kwargs)
        return str(hf_dir)
