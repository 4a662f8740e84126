"""Demo output: the results table (printed, Markdown, JSON) and the training-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORDER = ["sft_only", "proxykd", "proxykd_no_weights", "proxykd_unaligned_proxy"]
LABELS = {
    "sft_only": "SFT only (black-box KD)",
    "proxykd": "Proxy-KD",
    "proxykd_no_weights": "Proxy-KD, no weights",
    "proxykd_unaligned_proxy": "Proxy-KD, unaligned proxy",
    "proxy_aligned": "proxy (aligned)",
    "proxy_unaligned": "proxy (pre-trained only)",
}


def markdown_table(results: dict[int, dict[str, Any]]) -> str:
    """One row per model, KL and NLL per seed plus the mean and the change vs SFT-only."""
    seeds = sorted(results)
    names = ORDER + ["proxy_aligned", "proxy_unaligned"]
    head = "| model | " + " | ".join(f"KL s{s} | NLL s{s}" for s in seeds) + " | mean KL | vs SFT-only |"
    sep = "|" + "---|" * (2 * len(seeds) + 3)
    lines = [head, sep]
    base = sum(results[s]["eval"]["sft_only"]["kl"] for s in seeds) / len(seeds)
    for name in names:
        if not all(name in results[s]["eval"] for s in seeds):
            continue
        kls = [results[s]["eval"][name]["kl"] for s in seeds]
        cells = " | ".join(f"{results[s]['eval'][name]['kl']:.4f} | {results[s]['eval'][name]['nll']:.4f}" for s in seeds)
        mean = sum(kls) / len(kls)
        lines.append(f"| {LABELS.get(name, name)} | {cells} | {mean:.4f} | {100 * (mean / base - 1):+.1f}% |")
    return "\n".join(lines)


def verdict(results: dict[int, dict[str, Any]], default_seed: int) -> dict[str, Any]:
    """Proxy-KD vs SFT-only: relative KL change per seed and whether the demo's targets are met."""
    per = {s: results[s]["eval"]["proxykd"]["kl"] / results[s]["eval"]["sft_only"]["kl"] - 1 for s in results}
    out: dict[str, Any] = {"relative_kl_change": per, "all_seeds_better": all(v < 0 for v in per.values())}
    if default_seed in per:
        out["default_seed_at_least_10pct"] = per[default_seed] <= -0.10
    return out


def write_outputs(out: Path, results: dict[int, dict[str, Any]], default_seed: int, wall_s: float) -> str:
    """Write results.json / results.md / training_curves.png and return the Markdown table."""
    table = markdown_table(results)
    v = verdict(results, default_seed)
    md = ["# Proxy-KD demo: held-out KL(teacher || model) and NLL per token", "", table, "",
          "Proxy-KD vs SFT-only, relative KL change per seed: "
          + ", ".join(f"seed {s}: {100 * x:+.1f}%" for s, x in v["relative_kl_change"].items()),
          f"Total wall time: {wall_s:.0f} s", ""]
    (out / "results.md").write_text("\n".join(md), encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"results": results, "verdict": v, "wall_s": wall_s}, indent=2,
                                                 default=str), encoding="utf-8")
    plot_curves(out, results)
    return "\n".join(md)


def plot_curves(out: Path, results: dict[int, dict[str, Any]]) -> None:
    """Training loss and held-out NLL per student (first seed), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = sorted(results)[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ORDER:
        path = Path(results[seed]["dirs"][name]) / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        axes[0].plot([r["step"] for r in rows], [r["nll"] for r in rows], label=LABELS[name], lw=0.8)
        ev = [r for r in rows if "eval_nll" in r]
        axes[1].plot([r["step"] for r in ev], [r["eval_nll"] for r in ev], marker="o", label=LABELS[name])
        if name != "sft_only":
            axes[2].plot([r["step"] for r in rows], [r["kd"] for r in rows], label=LABELS[name], lw=0.8)
    axes[0].set_title("train NLL per token")
    axes[1].set_title("held-out teacher-sample NLL (early stopping)")
    axes[2].set_title("KL(proxy || student) on top-k")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"Proxy-KD demo, seed {seed}")
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)
