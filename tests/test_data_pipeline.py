"""Data: sampler statistics, DP slicing, exact resume, update rules, preprocessing round trip,
bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megashear.data import update_rules
from megashear.data.loader import token_stream
from megashear.data.manifest import Domain, Manifest, load_manifest, save_manifest
from megashear.data.sampler import DynamicDomainSampler
from megashear.training.batches import split_for_rank
from tests.launch import megashear_cli

ROOT = Path(__file__).resolve().parents[1]


def test_domain_frequencies_follow_the_weights():
    w = [0.5, 0.3, 0.15, 0.05]
    s = DynamicDomainSampler([1000, 1000, 1000, 1000], w, seed=3)
    picks = np.concatenate([s.next_global_batch(256).domain for _ in range(40)])
    counts = np.bincount(picks, minlength=4)
    n = len(picks)
    expected = np.array(w) * n
    chi2 = float((((counts - expected) ** 2) / expected).sum())
    assert chi2 < 16.27, (counts, expected)  # p = 0.001 for 3 degrees of freedom


def test_dp_slices_are_disjoint_and_cover_the_batch():
    import torch

    batch = {"tokens": torch.arange(16).view(16, 1), "labels": torch.arange(16).view(16, 1)}
    rows = []
    for rank in range(4):
        for mb in split_for_rank(batch, rank, 4, micro_batch_size=2):
            rows += mb["tokens"].view(-1).tolist()
    assert sorted(rows) == list(range(16)) and len(set(rows)) == 16


def run_sampler(steps, change_at, resume_at=None):
    s = DynamicDomainSampler([7, 50, 30], [0.6, 0.2, 0.2], seed=11)
    out = []
    for step in range(steps):
        if step == change_at:
            s.set_weights([0.1, 0.1, 0.8])
        if resume_at is not None and step == resume_at:
            state = json.loads(json.dumps(s.state_dict()))
            s = DynamicDomainSampler([7, 50, 30], [1, 1, 1], seed=11)
            s.load_state_dict(state)
        out.append(s.next_global_batch(8).tolist())
    return out, s


def test_resume_is_exact_across_weight_change_and_epoch_boundary():
    full, s = run_sampler(12, change_at=4)
    assert s.epochs()[0] >= 2  # the 7-sample domain went through several epochs
    for resume_at in (3, 5, 9):
        resumed, _ = run_sampler(12, change_at=4, resume_at=resume_at)
        assert resumed == full


def test_epochs_are_fresh_permutations():
    s = DynamicDomainSampler([5], [1.0], seed=0)
    picks = [j for _ in range(3) for _, j in s.next_global_batch(5).tolist()]
    for e in range(3):
        assert sorted(picks[5 * e : 5 * e + 5]) == list(range(5))
    assert picks[:5] != picks[5:10] or picks[5:10] != picks[10:15]


def test_paper_rule_by_hand():
    w, loss, ref = np.array([0.5, 0.3, 0.2]), np.array([2.0, 1.0, 3.5]), np.array([1.5, 1.2, 3.0])
    # delta = max(l - ref, 0) = [0.5, 0, 0.5]
    u = np.array([0.5 * np.exp(0.5), 0.3, 0.2 * np.exp(0.5)])
    np.testing.assert_allclose(update_rules.get_rule("paper")(w, loss, ref), u / u.sum())


def test_reference_code_rule_by_hand():
    w, loss, ref = np.array([0.5, 0.3, 0.2]), np.array([2.0, 1.0, 3.5]), np.array([1.5, 1.2, 3.0])
    # no clamp: delta = [0.5, -0.2, 0.5], then (1 - c) w + c / k
    u = np.array([0.5 * np.exp(0.5), 0.3 * np.exp(-0.2), 0.2 * np.exp(0.5)])
    u = u / u.sum()
    c = 1e-2
    got = update_rules.get_rule("reference_code")(w, loss, ref, smoothing=c)
    np.testing.assert_allclose(got, (1 - c) * u + c / 3)
    np.testing.assert_allclose(update_rules.get_rule("constant")(w, loss, ref), w)
    with pytest.raises(ValueError, match="unknown update rule"):
        update_rules.get_rule("nope")


def test_sampler_refuses_bad_weights():
    with pytest.raises(ValueError, match="not all 0"):
        DynamicDomainSampler([3, 3], [0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        DynamicDomainSampler([3, 3], [1, -1])


def test_manifest_errors(tmp_path):
    m = Manifest([Domain("a", "x", "y", 1.0), Domain("b", "x", "y", -1.0)])
    with pytest.raises(ValueError, match="negative for \\['b'\\]"):
        m.validate(check_files=False)
    m = Manifest([Domain("a", "x", "y", 0.0)])
    with pytest.raises(ValueError, match="sum to zero"):
        m.validate(check_files=False)
    m = Manifest([Domain("a", "x", "y", 1.0)])
    with pytest.raises(ValueError, match="unknown domains \\['zz'\\]"):
        m.set_reference_losses({"zz": 1.0})
    with pytest.raises(ValueError, match="does not exist"):
        m.validate(check_files=True)
    with pytest.raises(ValueError, match="does not exist"):
        load_manifest(str(tmp_path / "missing.yaml"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    docs = {
        "alpha": ["The 3 cats sat on 12 mats.", "Zwölf Boxkämpfer jagen Viktor!"] * 40,
        "beta": ["def f(x):\n    return x + 1\n", "print('héllo')\t# tab"] * 40,
    }
    for name, texts in docs.items():
        with open(d / f"{name}.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
            f.write("{not json\n")  # one malformed line per domain
    env = {"PYTHONWARNINGS": "ignore"}
    run = dict(capture_output=True, text=True, timeout=300, env={**__import__("os").environ, **env})
    tok = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/train_tokenizer.py"),
            "--input",
            str(d),
            "--vocab-size",
            "300",
            "--output-prefix",
            str(d / "tok"),
        ],
        **run,
    )
    assert tok.returncode == 0, tok.stderr
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/preprocess_data.py"),
            "--input",
            str(d),
            "--tokenizer",
            str(d / "tok.model"),
            "--output-dir",
            str(d / "out"),
            "--valid-tokens-per-domain",
            "50",
            "--workers",
            "2",
            "--max-bad-fraction",
            "0.05",
        ],
        **run,
    )
    return d, docs, out


def test_preprocessing_round_trip(small_data):
    import sentencepiece as spm

    d, docs, out = small_data
    assert out.returncode == 0, out.stderr
    assert "alpha: 80 documents" in out.stdout and "1 malformed lines" in out.stdout
    m = load_manifest(str(d / "out" / "manifest.yaml"))
    assert m.names == ["alpha", "beta"] and m.vocab_size == 300
    sp = spm.SentencePieceProcessor(model_file=str(d / "tok.model"))
    for dom in m.domains:
        stream = np.concatenate([token_stream(dom.valid_prefix), token_stream(dom.train_prefix)])
        texts = [sp.decode(t.tolist()) for t in np.split(stream, np.where(stream == 2)[0] + 1)]
        assert [t for t in texts if t] == [sp.decode(sp.encode(x)) for x in docs[dom.name]]
        assert len(token_stream(dom.valid_prefix)) == 50


def test_preprocessing_fails_on_too_many_bad_lines(small_data, tmp_path):
    d, _, _ = small_data
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/preprocess_data.py"),
            "--input",
            str(d / "alpha.jsonl"),
            "--tokenizer",
            str(d / "tok.model"),
            "--output-dir",
            str(tmp_path),
            "--valid-tokens-per-domain",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "too many malformed lines in alpha (1/81" in proc.stderr
    assert not (tmp_path / "manifest.yaml").exists()


def test_missing_input_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/preprocess_data.py"),
            "--input",
            str(tmp_path / "nope.jsonl"),
            "--tokenizer",
            "t.model",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: input")


def test_vocab_mismatch_is_refused(small_data):
    from megashear.data.loader import check_vocab

    d, _, _ = small_data
    m = load_manifest(str(d / "out" / "manifest.yaml"))
    check_vocab(m, 300)
    with pytest.raises(ValueError, match="tokenizer/model mismatch"):
        check_vocab(m, 32000)


def test_domain_batches_carry_domain_ids(small_data):
    from megashear.data.loader import DomainBatches

    d, _, _ = small_data
    m = load_manifest(str(d / "out" / "manifest.yaml"))
    src = DomainBatches(m, seq_length=8, seed=1, cache_dir=str(d / "cache"))
    batch = src.next_global_batch(6)
    assert batch["tokens"].shape == (6, 8) and batch["domain_id"].shape == (6,)
    assert (batch["labels"][:, :-1] == batch["tokens"][:, 1:]).all()
    state = src.state_dict()
    nxt = src.next_global_batch(6)
    src2 = DomainBatches(m, seq_length=8, seed=1, cache_dir=str(d / "cache"))
    src2.load_state_dict(state)
    assert (src2.next_global_batch(6)["tokens"] == nxt["tokens"]).all()
    save_manifest(m, str(d / "copy.yaml"))


def test_scaling_fit_recovers_a_known_law_and_needs_three_points(tmp_path):
    from megashear.data.reference_loss import reference_losses, scaling_law

    a, b, c = 300.0, 0.3, 0.8
    ns = [1e9, 3e9, 7e9, 13e9, 70e9]
    data = {"x": [[n, float(scaling_law(n, a, b, c))] for n in ns]}
    got = reference_losses(data, 2e9)["x"]
    assert abs(got - float(scaling_law(2e9, a, b, c))) < 1e-6
    with pytest.raises(ValueError, match="domain y: a scaling fit needs at least 3"):
        reference_losses({"y": [[1e9, 2.0], [2e9, 1.9]]}, 1e9)
    # the tool: docs/method.md §5's LLaMA2 losses evaluated at the 1.3B target lie above the 7B ones
    (tmp_path / "pts.json").write_text(
        json.dumps(
            {
                "cc": [[6738415616, 1.7520], [13015864320, 1.6680], [68976648192, 1.4621]],
                "github": [[6738415616, 0.6216], [13015864320, 0.5791], [68976648192, 0.4890]],
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/fit_reference_loss.py"),
            str(tmp_path / "pts.json"),
            "--target-preset",
            "sheared-llama-1.3b",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["cc"] > 1.7520 and out["github"] > 0.6216
    for bad in ("-5", "0", "inf"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools/fit_reference_loss.py"), str(tmp_path / "pts.json"),
             "--target-params", bad],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
            "error: --target-params must be a positive parameter count"
        ), proc.stderr[-500:]


def _splitmix_reference(seed: int, i: int) -> float:
    """keyed_uniform's definition in plain Python integers (no numpy wrap-around)."""
    m = (1 << 64) - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    key = mix((seed ^ 0x5DEECE66D1F0C3A7) & m)
    return (mix((key + (i + 1) * 0x9E3779B97F4A7C15) & m) >> 11) / 2.0**53


def test_keyed_uniform_is_a_pure_function_of_seed_and_index():
    from megashear.data.sampler import keyed_uniform

    u = keyed_uniform(7, 0, 50_000)
    assert u.dtype == np.float64 and 0.0 <= u.min() and u.max() < 1.0
    np.testing.assert_array_equal(keyed_uniform(7, 1234, 10), u[1234:1244])  # any range alone
    for i in (0, 1, 49_999):
        assert u[i] == _splitmix_reference(7, i)
    assert keyed_uniform(-3, 2**40, 1)[0] == _splitmix_reference(-3, 2**40)
    assert not np.array_equal(keyed_uniform(8, 0, 100), u[:100])
    hist = np.bincount((u * 10).astype(int), minlength=10)
    assert hist.min() > 4700 and hist.max() < 5300  # flat: 5000 expected per tenth


def test_zero_weight_domains_are_never_drawn():
    s = DynamicDomainSampler([10, 10, 10], [0.5, 0.5, 0.0], seed=2)
    s.set_weights([0.0, 1 / 3, 2 / 3])
    assert 0 not in s.next_global_batch(5000).domain


def test_gpt_domain_samples_are_windows_of_the_document_stream(small_data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megashear.data.domain_dataset import build_domain_dataset

    d, _, _ = small_data
    m = load_manifest(str(d / "out" / "manifest.yaml"))
    prefix, s = m.domains[0].train_prefix, 8
    ds = build_domain_dataset(prefix, s, seed=4, cache_root=str(tmp_path))
    indexed = IndexedDataset(prefix)
    # one epoch: every document exactly once, as many windows as the tokens allow
    assert sorted(ds.document_index.tolist()) == list(range(len(indexed)))
    total = int(indexed.sequence_lengths.sum())
    assert len(ds) == (total - 1) // s
    # sample k is window shuffle_index[k] of the documents concatenated in megatron's order
    stream = np.concatenate([indexed[int(doc)] for doc in ds.document_index])
    assert sorted(stream.tolist()) == sorted(token_stream(prefix).tolist())
    seen = set()
    for k in range(len(ds)):
        item, j = ds[k], int(ds.shuffle_index[k])
        window = np.append(item["tokens"].numpy(), item["labels"][-1].item())
        np.testing.assert_array_equal(window, stream[j * s : j * s + s + 1])
        assert (item["labels"][:-1] == item["tokens"][1:]).all() and (item["loss_mask"] == 1).all()
        seen.add(j)
    assert seen == set(range(len(ds)))
    # the cached indices (second build loads them) give the same samples
    again = build_domain_dataset(prefix, s, seed=4, cache_root=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    for k in (0, len(ds) - 1):
        assert (again[k]["tokens"] == ds[k]["tokens"]).all()


def _batches(m, cache, workers, steps=10, change_at=3, resume_at=None, sizes=None):
    from megashear.data.loader import DomainBatches

    src = DomainBatches(m, seq_length=8, seed=1, cache_dir=cache, num_workers=workers)
    out, stats = [], []
    for step in range(steps):
        if step == change_at:
            src.sampler.set_weights([0.9, 0.1])
        if step == resume_at:
            state = json.loads(json.dumps(src.state_dict()))
            stats.append(src.lookahead)
            src.close()
            src = DomainBatches(m, seq_length=8, seed=1, cache_dir=cache, num_workers=workers)
            src.load_state_dict(state)
        out.append(src.next_global_batch(sizes[step] if sizes else 6))
    stats.append(src.lookahead)
    src.close()
    return out, stats


def test_dataloader_workers_give_the_same_batches_across_weight_change_and_resume(small_data):
    d, _, _ = small_data
    m = load_manifest(str(d / "out" / "manifest.yaml"))
    cache = str(d / "cache")
    sizes = [6, 6, 6, 6, 4, 4, 6, 6, 6, 6]  # a batch-size change also drops the lookahead
    ref, _ = _batches(m, cache, 0, sizes=sizes)
    assert {int(x) for b in ref for x in b["domain_id"]} == {0, 1}
    for resume_at in (None, 5):
        got, stats = _batches(m, cache, 2, resume_at=resume_at, sizes=sizes)
        for r, g in zip(ref, got):
            assert set(g) == {"tokens", "labels", "loss_mask", "domain_id"}
            for k in r:
                assert torch_equal(r[k], g[k]), k
        # the lookahead was used on steady steps, and dropped after the weight change (step 3)
        # and the batch-size changes (steps 4 and 6)
        assert sum(s["used"] for s in stats) >= 4
        assert sum(s["dropped"] for s in stats) == 3


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_validation_batches_are_fixed_and_short_domains_are_refused(small_data, tmp_path):
    from megashear.data.loader import DomainBatches, validation_batches

    d, _, _ = small_data
    m = load_manifest(str(d / "out" / "manifest.yaml"))
    first = validation_batches(m, 8, 4, str(tmp_path / "a"))
    cached = validation_batches(m, 8, 4, str(tmp_path / "a"))
    fresh = validation_batches(m, 8, 100, str(tmp_path / "b"))
    for name in m.names:
        assert first[name]["tokens"].shape == (4, 8)
        assert fresh[name]["tokens"].shape == (6, 8)  # all (50 - 1) // 8 windows
        for k in first[name]:
            assert torch_equal(first[name][k], cached[name][k])
            assert torch_equal(first[name][k], fresh[name][k][:4])
        valid = token_stream(m.domains[m.names.index(name)].valid_prefix).tolist()
        assert all(t in valid for t in first[name]["tokens"].view(-1).tolist())
    with pytest.raises(ValueError, match="domain alpha has 50 validation tokens, fewer than"):
        validation_batches(m, 64, 4, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        DomainBatches(m, 8, num_workers=-1)


def test_training_with_dataloader_workers_matches_in_process_fetching(small_data, tmp_path):
    """``megashear train --data.num_workers=2`` trains on exactly the batches of 0 workers,
    across dynamic-loading weight updates (every 2 steps, with reference losses set low so that
    the weights move)."""
    d, _, _ = small_data
    m = load_manifest(str(d / "out" / "manifest.yaml"))
    m.set_reference_losses({name: 0.5 for name in m.names})
    manifest = tmp_path / "manifest.yaml"
    save_manifest(m, str(manifest))
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        proc = megashear_cli(
            "train",
            "--model_preset=tiny-gqa",
            f"--model.vocab_size={m.vocab_size}",
            "--model.seq_length=8",
            f"--data.manifest={manifest}",
            f"--data.num_workers={workers}",
            "--data.update_interval=2",
            "--data.eval_sequences_per_domain=2",
            "--data.eta=5.0",
            "--train.micro_batch_size=2",
            "--train.global_batch_size=4",
            "--train.train_iters=6",
            f"--logging.dir={out}",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
        runs[workers] = (
            [e["loss"] for e in events if e["kind"] == "train"],
            [e["weights"] for e in events if e["kind"] == "domain_update"],
        )
    losses, updates = runs[0]
    assert len(losses) == 6 and len(updates) == 3
    assert updates[0] != updates[-1]  # the weights moved, so later batches follow new weights
    assert runs[2] == runs[0]


def test_test_split_is_held_out_after_the_validation_tokens(small_data, tmp_path):
    from megashear.data.loader import validation_batches

    d, _, first = small_data
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/preprocess_data.py"),
            "--input",
            str(d),
            "--tokenizer",
            str(d / "tok.model"),
            "--output-dir",
            str(tmp_path / "out"),
            "--valid-tokens-per-domain",
            "50",
            "--test-tokens-per-domain",
            "40",
            "--workers",
            "1",
            "--max-bad-fraction",
            "0.05",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    m = load_manifest(str(tmp_path / "out" / "manifest.yaml"))
    plain = load_manifest(str(d / "out" / "manifest.yaml"))
    for dom, ref in zip(m.domains, plain.domains):
        valid, test = token_stream(dom.valid_prefix), token_stream(dom.test_prefix)
        assert len(valid) == 50 and len(test) == 40
        # the same stream as without a test split: valid, then test, then train
        assert np.array_equal(valid, token_stream(ref.valid_prefix))
        split = np.concatenate([test, token_stream(dom.train_prefix)])
        assert np.array_equal(split, token_stream(ref.train_prefix))
    valid = validation_batches(m, 8, 3, str(tmp_path / "c"))
    test = validation_batches(m, 8, 3, str(tmp_path / "c"), split="test")
    assert not np.array_equal(valid["alpha"]["tokens"].numpy(), test["alpha"]["tokens"].numpy())
    with pytest.raises(ValueError, match="has no test split"):
        validation_batches(plain, 8, 3, str(tmp_path / "c"), split="test")


def _preprocess(d: Path, inputs: list[Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", *map(str, inputs)]
    cmd += ["--tokenizer", str(d / "tok.model"), "--output-dir", str(out), "--workers", "1"]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)


def test_invalid_utf8_line_is_counted_as_malformed(small_data, tmp_path):
    d, _, _ = small_data
    path = tmp_path / "gamma.jsonl"
    good = json.dumps({"text": "a fine document about cats"}).encode()
    path.write_bytes(b"\n".join([good] * 30 + [b'{"text": "bad \xff\xfe bytes"}', good]) + b"\n")
    proc = _preprocess(d, [path], tmp_path / "out", "--valid-tokens-per-domain", "10",
                       "--max-bad-fraction", "0.05")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "gamma: 31 documents" in proc.stdout and "1 malformed lines" in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "alpha=-1"], "error: --weights 'alpha=-1': a weight must be a finite"),
        (["--weights", "alpha=x"], "error: --weights 'alpha=x': a weight must be a finite"),
        (["--valid-tokens-per-domain", "100000000"], "error: no training tokens in alpha"),
    ],
)
def test_preprocessing_refuses_bad_weights_and_empty_domains(small_data, tmp_path, extra, message):
    d, _, _ = small_data
    proc = _preprocess(d, [d / "alpha.jsonl"], tmp_path, "--max-bad-fraction", "0.05", *extra)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "manifest.yaml").exists()


def test_token_ids_beyond_the_vocabulary_are_refused_at_start_up(small_data, tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megashear.data.domain_dataset import build_domain_dataset

    prefix = str(tmp_path / "wide")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(torch.tensor([1, 2, 3, 299, 300, 4] * 10, dtype=torch.int32), [60])
    builder.finalize(prefix + ".idx")
    with pytest.raises(ValueError, match="holds token id 300, outside the model's vocabulary"):
        build_domain_dataset(prefix, 8, 1, "train", str(tmp_path / "c"), vocab_size=300, name="w")
    assert len(build_domain_dataset(prefix, 8, 1, "train", str(tmp_path / "c"), vocab_size=301)) > 0
