"""Tokenizers for preprocessing and HF export: sentencepiece ``.model`` or HF ``tokenizer.json``.

:func:`load_tokenizer` takes a sentencepiece model (LLaMA, LLaMA-2, ``tools/train_tokenizer.py``),
a Hugging Face ``tokenizer.json`` (LLaMA-3, SmolLM2, most current models), or a directory as
transformers saves it (``tokenizer.json`` preferred over ``tokenizer.model``, plus
``tokenizer_config.json`` / ``special_tokens_map.json``). Both kinds give a :class:`Tokenizer`
whose :meth:`~Tokenizer.encode_document` turns one pretraining document into ids with the
document's BOS/EOS made explicit:

* EOS is appended as the document separator (megatron's ``--append-eod``) whenever the tokenizer
  has an EOS token. An ``add_eos_token: false`` in ``tokenizer_config.json`` does not turn it off
  (that setting is about prompts at inference); only ``add_eos=False`` does.
* BOS: a sentencepiece model's BOS is prepended when it has one, as LLaMA-2 was trained and as
  transformers' ``LlamaTokenizer`` does (``add_bos_token`` defaults to true): documents read
  ``<s> ... </s>``. An HF tokenizer's BOS is prepended when
  ``tokenizer_config.json`` says ``add_bos_token: true``, or, without that key, when the
  ``tokenizer.json`` post-processor itself prepends BOS (as LLaMA-3's does).
* Text is encoded without special tokens, and special-token text inside a document (a literal
  ``<|endoftext|>`` in a code file) is encoded as ordinary text, never as the special id.

Every default can be overridden (``bos``/``eos`` token strings, ``add_bos``/``add_eos``).
:func:`export_tokenizer` writes the files an HF model directory needs for
``transformers.AutoTokenizer.from_pretrained``. Bad input is a one-line ``ValueError``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

logger = logging.getLogger(__name__)

SENTENCEPIECE = "sentencepiece"
HUGGINGFACE = "huggingface"

# Copied from next to tokenizer.json into an HF export when present (tokenizer_config.json is
# rewritten with the export's model_max_length).
_HF_EXTRA_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


class Tokenizer:
    """A loaded tokenizer and the BOS/EOS policy for pretraining documents.

    Attributes:
        kind: ``"sentencepiece"`` or ``"huggingface"``.
        path: the tokenizer file read (a ``.model`` or ``tokenizer.json``).
        vocab_size: the id space the model's embedding must cover (unpadded).
        bos_id: the BOS id, or None when the tokenizer has none.
        eos_id: the EOS id, or None when the tokenizer has none.
        add_bos: whether :meth:`encode_document` prepends ``bos_id``.
        add_eos: whether :meth:`encode_document` appends ``eos_id``.
        bos_token: the BOS token string, or None.
        eos_token: the EOS token string, or None.
    """

    kind: str = ""

    def __init__(
        self,
        path: str,
        vocab_size: int,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        add_eos: bool,
    ) -> None:
        self.path = path
        self.vocab_size = vocab_size
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = None if bos_token is None else self.token_id(bos_token)
        self.eos_id = None if eos_token is None else self.token_id(eos_token)
        if add_bos and self.bos_id is None:
            raise ValueError(f"tokenizer {path} has no BOS token to add (give a bos token)")
        if add_eos and self.eos_id is None:
            raise ValueError(f"tokenizer {path} has no EOS token to add (give an eos token)")
        self.add_bos = add_bos
        self.add_eos = add_eos

    def encode(self, text: str) -> list[int]:
        """The raw ids of ``text``: no special tokens added."""
        raise NotImplementedError

    def token_id(self, token: str) -> int:
        """The id of a token string.

        Raises:
            ValueError: the vocabulary has no such token.
        """
        raise NotImplementedError

    def encode_document(self, text: str) -> list[int]:
        """One pretraining document: ``[BOS] + encode(text) + [EOS]``, each per the policy."""
        ids = self.encode(text)
        if self.add_bos:
            ids.insert(0, self.bos_id)
        if self.add_eos:
            ids.append(self.eos_id)
        return ids

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records of the tokenizer."""
        return {
            "kind": self.kind,
            "path": self.path,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({items})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` (LLaMA / LLaMA-2 style: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2).

    Default policy: BOS prepended and EOS appended when the model has them (LLaMA-2's layout).
    """

    kind = SENTENCEPIECE

    def __init__(
        self,
        path: str,
        bos: str | None = None,
        eos: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"tokenizer {path} is neither a sentencepiece model nor a tokenizer.json ({detail})"
            ) from exc
        if bos is None and self.sp.bos_id() >= 0:
            bos = self.sp.id_to_piece(self.sp.bos_id())
        if eos is None and self.sp.eos_id() >= 0:
            eos = self.sp.id_to_piece(self.sp.eos_id())
        super().__init__(
            path,
            self.sp.get_piece_size(),
            bos,
            eos,
            add_bos=(bos is not None) if add_bos is None else add_bos,
            add_eos=(eos is not None) if add_eos is None else add_eos,
        )
        self.unk_token = self.sp.id_to_piece(self.sp.unk_id()) if self.sp.unk_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def token_id(self, token: str) -> int:
        i = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(i) != token:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}")
        return i


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library.

    BOS/EOS tokens come from ``tokenizer_config.json`` next to the file, else from
    ``special_tokens_map.json``. Default policy: EOS appended when there is one; BOS prepended
    when the config says ``add_bos_token: true`` or, without that key, when the post-processor
    prepends it.
    """

    kind = HUGGINGFACE

    def __init__(
        self,
        path: str,
        bos: str | None = None,
        eos: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.tok = RustTokenizer.from_file(path)
        except Exception as exc:  # the library raises a bare Exception on a malformed file
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"tokenizer {path} is not a readable tokenizer.json ({detail})"
            ) from exc
        folder = os.path.dirname(os.path.abspath(path))
        self.config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special = _read_json(os.path.join(folder, "special_tokens_map.json"))
        if bos is None:
            bos = _token_content(self.config.get("bos_token", special.get("bos_token")))
        if eos is None:
            eos = _token_content(self.config.get("eos_token", special.get("eos_token")))
        vocab = self.tok.get_vocab(with_added_tokens=True)
        # ids may have holes; the model must cover the largest one
        size = max(
            self.tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1
        )
        self._vocab = vocab
        bos_id = None if bos is None else self.token_id(bos)
        if add_bos is None:
            if "add_bos_token" in self.config:
                add_bos = bool(self.config["add_bos_token"]) and bos is not None
            else:
                add_bos = bos_id is not None and self._post_processor_adds(bos_id)
        super().__init__(
            path,
            size,
            bos,
            eos,
            add_bos=add_bos,
            add_eos=(eos is not None) if add_eos is None else add_eos,
        )
        if self.eos_id is None:
            logger.warning(
                "tokenizer %s names no EOS token: documents are not separated "
                "(give an eos token to separate them)",
                path,
            )
        # a literal "<|endoftext|>" in a document is text, not the special token
        self.tok.encode_special_tokens = True

    def _post_processor_adds(self, bos_id: int) -> bool:
        raw = self.tok.encode("hello", add_special_tokens=False).ids
        full = self.tok.encode("hello", add_special_tokens=True).ids
        return len(full) > len(raw) and full[0] == bos_id and raw[:1] != [bos_id]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        i = self._vocab.get(token)
        if i is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}")
        return i


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _token_content(token: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string, a dict, or null."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _is_tiktoken(head: bytes) -> bool:
    lines = head.split(b"\n")[:-1] or head.split(b"\n")  # the last line may be cut short
    lines = [line.rstrip(b"\r") for line in lines if line.strip()]
    return bool(lines) and all(_TIKTOKEN_LINE.match(line) for line in lines[:8])


def resolve_tokenizer_file(path: str) -> tuple[str, str]:
    """``(kind, file)`` for a tokenizer path: a file, or a directory as transformers saves it.

    Raises:
        ValueError: the path does not exist, holds no tokenizer, or is a tiktoken file.
    """
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return resolve_tokenizer_file(os.path.join(path, name))
        raise ValueError(f"tokenizer directory {path} has no tokenizer.json or tokenizer.model")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise ValueError(f"tokenizer {path} is not readable ({exc.strerror})") from exc
    if head.lstrip()[:1] == b"{":
        return HUGGINGFACE, path
    if _is_tiktoken(head):
        raise ValueError(
            f"tokenizer {path} is in tiktoken format (base64 token + rank lines), which is not "
            f"supported; use the model's tokenizer.json instead"
        )
    return SENTENCEPIECE, path


def load_tokenizer(
    path: str | os.PathLike[str],
    bos: str | None = None,
    eos: str | None = None,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
) -> Tokenizer:
    """Load a sentencepiece model or an HF ``tokenizer.json`` (file or directory).

    Args:
        path: a sentencepiece ``.model``, a ``tokenizer.json``, or a directory holding
            ``tokenizer.json`` (preferred) or ``tokenizer.model``.
        bos: the BOS token string (default: the tokenizer's own).
        eos: the EOS token string (default: the tokenizer's own).
        add_bos: prepend BOS to every document (default: see the module docstring).
        add_eos: append EOS to every document (default: True when there is an EOS token).

    Returns:
        The :class:`Tokenizer`.

    Raises:
        ValueError: (one line) missing or unreadable file, tiktoken format, unknown token, or
            ``add_bos``/``add_eos`` for a tokenizer without that token.
    """
    kind, file = resolve_tokenizer_file(os.fspath(path))
    cls = HFTokenizer if kind == HUGGINGFACE else SentencePieceTokenizer
    tok = cls(file, bos=bos, eos=eos, add_bos=add_bos, add_eos=add_eos)
    logger.debug("loaded %r", tok)
    return tok


def export_tokenizer(
    path: str | os.PathLike[str], out_dir: str | os.PathLike[str], model_max_length: int
) -> dict[str, Any]:
    """Write the tokenizer files of an HF model directory (``AutoTokenizer`` loads them).

    A sentencepiece model becomes ``tokenizer.model`` with a ``LlamaTokenizer``
    ``tokenizer_config.json`` (BOS added at inference, as LLaMA) and ``special_tokens_map.json``.
    A ``tokenizer.json`` is copied with the ``tokenizer_config.json`` /
    ``special_tokens_map.json`` (and chat template) next to it; a copied config gets
    ``model_max_length``. Without a config, a minimal ``PreTrainedTokenizerFast`` one is written.

    Args:
        path: the tokenizer, as for :func:`load_tokenizer`.
        out_dir: the HF model directory (created if needed).
        model_max_length: the exported model's context length.

    Returns:
        ``{"bos_token_id", "eos_token_id", "vocab_size"}`` for ``generation_config.json`` and the
        vocabulary check (ids may be None).

    Raises:
        ValueError: as :func:`load_tokenizer`.
    """
    tok = load_tokenizer(path)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(tok, SentencePieceTokenizer):
        _copy(tok.path, os.path.join(out_dir, "tokenizer.model"))
        special = {
            k: v
            for k, v in (
                ("bos_token", tok.bos_token),
                ("eos_token", tok.eos_token),
                ("unk_token", tok.unk_token),
            )
            if v is not None
        }
        config = {
            "tokenizer_class": "LlamaTokenizer",
            **special,
            "add_bos_token": tok.bos_token is not None,
            "add_eos_token": False,
            "legacy": False,
            "model_max_length": model_max_length,
        }
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), config, indent=2)
        _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    else:
        _copy(tok.path, os.path.join(out_dir, "tokenizer.json"))
        folder = os.path.dirname(os.path.abspath(tok.path))
        for name in _HF_EXTRA_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                _copy(os.path.join(folder, name), os.path.join(out_dir, name))
        if tok.config:
            config = {**tok.config, "model_max_length": model_max_length}
        else:
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **({"bos_token": tok.bos_token} if tok.bos_token is not None else {}),
                **({"eos_token": tok.eos_token} if tok.eos_token is not None else {}),
                "model_max_length": model_max_length,
            }
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), config, indent=2)
    logger.info("wrote %s tokenizer files to %s", tok.kind, out_dir)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "vocab_size": tok.vocab_size}


def _copy(src: str, dst: str) -> None:
    if os.path.abspath(src) != os.path.abspath(dst):  # exporting into the source folder
        shutil.copyfile(src, dst)


def _write_json(path: str, data: dict, indent: int | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)
