"""The stages of shearing a model, as processes, with typed results.

:class:`ShearStages` wraps a :class:`~megashear.pipeline.runner.StageRunner` with the settings
every stage of one pipeline shares (sequence length, validation windows, the GPTDataset index
cache), so that every run of a pipeline reads the same data and is evaluated on the same
windows. Each method launches one ``megashear`` command (or the pipeline's worker) and reads
its result back from what the stage wrote: a checkpoint's ``megashear.json``, the run log, the
manifest, or the worker's result file; never from the process's printed output.

- :meth:`~ShearStages.prepare` / :meth:`~ShearStages.convert` and
  :meth:`~ShearStages.preprocess`: the HF source as a megatron checkpoint, the corpus tokenised
  with the source's tokenizer (run side by side);
- :meth:`~ShearStages.evaluate`: per-domain loss on the validation or test split;
- :meth:`~ShearStages.importance`: activation importance (Minitron);
- :meth:`~ShearStages.prune` (learned masks, under torchrun), :meth:`~ShearStages.finalize`;
- :meth:`~ShearStages.one_shot`: the importance or leading cut;
- :meth:`~ShearStages.train`: continued pre-training (or from scratch), optionally distilled;
- :meth:`~ShearStages.export`: megatron -> Hugging Face with the tokenizer and a model card;
- :func:`manifest_with_weights`: a copy of the manifest whose initial weights are a run's last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from megashear.pipeline.runner import StageRunner, flags

DOMAINS = ("web", "github", "wikipedia", "books", "arxiv", "stackexchange")
# SmolLM2's pretraining documents are separated by <|endoftext|> (id 0); the Instruct model's
# tokenizer_config.json names the chat turn end <|im_end|> as its EOS, which is not what the
# model saw between documents, so the separator is given explicitly.
SMOLLM2_EOS = "<|endoftext|>"

DomainLosses = dict[str, float]
"""Per-domain loss, ``{domain: loss}``."""


@dataclass(frozen=True)
class CheckpointResult:
    """A checkpoint a stage wrote: where, its model (a ``ModelConfig`` dict) and its
    parameter count (the tie counted once)."""

    path: str
    model: dict
    parameters: int

    @classmethod
    def read(cls, path: Path) -> CheckpointResult:
        """The checkpoint at ``path``, from its ``megashear.json``."""
        from megashear.checkpoint.format import read_meta, resolve
        from megashear.model_config import ModelConfig

        model = ModelConfig.from_dict(read_meta(resolve(str(path)))["model"])
        return cls(str(path), model.to_dict(), model.num_parameters())


@dataclass(frozen=True)
class RunResult:
    """A training or pruning run: its checkpoint, the steps taken and the last step's logged
    values (``loss``, and ``lm_loss`` / ``kd_loss`` / ``lagrangian`` where logged)."""

    checkpoint: CheckpointResult
    steps: int
    last: dict

    @classmethod
    def read(cls, save: Path, run_dir: Path, kind: str) -> RunResult:
        """The run logged in ``run_dir`` (events of ``kind``) that saved to ``save``."""
        from megashear.training.run_log import read_events

        events = read_events(str(run_dir), kind)
        last = events[-1] if events else {}
        return cls(CheckpointResult.read(save), int(last.get("step", 0)), last)


def corpus_files(corpus: Path) -> list[str]:
    """The six domains' files of the shared corpus; a ``ValueError`` naming the missing ones."""
    missing = [d for d in DOMAINS if not (Path(corpus) / f"{d}.jsonl.xz").is_file()]
    if missing:
        raise ValueError(f"corpus {corpus} lacks domains {missing}")
    return [str(Path(corpus) / f"{d}.jsonl.xz") for d in DOMAINS]


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
    return Path(out)


def _yaml(value: object) -> str:
    """A config value as a ``--section.field=`` flag value (YAML scalars)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def layout_flags(tp: int = 1, pp: int = 1) -> list[str]:
    """``--parallel.tp`` / ``--parallel.pp`` (the rest of the ranks are data parallel)."""
    return [f"--parallel.tp={tp}", f"--parallel.pp={pp}"]


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
        self.index_cache = Path(index_cache)

    @contextmanager
    def threads(self, n: int) -> Iterator[None]:
        """Stages launched inside run with ``OMP_NUM_THREADS=n`` in all (split between the
        ranks of a torchrun stage)."""
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

    def held_out_tokens(self) -> int:
        """Tokens a validation split needs: twice the evaluation windows, at least 4096."""
        return max(4096, 2 * self.eval_sequences * (self.seq + 1))

    def convert(self, stage: str, hf_source: Path, save: Path) -> CheckpointResult:
        """``megashear convert --direction=hf-to-megatron``: ``hf_source`` into ``save``."""
        self.runner.megashear(
            stage,
            "convert",
            "--direction=hf-to-megatron",
            f"--load={hf_source}",
            f"--save={save}",
            "--overwrite=true",
        )
        return CheckpointResult.read(save)

    def preprocess(
        self,
        stage: str,
        inputs: Sequence[str],
        tokenizer: Path,
        data: Path,
        bytes_per_domain: int | None = None,
        eos_token: str | None = None,
        add_bos: bool | None = None,
        test_tokens: int = 0,
        valid_tokens: int | None = None,
        workers: int | None = 2,
    ) -> Path:
        """``megashear preprocess`` of ``inputs`` (JSON Lines per domain) into ``data``;
        returns the manifest. Every validation split (and test split, with ``test_tokens``)
        holds at least :meth:`held_out_tokens` tokens unless ``valid_tokens`` says otherwise."""
        held_out = valid_tokens if valid_tokens is not None else self.held_out_tokens()
        args = [
            f"--input=[{', '.join(json.dumps(str(i)) for i in inputs)}]",
            f"--tokenizer={tokenizer}",
            f"--output_dir={data}",
            f"--valid_tokens_per_domain={held_out}",
        ]
        if workers is not None:
            args.append(f"--workers={workers}")
        if bytes_per_domain is not None:
            args.append(f"--max_bytes_per_domain={bytes_per_domain}")
        if test_tokens:
            args.append(f"--test_tokens_per_domain={max(test_tokens, held_out)}")
        if eos_token:
            args.append(f"--eos_token={json.dumps(eos_token)}")
        if add_bos is not None:
            args.append(f"--add_bos={_yaml(add_bos)}")
        self.runner.megashear(stage, "preprocess", *args)
        return Path(data) / "manifest.yaml"

    def prepare(
        self,
        hf_source: Path,
        corpus: Path,
        save: Path,
        data: Path,
        bytes_per_domain: int,
        eos_token: str | None = SMOLLM2_EOS,
        test_tokens: int = 0,
    ) -> tuple[CheckpointResult, Path]:
        """Convert ``hf_source`` into ``save`` while the six-domain ``corpus`` is tokenised into
        ``data`` with the source's tokenizer; returns (the converted checkpoint, the manifest).
        With ``eos_token``, documents are "text<eos>" without a BOS (SmolLM2's way)."""
        files = corpus_files(corpus)
        with ThreadPoolExecutor(2) as pool:
            converted = pool.submit(self.convert, "convert", hf_source, save)
            manifest = pool.submit(
                self.preprocess, "preprocess", files, hf_source, data, bytes_per_domain,
                eos_token, False if eos_token else None, test_tokens,
            )  # fmt: skip
            return converted.result(), manifest.result()

    def evaluate(
        self,
        stage: str,
        load: Path,
        manifest: Path,
        split: str = "valid",
        write_reference: bool = False,
        sequences: int | None = None,
        result: Path | None = None,
        tp: int = 1,
        pp: int = 1,
        nproc: int = 1,
    ) -> DomainLosses:
        """Per-domain loss of checkpoint ``load`` on ``split``'s first windows (``sequences``
        of them; default: the pipeline's ``eval_sequences``), by the pipeline's worker, which
        writes it to ``result`` (default: ``OUT/eval/STAGE/losses.json``)."""
        from megashear.config import RunConfig
        from megashear.config_io import dump_yaml

        n = sequences or self.eval_sequences
        where = self.runner.out / "eval" / stage
        where.mkdir(parents=True, exist_ok=True)
        result = Path(result) if result is not None else where / "losses.json"
        cfg = RunConfig()
        cfg.model.seq_length = self.seq
        cfg.checkpoint.load = str(load)
        cfg.data.manifest = str(manifest)
        cfg.data.eval_sequences_per_domain = n
        cfg.data.cache_dir = str(self.index_cache)
        cfg.data.eval_split = split
        cfg.data.write_reference = write_reference
        dp = max(1, nproc // (tp * pp))
        cfg.train.micro_batch_size = max(1, min(8, n // dp))
        cfg.train.global_batch_size = cfg.train.micro_batch_size * dp
        cfg.parallel.tp, cfg.parallel.pp = tp, pp
        cfg.logging.dir = str(where)
        dump_yaml(cfg, str(where / "config.yaml"))
        if result.exists():
            result.unlink()
        self.runner.worker(stage, "evaluate", str(where / "config.yaml"), str(result), nproc=nproc)
        return json.loads(result.read_text())

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
        tp: int = 1,
        dp: int = 1,
        resume: bool = False,
        threads: int | None = None,
    ) -> RunResult:
        """``megashear prune`` toward ``target`` (``num_layers`` ... fields) on
        ``tp × pp × dp`` ranks; the model weights at a constant ``lr``, log α and λ at
        ``lr_masks`` (the paper: 1.0), the target sparsity ramped over the first fifth (the
        paper: 640 of 3200 steps); ``extra`` flags are passed on (e.g.
        ``--pruning.init=importance``, seeds). With ``resume``, ``load`` is the starting point
        only until ``save`` holds a checkpoint (``checkpoint.init``): a relaunch continues
        from the last one."""
        nproc = tp * pp * dp
        start = f"--checkpoint.{'init' if resume else 'load'}={load}"
        with self.threads(threads or max(1, 2 // pp) * nproc):
            self.runner.megashear(
                stage,
                "prune",
                start,
                *self._run(manifest, run_dir, save, steps, batch, micro_batch, updates, rule),
                *flags("pruning", {f"target_{k}": _yaml(v) for k, v in target.items()}),
                *layout_flags(tp, pp),
                f"--train.lr={lr}",
                f"--train.min_lr={lr}",
                "--train.lr_warmup_iters=0",
                f"--pruning.lagrangian_warmup_steps={max(1, steps // 5)}",
                f"--pruning.lr_log_alpha={lr_masks}",
                f"--pruning.lr_lambda={lr_masks}",
                *extra,
                nproc=nproc,
            )
        return RunResult.read(save, run_dir, "prune")

    def finalize(self, stage: str, load: Path, save: Path) -> CheckpointResult:
        """``megashear finalize``: the pruning checkpoint ``load`` as a dense one in ``save``."""
        self.runner.megashear(
            stage, "finalize", f"--checkpoint.load={load}", f"--checkpoint.save={save}"
        )
        return CheckpointResult.read(save)

    def importance(
        self,
        stage: str,
        load: Path,
        manifest: Path,
        samples: int,
        path: Path | None = None,
        tp: int = 1,
        pp: int = 1,
        nproc: int = 1,
    ) -> Path:
        """``megashear importance`` of ``load`` on ``samples`` training windows, written to
        ``path`` (default: ``importance.pt`` in ``load``'s root); returns the scores' path."""
        from megashear.pruning.importance import default_path

        extra = [f"--importance.path={path}"] if path is not None else []
        self.runner.megashear(
            stage,
            "importance",
            f"--checkpoint.load={load}",
            *self._common(manifest),
            f"--importance.samples={samples}",
            f"--train.micro_batch_size={max(1, min(8, samples // max(1, nproc // (tp * pp))))}",
            f"--logging.dir={self.runner.out / 'eval' / stage}",
            *layout_flags(tp, pp),
            *extra,
            nproc=nproc,
        )
        return Path(path) if path is not None else Path(default_path(str(load)))

    def one_shot(
        self,
        stage: str,
        load: Path,
        target: dict,
        save: Path,
        method: str = "leading",
        importance: Path | None = None,
    ) -> CheckpointResult:
        """``megashear one-shot``: the target cut from ``load`` by ``method`` (importance:
        the scores at ``importance``, default ``load``'s root; leading: the leading units)."""
        extra = [f"--importance.path={importance}"] if importance is not None else []
        self.runner.megashear(
            stage,
            "one-shot",
            f"--method={method}",
            f"--checkpoint.load={load}",
            f"--checkpoint.save={save}",
            "--overwrite=true",
            *flags("pruning", {f"target_{k}": _yaml(v) for k, v in target.items()}),
            *extra,
        )
        return CheckpointResult.read(save)

    def export(
        self,
        stage: str,
        load: Path,
        hf_dir: Path,
        tokenizer: Path | None,
        losses: Path | None = None,
        source_losses: Path | None = None,
    ) -> Path:
        """``megashear convert --direction=megatron-to-hf`` with the tokenizer and a model card
        (with the per-domain ``losses`` files, JSON, when given); returns ``hf_dir``."""
        args = [
            "--direction=megatron-to-hf",
            f"--load={load}",
            f"--save={hf_dir}",
            "--overwrite=true",
        ]
        if tokenizer is not None:
            args.append(f"--tokenizer={tokenizer}")
        if losses is not None:
            args.append(f"--losses={losses}")
        if source_losses is not None:
            args.append(f"--source_losses={source_losses}")
        self.runner.megashear(stage, "convert", *args)
        return Path(hf_dir)

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
        pp: int = 1,
        dp: int = 1,
        resume: bool = False,
        threads: int | None = None,
    ) -> RunResult:
        """``megashear train`` from checkpoint ``load``, or from random weights of shape
        ``model`` (a ``ModelConfig`` dict), on ``tp × pp × dp`` ranks; cosine from ``lr`` to
        ``lr / 10`` after a 10% warm-up. With ``teacher``, distilled from it at weight
        ``kd_alpha``. With ``resume``, ``load`` is the starting point only until ``save``
        holds a checkpoint (``checkpoint.init``)."""
        nproc = tp * pp * dp
        start = []
        if load is not None:
            start.append(f"--checkpoint.{'init' if resume else 'load'}={load}")
        if teacher is not None:
            start += [f"--distill.teacher={teacher}", f"--distill.alpha={kd_alpha}"]
        if model is not None:
            start += flags("model", {k: _yaml(v) for k, v in model.items() if k != "seq_length"})
        with self.threads(threads or max(1, 2 // tp) * nproc):
            self.runner.megashear(
                stage,
                "train",
                *start,
                *self._run(manifest, run_dir, save, steps, batch, micro_batch, updates, rule),
                *layout_flags(tp, pp),
                f"--train.lr={lr}",
                f"--train.min_lr={lr / 10}",
                f"--train.lr_warmup_iters={max(1, steps // 10)}",
                *extra,
                nproc=nproc,
            )
        return RunResult.read(save, run_dir, "train")


def relative_to(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given (records stay valid when an
    output folder moves)."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
