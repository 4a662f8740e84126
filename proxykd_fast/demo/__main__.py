"""`python -m proxykd_fast.demo`: run the Proxy-KD demo and write its table and plot."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the chosen preset."""
    p = argparse.ArgumentParser(prog="python -m proxykd_fast.demo", description=__doc__)
    p.add_argument("--preset", default="default", choices=["default", "smollm2"])
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (the first is the default seed)")
    p.add_argument("--out", default="demo_out", help="output directory (the trained teacher is cached here)")
    p.add_argument("--alpha", type=float, default=None, help="KD weight alpha for the Proxy-KD students")
    p.add_argument("--student-steps", type=int, default=None, help="step budget of every student (default 400)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--progress", action="store_true", help="show per-stage progress bars")
    p.add_argument("--full", action="store_true",
                   help="also run the uneven-alignment world (the proxy's pre-training misses 30%% of the contexts): "
                        "Proxy-KD with and without weights there, written to uneven.md")
    p.add_argument("--missing-contexts", type=float, default=0.3,
                   help="share of contexts the proxy never pre-trains on in the --full variant")
    p.add_argument("--alpha-sweep", default="",
                   help="comma-separated alphas, e.g. 0.3,1,3,10,30,100: Proxy-KD students on the first seed's "
                        "targets, one per alpha, written to alpha_sweep.md")
    p.add_argument("--resume", action="store_true",
                   help="reuse the seeds, variants and sweep points an earlier run with the same settings finished "
                        "in --out (each writes its run_result.json last)")
    p.add_argument("--skip-main", action="store_true",
                   help="skip the main comparison (e.g. to run only --full's uneven world or the sweep)")
    p.add_argument("--sweep-only", action="store_true",
                   help="run only the --alpha-sweep, on the targets an earlier run left in --out")
    p.add_argument("--sweep-targets", default="aligned",
                   help="comma-separated target sources of the sweep: aligned, sft, prior, posterior, teacher (white-box)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.preset == "smollm2":
        from .smollm2 import run_smollm2

        return run_smollm2(out / "smollm2", seeds[0], alpha=args.alpha)
    from .default import DemoSettings, run_seed
    from .report import write_outputs

    settings = DemoSettings()
    if args.alpha is not None:
        settings.alpha = args.alpha
    if args.student_steps is not None:
        settings.student_steps = args.student_steps
    import dataclasses

    from .default import UNEVEN_ROWS

    uneven = dataclasses.replace(settings, missing_contexts=args.missing_contexts, variant="uneven")
    uneven_title = f"Uneven-alignment world (proxy pre-training misses {args.missing_contexts:.0%} of the contexts)"
    results: dict[int, dict] = {}
    uneven_results: dict[int, dict] = {}
    t_uneven = 0.0
    # Per seed: the main comparison, then (first seed) the alpha sweep, then (--full) the uneven world, so the
    # most wanted results land first; --resume reuses every finished seed / variant / sweep from --out.
    for i, seed in enumerate(seeds):
        if not (args.sweep_only or args.skip_main):
            results[seed] = run_seed(out, seed, settings, progress=args.progress, reuse=args.resume)
            md = write_outputs(out, results, seeds[0], time.perf_counter() - start)
            print(md)
            print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'training_curves.png'}")
        if i == 0 and args.alpha_sweep:
            from .sweep import alpha_sweep, sweep_table

            alphas = [float(x) for x in args.alpha_sweep.split(",") if x.strip()]
            t = time.perf_counter()
            rows = alpha_sweep(out, seed, settings, alphas,
                               tuple(x.strip() for x in args.sweep_targets.split(",") if x.strip()), args.progress,
                               reuse=args.resume)
            table = sweep_table(rows)
            (out / "alpha_sweep.md").write_text(f"# alpha sweep, seed {seed}\n\n{table}\n\n"
                                                f"wall time {time.perf_counter() - t:.0f} s\n", encoding="utf-8")
            print(table)
        if args.full and not args.sweep_only:
            t = time.perf_counter()
            uneven_results[seed] = run_seed(out, seed, uneven, progress=args.progress, rows=UNEVEN_ROWS,
                                            reuse=args.resume)
            t_uneven += time.perf_counter() - t
            print(write_outputs(out, uneven_results, seeds[0], t_uneven, name="uneven", title=uneven_title))
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
