"""``megashear shear RECIPE.yaml``: the whole job, resumable by stage.

The stages, in order (each a process, or several ranks under torchrun; docs/pipeline.md):

==============  ===========================================================================
convert         a Hugging Face source -> ``ckpt/source`` (a megashear source is used as is)
preprocess      ``data.inputs`` -> ``data/`` with the tokenizer (beside convert), or a copy of
                ``data.manifest``
reference       the reference losses: the source's validation losses, or a scaling-law fit
importance      activation importance of the source -> ``importance/importance.pt``
prune           learned masks (``pruning.method: prune``) -> ``ckpt/prune``, then
finalize        -> ``ckpt/cut``; or
cut             the one-shot cut (``importance`` / ``leading``) -> ``ckpt/cut``
continue        continued pre-training, distilled from the source -> ``ckpt/continue``
export          the last checkpoint -> ``hf/`` (tokenizer, model card with the losses)
==============  ===========================================================================

Every stage that makes a model ends with its per-domain validation loss (one progress line
per stage). Resume: a stage's outputs are published atomically (checkpoints, the manifest and
result files are written under temporary names and renamed), and its record
``stages/STAGE.json`` is written last, with the fingerprint of its inputs (the recipe values it
reads and the fingerprint of the stage before it). Running the same command again skips the
recorded stages; an interrupted ``prune`` or ``continue`` resumes from its last checkpoint
(``pruning.save_interval``, ``continuation.save_interval``). A recorded stage whose inputs
changed is refused in one line (a new output folder, or removing the record, redoes it); an
unfinished one whose inputs changed starts again from scratch. The layout, the threads and the
save intervals are not inputs: a relaunch may change them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from megashear.atomic_file import write_json_atomic
from megashear.config_io import ConfigError
from megashear.pipeline.recipe import Recipe, check
from megashear.pipeline.runner import StageError, StageRunner
from megashear.pipeline.stages import (
    CheckpointResult,
    RunResult,
    ShearStages,
    manifest_with_weights,
    relative_to,
)

logger = logging.getLogger(__name__)

RECORDS = "stages"


@dataclass
class Stage:
    """One stage of the job.

    Args:
        name: as progress lines and records name it.
        inputs: the recipe values it reads (its fingerprint, with the previous stage's).
        run: does the work and returns its result (JSON-able).
        outputs: what it writes; removed before an unfinished stage starts again with other
            inputs.
        summary: the progress line's tail, from the result.
    """

    name: str
    inputs: dict
    run: Callable[[], dict]
    outputs: list[Path] = field(default_factory=list)
    summary: Callable[[dict], str] = lambda result: ""
    fingerprint: str = ""


@dataclass(frozen=True)
class StageRecord:
    """What ``stages/STAGE.json`` holds: the stage's fingerprint and inputs, its result and
    its wall time."""

    stage: str
    fingerprint: str
    inputs: dict
    result: dict
    seconds: float


def read_record(out: Path, name: str) -> StageRecord | None:
    """The record of stage ``name`` in job folder ``out`` (None: not finished)."""
    path = Path(out) / RECORDS / f"{name}.json"
    if not path.is_file():
        return None
    return StageRecord(**json.loads(path.read_text()))


def _fingerprint(inputs: dict, before: str) -> str:
    text = json.dumps({"inputs": inputs, "after": before}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two input mappings."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _keys(section: str, values: dict) -> dict:
    """``{"steps": 4}`` -> ``{"section.steps": 4}`` (inputs named as the recipe names them)."""
    return {f"{section}.{k}": v for k, v in values.items()}


def _mean(losses: dict[str, float]) -> float:
    return sum(losses.values()) / max(1, len(losses))


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _abs(path: str) -> str:
    return os.path.abspath(path) if path else ""


class ShearJob:
    """The stages of one recipe under its output folder, and how they are run and resumed."""

    def __init__(self, recipe: Recipe, report: Callable[[str], None] | None = None) -> None:
        self.recipe = r = recipe
        self.out = Path(r.output).resolve()
        self.threads = r.threads or _cpus()
        self.runner = StageRunner(self.out, threads=self.threads, report=report)
        self.stages = ShearStages(
            self.runner, r.data.seq_length, r.data.eval_sequences, self.out / "index_cache"
        )
        ck = self.out / "ckpt"
        self.source = ck / "source" if r.source_is_hf() else Path(r.source).resolve()
        self.manifest = self.out / "data" / "manifest.yaml"
        self.scores = self.out / "importance" / "importance.pt"
        self.cut = ck / "cut"
        self.final = ck / "continue" if r.continuation.steps else self.cut
        self.tokenizer = Path(r.tokenizer_path()).resolve() if r.tokenizer_path() else None
        self.plan = self._plan()

    # --- the plan -------------------------------------------------------------------------

    def _eval(self, stage: str, load: Path, manifest: Path | None = None) -> dict[str, float]:
        lay = self.recipe.layout
        return self.stages.evaluate(
            stage, load, manifest or self.manifest, tp=lay.tp, pp=lay.pp, nproc=lay.nproc
        )

    def _plan(self) -> list[Stage]:
        r, out = self.recipe, self.out
        d, p, c = r.data, r.pruning, r.continuation
        data = {"seq_length": d.seq_length, "eval_sequences": d.eval_sequences}
        if d.inputs:
            data.update(
                inputs=[_abs(i) for i in d.inputs],
                max_bytes_per_domain=d.max_bytes_per_domain,
                valid_tokens_per_domain=d.valid_tokens_per_domain,
                eos_token=d.eos_token,
                add_bos=d.add_bos,
            )
        else:
            data["manifest"] = _abs(d.manifest)
        data_inputs = {"tokenizer": str(self.tokenizer or ""), **_keys("data", data)}
        plan: list[Stage] = []
        if r.source_is_hf():
            plan.append(
                Stage(
                    "convert",
                    {"source": _abs(r.source)},
                    self._convert,
                    [self.source],
                    lambda res: f"{res['parameters']:,} parameters",
                )
            )
        plan.append(Stage("preprocess", data_inputs, self._preprocess, [self.out / "data"]))
        ref = _keys("reference", {"method": r.reference.method, "points": _abs(r.reference.points)})
        ref["source"] = _abs(r.source)  # a megashear source has no convert stage
        if r.reference.method == "fit":
            ref.update(_keys("target", r.target_fields()))
        plan.append(Stage("reference", ref, self._reference, [], self._losses_line))
        if r.needs_importance():
            plan.append(
                Stage(
                    "importance",
                    {"pruning.importance_samples": p.importance_samples},
                    self._importance,
                    [self.scores.parent],
                )
            )
        target = r.target_fields()
        if p.method == "prune":
            prune = dataclasses.asdict(p)
            for k in ("layout", "save_interval", "method"):
                prune.pop(k)
            prune = {
                **_keys("pruning", prune),
                **_keys("target", target),
                "data.update_rule": d.update_rule,
            }
            plan.append(
                Stage(
                    "prune",
                    prune,
                    self._prune,
                    [out / "ckpt" / "prune", out / "runs" / "prune"],
                    lambda res: f"loss {res['loss']:.4f}, masked " + self._losses_line(res),
                )
            )
            plan.append(Stage("finalize", {}, self._finalize, [self.cut], self._cut_line))
        else:
            plan.append(
                Stage(
                    "cut",
                    {"pruning.method": p.method, **_keys("target", target)},
                    self._one_shot,
                    [self.cut],
                    self._cut_line,
                )
            )
        if c.steps:
            cont = dataclasses.asdict(c)
            cont.pop("layout")
            cont.pop("save_interval")
            cont = {
                **_keys("continuation", cont),
                "distill.alpha": r.distill.alpha,
                "data.update_rule": d.update_rule,
            }
            plan.append(
                Stage(
                    "continue",
                    cont,
                    self._continue,
                    [out / "ckpt" / "continue", out / "runs" / "continue"],
                    lambda res: f"loss {res['loss']:.4f}, " + self._losses_line(res),
                )
            )
        plan.append(
            Stage("export", {"tokenizer": str(self.tokenizer or "")}, self._export, [out / "hf"])
        )
        before = ""
        for stage in plan:
            stage.fingerprint = before = _fingerprint(stage.inputs, before)
        return plan

    @staticmethod
    def _losses_line(res: dict) -> str:
        return f"valid {_mean(res['losses']):.4f}"

    def _cut_line(self, res: dict) -> str:
        return f"{res['parameters']:,} parameters, " + self._losses_line(res)

    # --- the stages -----------------------------------------------------------------------

    def _convert(self) -> dict:
        res = self.stages.convert("convert", Path(self.recipe.source).resolve(), self.source)
        return {**dataclasses.asdict(res), "path": relative_to(res.path, self.out)}

    def _preprocess(self) -> dict:
        d = self.recipe.data
        if d.inputs:
            self.stages.preprocess(
                "preprocess",
                [_abs(i) for i in d.inputs],
                self.tokenizer,
                self.out / "data",
                d.max_bytes_per_domain,
                d.eos_token,
                d.add_bos,
                valid_tokens=d.valid_tokens_per_domain,
                workers=d.workers,
            )
        else:
            from megashear.data.manifest import load_manifest, save_manifest

            m = load_manifest(d.manifest)  # paths resolved: the copy reads the same files
            self.manifest.parent.mkdir(parents=True, exist_ok=True)
            save_manifest(m, str(self.manifest))
        from megashear.data.manifest import load_manifest

        m = load_manifest(str(self.manifest))
        return {"manifest": relative_to(self.manifest, self.out), "domains": m.names}

    def _reference(self) -> dict:
        r = self.recipe
        if r.reference.method == "source":
            losses = self._eval("reference", self.source)
            from megashear.data.manifest import load_manifest, save_manifest

            m = load_manifest(str(self.manifest))
            m.set_reference_losses(losses)
            save_manifest(m, str(self.manifest))
            source = CheckpointResult.read(self.source)
            return {"losses": losses, "source_parameters": source.parameters}
        from megashear.jobs.fit_reference import FitReferenceConfig
        from megashear.jobs.fit_reference import run as fit_reference
        from megashear.model_config import ModelConfig
        from megashear.pruning.targets import make_target

        source = CheckpointResult.read(self.source)
        n = make_target(ModelConfig.from_dict(source.model), **r.target_fields()).num_parameters()
        cfg = FitReferenceConfig(
            points=r.reference.points, target_params=float(n), write_manifest=str(self.manifest)
        )
        losses = fit_reference(cfg)
        write_json_atomic(self.out / "eval" / "reference" / "losses.json", losses)
        return {"losses": losses, "target_parameters": n, "source_parameters": source.parameters}

    def _importance(self) -> dict:
        lay = self.recipe.layout
        if self.scores.exists():
            self.scores.unlink()
        self.scores.parent.mkdir(parents=True, exist_ok=True)
        self.stages.importance(
            "importance",
            self.source,
            self.manifest,
            self.recipe.pruning.importance_samples,
            path=self.scores,
            tp=lay.tp,
            pp=lay.pp,
            nproc=lay.nproc,
        )
        return {"scores": relative_to(self.scores, self.out)}

    def _prune(self) -> dict:
        r, p = self.recipe, self.recipe.pruning
        lay = r.prune_layout()
        extra = [f"--pruning.init={p.init}", f"--pruning.pin_hidden={p.pin_hidden}"]
        if r.needs_importance():
            extra.append(f"--importance.path={self.scores}")
        if p.save_interval:
            extra.append(f"--checkpoint.save_interval={p.save_interval}")
        run = self.stages.prune(
            "prune",
            self.source,
            self.manifest,
            r.target_fields(),
            self.out / "ckpt" / "prune",
            self.out / "runs" / "prune",
            p.steps,
            p.batch,
            p.micro_batch,
            p.lr,
            p.domain_updates,
            rule=r.data.update_rule,
            pp=lay.pp,
            tp=lay.tp,
            dp=lay.dp,
            lr_masks=p.mask_lr,
            extra=tuple(extra),
            resume=True,
            threads=self.threads,
        )
        losses = self._eval("prune", self.out / "ckpt" / "prune")
        return _run_result(run, self.out, losses)

    def _finalize(self) -> dict:
        if self.cut.exists():  # a finalisation not recorded (killed before its evaluation)
            shutil.rmtree(self.cut)
        res = self.stages.finalize("finalize", self.out / "ckpt" / "prune", self.cut)
        return self._checkpoint_result("finalize", res)

    def _one_shot(self) -> dict:
        r = self.recipe
        scores = self.scores if r.pruning.method == "importance" else None
        res = self.stages.one_shot(
            "cut", self.source, r.target_fields(), self.cut, r.pruning.method, scores
        )
        return self._checkpoint_result("cut", res)

    def _checkpoint_result(self, stage: str, res: CheckpointResult) -> dict:
        losses = self._eval(stage, self.cut)
        return {
            **dataclasses.asdict(res),
            "path": relative_to(res.path, self.out),
            "losses": losses,
        }

    def _continue(self) -> dict:
        r, c = self.recipe, self.recipe.continuation
        lay = r.continue_layout()
        manifest = self.manifest
        if r.pruning.method == "prune":  # start from the domain weights pruning ended with
            manifest = manifest_with_weights(
                self.manifest, self.out / "runs" / "prune", self.out / "data" / "continue.yaml"
            )
        extra = [f"--checkpoint.save_interval={c.save_interval}"] if c.save_interval else []
        run = self.stages.train(
            "continue",
            manifest,
            self.out / "ckpt" / "continue",
            self.out / "runs" / "continue",
            c.steps,
            c.batch,
            c.micro_batch,
            c.lr,
            c.domain_updates,
            rule=r.data.update_rule,
            tp=lay.tp,
            pp=lay.pp,
            dp=lay.dp,
            load=self.cut,
            teacher=self.source if r.distill.alpha > 0 else None,
            kd_alpha=r.distill.alpha,
            extra=tuple(extra),
            resume=True,
            threads=self.threads,
        )
        losses = self._eval("continue", self.out / "ckpt" / "continue", manifest)
        return _run_result(run, self.out, losses)

    def _export(self) -> dict:
        last = "continue" if self.recipe.continuation.steps else self._cut_stage()
        losses = self.out / "eval" / last / "losses.json"
        source_losses = self.out / "eval" / "reference" / "losses.json"
        hf = self.stages.export(
            "export",
            self.final,
            self.out / "hf",
            self.tokenizer,
            losses=losses if losses.is_file() else None,
            source_losses=(
                source_losses
                if self.recipe.reference.method == "source" and source_losses.is_file()
                else None
            ),
        )
        return {"hf": relative_to(hf, self.out)}

    def _cut_stage(self) -> str:
        return "finalize" if self.recipe.pruning.method == "prune" else "cut"

    # --- running --------------------------------------------------------------------------

    def check_records(self) -> None:
        """Refuse (``ConfigError``, one line) a recorded stage whose inputs changed."""
        for stage in self.plan:
            rec = read_record(self.out, stage.name)
            if rec is not None and rec.fingerprint != stage.fingerprint:
                changed = _changed(rec.inputs, stage.inputs)
                what = ", ".join(changed) if changed else "a stage before it"
                raise ConfigError(
                    f"stage {stage.name} finished in {self.out} with other inputs (changed: "
                    f"{what}); use another output folder, or remove "
                    f"{self.out / RECORDS / (stage.name + '.json')} and the records after it to "
                    "redo it"
                )

    def run(self) -> dict:
        """Run the stages not recorded yet; returns the job's summary (also written to
        ``summary.json``)."""
        self.check_records()
        self.out.mkdir(parents=True, exist_ok=True)
        from megashear.config_io import dump_yaml

        dump_yaml(self.recipe, str(self.out / "recipe.yaml"))
        pending = [s for s in self.plan if read_record(self.out, s.name) is None]
        for stage in self.plan:
            if stage not in pending:
                self.runner.say(f"{stage.name:<11} recorded, skipped")
        # convert and preprocess read different inputs: they run side by side
        first = [s for s in pending if s.name in ("convert", "preprocess")]
        if len(first) == 2:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                for job in [pool.submit(self._run_stage, s) for s in first]:
                    job.result()
            pending = pending[2:]
        for stage in pending:
            self._run_stage(stage)
        summary = self.summary()
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    def _run_stage(self, stage: Stage) -> None:
        records = self.out / RECORDS
        started = records / f"{stage.name}.started.json"
        before = json.loads(started.read_text()) if started.is_file() else None
        if before is not None and before["fingerprint"] == stage.fingerprint:
            logger.info("%s: resuming an unfinished run", stage.name)
        else:
            # outputs of other inputs, or of no run of this job: never resumed from
            if before is not None:
                logger.info("%s: inputs changed since it started; starting again", stage.name)
            for path in stage.outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        write_json_atomic(started, {"fingerprint": stage.fingerprint, "inputs": stage.inputs})
        start = time.time()
        result: dict = {}
        with self.runner.stage(stage.name, lambda: stage.summary(result)):
            result.update(stage.run())
        record = StageRecord(
            stage.name, stage.fingerprint, stage.inputs, result, time.time() - start
        )
        write_json_atomic(records / f"{stage.name}.json", dataclasses.asdict(record))
        started.unlink()

    def summary(self) -> dict:
        """The job's results, from the stage records."""
        return dataclasses.asdict(read_job(self.out))


def _run_result(run: RunResult, out: Path, losses: dict[str, float]) -> dict:
    ck = {**dataclasses.asdict(run.checkpoint), "path": relative_to(run.checkpoint.path, out)}
    return {
        "checkpoint": ck,
        "steps": run.steps,
        "loss": run.last.get("loss"),
        "last": run.last,
        "losses": losses,
    }


@dataclass(frozen=True)
class JobResult:
    """A finished (or partly finished) job, from its stage records.

    Attributes:
        output: the job folder.
        source_parameters: the source's parameters (tie counted once), None if not recorded.
        parameters: the sheared model's.
        losses: per-domain validation loss after each stage that made a model (``reference``
            for the source, ``prune`` masked, ``finalize`` / ``cut``, ``continue``).
        losses_kind: ``reference``: whether the reference row is the source's loss or a fit.
        prune_loss, continue_loss: the last logged step's loss of pruning and continued
            pre-training (None: not run).
        hf: the export, None if not run.
        seconds: wall time of each recorded stage.
    """

    output: str
    source_parameters: int | None
    parameters: int | None
    losses: dict[str, dict[str, float]]
    prune_loss: float | None
    continue_loss: float | None
    hf: str | None
    seconds: dict[str, float]
    reference_method: str = "source"


def read_job(out: Path) -> JobResult:
    """The results recorded in job folder ``out``."""
    out = Path(out).resolve()
    recs = {}
    for path in sorted((out / RECORDS).glob("*.json")):
        if not path.name.endswith(".started.json"):
            rec = StageRecord(**json.loads(path.read_text()))
            recs[rec.stage] = rec
    order = ["convert", "preprocess", "reference", "importance", "prune", "finalize", "cut",
             "continue", "export"]  # fmt: skip
    losses = {
        n: recs[n].result["losses"] for n in order if n in recs and "losses" in recs[n].result
    }
    cut = recs.get("finalize") or recs.get("cut")
    source = recs["reference"].result.get("source_parameters") if "reference" in recs else None
    final = recs.get("continue")
    params = (
        final.result["checkpoint"]["parameters"]
        if final
        else (cut.result["parameters"] if cut else None)
    )
    return JobResult(
        output=str(out),
        source_parameters=source,
        parameters=params,
        losses=losses,
        prune_loss=recs["prune"].result["loss"] if "prune" in recs else None,
        continue_loss=final.result["loss"] if final else None,
        hf=str(out / recs["export"].result["hf"]) if "export" in recs else None,
        seconds={n: recs[n].seconds for n in order if n in recs},
        reference_method=(
            recs["reference"].inputs["reference.method"] if "reference" in recs else "source"
        ),
    )


def run(recipe: Recipe) -> int | None:
    """``megashear shear``: check the recipe, run the job (see the module); a failing stage is
    one ``error:`` line (with its log's tail logged before it) and exit code 1."""
    check(recipe)
    job = ShearJob(recipe)
    try:
        result = job.run()
    except StageError as exc:
        logger.error("the end of %s:\n%s", exc.log, exc.tail)
        sys.stderr.write(f"error: {exc}\n")
        return 1
    job.runner.say(f"done: {result['hf'] or job.out}")
    return None
