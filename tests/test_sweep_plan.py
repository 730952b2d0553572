"""`pretrain-plan --budget FLOPS --fit POINTS`: the compute-optimal model from a scaling-law fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.cli import plan
from pretrain.runtime.flops import total_flops
from pretrain.sweep.fit import compute_optimal
from tests.test_sweep_fit import TRUE, chinchilla_points


@pytest.fixture
def points(tmp_path):
    n, d, loss = chinchilla_points(0)
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps({"params": a, "tokens": b, "loss": c}) + "\n" for a, b, c in zip(n, d, loss)))
    csv = tmp_path / "points.csv"
    csv.write_text("params,tokens,loss\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(n, d, loss)))
    return path, csv


def test_plan_from_a_fit_prints_the_optimal_size_and_tokens(points, capsys):
    assert plan.main(["--budget", "1e21", "--fit", str(points[0])]) == 0
    text = capsys.readouterr().out
    assert "compute-optimal for 1e+21 FLOPs" in text
    assert "optimal          N = " in text and "tokens/parameter" in text and "20 tokens/param" in text
    assert "ZeRO-3" in text and "GPU-days" in text  # then the usual plan, for that model


def test_plan_from_a_fit_matches_the_true_optimum_and_spends_the_budget(points, capsys):
    assert plan.main(["--budget", "1e21", "--fit", str(points[1]), "--json", "--gpu", "h100"]) == 0
    result = json.loads(capsys.readouterr().out)
    f = result["scaling_fit"]
    n_true, d_true = compute_optimal(TRUE, 1e21)
    # the exponent ratio sets the split; a 5% error in each moves N at 1e21 by tens of percent
    assert f["optimal_params"] == pytest.approx(n_true, rel=0.5)
    assert f["optimal_tokens"] == pytest.approx(d_true, rel=0.5)
    assert total_flops(f["optimal_params"], f["optimal_tokens"]) == pytest.approx(1e21)
    assert result["params"] == round(f["optimal_params"]) and result["total_flops"] == pytest.approx(1e21, rel=1e-6)
    assert f["predicted_loss"] <= f["rule_20_predicted_loss"]  # the fit's own optimum beats the rule, by the fit
    assert np.isclose(f["rule_20_tokens"] / f["rule_20_params"], 20)
    assert f["warnings"] == []  # 9 sizes x 9 token counts, and the budget inside their compute


def test_a_fit_from_two_token_counts_is_flagged_as_unidentified(tmp_path, capsys):
    n, d, loss = chinchilla_points(0)
    keep = np.isin(d, np.unique(d)[[0, -1]])
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"params": a, "tokens": b, "loss": c}) + "\n" for a, b, c in
                            zip(n[keep], d[keep], loss[keep])))  # fmt: skip
    assert plan.main(["--budget", "1e21", "--fit", str(path)]) == 0
    assert "9 model sizes x 2 token counts" in capsys.readouterr().out


def test_fit_and_budget_go_together_and_replace_params_and_tokens(points, capsys):
    assert plan.main(["--fit", str(points[0])]) == 2
    assert "--budget and --fit go together" in capsys.readouterr().err
    assert plan.main(["--budget", "1e21", "--fit", str(points[0]), "--params", "1B"]) == 2
    assert "leave out --params" in capsys.readouterr().err


def test_sweep_fit_reads_a_csv_points_file_prints_json_and_draws_the_plots(points, tmp_path, capsys):
    from pretrain.cli import sweep

    assert sweep.main(["fit", str(points[1]), "--json", "--bootstrap", "4", "--plots", str(tmp_path / "p")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chinchilla"]["alpha"] == pytest.approx(TRUE.alpha, rel=0.05)
    assert report["usable"] == 81 and "intervals" in report["chinchilla"]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["compute.png", "laws.png", "lr.png"]
    assert sweep.main(["fit", str(tmp_path / "missing.csv")]) == 2
