"""The sweep's fits (pretrain/sweep/fit.py) recover known laws from synthetic points; pure and fast."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.runtime.flops import total_flops
from pretrain.sweep.fit import (
    ChinchillaFit,
    best_per_shape,
    compute_optimal,
    envelope,
    fit_all,
    fit_chinchilla,
    fit_compute_law,
    fit_lr_batch,
    load_points,
    lr_optima,
    optimal_lr,
    rule_of_thumb,
    usable,
)

# Hoffmann et al. 2022's own approach-3 law, the "known law" of the synthetic points
TRUE = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, points=0)


def chinchilla_points(seed: int, noise: float = 0.01):
    """9 sizes x 9 token counts over four decades each, the loss times (1 + 1% Gaussian noise)."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.logspace(6, 10, 9), 9)
    d = np.tile(np.logspace(8, 12, 9), 9)
    return n, d, TRUE.loss(n, d) * (1 + noise * rng.standard_normal(n.size))


@pytest.mark.parametrize("seed", [0, 1])
def test_chinchilla_fit_recovers_the_exponents_within_5_percent(seed):
    fit = fit_chinchilla(*chinchilla_points(seed))
    assert fit.alpha == pytest.approx(TRUE.alpha, rel=0.05)
    assert fit.beta == pytest.approx(TRUE.beta, rel=0.05)
    assert fit.E == pytest.approx(TRUE.E, rel=0.05)


def test_chinchilla_fit_is_exact_without_noise_and_needs_five_points():
    n, d, loss = chinchilla_points(0, noise=0.0)
    fit = fit_chinchilla(n, d, loss)
    assert fit.alpha == pytest.approx(0.34, rel=1e-3) and fit.beta == pytest.approx(0.28, rel=1e-3)
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_chinchilla(n[:4], d[:4], loss[:4])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_law_recovers_alpha_within_5_percent(seed):
    rng = np.random.default_rng(seed)
    c = np.logspace(12, 20, 25)
    loss = (1.5 + 2e4 * c**-0.3) * (1 + 0.01 * rng.standard_normal(c.size))
    fit = fit_compute_law(c, loss)
    assert fit.alpha == pytest.approx(0.3, rel=0.05)
    assert fit.L_inf == pytest.approx(1.5, rel=0.05)


def test_optimal_lr_is_the_parabola_vertex_in_log_lr_and_edges_are_flagged():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]
    loss = [(np.log(lr) - np.log(5e-4)) ** 2 + 3 for lr in lrs]
    lr, interior = optimal_lr(lrs, loss)
    assert interior and lr == pytest.approx(5e-4, rel=1e-6)
    lr, interior = optimal_lr(lrs, [4, 3, 2, 1])  # still falling at the largest LR: the range is too narrow
    assert (lr, interior) == (3e-3, False)


def test_lr_batch_power_law_recovers_gamma_from_swept_losses():
    """A loss bowl in log LR centred on 2e-3·(B/16)^0.5, swept at 7 LRs per batch with 1% noise: the
    per-batch optima and their power law give gamma within 5%."""
    rng = np.random.default_rng(0)
    rows = []
    for batch in (8, 16, 32, 64, 128):
        best = 2e-3 * (batch / 16) ** 0.5
        for lr in np.logspace(-4, -1, 7):
            loss = (3 + 0.2 * (np.log(lr) - np.log(best)) ** 2) * (1 + 0.001 * rng.standard_normal())
            rows.append({"params": 1e6, "tokens": 1e7 * batch, "batch": batch, "lr": lr, "loss": loss, "size": 64})
    optima = lr_optima(usable(rows))
    assert len(optima) == 5 and all(o["interior"] for o in optima)
    fit = fit_lr_batch([o["batch"] for o in optima], [o["lr"] for o in optima])
    assert fit["gamma"] == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="2 batch sizes"):
        fit_lr_batch([16, 16], [1e-3, 2e-3])


def test_compute_optimal_spends_the_budget_and_beats_other_splits():
    budget = 1e21
    n, d = compute_optimal(TRUE, budget)
    assert total_flops(n, d) == pytest.approx(budget)
    for factor in (0.5, 0.8, 1.25, 2.0):
        other_n = n * factor
        assert TRUE.loss(n, d) < TRUE.loss(other_n, budget / total_flops(other_n, 1.0))
    n20, d20 = rule_of_thumb(budget)
    assert d20 / n20 == pytest.approx(20) and total_flops(n20, d20) == pytest.approx(budget)


def test_envelope_keeps_the_best_loss_per_compute_and_only_improvements():
    flops = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 4.0])
    loss = np.array([5.0, 4.0, 4.5, 3.0, 3.5, 3.2])
    assert envelope(flops, loss).tolist() == [1, 3]


def test_points_files_csv_and_jsonl_and_what_is_left_out(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("params,tokens,loss,lr\n1e6,1e8,3.5,1e-3\n1e6,1e8,3.4,3e-3\n2e6,1e8,,1e-3\n")
    rows = load_points(csv_path)
    assert rows[0] == {"params": 1e6, "tokens": 1e8, "loss": 3.5, "lr": 1e-3}
    good = usable(rows)
    assert len(good) == 2 and good[0]["flops"] == total_flops(1e6, 1e8)  # the empty loss is left out
    assert [r["loss"] for r in best_per_shape(good)] == [3.4]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"params": 1e6, "tokens": 1e8, "loss": 3.0, "diverged": True})
        + "\n"
        + json.dumps({"params": 1e6, "tokens": 1e8, "loss": 3.2})
        + "\n"
        + json.dumps({"params": 2e6, "tokens": 1e8, "loss": float("nan")})
        + "\n"
    )
    # a diverged run, or a non-finite loss, is no evidence for a law
    assert [r["loss"] for r in usable(load_points(jsonl))] == [3.2]
    bad = tmp_path / "bad.csv"
    bad.write_text("n,d,loss\n1,2,3\n")
    with pytest.raises(ValueError, match="params, tokens"):
        load_points(bad)


def test_fit_all_reports_every_fit_and_its_intervals():
    n, d, loss = chinchilla_points(0)
    rows = [{"params": a, "tokens": b, "loss": c} for a, b, c in zip(n, d, loss)]
    report = fit_all(rows, n_bootstrap=8)
    ch = report["chinchilla"]
    assert ch["alpha"] == pytest.approx(0.34, rel=0.05)
    lo, hi = ch["intervals"]["alpha"]
    assert lo <= hi and lo < 0.4 and hi > 0.3
    assert "alpha" in report["compute_law"] and report["envelope"]
    assert "error" in report["lr_batch"]  # no LRs in these points: said, not invented
