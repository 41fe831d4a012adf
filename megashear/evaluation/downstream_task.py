"""A local lm-eval task from held-out corpus text: 4-way multiple-choice continuation.

Each item is a passage of about ``context_chars`` characters from one document (it starts at a
line or sentence start where the document has one), its true continuation (the next words, up to
the first word end past a target length drawn from ``min_continuation_chars``-
``max_continuation_chars``), and three distractors: spans from random word starts of three
*other* documents of the same domain, cut by the same rule at the same target length (so true and
false choices have the same length distribution and a model that prefers short or long choices
scores chance), each led by the same whitespace that separates the passage from its true
continuation. The four choices are shuffled with a seeded generator; lm-eval scores them by
log-likelihood (``acc``) and by log-likelihood per character (``acc_norm``), as it scores
HellaSwag. Chance is 0.25.

**Held out.** Training, pruning and preprocessing read each domain's corpus file from its start
(``tools/preprocess_data.py --max-bytes-per-domain``, at most 2 MB in ``tools/demo.py`` and
``tools/shear_experiment.py``). Items are built only from documents that start after the first
``min_skip_bytes`` of text, counted as ``--max-bytes-per-domain`` counts it (decoded characters of
the non-empty lines, newlines included, never more than the byte count; that reader stops only
after the line that crosses its limit, so the region starts at a line boundary past the limit).
With ``tail_bytes`` the region is the file's last ``tail_bytes`` bytes instead, and a request
whose region would reach into the first ``min_skip_bytes`` is refused. The task's metadata
records, per domain, the decompressed byte offset and the character count where the region
starts.

The task directory holds ``<name>.yaml`` (the lm-eval task config), ``<name>.jsonl`` (the items),
``<name>_loader.py`` (a ``custom_dataset`` function that reads the items beside it, so the
directory can be moved and nothing is fetched) and ``<name>.meta.json`` (the build metadata);
each is written under a temporary name and renamed.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import json
import logging
import lzma
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from megashear.atomic_file import write_text_atomic

log = logging.getLogger(__name__)

# Twice the most that tools/shear_experiment.py reads per domain by default (2 MB).
DEFAULT_MIN_SKIP_BYTES = 4_000_000
DEFAULT_TASK_NAME = "megashear_heldout"
CORPUS_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz", ".jsonl.bz2")
TASK_VERSION = 1
NUM_CHOICES = 4
_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"(?:[.!?:;][\"')\]]*\s+|\n\s*)$")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How to build the task.

    Args:
        items_per_domain: items drawn from each domain (one per held-out document).
        context_chars: the passage's length in characters (it ends at a word end at or past it).
        min_continuation_chars, max_continuation_chars: the range the true continuation's target
            length is drawn from; it ends at the first word end at or past that target.
        seed: seeds the documents, positions, distractors and choice order.
        min_skip_bytes: the leading text of each file that no item may come from.
        tail_bytes: take the held-out region from the file's last ``tail_bytes`` bytes (None:
            everything past ``min_skip_bytes``).
        name: the lm-eval task name (also the files' stem).
    """

    items_per_domain: int = 30
    context_chars: int = 256
    min_continuation_chars: int = 60
    max_continuation_chars: int = 100
    seed: int = 1234
    min_skip_bytes: int = DEFAULT_MIN_SKIP_BYTES
    tail_bytes: int | None = None
    name: str = DEFAULT_TASK_NAME

    def check(self) -> None:
        """Raise a one-line ``ValueError`` for a spec that cannot make a task."""
        if self.items_per_domain < 1:
            raise ValueError(f"items per domain must be at least 1, got {self.items_per_domain}")
        if self.context_chars < 16:
            raise ValueError(f"context chars must be at least 16, got {self.context_chars}")
        if not 8 <= self.min_continuation_chars <= self.max_continuation_chars:
            raise ValueError(
                "continuation chars need 8 <= min <= max, got "
                f"{self.min_continuation_chars}..{self.max_continuation_chars}"
            )
        if self.min_skip_bytes < 0:
            raise ValueError(f"min skip bytes must be >= 0, got {self.min_skip_bytes}")
        if self.tail_bytes is not None and self.tail_bytes < 1:
            raise ValueError(f"tail bytes must be at least 1, got {self.tail_bytes}")
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"task name must match [A-Za-z][A-Za-z0-9_]*, got {self.name!r}")


@dataclasses.dataclass
class HeldOut:
    """One domain's held-out documents and where its held-out region starts."""

    domain: str
    path: Path
    total_bytes: int
    start_byte: int
    start_chars: int
    docs: list[tuple[int, int, str]]  # (line index, decompressed byte offset, text)


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def corpus_files(corpus_dir: str | os.PathLike) -> dict[str, Path]:
    """Domain name -> JSON Lines file (``<domain>.jsonl[.xz|.gz|.bz2]``) in ``corpus_dir``."""
    root = Path(corpus_dir)
    if not root.is_dir():
        raise ValueError(f"corpus {root} is not a directory")
    out: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        for suffix in CORPUS_SUFFIXES:
            if path.name.endswith(suffix) and path.is_file():
                domain = path.name[: -len(suffix)]
                if domain in out:
                    raise ValueError(f"corpus {root} has two files for domain {domain!r}")
                out[domain] = path
    if not out:
        raise ValueError(f"corpus {root} has no *.jsonl[.xz|.gz|.bz2] files")
    return out


def _lines(path: Path) -> Iterator[tuple[int, int, int, bytes]]:
    """(line index, byte offset, characters before it as preprocess counts them, raw line)."""
    offset = chars = 0
    with _open_binary(path) as f:
        for index, line in enumerate(f):
            yield index, offset, chars, line
            offset += len(line)
            if line.strip():
                chars += len(line.decode("utf-8", errors="surrogateescape"))


def read_heldout(
    domain: str, path: Path, min_skip_bytes: int, tail_bytes: int | None = None
) -> HeldOut:
    """The documents of ``path`` in its held-out region (see the module docstring).

    Raises a one-line ``ValueError`` when the region would overlap the first ``min_skip_bytes``
    or holds no document.
    """
    kept: list[tuple[int, int, int, bytes]] = []
    total = 0
    for index, offset, chars, line in _lines(path):
        total = offset + len(line)
        if chars >= min_skip_bytes:
            kept.append((index, offset, chars, line))
    floor = 0
    if tail_bytes is not None:
        floor = total - tail_bytes
        if floor < min_skip_bytes:
            raise ValueError(
                f"the held-out region of {path.name} (its last {tail_bytes} bytes, from byte "
                f"{max(floor, 0)} of {total}) overlaps the first --min-skip-bytes="
                f"{min_skip_bytes} bytes that runs may read"
            )
    region = [r for r in kept if r[1] >= floor]
    docs: list[tuple[int, int, str]] = []
    for index, offset, _, line in region:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path.name} line {index + 1} is not JSON: {exc}") from None
        text = doc.get("text") if isinstance(doc, dict) else None
        if isinstance(text, str) and text.strip():
            docs.append((index, offset, text))
    if not region or not docs:
        raise ValueError(
            f"{path.name} has no document past its first --min-skip-bytes={min_skip_bytes} bytes "
            f"({total} bytes in all); nothing is held out"
        )
    return HeldOut(domain, path, total, region[0][1], region[0][2], docs)


def _span(
    text: str, words: list[re.Match[str]], first: int, min_chars: int
) -> tuple[int, int] | None:
    """The words from ``first`` on, up to the first word end at least ``min_chars`` past the
    start: (index of the last word, end offset), or None when the text ends first."""
    start = words[first].start()
    for j in range(first, len(words)):
        if words[j].end() - start >= min_chars:
            return j, words[j].end()
    return None


def _distractor(
    rng: random.Random, pool: list[str], avoid: set[int], target: int, cap: int
) -> tuple[int, str] | None:
    """A span from a random word start of a random document of ``pool`` not in ``avoid`` to
    the first word end at least ``target`` characters on (the rule that cut the true
    continuation, so the lengths of the true and the false choices have the same distribution),
    at most ``cap`` characters: (document index, text), or None after a bounded number of tries.
    """
    for _ in range(64):
        d = rng.randrange(len(pool))
        text = pool[d]
        if d in avoid or len(text) < target:
            continue
        first = _WORD.search(text, rng.randrange(len(text)))
        if first is None:
            continue
        if first.start() > 0 and not text[first.start() - 1].isspace():
            first = _WORD.search(text, first.end())  # the next whole word
            if first is None:
                continue
        start = first.start()
        for word in _WORD.finditer(text, start):
            if word.end() - start >= target:
                if word.end() - start <= cap:
                    return d, text[start : word.end()]
                break
    return None


def _item(
    rng: random.Random, spec: TaskSpec, pool: list[str], d: int
) -> tuple[str, list[str], int] | None:
    """(context, choices, label) from document ``d`` of ``pool``, or None when it cannot give
    one (too short, a word longer than the continuation, no distinct distractors)."""
    text = pool[d]
    need = spec.context_chars + spec.max_continuation_chars
    words = list(_WORD.finditer(text))
    starts = [i for i, w in enumerate(words) if len(text) - w.start() >= need]
    if not starts:
        return None
    sentence = [
        i
        for i in starts
        if i == 0 or _SENTENCE_END.search(text[max(0, words[i].start() - 8) : words[i].start()])
    ]
    first = rng.choice(sentence or starts)
    ctx = _span(text, words, first, spec.context_chars)
    if ctx is None or ctx[0] + 1 >= len(words):
        return None
    last, ctx_end = ctx
    context = text[words[first].start() : ctx_end]
    if len(context) > 2 * spec.context_chars:
        return None
    target = rng.randint(spec.min_continuation_chars, spec.max_continuation_chars)
    cont = _span(text, words, last + 1, target)
    if cont is None:
        return None
    sep = text[ctx_end : words[last + 1].start()]
    truth = text[words[last + 1].start() : cont[1]]
    if len(truth) > 2 * spec.max_continuation_chars:
        return None
    choices = [sep + truth]
    seen = {" ".join(truth.split())}
    avoid = {d}
    while len(choices) < NUM_CHOICES:
        got = _distractor(rng, pool, avoid, target, 2 * spec.max_continuation_chars)
        if got is None:
            return None
        doc, span = got
        key = " ".join(span.split())
        avoid.add(doc)
        if key in seen or key in " ".join(context.split()):
            continue
        seen.add(key)
        choices.append(sep + span)
    order = list(range(NUM_CHOICES))
    rng.shuffle(order)
    return context, [choices[i] for i in order], order.index(0)


def build_items(heldout: HeldOut, spec: TaskSpec) -> list[dict[str, Any]]:
    """``spec.items_per_domain`` items from one domain's held-out documents, one per document,
    in a seeded order that depends only on the seed, the domain and the documents."""
    rng = random.Random(f"megashear-heldout:{spec.seed}:{heldout.domain}")
    pool = [text for _, _, text in heldout.docs]
    order = list(range(len(pool)))
    rng.shuffle(order)
    items: list[dict[str, Any]] = []
    for d in order:
        got = _item(rng, spec, pool, d)
        if got is None:
            continue
        context, choices, label = got
        line, offset, _ = heldout.docs[d]
        items.append(
            {
                "id": f"{heldout.domain}-{len(items)}",
                "domain": heldout.domain,
                "line": line,
                "byte_offset": offset,
                "context": context,
                "choices": choices,
                "label": label,
            }
        )
        if len(items) == spec.items_per_domain:
            return items
    raise ValueError(
        f"domain {heldout.domain} gives only {len(items)} of {spec.items_per_domain} items from "
        f"its {len(pool)} held-out documents (too few or too short; lower --items-per-domain or "
        "--context-chars)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_LOADER = '''"""Reads the items of lm-eval task {name!r} beside this file (written by
megashear.evaluation.downstream_task; local files only, nothing is fetched)."""

import json
from pathlib import Path

DATA = Path(__file__).with_name({data!r})


def load(**kwargs):
    """lm-eval's ``custom_dataset``: the items as a one-split DatasetDict ("test")."""
    import datasets

    with DATA.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({{"test": datasets.Dataset.from_list(rows)}})
'''


def task_yaml(name: str, metadata: dict[str, Any]) -> str:
    """The lm-eval task config (``metadata`` is recorded in it, and lm-eval passes it to the
    loader, which ignores it)."""
    import yaml

    meta = yaml.safe_dump({"metadata": metadata}, sort_keys=False, width=100)
    return (
        f"# lm-eval task built by megashear.evaluation.downstream_task from held-out corpus text.\n"
        f"# 4-way multiple-choice continuation; chance is 0.25. Do not edit: rebuild instead.\n"
        f"task: {name}\n"
        f"custom_dataset: !function {name}_loader.load\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "num_fewshot: 0\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        f"{meta}"
    )


def task_files(task_dir: str | os.PathLike, name: str = DEFAULT_TASK_NAME) -> dict[str, Path]:
    """The paths of a task's files: yaml, data, loader, meta."""
    root = Path(task_dir)
    return {
        "yaml": root / f"{name}.yaml",
        "data": root / f"{name}.jsonl",
        "loader": root / f"{name}_loader.py",
        "meta": root / f"{name}.meta.json",
    }


def build_task(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: TaskSpec | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the task from every domain file in ``corpus_dir`` into ``out_dir``.

    Returns the build metadata (also written to ``<name>.meta.json``): the task name and path,
    items per domain, the spec, and per domain the held-out region's start (decompressed byte
    offset and preprocess-style character count), the file's size and sha256. Bad input is a
    one-line ``ValueError``; an existing task of that name needs ``overwrite``.
    """
    spec = spec or TaskSpec()
    spec.check()
    files = corpus_files(corpus_dir)
    out = Path(out_dir)
    paths = task_files(out, spec.name)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if paths["yaml"].exists() and not overwrite:
        raise ValueError(f"{paths['yaml']} exists; pass --overwrite to rebuild it")
    per_domain: list[list[dict[str, Any]]] = []
    domains: dict[str, Any] = {}
    for domain, path in files.items():
        held = read_heldout(domain, path, spec.min_skip_bytes, spec.tail_bytes)
        got = build_items(held, spec)
        per_domain.append(got)
        domains[domain] = {
            "file": path.name,
            "sha256": _sha256(path),
            "decompressed_bytes": held.total_bytes,
            "heldout_start_byte": held.start_byte,
            "heldout_start_chars": held.start_chars,
            "heldout_documents": len(held.docs),
            "items": len(got),
        }
        log.info(
            "%s: %d items from %d held-out documents (region from byte %d of %d)",
            domain,
            len(got),
            len(held.docs),
            held.start_byte,
            held.total_bytes,
        )
    # Round robin over the domains, so that lm-eval's --limit N scores a mixed sample.
    items = [group[i] for i in range(spec.items_per_domain) for group in per_domain]
    meta: dict[str, Any] = {
        "task": spec.name,
        "version": TASK_VERSION,
        "items": len(items),
        "choices": NUM_CHOICES,
        "chance": 1.0 / NUM_CHOICES,
        "spec": dataclasses.asdict(spec),
        "domains": domains,
    }
    out.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    write_text_atomic(paths["data"], data)
    write_text_atomic(paths["loader"], _LOADER.format(name=spec.name, data=paths["data"].name))
    write_text_atomic(paths["meta"], json.dumps(meta, indent=1) + "\n")
    yaml_meta = {
        "version": TASK_VERSION,
        "items": len(items),
        "seed": spec.seed,
        "min_skip_bytes": spec.min_skip_bytes,
        "heldout_start_byte": {d: v["heldout_start_byte"] for d, v in domains.items()},
    }
    # The config goes last: a task whose YAML exists is complete.
    write_text_atomic(paths["yaml"], task_yaml(spec.name, yaml_meta))
    return {"task_dir": str(out), "yaml": str(paths["yaml"]), **meta}


def find_task(task_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The task name and build metadata of the one task in ``task_dir`` (one-line ValueError
    when there is none or more than one)."""
    root = Path(task_dir)
    if not root.is_dir():
        raise ValueError(f"task {root} is not a directory")
    metas = sorted(root.glob("*.meta.json"))
    names = [m.name[: -len(".meta.json")] for m in metas]
    names = [n for n in names if task_files(root, n)["yaml"].is_file()]
    if len(names) != 1:
        raise ValueError(
            f"task {root} holds {len(names)} built tasks ({', '.join(names) or 'none'}); "
            "expected one (build it with tools/downstream_eval.py build)"
        )
    name = names[0]
    try:
        meta = json.loads(task_files(root, name)["meta"].read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{task_files(root, name)['meta']} is not JSON: {exc}") from None
    return name, meta


def load_items(task_dir: str | os.PathLike, name: str = DEFAULT_TASK_NAME) -> list[dict]:
    """The items of a built task, in file order."""
    with open(task_files(task_dir, name)["data"], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
