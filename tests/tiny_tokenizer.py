"""A tiny byte-level BPE tokenizer trained in a test, saved as an HF tokenizer directory."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from megashear.paths import corpus_dir


def save_tiny_bpe(d: Path, vocab_size: int, special_tokens: list[str]) -> Path:
    """Train a byte-level BPE of ``vocab_size`` tokens on the first 8,000 characters of the
    corpus's first wikipedia document and save ``tokenizer.json`` and a ``tokenizer_config.json``
    naming ``special_tokens[0]`` the EOS (ids ``0..`` are the special tokens, in order) in ``d``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with lzma.open(corpus_dir() / "wikipedia.jsonl.xz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:8000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": special_tokens[0]})
    )
    return d
