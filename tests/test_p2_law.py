"""The P² law (megashear.scaling, megashear fit-p2): constants recovered from points generated
with them, predictions beyond the data, fixed constants, one-line errors, the command."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from megashear.jobs.fit_p2 import run, run_points, train_predictor
from megashear.scaling.p2_config import FitP2Config
from megashear.scaling.p2_law import PARAMS, P2Law, fit_p2
from megashear.scaling.p2_points import Points, points_from_rows, read_points
from tests.launch import megashear_cli

# every constant active: γ < 0 since ρ is the fraction removed and the gap grows with it
TRUE = P2Law(gamma=-0.7, delta=0.3, n_c=0.05, alpha=0.4, d_c=0.2, beta=0.45, e=0.1)
N0S = (0.5e9, 1e9, 2e9, 4e9, 8e9)
RATES = (0.3, 0.5, 0.7)
TOKENS = np.geomspace(1e8, 5e9, 8)
SMOLLM2 = 134_515_008


def grid(law: P2Law, n0s=N0S, rates=RATES, tokens=TOKENS, noise: float = 0.0, seed: int = 0):
    """Points of ``law`` on a grid (L0 falling with N0), with multiplicative noise of
    standard deviation ``noise`` on the loss."""
    rows = [
        (n0, round(n0 * (1 - r)), t, 3.0 - 0.2 * math.log10(n0 / 1e9))
        for n0 in n0s
        for r in rates
        for t in tokens
    ]
    a = np.array(rows, dtype=float)
    loss = law.loss(a[:, 0], a[:, 1], a[:, 2], a[:, 3])
    loss = loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(loss)))
    return Points(a[:, 0], a[:, 1], a[:, 2], a[:, 3], loss)


def relative_errors(fitted: P2Law, true: P2Law, names=PARAMS) -> dict[str, float]:
    return {p: abs(getattr(fitted, p) / getattr(true, p) - 1) for p in names}


def far_gap_error(fitted: P2Law, true: P2Law, points: Points) -> float:
    """Largest relative error of L − L0 at 10x the largest token count, every curve."""
    far = 10 * points.tokens.max()
    return float(
        np.max(
            np.abs(fitted.gap(points.n0, points.n, far) / true.gap(points.n0, points.n, far) - 1)
        )
    )


def test_constants_recovered_without_noise():
    points = grid(TRUE)
    result = fit_p2(points)
    assert not result.fixed  # five N0, three rates: every constant is identified
    errors = relative_errors(result.law, TRUE)
    assert max(errors.values()) < 1e-3, errors
    assert result.r2 > 1 - 1e-9 and result.asd < 1e-6
    assert far_gap_error(result.law, TRUE, points) < 1e-3
    for p in PARAMS:  # every free constant has an interval around its value
        lo, hi = result.ci95[p]
        assert lo <= getattr(result.law, p) <= hi


def test_constants_recovered_with_small_noise():
    """Noise of 1e-5 (relative) on the loss: the constants that scale the whole gap or the
    token term (γ, δ, D_C, β, E) within 1e-3, N_C and α (the N0-only term, told apart from E by
    five sizes) within 1e-2, the truth inside twice the 95% interval, and the loss gap 10x
    beyond the data within 1%."""
    points = grid(TRUE, noise=1e-5, seed=1)
    result = fit_p2(points)
    errors = relative_errors(result.law, TRUE)
    assert max(errors[p] for p in ("gamma", "delta", "d_c", "beta", "e")) < 1e-3, errors
    assert max(errors.values()) < 1e-2, errors
    for p in PARAMS:
        lo, hi = result.ci95[p]
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        assert abs(getattr(TRUE, p) - mid) <= 2 * half + 1e-12, (p, result.ci95[p])
    assert far_gap_error(result.law, TRUE, points) < 0.01


def test_larger_noise_still_predicts_far_beyond_the_data():
    points = grid(TRUE, noise=1e-4, seed=2)
    result = fit_p2(points)
    assert far_gap_error(result.law, TRUE, points) < 0.01


def test_one_source_fixes_delta_alpha_and_n_c_and_says_why():
    """One N0 (one source pruned to three rates, the sweep's case): δ, α and N_C are held, the
    constant term is fitted as E; the law still recovers the curves exactly."""
    points = grid(TRUE, n0s=(SMOLLM2,))
    result = fit_p2(points)
    assert set(result.fixed) == {"delta", "alpha", "n_c"}
    assert all("same N0" in why for why in result.fixed.values())
    assert any("same N0" in m and "δ" in m for m in result.messages)
    n0b = SMOLLM2 / 1e9
    effective_e = n0b**-TRUE.delta * (TRUE.n_c * n0b**-TRUE.alpha + TRUE.e)
    effective_d_c = n0b**-TRUE.delta * TRUE.d_c
    assert result.law.e == pytest.approx(effective_e, rel=1e-3)
    assert result.law.d_c == pytest.approx(effective_d_c, rel=1e-3)
    assert result.law.gamma == pytest.approx(TRUE.gamma, rel=1e-3)
    assert far_gap_error(result.law, TRUE, points) < 1e-3
    # a constant the caller fixes stays at the caller's value, the rest is still held
    held = fit_p2(points, fixed={"delta": 0.3})
    assert held.law.delta == 0.3 and held.fixed["delta"] == "given"
    assert set(held.fixed) == {"delta", "alpha", "n_c"}


def test_an_asymptote_below_l0_is_recovered():
    """E < 0: the law's curve ends below L0 (a corpus the source never trained on)."""
    below = P2Law(gamma=-0.7, delta=0.0, n_c=0.0, alpha=0.0, d_c=0.2, beta=0.45, e=-0.05)
    points = grid(below, n0s=(SMOLLM2,))
    result = fit_p2(points)
    assert result.law.e == pytest.approx(-0.05, rel=1e-3)
    assert result.law.d_c == pytest.approx(0.2, rel=1e-3)
    far = 10 * points.tokens.max()
    assert np.all(below.gap(points.n0, points.n, far) < 0)  # beyond the data: below L0
    assert result.law.gap(points.n0, points.n, far) == pytest.approx(
        below.gap(points.n0, points.n, far), rel=1e-3
    )


def test_one_rate_fixes_gamma():
    points = grid(TRUE, n0s=(SMOLLM2,), rates=(0.5,))
    result = fit_p2(points)
    assert result.fixed["gamma"].startswith("every point has the same pruning rate")
    assert far_gap_error(result.law, TRUE, points) < 1e-3


def test_planning_answers_invert_the_law():
    n0, n, l0 = SMOLLM2, SMOLLM2 // 2, 3.0
    target = float(TRUE.loss(n0, n, 2e9, l0))
    assert TRUE.tokens_to_reach(n0, n, l0, target) == pytest.approx(2e9, rel=1e-9)
    assert math.isinf(TRUE.tokens_to_reach(n0, n, l0, l0 + 0.5 * TRUE.floor(n0, n)))
    within = TRUE.tokens_for_gap(n0, n, 0.3)
    assert TRUE.gap(n0, n, within) == pytest.approx(0.3, rel=1e-9)
    t, h = 1e9, 1e6  # the marginal gain is -dL/dD per billion tokens
    slope = (TRUE.loss(n0, n, t - h, l0) - TRUE.loss(n0, n, t + h, l0)) / (2 * h) * 1e9
    assert TRUE.gain_per_billion(n0, n, t) == pytest.approx(slope, rel=1e-6)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"tokens": -5}, "tokens must be positive"),
        ({"n": 2e9}, "must be smaller than n0"),
        ({"loss": float("nan")}, "not a finite number"),
        ({"lr": 1.0}, "unknown column 'lr'"),
    ],
)
def test_bad_rows_are_one_line_errors(row, message):
    good = {"n0": 1e9, "n": 5e8, "tokens": 1e9, "l0": 3.0, "loss": 3.2}
    with pytest.raises(ValueError, match=message) as info:
        points_from_rows([good, {**good, **row}], "FIT.csv")
    assert "\n" not in str(info.value) and "FIT.csv" in str(info.value)


def test_fewer_points_than_free_constants():
    points = grid(TRUE, tokens=np.array([1e8]), rates=(0.3, 0.5))
    points = points.subset(np.arange(len(points)) < 4)
    with pytest.raises(ValueError, match="fewer than the .* free constants"):
        fit_p2(points, fixed={"alpha": 0.4, "n_c": 0.05})


def test_missing_file_and_bad_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run(FitP2Config(points=str(tmp_path / "nope.csv")))
    with pytest.raises(ValueError, match="cannot fix 'zeta'"):
        fit_p2(grid(TRUE), fixed={"zeta": 1.0})


def write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_command_fits_predicts_plots_and_writes(tmp_path, capsys):
    """``megashear fit-p2`` in this process (the subprocess path is the error test's)."""
    from megashear.cli import main

    points = grid(TRUE, n0s=(SMOLLM2,))
    fit = write_csv(tmp_path / "fit.csv", points.rows())
    queries = [
        {"n0": SMOLLM2, "n": SMOLLM2 // 3, "tokens": 5e10, "l0": 3.1},
        {"n0": SMOLLM2, "n": SMOLLM2 // 2, "tokens": 2e9, "l0": 2.9},
    ]
    query = write_csv(tmp_path / "query.csv", queries)
    code = main(
        [
            "fit-p2",
            f"--points={fit}",
            f"--predict={query}",
            "--within=0.3",
            f"--plot={tmp_path / 'p2.png'}",
            f"--out={tmp_path / 'fit.json'}",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert [set(p) for p in out["predictions"]] == [{"n0", "n", "tokens", "l0", "loss"}] * 2
    for p, q in zip(out["predictions"], queries):
        assert (p["n"], p["l0"]) == (q["n"], q["l0"])
        assert p["loss"] == pytest.approx(float(TRUE.loss(q["n0"], q["n"], q["tokens"], q["l0"])))
    assert out["parameters"]["delta"]["fixed"] and "same N0" in out["fixed"]["delta"]
    assert all(row["tokens_within"] > 0 for row in out["plan"])
    assert (tmp_path / "p2.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert P2Law.from_dict(saved) == P2Law.from_dict(out) and saved["n0"] == SMOLLM2


def test_command_bad_input_is_one_error_line(tmp_path):
    rows = grid(TRUE, n0s=(SMOLLM2,)).rows()
    rows[3]["tokens"] = -1
    proc = megashear_cli("fit-p2", f"--points={write_csv(tmp_path / 'bad.csv', rows)}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "tokens must be positive" in last


def test_help_lists_the_fields():
    proc = megashear_cli("fit-p2", "--help")
    assert proc.returncode == 0
    for field in ("--points", "--predict", "--runs", "--n0", "--fix", "--plot", "--within"):
        assert field in proc.stdout


def fake_run(directory, n_layers_model: dict, steps=(0, 10, 20), batch=4, seq=16):
    """A run directory as megashear train leaves it: config.yaml and domain_update events."""
    import yaml

    directory.mkdir()
    cfg = {"model": {**n_layers_model, "seq_length": seq}, "train": {"global_batch_size": batch}}
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(directory / "events.jsonl", "w") as f:
        for s in steps:
            losses = {"web": 4.0 - 0.01 * s, "books": 4.2 - 0.01 * s}
            record = {"losses": losses, "reference": {"web": 3.0, "books": 3.2}}
            f.write(json.dumps({"kind": "domain_update", "step": s, **record}) + "\n")
            f.write(json.dumps({"kind": "train", "step": s, "loss": 5.0}) + "\n")
    return directory


def test_run_directories_and_the_train_predictor(tmp_path):
    from megashear.model_config import get_preset

    model = get_preset("tiny-gqa").to_dict()
    run_dir = fake_run(tmp_path / "run", model)
    n = get_preset("tiny-gqa").num_parameters()
    rows = run_points(str(run_dir), n0=2 * n, l0=None)
    assert [r["tokens"] for r in rows] == [10 * 4 * 16, 20 * 4 * 16]  # step 0 has no tokens
    assert rows[0] == {"n0": 2 * n, "n": n, "tokens": 640, "l0": 3.1, "loss": pytest.approx(4.0)}
    assert run_points(str(run_dir), 2 * n, None, domain="books")[1]["loss"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="need n0"):
        run_points(str(run_dir), None, None)
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"parameters": TRUE.to_dict(), "n0": 2 * n}))
    predict = train_predictor(str(fit), n, 64)
    assert predict(0, 3.0) is None
    assert predict(10, 3.0) == pytest.approx(float(TRUE.loss(2 * n, n, 640, 3.0)))
    with pytest.raises(ValueError, match="predicts pruned models only"):
        train_predictor(str(fit), 2 * n, 64)


def test_read_points_json(tmp_path):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"points": grid(TRUE, n0s=(1e9,)).rows()}))
    assert len(read_points(str(path))) == len(RATES) * len(TOKENS)


def test_dynamic_loading_logs_the_prediction_beside_the_observed_loss():
    """With a predictor (logging.p2_law), every domain update records the observed mean
    validation loss and the law's loss at the run's tokens, L0 the mean reference loss."""
    from types import SimpleNamespace

    from megashear.training.dynamic_loading import DynamicBatchLoading

    class Sampler:
        weights = np.array([0.5, 0.5])

        def set_weights(self, w):
            self.weights = np.asarray(w)

    class Log:
        records: list = []

        def log(self, kind, step, values):
            self.records.append((kind, step, values))

    class Fixed(DynamicBatchLoading):
        def domain_losses(self, trainer):
            return {"web": 4.0, "books": 4.4}

    batches = SimpleNamespace(names=["web", "books"], sampler=Sampler())
    calls = []

    def predict(step, l0):
        calls.append((step, l0))
        return 3.5

    log = Log()
    dyn = Fixed(batches, {}, {"web": 3.0, "books": 3.2}, "paper", log=log, p2_predict=predict)
    dyn.update(SimpleNamespace(iteration=50))
    kind, step, record = log.records[-1]
    assert (kind, step) == ("domain_update", 50) and calls == [(50, pytest.approx(3.1))]
    assert record["p2"] == {"observed": pytest.approx(4.2), "predicted": 3.5}
    with pytest.raises(ValueError, match="needs the source's loss"):
        Fixed(batches, {}, None, "constant", p2_predict=predict)
