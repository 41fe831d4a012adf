"""Default locations outside the package, each one setting.

- :func:`corpus_dir`: the six-domain text corpus (``web.jsonl.xz`` ... ``stackexchange.jsonl.xz``)
  that the demo, the experiment tool, the benchmarks and the corpus tests read:
  ``$MEGASHEAR_CORPUS`` if set, else ``../shared/corpus`` beside the repository checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def corpus_dir() -> Path:
    """The corpus folder: ``$MEGASHEAR_CORPUS``, else ``REPO_ROOT/../shared/corpus``."""
    env = os.environ.get("MEGASHEAR_CORPUS")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "corpus"
