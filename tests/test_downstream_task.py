"""The held-out lm-eval task builder (megashear.evaluation.downstream_task) on a synthetic corpus.

Fast: a few small generated domains in tmp_path, never the real corpus text. Scoring a real model
takes minutes on the CPU (docs/downstream_eval.md gives the measurement), so it is not here.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import random
from pathlib import Path

import pytest

from megashear.evaluation.downstream_task import (
    TaskSpec,
    build_task,
    find_task,
    load_items,
    read_heldout,
    task_files,
)

ROOT = Path(__file__).parents[1]
SPEC = TaskSpec(
    items_per_domain=6,
    context_chars=120,
    min_continuation_chars=30,
    max_continuation_chars=45,
    seed=7,
    min_skip_bytes=20_000,
)
MARKER = "Zyzzyva"  # only in the documents that runs may read


def _document(rng: random.Random, words: list[str], n_sentences: int, marker: bool) -> str:
    sentences = []
    for _ in range(n_sentences):
        n = rng.randint(6, 14)
        s = " ".join(rng.choice(words) for _ in range(n))
        if marker and rng.random() < 0.5:
            s += f" {MARKER}"
        sentences.append(s[0].upper() + s[1:] + ".")
    return " ".join(sentences)


def write_corpus(root: Path, domains: tuple[str, ...] = ("alpha", "beta")) -> Path:
    """A corpus of xz JSON Lines files: 40 KB per domain, the first 20 KB marked."""
    root.mkdir(parents=True, exist_ok=True)
    for k, domain in enumerate(domains):
        rng = random.Random(k)
        words = [f"{domain[:2]}{rng.randrange(10_000)}" for _ in range(300)]
        lines, size = [], 0
        while size < 40_000:
            doc = {"text": _document(rng, words, rng.randint(4, 12), size < 20_000)}
            line = json.dumps(doc) + "\n"
            lines.append(line)
            size += len(line)
            if len(lines) % 9 == 0:
                lines.append("\n")  # blank lines are skipped, as preprocess skips them
        with lzma.open(root / f"{domain}.jsonl.xz", "wt", encoding="utf-8") as f:
            f.writelines(lines)
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def _doc_texts(corpus: Path) -> dict[str, list[str]]:
    out = {}
    for path in corpus.glob("*.jsonl.xz"):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            out[path.name[: -len(".jsonl.xz")]] = [json.loads(x)["text"] for x in f if x.strip()]
    return out


def test_items_come_only_from_the_held_out_region(corpus: Path, tmp_path: Path) -> None:
    meta = build_task(corpus, tmp_path / "task", SPEC)
    items = load_items(tmp_path / "task")
    assert meta["items"] == len(items) == 2 * SPEC.items_per_domain
    for d in meta["domains"].values():
        assert d["heldout_start_chars"] >= SPEC.min_skip_bytes
        assert d["heldout_start_byte"] >= d["heldout_start_chars"]
        assert d["items"] == SPEC.items_per_domain
    for item in items:
        start = meta["domains"][item["domain"]]["heldout_start_byte"]
        assert item["byte_offset"] >= start
        assert MARKER not in item["context"] and all(MARKER not in c for c in item["choices"])
    yaml_text = task_files(tmp_path / "task")["yaml"].read_text()
    assert "heldout_start_byte:" in yaml_text and "min_skip_bytes: 20000" in yaml_text


def test_the_region_starts_past_what_preprocess_reads(corpus: Path) -> None:
    """preprocess reads whole lines until it has read --max-bytes-per-domain characters; the
    region starts at the first line boundary at or past that count."""
    held = read_heldout("alpha", corpus / "alpha.jsonl.xz", SPEC.min_skip_bytes)
    with lzma.open(corpus / "alpha.jsonl.xz", "rt", encoding="utf-8") as f:
        read, size = 0, 0
        for line in f:
            if line.strip():
                read += 1
                size += len(line)
                if size >= SPEC.min_skip_bytes:
                    break
    assert held.start_chars == size
    first_line = held.docs[0][0]
    with lzma.open(corpus / "alpha.jsonl.xz", "rt", encoding="utf-8") as f:
        nonblank_before = sum(1 for i, x in enumerate(f) if i < first_line and x.strip())
    assert nonblank_before == read


def test_a_region_overlapping_the_skip_is_refused(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overlaps the first --min-skip-bytes=20000") as err:
        build_task(corpus, tmp_path / "t", TaskSpec(**{**vars(SPEC), "tail_bytes": 30_000}))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="nothing is held out") as err:
        build_task(corpus, tmp_path / "t", TaskSpec(**{**vars(SPEC), "min_skip_bytes": 10**6}))
    assert "\n" not in str(err.value)
    # a tail inside the region is fine, and its items come from that tail
    meta = build_task(corpus, tmp_path / "t", TaskSpec(**{**vars(SPEC), "tail_bytes": 15_000}))
    for d in meta["domains"].values():
        assert d["heldout_start_byte"] >= d["decompressed_bytes"] - 15_000


def test_the_build_is_deterministic_under_a_seed(corpus: Path, tmp_path: Path) -> None:
    build_task(corpus, tmp_path / "a", SPEC)
    build_task(corpus, tmp_path / "b", SPEC)
    build_task(corpus, tmp_path / "c", TaskSpec(**{**vars(SPEC), "seed": 8}))
    data = {k: task_files(tmp_path / k)["data"].read_bytes() for k in "abc"}
    assert data["a"] == data["b"] != data["c"]
    assert task_files(tmp_path / "a")["yaml"].read_bytes() == (
        task_files(tmp_path / "b")["yaml"].read_bytes()
    )
    # only the task's four files, no temporary left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        p.name for p in task_files(tmp_path / "a").values()
    )


def test_four_distinct_choices_one_true(corpus: Path, tmp_path: Path) -> None:
    build_task(corpus, tmp_path / "task", SPEC)
    docs = _doc_texts(corpus)
    labels = set()
    for item in load_items(tmp_path / "task"):
        choices, label = item["choices"], item["label"]
        assert len(choices) == 4 and len({" ".join(c.split()) for c in choices}) == 4
        assert 0 <= label < 4
        labels.add(label)
        assert len(item["context"]) >= SPEC.context_chars
        # the true choice continues the passage in its document; no distractor does
        same_domain = docs[item["domain"]]
        assert any(item["context"] + choices[label] in t for t in same_domain)
        for k, c in enumerate(choices):
            assert c[:1].isspace() and c.strip()
            # every choice is cut by one rule: words up to the first end past a target length
            body = c.lstrip()
            assert SPEC.min_continuation_chars <= len(body) <= 2 * SPEC.max_continuation_chars
            if k != label:
                assert not any(item["context"] + c in t for t in same_domain)
    assert len(labels) > 1  # shuffled


def test_the_task_loads_with_lm_eval(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install -e .[eval])")
    from lm_eval.tasks import TaskManager

    build_task(corpus, tmp_path / "task", SPEC)
    manager = TaskManager(include_path=str(tmp_path / "task"), include_defaults=False)
    assert "megashear_heldout" in manager.all_tasks
    task = manager.load(["megashear_heldout"])["tasks"]["megashear_heldout"]
    docs = list(task.test_docs())
    items = load_items(tmp_path / "task")
    assert len(docs) == len(items)
    assert task.OUTPUT_TYPE == "multiple_choice"
    assert task.doc_to_text(docs[0]) == items[0]["context"]
    assert task.doc_to_choice(docs[0]) == items[0]["choices"]
    assert task.doc_to_target(docs[0]) == items[0]["label"]
    # lm-eval's requests: context + "" (no delimiter) and each choice
    instances = task.construct_requests(docs[0], task.doc_to_text(docs[0]), metadata=("x", 0, 1))
    assert [r.arguments for r in instances] == [
        (items[0]["context"], c) for c in items[0]["choices"]
    ]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "megashear_downstream_eval", ROOT / "tools" / "downstream_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "--corpus", "{tmp}/nope", "--out", "{tmp}/t"], "is not a directory"),
        (["build", "--corpus", "{tmp}/empty", "--out", "{tmp}/t"], "has no *.jsonl"),
        (["build", "--corpus", "{corpus}", "--out", "{tmp}/t", "--items-per-domain", "0"], "at"),
        (["build", "--corpus", "{corpus}", "--out", "{tmp}/t", "--tail-bytes", "0"], "tail"),
        (["build", "--corpus", "{corpus}", "--out", "{tmp}/t", "--name", "a-b"], "task name"),
        (["build", "--corpus", "{corpus}", "--out", "{tmp}/t"], "nothing is held out"),
        (["score", "--model", "{tmp}/nope", "--task", "{tmp}/t"], "not a local directory"),
        (["score", "--model", "{tmp}", "--task", "{tmp}/t"], "no config.json"),
        (["score", "--model", "{tmp}/m", "--task", "{tmp}/empty"], "holds 0 built tasks"),
        (["score", "--model", "{tmp}/m"], "required"),
        (["greedy", "--model", "{tmp}/nope"], "not a local directory"),
        (["greedy", "--model", "{tmp}/m", "--task", "{corpus}", "--per-domain", "0"], "at least"),
        (["greedy", "--model", "{tmp}/m", "--new-tokens", "2"], "at least n"),
        (["greedy", "--model", "{tmp}/m", "--threads", "0"], "threads must be at least 1"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line(
    argv: list[str], message: str, corpus: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    argv = [a.format(tmp=tmp_path, corpus=corpus) for a in argv]
    try:
        code = _tool().main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err


def test_an_existing_task_needs_overwrite(corpus: Path, tmp_path: Path, capsys) -> None:
    args = ["build", "--corpus", str(corpus), "--out", str(tmp_path / "t")]
    args += ["--items-per-domain", "3", "--context-chars", "100", "--min-skip-bytes", "20000"]
    assert _tool().main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["items"] == 6 and find_task(tmp_path / "t")[0] == "megashear_heldout"
    assert _tool().main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _tool().main([*args, "--overwrite"]) == 0
