"""Tokenizers: HF tokenizer.json (byte-level BPE) and sentencepiece through one interface, BOS/EOS
policy and overrides, preprocessing with an HF tokenizer, HF export, one-line errors."""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megashear.data.loader import token_stream
from megashear.data.manifest import load_manifest
from megashear.data.tokenizer import export_tokenizer, load_tokenizer
from megashear.paths import corpus_dir

ROOT = Path(__file__).resolve().parents[1]
CORPUS = corpus_dir()

SENTENCE = "The quick brown fox, Zwölf Boxkämpfer, jumps over 12 lazy dogs!"


def corpus_docs(domain: str, max_bytes: int) -> list[str]:
    """The first documents of a corpus domain, as preprocess_data.py's --max-bytes-per-domain
    reads them (whole lines until that much line text)."""
    docs, size = [], 0
    with lzma.open(CORPUS / f"{domain}.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line)["text"])
                size += len(line)
                if size >= max_bytes:
                    break
    return docs


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer.json (``<|endoftext|>`` id 0, ``<|begin|>`` id 1) with a
    tokenizer_config.json naming the EOS, trained on a few KB of the wikipedia domain."""
    from tests.tiny_tokenizer import save_tiny_bpe

    return save_tiny_bpe(tmp_path_factory.mktemp("hf_tok"), 400, ["<|endoftext|>", "<|begin|>"])


def variant(src: Path, dst: Path, config: dict | None, special: dict | None = None) -> Path:
    dst.mkdir()
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    if config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if special is not None:
        (dst / "special_tokens_map.json").write_text(json.dumps(special))
    return dst


def test_hf_tokenizer_appends_eos_and_no_bos(hf_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for path in (hf_dir, hf_dir / "tokenizer.json"):
        tok = load_tokenizer(str(path))
        assert (tok.kind, tok.vocab_size, tok.eos_id, tok.bos_id) == ("huggingface", 400, 0, None)
        assert (tok.add_bos, tok.add_eos) == (False, True)
        ids = tok.encode_document(SENTENCE)
        assert ids == raw.encode(SENTENCE, add_special_tokens=False).ids + [0]
    # special-token text inside a document is text, not the separator
    assert load_tokenizer(str(hf_dir)).encode_document("a<|endoftext|>b").count(0) == 1
    assert tok.to_dict() == {
        "kind": "huggingface",
        "path": str(hf_dir / "tokenizer.json"),
        "vocab_size": 400,
        "bos_id": None,
        "eos_id": 0,
        "add_bos": False,
        "add_eos": True,
    }


def test_hf_bos_follows_the_config_and_overrides_win(hf_dir, tmp_path):
    body = load_tokenizer(str(hf_dir)).encode(SENTENCE)
    cfg = {"bos_token": {"content": "<|begin|>", "special": True}, "eos_token": "<|endoftext|>"}
    with_bos = variant(hf_dir, tmp_path / "bos", {**cfg, "add_bos_token": True})
    tok = load_tokenizer(str(with_bos))
    assert (tok.bos_id, tok.add_bos) == (1, True)
    assert tok.encode_document(SENTENCE) == [1] + body + [0]
    # a BOS that the config does not ask to add is not added; add_eos_token: false (a setting for
    # prompts, as in LLaMA-2's config) does not drop the document separator
    tok = load_tokenizer(str(variant(hf_dir, tmp_path / "nob", {**cfg, "add_eos_token": False})))
    assert (tok.add_bos, tok.add_eos) == (False, True)
    # overrides
    tok = load_tokenizer(str(with_bos), add_bos=False, add_eos=False)
    assert tok.encode_document(SENTENCE) == body
    tok = load_tokenizer(str(hf_dir), bos="<|begin|>", eos="<|begin|>", add_bos=True)
    assert tok.encode_document(SENTENCE) == [1] + body + [1]
    # special_tokens_map.json when there is no tokenizer_config.json
    tok = load_tokenizer(str(variant(hf_dir, tmp_path / "map", None, {"eos_token": "<|begin|>"})))
    assert (tok.eos_id, tok.encode_document(SENTENCE)) == (1, body + [1])
    with pytest.raises(ValueError, match="has no token '<nope>'") as err:
        load_tokenizer(str(hf_dir), eos="<nope>")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no BOS token to add"):
        load_tokenizer(str(hf_dir), add_bos=True)


def test_hf_bos_added_by_the_post_processor_counts(hf_dir, tmp_path):
    """LLaMA-3 style: no add_bos_token key; the tokenizer.json post-processor prepends BOS."""
    from tokenizers import Tokenizer, processors

    d = variant(hf_dir, tmp_path / "pp", {"bos_token": "<|begin|>", "eos_token": "<|endoftext|>"})
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", 1)]
    )
    raw.save(str(d / "tokenizer.json"))
    tok = load_tokenizer(str(d))
    assert tok.add_bos and tok.encode_document(SENTENCE) == (
        [1] + raw.encode(SENTENCE, add_special_tokens=False).ids + [0]
    )


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    tik = tmp_path / "tokenizer.model"  # LLaMA-3's original tokenizer.model: "base64 rank" lines
    tik.write_text("".join(f"{t} {i}\n" for i, t in enumerate(["IQ==", "Ig==", "Iw==", "JA=="])))
    for path, message in (
        (tik, "tiktoken format"),
        (tmp_path, "tiktoken format"),  # a directory with that tokenizer.model
        (tmp_path / "missing.json", "missing.json does not exist"),
    ):
        with pytest.raises(ValueError, match=message) as err:
            load_tokenizer(str(path))
        assert "\n" not in str(err.value)
    assert "tokenizer.json" in str(pytest.raises(ValueError, load_tokenizer, str(tik)).value)
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="junk.model is neither a sentencepiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    for path in (tik, tmp_path / "missing.model"):
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools/preprocess_data.py"),
                "--input",
                str(CORPUS / "github.jsonl.xz"),
                "--tokenizer",
                str(path),
                "--output-dir",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_preprocess_with_hf_tokenizer(hf_dir, tmp_path):
    max_bytes = 6000
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/preprocess_data.py"),
            "--input",
            str(CORPUS / "github.jsonl.xz"),
            str(CORPUS / "stackexchange.jsonl.xz"),
            "--tokenizer",
            str(hf_dir),
            "--output-dir",
            str(tmp_path / "out"),
            "--valid-tokens-per-domain",
            "100",
            "--workers",
            "1",
            "--max-bytes-per-domain",
            str(max_bytes),
            "--bos-token",
            "<|begin|>",
            "--add-bos",  # the overrides reach the worker processes
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(str(tmp_path / "out" / "manifest.yaml"))
    assert (m.tokenizer_kind, m.vocab_size, m.bos_id, m.eos_id) == ("huggingface", 400, 1, 0)
    assert (m.add_bos, m.add_eos) == (True, True) and m.tokenizer == str(hf_dir)
    tok = load_tokenizer(str(hf_dir), bos="<|begin|>", add_bos=True)
    for dom in m.domains:
        docs = corpus_docs(dom.name, max_bytes)
        assert f"{dom.name}: {len(docs)} documents" in proc.stdout
        stream = np.concatenate([token_stream(dom.valid_prefix), token_stream(dom.train_prefix)])
        assert stream.dtype == np.int32 and len(token_stream(dom.valid_prefix)) == 100
        first = tok.encode_document(docs[0])
        assert first[0] == 1 and first[-1] == 0 and stream[: len(first)].tolist() == first
        assert stream.tolist() == [i for doc in docs for i in tok.encode_document(doc)]


def test_export_hf_tokenizer_loads_in_transformers(hf_dir, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    info = export_tokenizer(str(hf_dir), str(tmp_path / "a"), model_max_length=64)
    assert info == {"bos_token_id": None, "eos_token_id": 0, "vocab_size": 400}
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 64 and config["eos_token"] == "<|endoftext|>"
    at = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    expected = raw.encode(SENTENCE, add_special_tokens=False).ids
    assert at.encode(SENTENCE, add_special_tokens=False) == expected
    assert at.eos_token_id == 0 and at.model_max_length == 64
    # no tokenizer_config.json: a minimal one is written from special_tokens_map.json
    src = variant(hf_dir, tmp_path / "src", None, {"eos_token": "<|endoftext|>"})
    info = export_tokenizer(str(src / "tokenizer.json"), str(tmp_path / "b"), model_max_length=32)
    assert info["eos_token_id"] == 0
    at = AutoTokenizer.from_pretrained(str(tmp_path / "b"))
    assert at.encode(SENTENCE, add_special_tokens=False) == expected and at.eos_token_id == 0
    assert sorted(os.listdir(tmp_path / "b")) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_sentencepiece_through_the_same_interface(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("\n".join(corpus_docs("wikipedia", 1)[0][:20000].splitlines()))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = str(tmp_path / "sp.model")
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = load_tokenizer(path)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 400, 1, 2)
    assert (tok.add_bos, tok.add_eos) == (True, True)  # LLaMA-2's <s> ... </s>
    assert tok.encode_document(SENTENCE) == [1] + sp.encode(SENTENCE) + [2]
    tok = load_tokenizer(path, add_bos=False, eos="<unk>")
    assert tok.encode_document(SENTENCE) == sp.encode(SENTENCE) + [0]
    with pytest.raises(ValueError, match=re.escape("has no token '<|endoftext|>'")):
        load_tokenizer(path, eos="<|endoftext|>")
    # export: exactly the files hf.py has always written
    info = export_tokenizer(path, str(tmp_path / "hf"), model_max_length=128)
    assert info == {"bos_token_id": 1, "eos_token_id": 2, "vocab_size": 400}
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 128,
    }
    assert json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text()) == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == Path(path).read_bytes()


def test_smollm2_tokenizer_matches_transformers(request):
    """The real SmolLM2-135M(-Instruct) tokenizer (conftest's ``smollm2_hf``)."""
    try:
        smollm2_hf = request.getfixturevalue("smollm2_hf")
    except pytest.FixtureLookupError:
        pytest.skip("no smollm2_hf fixture in tests/conftest.py")
    from transformers import AutoTokenizer

    tok = load_tokenizer(smollm2_hf)
    assert (tok.kind, tok.vocab_size, tok.add_bos, tok.add_eos) == (
        "huggingface",
        49152,
        False,
        True,
    )
    at = AutoTokenizer.from_pretrained(str(smollm2_hf))
    expected = at.encode(SENTENCE, add_special_tokens=False) + [at.eos_token_id]
    assert tok.encode_document(SENTENCE) == expected and tok.eos_id == at.eos_token_id
    # the Instruct config's EOS is <|im_end|>; pretraining's separator <|endoftext|> is id 0
    assert load_tokenizer(smollm2_hf, eos="<|endoftext|>").encode_document(SENTENCE)[-1] == 0
