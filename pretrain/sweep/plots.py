"""The sweep's table and plots (matplotlib, Agg: no display needed).

lr.png       val loss vs LR, one panel per size, a line per batch size, the optimal LR marked
compute.png  train loss vs compute (the planner's FLOPs) for every run, the envelope and L(C)
laws.png     the optimal LR vs the batch with its power law; L(N, D) against the best points
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.runtime.flops import total_flops
from pretrain.sweep.fit import optimal_lr, usable


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'point':<34} {'params':>9} {'tokens':>10} {'FLOPs':>9} {'train':>7} {'val':>7} {'status':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        status = "diverged" if r.get("diverged") else r.get("status", "?")
        lines.append(
            f"{r.get('name', '-'):<34} {_fmt(r.get('params'), ',.0f'):>9} {_fmt(r.get('tokens'), ',.0f'):>10} "
            f"{_fmt(r.get('flops'), '.2e'):>9} {_fmt(r.get('train_loss'), '.4f'):>7} "
            f"{_fmt(r.get('val_loss'), '.4f'):>7} {status:>8}"
        )
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"points: {report['usable']} usable of {report['points']}"]
    cl = report.get("compute_law", {})
    if "error" in cl:
        lines.append(f"(a) L(C): not fitted: {cl['error']}")
    else:
        ci = cl.get("intervals", {}).get("alpha")
        lines.append(
            f"(a) L(C) = {cl['L_inf']:.3f} + {cl['a']:.3g}·C^-{cl['alpha']:.3f}"
            + (f"   (alpha 90% bootstrap [{ci[0]:.3f}, {ci[1]:.3f}])" if ci else "")
            + f"   over {cl['points']} envelope points"
        )
    ch = report.get("chinchilla", {})
    if "error" in ch:
        lines.append(f"(b) L(N, D): not fitted: {ch['error']}")
    else:
        iv = ch.get("intervals", {})

        def ci(k: str) -> str:
            return f" [{iv[k][0]:.3g}, {iv[k][1]:.3g}]" if k in iv else ""

        lines.append(
            f"(b) L(N, D) = {ch['E']:.3f} + {ch['A']:.3g}/N^{ch['alpha']:.3f} + {ch['B']:.3g}/D^{ch['beta']:.3f}"
            f"   ({ch['points']} points: {ch['distinct_params']} sizes x {ch['distinct_tokens']} token counts)"
        )
        lines.append(
            f"    90% bootstrap: alpha{ci('alpha')}, beta{ci('beta')}, E{ci('E')}"
            + ("   (few points: the intervals are wide for a reason)" if ch["points"] < 12 else "")
        )
        a, b = ch["alpha"], ch["beta"]
        if a > 0 and b > 0:
            lines.append(f"    compute-optimal: N ~ C^{b / (a + b):.3f}, D ~ C^{a / (a + b):.3f}")
    for o in report.get("lr_optima", []):
        where = "interior" if o["interior"] else "AT THE EDGE of the LR range"
        lines.append(f"    optimal LR, size {o['size']}, batch {o['batch']:g}: {o['lr']:.3g} ({where})")
    lb = report.get("lr_batch", {})
    if "error" in lb:
        lines.append(f"(c) lr*(B): not fitted: {lb['error']}")
    else:
        ks = ", ".join(f"{size}: {k:.3g}" for size, k in (lb.get("k_by_size") or {}).items())
        lines.append(
            f"(c) lr*(B) = k·B^{lb['gamma']:.3f}   over {lb['points']} interior optima"
            + (f"   (k by size: {ks})" if ks else f"   (k = {lb['k']:.3g})")
        )
    return "\n".join(lines)


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.85) for i in range(n)]


def plot_lr(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [r for r in rows if r.get("lr") is not None and r.get("batch") is not None]
    sizes = sorted({str(r.get("size")) for r in runs}, key=lambda s: (len(s), s))
    fig, axes = plt.subplots(1, max(len(sizes), 1), figsize=(4.2 * max(len(sizes), 1), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        batches = sorted({r["batch"] for r in runs if str(r.get("size")) == size})
        for color, batch in zip(_colors(len(batches)), batches):
            pts = sorted((r for r in runs if str(r.get("size")) == size and r["batch"] == batch), key=lambda r: r["lr"])
            good = [r for r in pts if r.get("loss") is not None and not r.get("diverged")]
            ax.plot([r["lr"] for r in good], [r["loss"] for r in good], "o-", color=color, label=f"batch {batch}")
            for r in pts:
                if r.get("diverged") or r.get("loss") is None:
                    ax.axvline(r["lr"], color=color, ls=":", lw=1)
            if len(good) >= 3:
                lr, interior = optimal_lr([r["lr"] for r in good], [r["loss"] for r in good])
                best = min(good, key=lambda r: r["loss"])
                ax.plot([lr], [best["loss"]], "*", ms=15, color=color, mec="k", zorder=5)
                ax.annotate(
                    f"{lr:.2g}" + ("" if interior else " (edge)"),
                    (lr, best["loss"]),
                    xytext=(4, -12),
                    textcoords="offset points",
                    fontsize=8,
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
        ax.set_title(f"size {size}")
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss")
    if not runs:  # a points file from elsewhere may carry no LR or batch
        axes[0][0].text(0.5, 0.5, "no LR x batch points", ha="center", transform=axes[0][0].transAxes)
    else:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("val loss vs LR (star: optimal LR)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_compute(rows: list[dict[str, Any]], report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = usable(rows)
    sizes = sorted({str(r.get("size", r["params"])) for r in pts}, key=lambda s: (len(s), s))
    colors = dict(zip(sizes, _colors(len(sizes))))
    for r in pts:
        color = colors[str(r.get("size", r["params"]))]
        curve = r.get("curve") or []
        if curve:
            c = [total_flops(r["params"], t) for t, _ in curve]
            ax.plot(c, [loss for _, loss in curve], color=color, lw=0.6, alpha=0.35)
        ax.plot([r["flops"]], [r["loss"]], "o", color=color, ms=4)
    for size, color in colors.items():
        ax.plot([], [], "o-", color=color, label=f"size {size}")
    env = report.get("envelope", [])
    if env:
        ax.plot([e["flops"] for e in env], [e["loss"] for e in env], "k--", lw=1, label="envelope (final losses)")
    cl = report.get("compute_law", {})
    if env and "error" not in cl:
        c = np.logspace(math.log10(env[0]["flops"]), math.log10(env[-1]["flops"]), 50)
        ax.plot(
            c,
            cl["L_inf"] + cl["a"] * c ** -cl["alpha"],
            "r-",
            lw=1.5,
            label=f"L(C) = {cl['L_inf']:.2f} + {cl['a']:.3g}·C^-{cl['alpha']:.3f}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = total_flops(N, D) (FLOPs)")
    ax.set_ylabel("loss (curves: train; dots: final val)")
    lo = min((r["loss"] for r in pts), default=1.0)
    ax.set_ylim(lo * 0.95, lo * 1.8 if pts else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss vs compute per size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_laws(rows: list[dict[str, Any]], report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain.sweep.fit import best_per_shape

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    optima = report.get("lr_optima", [])
    sizes = sorted({str(o["size"]) for o in optima}, key=lambda s: (len(s), s))
    for color, size in zip(_colors(len(sizes)), sizes):
        mine = [o for o in optima if str(o["size"]) == size]
        left.plot([o["batch"] for o in mine], [o["lr"] for o in mine], "o", color=color, label=f"size {size}")
    lb = report.get("lr_batch", {})
    if optima and "error" not in lb:
        b = np.logspace(math.log10(min(o["batch"] for o in optima)), math.log10(max(o["batch"] for o in optima)), 20)
        ks = lb.get("k_by_size") or {"all": lb["k"]}
        colors = dict(zip(sizes, _colors(len(sizes))))
        for size, k in ks.items():
            left.plot(b, k * b ** lb["gamma"], "-", color=colors.get(str(size), "r"), lw=1)
        left.plot([], [], "k-", lw=1, label=f"lr* = k(size)·B^{lb['gamma']:.2f}")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("batch (sequences)")
    left.set_ylabel("optimal LR")
    left.set_title("(c) optimal LR vs batch", fontsize=10)
    left.grid(alpha=0.3)
    if optima:
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no sweep of 3+ LRs per batch", ha="center", transform=left.transAxes)
    best = best_per_shape(usable(rows))
    ch = report.get("chinchilla", {})
    tokens = sorted({p["tokens"] for p in best})
    for color, d in zip(_colors(len(tokens)), tokens):
        mine = [p for p in best if p["tokens"] == d]
        right.plot([p["params"] for p in mine], [p["loss"] for p in mine], "o", color=color, label=f"D = {d:.3g}")
        if "error" not in ch and mine:
            n = np.logspace(math.log10(min(p["params"] for p in best)), math.log10(max(p["params"] for p in best)), 30)
            right.plot(n, ch["E"] + ch["A"] / n ** ch["alpha"] + ch["B"] / d ** ch["beta"], "-", color=color, lw=1)
    right.set_xscale("log")
    right.set_xlabel("parameters N")
    right.set_ylabel("loss (best LR)")
    title = "(b) L(N, D)"
    if "error" not in ch:
        title += f" = {ch['E']:.2f} + {ch['A']:.3g}/N^{ch['alpha']:.2f} + {ch['B']:.3g}/D^{ch['beta']:.2f}"
    right.set_title(title, fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(rows: list[dict[str, Any]], report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "lr.png", out / "compute.png", out / "laws.png"]
    plot_lr(rows, paths[0])
    plot_compute(rows, report, paths[1])
    plot_laws(rows, report, paths[2])
    return paths
