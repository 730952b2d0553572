"""Scaling-law fits over a sweep's points. Pure functions of arrays (numpy, scipy); nothing here runs
or reads a training run.

(a) ``fit_compute_law``: L(C) = L_inf + a·C^-alpha over the compute envelope (the lowest loss reached
    at or below each compute, Kaplan et al. 2020 sec. 6.1 style).
(b) ``fit_chinchilla``: L(N, D) = E + A/N^alpha + B/D^beta by Hoffmann et al. 2022 ("Chinchilla"),
    approach 3 (sec. 3.3 and App. D.2): minimise the Huber loss (delta 1e-3) between
    LSE(a - alpha·log N, b - beta·log D, e) and log L with L-BFGS, A = e^a, B = e^b, E = e^e. The
    objective is not convex, so the fit starts from their grid of initialisations and keeps the
    best; intervals come from refitting bootstrap resamples of the points.
(c) ``fit_lr_batch``: the optimal LR as a power of the batch, lr* = k·B^gamma (one gamma, a k per model
    size), from the per-batch optimum of ``optimal_lr`` (a parabola in log LR through the best point
    and its neighbours).

Compute is the planner's: C = ``pretrain.runtime.flops.total_flops``(N, D), so the compute-optimal
N and D for a budget (``compute_optimal``) use the same convention as ``pretrain-plan``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.runtime.flops import total_flops

HUBER_DELTA = 1e-3
# Hoffmann et al. 2022, App. D.2: the grid their L-BFGS runs start from
CHINCHILLA_GRID = {
    "alpha": [0.0, 0.5, 1.0, 1.5, 2.0],
    "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
    "e": [-1.0, -0.5, 0.0, 0.5, 1.0],
    "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
}
# L-BFGS runs from this many of the grid's best starts (every start of the grid is evaluated; runs from
# the far worse ones end in the same few minima, at 100x the time, which bootstrapping multiplies)
TOP_STARTS = 32
TOKENS_PER_PARAM_RULE = 20  # Hoffmann et al. 2022, Table 3: ~20 tokens per parameter at the optimum


# ---------------------------------------------------------------------------------------------
# Points


def load_points(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a sweep.jsonl or of a points file from elsewhere (JSONL or CSV with columns params,
    tokens, loss, and optionally flops, lr, batch); ValueError naming the file and line."""
    path = Path(path)
    text = path.read_text()
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        for row in csv.DictReader(text.splitlines()):
            rows.append({k.strip(): _cell(v) for k, v in row.items() if k})
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no points")
    missing = [c for c in ("params", "tokens", "loss") if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (a points file needs params, tokens, loss)")
    return rows


def _cell(v: str | None) -> Any:
    if v is None or not v.strip():
        return None
    s = v.strip()
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    try:
        return float(s)
    except ValueError:
        return s


def usable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points with a finite positive loss that did not diverge, with flops filled in where missing."""
    out = []
    for r in rows:
        loss = r.get("loss")
        if r.get("diverged") or loss is None or not math.isfinite(float(loss)) or float(loss) <= 0:
            continue
        n, d = float(r["params"]), float(r["tokens"])
        out.append({**r, "params": n, "tokens": d, "loss": float(loss), "flops": float(r.get("flops") or 0) or None})
        if out[-1]["flops"] is None:
            out[-1]["flops"] = total_flops(n, d)
    return out


def best_per_shape(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lowest-loss point of each (params, tokens): a law of N and D is a law of tuned runs, so
    the other LRs of the same model and data are left out."""
    best: dict[tuple[float, float], dict] = {}
    for r in rows:
        key = (r["params"], r["tokens"])
        if key not in best or r["loss"] < best[key]["loss"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["params"], r["tokens"]))


def envelope(flops: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the compute envelope: the points no cheaper point beats, by increasing compute."""
    # by compute, and at equal compute (the LRs of one model and batch) the lowest loss first
    order = np.lexsort((loss, flops))
    keep, best, seen = [], math.inf, set()
    for i in order:
        if flops[i] not in seen and loss[i] < best:
            keep.append(i)
            best = loss[i]
        seen.add(flops[i])
    return np.array(keep, dtype=int)


# ---------------------------------------------------------------------------------------------
# (b) Chinchilla approach 3


@dataclass(frozen=True)
class ChinchillaFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    points: int

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    quad = a <= delta
    value = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(quad, r, delta * np.sign(r))
    return value, grad


def _chinchilla_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    pred = top + np.log(total)
    w /= total  # d pred / d term: the softmax weights of the log-sum-exp
    value, g = _huber(pred - log_l, delta)
    grad = np.array(
        [(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(), -(g * w[0] * log_n).sum(), -(g * w[1] * log_d).sum()]
    )
    return float(value.sum()), grad


def _grid_objective(starts: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    return _huber(pred - log_l, delta)[0].sum(axis=1)


def _lbfgs(theta0: np.ndarray, log_n, log_d, log_l, delta: float) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    res = minimize(
        _chinchilla_objective,
        theta0,
        args=(log_n, log_d, log_l, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-10},
    )
    return res.x, float(res.fun)


def fit_chinchilla(
    params, tokens, loss, *, delta: float = HUBER_DELTA, starts: np.ndarray | None = None, top: int = TOP_STARTS
) -> ChinchillaFit:
    """Approach 3 of Hoffmann et al. 2022 on (N, D, L) points; the best of the L-BFGS runs is kept."""
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (params, tokens, loss))
    if len(log_l) < 5:
        raise ValueError(f"L(N, D) has 5 parameters and needs at least 5 points, got {len(log_l)}")
    if starts is None:
        g = CHINCHILLA_GRID
        starts = np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))
        ranked = np.argsort(_grid_objective(starts, log_n, log_d, log_l, delta))
        starts = starts[ranked[:top]]
    best_theta, best = None, math.inf
    for theta0 in starts:
        theta, value = _lbfgs(np.asarray(theta0, dtype=float), log_n, log_d, log_l, delta)
        if value < best and np.all(np.isfinite(theta)):
            best_theta, best = theta, value
    a, b, e, alpha, beta = best_theta
    return ChinchillaFit(
        float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta), best, len(log_l)
    )


def bootstrap(fit_fn, columns: list[np.ndarray], n: int, seed: int = 0) -> list[Any]:
    """``fit_fn`` refitted on ``n`` resamples (with replacement) of the rows; failed refits are dropped."""
    rng = np.random.default_rng(seed)
    size = len(columns[0])
    out = []
    for _ in range(n):
        idx = rng.integers(0, size, size)
        try:
            out.append(fit_fn(*(c[idx] for c in columns)))
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            continue
    return out


def intervals(fits: list[Any], names: list[str], level: float = 0.9) -> dict[str, list[float]]:
    """Percentile intervals of each named field over bootstrap fits."""
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    return {
        k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))]
        for k in names
        if len(v := [getattr(f, k) if not isinstance(f, dict) else f[k] for f in fits]) >= 2
    }


def compute_optimal(fit: ChinchillaFit, budget: float) -> tuple[float, float]:
    """(N, D) minimising the fitted L(N, D) subject to total_flops(N, D) = budget (Hoffmann et al.
    2022, eq. 4): N = G·(C/k)^(beta/(alpha+beta)), D = (C/k)/N, G = (alpha·A / (beta·B))^(1/(alpha+beta)),
    with k = total_flops(1, 1) the FLOPs per parameter per token (6)."""
    if fit.alpha <= 0 or fit.beta <= 0:
        raise ValueError(f"the fit has alpha={fit.alpha:.3g}, beta={fit.beta:.3g}: no compute-optimal trade-off")
    k = total_flops(1.0, 1.0)
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / (fit.alpha + fit.beta))
    n = g * (budget / k) ** (fit.beta / (fit.alpha + fit.beta))
    return n, budget / k / n


def rule_of_thumb(budget: float, tokens_per_param: float = TOKENS_PER_PARAM_RULE) -> tuple[float, float]:
    """(N, D) with D = tokens_per_param·N and total_flops(N, D) = budget."""
    n = math.sqrt(budget / (total_flops(1.0, 1.0) * tokens_per_param))
    return n, tokens_per_param * n


# ---------------------------------------------------------------------------------------------
# (a) L(C) over the envelope


@dataclass(frozen=True)
class ComputeFit:
    L_inf: float
    a: float
    alpha: float
    points: int

    def loss(self, c):
        return self.L_inf + self.a * np.power(c, -self.alpha)


def fit_compute_law(flops, loss) -> ComputeFit:
    """L(C) = L_inf + a·C^-alpha by least squares on log L, from a small grid of starts. C is scaled
    by its geometric mean inside the fit so that a is near the losses' size."""
    from scipy.optimize import minimize

    c, y = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
    if len(c) < 3:
        raise ValueError(f"L(C) has 3 parameters and needs at least 3 points, got {len(c)}")
    c0 = float(np.exp(np.log(c).mean()))
    x, log_y = np.log(c / c0), np.log(y)

    def objective(theta):
        l_inf, log_a, alpha = theta
        pred = np.logaddexp(math.log(l_inf) if l_inf > 0 else -np.inf, log_a - alpha * x)
        return float(((pred - log_y) ** 2).sum())

    best, best_theta = math.inf, None
    for frac, alpha in itertools.product((0.0, 0.5, 0.8, 0.95), (0.05, 0.2, 0.5, 1.0)):
        l_inf = frac * y.min()
        theta0 = [l_inf, math.log(max(np.median(y) - l_inf, 1e-9)), alpha]
        res = minimize(objective, theta0, method="L-BFGS-B", bounds=[(0.0, y.min()), (None, None), (0.0, 10.0)])
        if res.fun < best:
            best, best_theta = float(res.fun), res.x
    l_inf, log_a, alpha = best_theta
    return ComputeFit(float(l_inf), float(math.exp(log_a) * c0**alpha), float(alpha), len(c))


# ---------------------------------------------------------------------------------------------
# (c) the optimal LR and the batch


def optimal_lr(lrs, losses) -> tuple[float, bool]:
    """(lr*, interior): the vertex of the parabola in log LR through the lowest loss and its two
    neighbours; at an edge of the range, that edge and False (the optimum may lie outside)."""
    lr, y = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    order = np.argsort(lr)
    lr, y = lr[order], y[order]
    i = int(np.nanargmin(y))
    if i == 0 or i == len(lr) - 1:
        return float(lr[i]), False
    x = np.log(lr[i - 1 : i + 2])
    c2, c1, _ = np.polyfit(x, y[i - 1 : i + 2], 2)
    vertex = -c1 / (2 * c2) if c2 > 0 else x[1]
    return float(np.exp(np.clip(vertex, x[0], x[2]))), True


def fit_lr_batch(batches, lrs, groups=None) -> dict[str, Any]:
    """lr* = k·B^gamma by least squares in log-log. With ``groups`` (the model size of each optimum), one
    gamma is shared and each group has its own k: the sizes' optima differ by a factor that is not the
    batch's doing, and pooling them would hand that factor to gamma."""
    b, lr = np.log(np.asarray(batches, dtype=float)), np.log(np.asarray(lrs, dtype=float))
    if len(set(b.tolist())) < 2:
        raise ValueError("the optimal LR as a power of the batch needs at least 2 batch sizes")
    names = [str(g) for g in groups] if groups is not None else ["all"] * len(b)
    keys = sorted(set(names), key=names.index)
    design = np.column_stack([b] + [np.array([n == k for n in names], dtype=float) for k in keys])
    coef, *_ = np.linalg.lstsq(design, lr, rcond=None)
    k_by = {key: float(np.exp(c)) for key, c in zip(keys, coef[1:])}
    out = {"gamma": float(coef[0]), "k": float(np.exp(np.mean(coef[1:]))), "points": len(b)}
    if groups is not None:
        out["k_by_size"] = k_by
    return out


def lr_optima(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimal LR of each (params, batch, tokens/batch) group of a sweep with at least 3 LRs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("lr") is not None and r.get("batch") is not None:
            groups.setdefault((r["params"], r["batch"], r["tokens"] / r["batch"]), []).append(r)
    out = []
    for (params, batch, _), members in sorted(groups.items()):
        if len({m["lr"] for m in members}) >= 3:
            lr, interior = optimal_lr([m["lr"] for m in members], [m["loss"] for m in members])
            out.append(
                {"params": params, "batch": batch, "lr": lr, "interior": interior, "size": members[0].get("size")}
            )
    return out


# ---------------------------------------------------------------------------------------------
# Everything `pretrain-sweep fit` reports


def fit_all(rows: list[dict[str, Any]], n_bootstrap: int = 100, seed: int = 0) -> dict[str, Any]:
    """The three fits over the usable points of a sweep; a fit the points cannot support is reported
    with its reason instead of a number."""
    pts = usable(rows)
    report: dict[str, Any] = {"points": len(rows), "usable": len(pts)}
    if not pts:
        raise ValueError("no usable points (every one failed, diverged or has no loss)")
    flops = np.array([p["flops"] for p in pts])
    loss = np.array([p["loss"] for p in pts])
    env = envelope(flops, loss)
    report["envelope"] = [{"flops": float(flops[i]), "loss": float(loss[i])} for i in env]
    try:
        cf = fit_compute_law(flops[env], loss[env])
        boot = bootstrap(fit_compute_law, [flops[env], loss[env]], n_bootstrap, seed)
        report["compute_law"] = {**asdict(cf), "intervals": intervals(boot, ["L_inf", "a", "alpha"])}
    except ValueError as e:
        report["compute_law"] = {"error": str(e)}
    best = best_per_shape(pts)
    cols = [np.array([p[k] for p in best]) for k in ("params", "tokens", "loss")]
    try:
        ch = fit_chinchilla(*cols)
        # each resample starts from the full fit and its neighbours, not the whole grid: the grid is for
        # finding the basin, and 100 resamples x 32 starts would dominate the command's time
        start = np.log([ch.A, ch.B, ch.E]).tolist() + [ch.alpha, ch.beta]
        starts = np.array([start, [start[0], start[1], start[2], 0.5, 0.5]])
        boot = bootstrap(lambda n, d, lo: fit_chinchilla(n, d, lo, starts=starts), cols, n_bootstrap, seed)
        report["chinchilla"] = {**asdict(ch), "intervals": intervals(boot, ["E", "A", "B", "alpha", "beta"])}
        report["chinchilla"]["distinct_params"] = len(set(cols[0].tolist()))
        report["chinchilla"]["distinct_tokens"] = len(set(cols[1].tolist()))
    except ValueError as e:
        report["chinchilla"] = {"error": str(e)}
    optima = lr_optima(pts)
    report["lr_optima"] = optima
    inner = [o for o in optima if o["interior"]]
    try:
        report["lr_batch"] = fit_lr_batch(
            [o["batch"] for o in inner], [o["lr"] for o in inner], [o["size"] for o in inner]
        )
    except ValueError as e:
        report["lr_batch"] = {"error": str(e)}
    return report


def chinchilla_from(report: dict[str, Any]) -> ChinchillaFit:
    c = report["chinchilla"]
    if "error" in c:
        raise ValueError(f"no L(N, D) fit: {c['error']}")
    return ChinchillaFit(c["E"], c["A"], c["B"], c["alpha"], c["beta"], c["objective"], c["points"])
