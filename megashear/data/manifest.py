"""The domain manifest: which per-domain datasets a run reads, and with which weights.

YAML written by ``tools/preprocess_data.py``::

    tokenizer: /path/tokenizer.model
    vocab_size: 32000
    tokenizer_kind: sentencepiece   # or huggingface (a tokenizer.json)
    bos_id: 1
    eos_id: 2
    add_bos: false                  # documents start with BOS
    add_eos: true                   # documents end with EOS
    domains:
      - {name: web, train_prefix: data/web_train, valid_prefix: data/web_valid,
         weight: 0.67, reference_loss: 1.75}
      ...

A domain may also have a ``test_prefix``: a held-out split that training and dynamic batch
loading never read (``megashear evaluate --data.eval_split=test`` reports on it).
Prefixes name megatron-core indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``). Weights are
normalised on load; ``reference_loss`` may be null (then only the constant update rule runs).
The tokenizer fields after ``vocab_size`` are optional (null: not recorded, as in manifests
written before they existed).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import yaml

from megashear.atomic_file import write_text_atomic

# Manifest fields describing how documents were tokenized (all optional).
TOKENIZER_FIELDS = ("tokenizer_kind", "bos_id", "eos_id", "add_bos", "add_eos")


@dataclass
class Domain:
    name: str
    train_prefix: str
    valid_prefix: str
    weight: float = 1.0
    reference_loss: float | None = None
    test_prefix: str | None = None


@dataclass
class Manifest:
    domains: list[Domain]
    tokenizer: str = ""
    vocab_size: int | None = None
    tokenizer_kind: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    path: str = field(default="", repr=False)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def weights(self) -> list[float]:
        total = sum(d.weight for d in self.domains)
        return [d.weight / total for d in self.domains]

    def references(self) -> dict[str, float] | None:
        refs = {d.name: d.reference_loss for d in self.domains}
        return None if any(v is None for v in refs.values()) else refs

    def set_reference_losses(self, losses: dict[str, float]) -> None:
        unknown = sorted(set(losses) - set(self.names))
        if unknown:
            raise ValueError(f"reference losses for unknown domains {unknown}; known: {self.names}")
        for d in self.domains:
            if d.name in losses:
                d.reference_loss = float(losses[d.name])

    def validate(self, check_files: bool = True) -> None:
        """Raise ``ValueError`` (one line) for an unusable manifest."""
        if not self.domains:
            raise ValueError("manifest has no domains")
        names = self.names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"manifest repeats domains {dupes}")
        negative = [d.name for d in self.domains if d.weight < 0]
        if negative:
            raise ValueError(f"manifest weights must be >= 0; negative for {negative}")
        if sum(d.weight for d in self.domains) <= 0:
            raise ValueError("manifest weights sum to zero")
        if check_files:
            for d in self.domains:
                for prefix in filter(None, (d.train_prefix, d.valid_prefix, d.test_prefix)):
                    for ext in (".bin", ".idx"):
                        if not os.path.isfile(prefix + ext):
                            raise ValueError(f"domain {d.name}: {prefix + ext} does not exist")


def _resolve(base: str, path: str) -> str:
    return path if not path or os.path.isabs(path) else os.path.join(base, path)


def load_manifest(path: str, check_files: bool = True) -> Manifest:
    """Read and validate a manifest; relative paths are relative to the manifest's folder."""
    if not os.path.isfile(path):
        raise ValueError(f"manifest {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = " ".join(str(exc).split())
        raise ValueError(f"manifest {path} is not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"manifest {path} must hold a mapping (tokenizer, vocab_size, domains)")
    base = os.path.dirname(os.path.abspath(path))
    entries = data.get("domains") or []
    if not isinstance(entries, list) or not all(isinstance(d, dict) for d in entries):
        raise ValueError(f"manifest {path}: 'domains' must be a list of mappings")
    try:
        domains = [Domain(**d) for d in entries]
    except TypeError as exc:
        raise ValueError(f"manifest {path}: bad domain entry ({exc})") from exc
    for d in domains:
        d.train_prefix = _resolve(base, d.train_prefix)
        d.valid_prefix = _resolve(base, d.valid_prefix)
        if d.test_prefix:
            d.test_prefix = _resolve(base, d.test_prefix)
    m = Manifest(
        domains,
        tokenizer=_resolve(base, data.get("tokenizer", "")),
        vocab_size=data.get("vocab_size"),
        **{k: data.get(k) for k in TOKENIZER_FIELDS},
        path=path,
    )
    m.validate(check_files)
    return m


def save_manifest(m: Manifest, path: str) -> None:
    """Write atomically (temporary name, then rename); paths are written as given."""
    data = {
        "tokenizer": m.tokenizer,
        "vocab_size": m.vocab_size,
        **{k: getattr(m, k) for k in TOKENIZER_FIELDS},
        "domains": [asdict(d) for d in m.domains],
    }
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
