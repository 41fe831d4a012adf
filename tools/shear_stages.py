"""The stages of shearing a real model, as commands: shared by ``tools/demo.py`` and
``tools/shear_experiment.py``.

:class:`ShearStages` wraps a :class:`~stage_runner.StageRunner` with the settings every stage of
one pipeline shares (sequence length, validation windows, the GPTDataset index cache), so that
every run of a pipeline reads the same data and is evaluated on the same windows:

- :meth:`prepare`: convert the HF source to a megatron checkpoint while the corpus is tokenised
  with the source's own tokenizer (optionally with a held-out test split);
- :meth:`evaluate`: ``megashear evaluate`` (per-domain loss, JSON) on the validation or test split;
- :meth:`prune`: ``megashear prune`` under torchrun at PP ``pp`` with dynamic batch loading;
- :meth:`finalize`, :meth:`train` (continued pre-training, or training from scratch);
- :meth:`importance`: ``megashear importance`` (activation importance, written beside the
  checkpoint);
- :meth:`one_shot`: ``megashear one-shot`` (importance or leading cut);
- :meth:`export`: ``tools/convert_checkpoint.py megatron-to-hf`` with the tokenizer;
- :func:`manifest_with_weights`: a copy of the manifest whose initial weights are a run's last.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from stage_runner import ROOT, StageRunner, flags, last_json

DOMAINS = ("web", "github", "wikipedia", "books", "arxiv", "stackexchange")
# SmolLM2's pretraining documents are separated by <|endoftext|> (id 0); the Instruct model's
# tokenizer_config.json names the chat turn end <|im_end|> as its EOS, which is not what the
# model saw between documents, so the separator is given explicitly.
SMOLLM2_EOS = "<|endoftext|>"


def corpus_files(corpus: Path) -> list[str]:
    """The six domains' files; a one-line ``SystemExit`` naming the missing ones."""
    missing = [d for d in DOMAINS if not (corpus / f"{d}.jsonl.xz").is_file()]
    if missing:
        raise SystemExit(f"error: corpus {corpus} lacks domains {missing}")
    return [str(corpus / f"{d}.jsonl.xz") for d in DOMAINS]


def load_fetcher():
    """``tools/fetch_smollm2.py`` as a module (its ``ensure_smollm2`` caches the model)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "megashear_fetch_smollm2", ROOT / "tools" / "fetch_smollm2.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def cached(path: Path, make):
    """The JSON at ``path``, or ``make()``'s value, written there first (a stage done once)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    write_json_atomic(path, value)
    return value


def manifest_with_weights(manifest: Path, run_dir: Path, out: Path) -> Path:
    """Write ``out``: ``manifest`` with the domain weights of ``run_dir``'s last
    ``domain_update`` as its initial weights (unchanged if the run made none)."""
    from megashear.data.manifest import load_manifest, save_manifest
    from megashear.training.run_log import read_events

    updates = read_events(str(run_dir), "domain_update")
    m = load_manifest(str(manifest))
    for d in m.domains:
        d.weight = updates[-1]["weights"][d.name] if updates else d.weight
    save_manifest(m, str(out))
    return out


class ShearStages:
    """Args:
    runner: runs and times the commands (logs under ``runner.out/logs``).
    seq_length: tokens per training and validation sequence.
    eval_sequences: validation (and test) windows per domain.
    index_cache: the GPTDataset index cache every stage shares.
    """

    def __init__(
        self, runner: StageRunner, seq_length: int, eval_sequences: int, index_cache: Path
    ) -> None:
        self.runner, self.seq, self.eval_sequences = runner, seq_length, eval_sequences
        self.index_cache = index_cache

    @contextmanager
    def threads(self, n: int):
        """Stages launched inside run with ``OMP_NUM_THREADS=n`` (1 per rank under torchrun on
        two cores: the ranks then share the cores instead of oversubscribing them)."""
        before = self.runner.env["OMP_NUM_THREADS"]
        self.runner.env["OMP_NUM_THREADS"] = str(n)
        try:
            yield
        finally:
            self.runner.env["OMP_NUM_THREADS"] = before

    def _common(self, manifest: Path) -> list[str]:
        return [
            f"--model.seq_length={self.seq}",
            f"--data.manifest={manifest}",
            f"--data.eval_sequences_per_domain={self.eval_sequences}",
            f"--data.cache_dir={self.index_cache}",
        ]

    def _run(self, manifest, run_dir, save, steps, batch, micro_batch, updates, rule) -> list[str]:
        """The flags a pruning and a training run share: data, budget, logs, checkpoint."""
        return [
            *self._common(manifest),
            f"--data.update_rule={rule}",
            f"--data.update_interval={max(1, steps // max(1, updates))}",
            f"--train.micro_batch_size={micro_batch}",
            f"--train.global_batch_size={batch}",
            f"--train.train_iters={steps}",
            f"--logging.dir={run_dir}",
            f"--checkpoint.save={save}",
        ]

    def prepare(
        self,
        hf_source: Path,
        corpus: Path,
        save: Path,
        data: Path,
        bytes_per_domain: int,
        eos_token: str | None = SMOLLM2_EOS,
        test_tokens: int = 0,
    ) -> tuple[dict, Path]:
        """Convert ``hf_source`` into ``save`` while ``corpus`` is tokenised into ``data`` with
        the source's tokenizer; returns (the converter's JSON, the manifest path).

        Every domain's validation split (and test split, with ``test_tokens``) holds at least
        twice the evaluation windows (``seq + 1`` tokens each).
        """
        py = sys.executable
        convert = [py, "tools/convert_checkpoint.py", "hf-to-megatron"]
        convert += ["--load", str(hf_source), "--save", str(save), "--overwrite"]
        held_out = max(4096, 2 * self.eval_sequences * (self.seq + 1))
        preprocess = [py, "tools/preprocess_data.py", "--input", *corpus_files(corpus)]
        preprocess += ["--tokenizer", str(hf_source), "--output-dir", str(data)]
        preprocess += ["--valid-tokens-per-domain", str(held_out), "--workers", "2"]
        preprocess += ["--max-bytes-per-domain", str(bytes_per_domain)]
        if test_tokens:
            preprocess += ["--test-tokens-per-domain", str(max(test_tokens, held_out))]
        if eos_token:
            # documents are "text<eos>" without a BOS (SmolLM2's tokenizer adds none)
            preprocess += ["--eos-token", eos_token, "--no-add-bos"]
        with ThreadPoolExecutor(2) as pool:
            jobs = [
                pool.submit(self.runner.run, "convert", convert),
                pool.submit(self.runner.run, "preprocess", preprocess),
            ]
            converted = last_json(jobs[0].result())
            jobs[1].result()
        return converted, data / "manifest.yaml"

    def evaluate(
        self,
        stage: str,
        load: Path,
        manifest: Path,
        split: str = "valid",
        write_reference: bool = False,
        sequences: int | None = None,
    ) -> dict[str, float]:
        """Per-domain loss of checkpoint ``load`` on ``split``'s first windows (``sequences``
        of them; default: the pipeline's ``eval_sequences``)."""
        extra = ["--data.write_reference=true"] if write_reference else []
        if sequences is not None:
            extra.append(f"--data.eval_sequences_per_domain={sequences}")
        return last_json(
            self.runner.megashear(
                stage,
                "evaluate",
                f"--checkpoint.load={load}",
                *self._common(manifest),
                f"--data.eval_split={split}",
                f"--train.micro_batch_size={min(8, sequences or self.eval_sequences)}",
                f"--logging.dir={self.runner.out / 'eval' / stage}",
                *extra,
            )
        )

    def prune(
        self,
        stage: str,
        load: Path,
        manifest: Path,
        target: dict,
        save: Path,
        run_dir: Path,
        steps: int,
        batch: int,
        micro_batch: int,
        lr: float,
        updates: int,
        rule: str = "paper",
        pp: int = 2,
        lr_masks: float = 1.0,
        extra: tuple[str, ...] = (),
    ) -> None:
        """``megashear prune`` toward ``target`` (``num_layers`` ... fields) on ``pp`` ranks;
        the model weights at a constant ``lr``, log α and λ at ``lr_masks`` (the paper: 1.0), the
        target sparsity ramped over the first fifth (the paper: 640 of 3200 steps); ``extra``
        flags are passed on (e.g. ``--pruning.init=importance``, seeds)."""
        with self.threads(max(1, 2 // pp)):
            self.runner.megashear(
                stage,
                "prune",
                f"--checkpoint.load={load}",
                *self._run(manifest, run_dir, save, steps, batch, micro_batch, updates, rule),
                *flags("pruning", {f"target_{k}": v for k, v in target.items()}),
                f"--parallel.pp={pp}",
                f"--train.lr={lr}",
                f"--train.min_lr={lr}",
                "--train.lr_warmup_iters=0",
                f"--pruning.lagrangian_warmup_steps={max(1, steps // 5)}",
                f"--pruning.lr_log_alpha={lr_masks}",
                f"--pruning.lr_lambda={lr_masks}",
                *extra,
                nproc=pp,
            )

    def finalize(self, stage: str, load: Path, save: Path) -> dict:
        return last_json(
            self.runner.megashear(
                stage, "finalize", f"--checkpoint.load={load}", f"--checkpoint.save={save}"
            )
        )

    def importance(self, stage: str, load: Path, manifest: Path, samples: int) -> dict:
        """``megashear importance`` of ``load`` on ``samples`` training windows (written to
        ``importance.pt`` in its root)."""
        return last_json(
            self.runner.megashear(
                stage,
                "importance",
                f"--checkpoint.load={load}",
                *self._common(manifest),
                f"--importance.samples={samples}",
                f"--train.micro_batch_size={min(8, samples)}",
                f"--logging.dir={self.runner.out / 'eval' / stage}",
            )
        )

    def one_shot(
        self, stage: str, load: Path, target: dict, save: Path, method: str = "leading"
    ) -> dict:
        """``megashear one-shot``: the target cut from ``load`` by ``method`` (importance:
        the scores in ``load``'s root; leading: the leading units)."""
        return last_json(
            self.runner.megashear(
                stage,
                "one-shot",
                f"--method={method}",
                f"--checkpoint.load={load}",
                f"--checkpoint.save={save}",
                "--overwrite=true",
                *flags("pruning", {f"target_{k}": v for k, v in target.items()}),
            )
        )

    def export(self, stage: str, load: Path, hf_dir: Path, tokenizer: Path) -> str:
        """``tools/convert_checkpoint.py megatron-to-hf`` with the source's tokenizer."""
        return self.runner.tool(
            stage, "convert_checkpoint.py", "megatron-to-hf", "--load", str(load),
            "--save", str(hf_dir), "--tokenizer", str(tokenizer), "--overwrite",
        )  # fmt: skip

    def train(
        self,
        stage: str,
        manifest: Path,
        save: Path,
        run_dir: Path,
        steps: int,
        batch: int,
        micro_batch: int,
        lr: float,
        updates: int,
        rule: str = "paper",
        tp: int = 1,
        load: Path | None = None,
        model: dict | None = None,
        teacher: Path | None = None,
        kd_alpha: float = 1.0,
        extra: tuple[str, ...] = (),
    ) -> None:
        """``megashear train`` from checkpoint ``load``, or from random weights of shape
        ``model`` (a ``ModelConfig`` dict); cosine from ``lr`` to ``lr / 10`` after a 10%
        warm-up. With ``teacher``, distilled from it at weight ``kd_alpha``."""
        start = [f"--checkpoint.load={load}"] if load is not None else []
        if teacher is not None:
            start += [f"--distill.teacher={teacher}", f"--distill.alpha={kd_alpha}"]
        if model is not None:
            start += flags("model", {k: _yaml(v) for k, v in model.items() if k != "seq_length"})
        with self.threads(max(1, 2 // tp)):
            self.runner.megashear(
                stage,
                "train",
                *start,
                *self._run(manifest, run_dir, save, steps, batch, micro_batch, updates, rule),
                f"--parallel.tp={tp}",
                f"--train.lr={lr}",
                f"--train.min_lr={lr / 10}",
                f"--train.lr_warmup_iters={max(1, steps // 10)}",
                *extra,
                nproc=tp,
            )


def _yaml(value) -> str:
    """A config value as a ``--section.field=`` flag value (YAML scalars)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
