"""Demo output: the results table (printed, Markdown, JSON) and the training-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proxykd_fast.jsonl import read_jsonl

ORDER = ["sft_only", "takd", "proxykd", "proxykd_no_weights", "proxykd_no_dpo", "proxykd_unaligned_proxy",
         "bayes_prior", "bayes_posterior", "whitebox_kd"]
LABELS = {
    "sft_only": "SFT only (black-box KD)",
    "takd": "TAKD-like (proxy after SFT, plain KD, no weights)",
    "proxykd": "Proxy-KD",
    "proxykd_no_weights": "Proxy-KD, no weights",
    "proxykd_no_dpo": "Proxy-KD, no DPO (proxy after SFT)",
    "proxykd_unaligned_proxy": "Proxy-KD, unaligned proxy",
    "bayes_prior": "Bayesian (v1): prior only",
    "bayes_posterior": "Bayesian (v1): posterior",
    "whitebox_kd": "white-box KD (teacher's full distribution; upper bound)",
    "proxy_aligned": "proxy (aligned: SFT + DPO)",
    "proxy_sft": "proxy (after SFT only)",
    "proxy_unaligned": "proxy (pre-trained only)",
}
TARGET_ORDER = ["prior", "proxy_sft", "proxy_aligned", "posterior"]
TARGET_LABELS = {"prior": "corpus prior (trigram, Witten-Bell, counts of the student's training answers)",
                 "proxy_sft": "proxy after SFT", "proxy_aligned": "proxy after SFT + DPO",
                 "posterior": "Dirichlet posterior (prior counts + kappa (alpha proxy + (1 - alpha) bigram prior))"}


def _mean_std(xs: list[float]) -> str:
    """'mean' for one value, 'mean +- population std' for several."""
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.4f}"
    sd = (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5
    return f"{m:.4f} ± {sd:.4f}"


def markdown_table(results: dict[int, dict[str, Any]]) -> str:
    """One row per model, KL and NLL per seed plus the mean and the change vs SFT-only."""
    seeds = sorted(results)
    names = ORDER + ["proxy_aligned", "proxy_sft", "proxy_unaligned"]
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
        lines.append(f"| {LABELS.get(name, name)} | {cells} | {_mean_std(kls)} | {100 * (mean / base - 1):+.1f}% |")
    return "\n".join(lines)


def target_table(results: dict[int, dict[str, Any]]) -> str:
    """KL(teacher || targets) per target source and seed, on the held-out answer tokens."""
    seeds = sorted(results)
    names = [n for n in TARGET_ORDER if all(n in results[s].get("targets_kl", {}) for s in seeds)]
    if not names:
        return ""
    lines = ["| targets | " + " | ".join(f"KL s{s}" for s in seeds) + " | mean |", "|" + "---|" * (len(seeds) + 2)]
    for n in names:
        kls = [results[s]["targets_kl"][n] for s in seeds]
        lines.append(f"| {TARGET_LABELS[n]} | " + " | ".join(f"{x:.4f}" for x in kls) + f" | {_mean_std(kls)} |")
    fits = [(s, results[s]["posterior_fit"]) for s in seeds if results[s].get("posterior_fit")]
    if fits:
        lines += ["", "Posterior strength fitted on the 300 held-out validation answers (leave-one-out NLL per token): "
                  + "; ".join(f"seed {s}: kappa {f['strength']:.3g}, alpha {f['mix']:.3g} (NLL prior "
                              f"{f['nll_prior']:.4f}, proxy {f['nll_proxy']:.4f}, posterior {f['nll_posterior']:.4f})"
                              for s, f in fits)]
    return "\n".join(lines)


def verdict(results: dict[int, dict[str, Any]], default_seed: int) -> dict[str, Any]:
    """Proxy-KD vs SFT-only: relative KL change per seed and whether the demo's targets are met."""
    per = {s: results[s]["eval"]["proxykd"]["kl"] / results[s]["eval"]["sft_only"]["kl"] - 1 for s in results}
    out: dict[str, Any] = {"relative_kl_change": per, "all_seeds_better": all(v < 0 for v in per.values())}
    if default_seed in per:
        out["default_seed_at_least_10pct"] = per[default_seed] <= -0.10
    return out


def write_outputs(out: Path, results: dict[int, dict[str, Any]], default_seed: int, wall_s: float,
                  name: str = "results", title: str = "Proxy-KD demo") -> str:
    """Write results.json / results.md / training_curves.png and return the Markdown table."""
    table = markdown_table(results)
    v = verdict(results, default_seed)
    md = [f"# {title}: held-out KL(teacher || model) and NLL per token", "", table, "",
          "Proxy-KD vs SFT-only, relative KL change per seed: "
          + ", ".join(f"seed {s}: {100 * x:+.1f}%" for s, x in v["relative_kl_change"].items()), ""]
    quality = target_table(results)
    if quality:
        md += ["## Target quality: KL(teacher || targets) per held-out answer token, full vocabulary", "", quality, ""]
    md += [f"Total wall time: {wall_s:.0f} s", ""]
    (out / f"{name}.md").write_text("\n".join(md), encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps({"results": results, "verdict": v, "wall_s": wall_s}, indent=2,
                                                 default=str), encoding="utf-8")
    plot_curves(out, results, f"{name}_curves.png" if name != "results" else "training_curves.png", title)
    return "\n".join(md)


def plot_curves(out: Path, results: dict[int, dict[str, Any]], filename: str = "training_curves.png",
                title: str = "Proxy-KD demo") -> None:
    """Training loss and held-out NLL per student (first seed), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = sorted(results)[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ORDER:
        if name not in results[seed]["dirs"]:
            continue
        path = Path(results[seed]["dirs"][name]) / "metrics.jsonl"
        if not path.exists():
            continue
        rows = list(read_jsonl(path))
        color = f"C{ORDER.index(name) % 10}"  # one colour per model in every panel
        axes[0].plot([r["step"] for r in rows], [r["nll"] for r in rows], label=LABELS[name], lw=0.8, color=color)
        ev = [r for r in rows if "eval_nll" in r]
        axes[1].plot([r["step"] for r in ev], [r["eval_nll"] for r in ev], marker="o", label=LABELS[name],
                     color=color)
        if name != "sft_only":
            axes[2].plot([r["step"] for r in rows], [r["kd"] for r in rows], label=LABELS[name], lw=0.8, color=color)
    axes[0].set_title("train NLL per token")
    axes[1].set_title("held-out teacher-sample NLL (early stopping)")
    axes[2].set_title("KL(targets || student) on top-k")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}, seed {seed}")
    fig.tight_layout()
    fig.savefig(out / filename, dpi=110)
    plt.close(fig)
