"""make bench-check: the pre-release regression gate on ratios, not absolute times.

    python -m benchmarks.suite.check --record   # run the small CPU suite R times, store ratios + noise
    python -m benchmarks.suite.check            # run it once, compare with the recorded baseline

For each (loss, dtype) at the `small` preset's shape two ratios are computed from one run:
ours / GEMM floor (the two alternating step by step in ours' process, so that load drifting over
the minutes of a run cancels out), and ours / the best peer of the baseline (the same peer in both runs; peers
timed: VARIANTS). The baseline keeps each ratio's median over R (default 2) repeated runs and its spread (max - min) / median:
that spread is the noise of this machine for that ratio. The check fails when a ratio exceeds
median x (1 + max(NOISE_FACTOR x spread, MIN_TOLERANCE)), when ours fails its parity gate or
when it no longer runs. Absolute times never enter, so a slower or busier machine does not fail
it by itself; a machine much noisier than the recorded one can, which is why this is a manual
pre-release check and not part of `make test` (it takes minutes and depends on timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from .report import OURS, Results
from .run import RESULTS
from .run import main as run_main
from .spec import PRESETS, Shape

BASELINE = RESULTS / "bench_check_baseline.json"
NOISE_FACTOR, MIN_TOLERANCE = 2.0, 0.10
PRESET = "small"
# ours, the floor and the peers that need no torch.compile warm-up (which would dominate the check's
# minutes); the report's full peer set runs in `make bench`
VARIANTS = ("gemm-floor", "ours", "naive", "torch-lce", "liger", "trl")


def ratios(data: dict, peers: dict[str, str] | None = None) -> dict[str, dict]:
    """{"loss/dtype": {"floor": ours/floor, "peer": ours/peer, "peer_name", "status"}} at the main shape."""
    res = Results(data)
    main: Shape = PRESETS[PRESET].main
    out = {}
    for (loss, dtype, shape), recs in res.by_point.items():
        if shape != main:
            continue
        key = f"{loss}/{dtype}"
        ours = recs.get("ours")
        if not ours or ours.get("status") != "ok":
            out[key] = {"status": (ours or {}).get("status", "missing")}
            continue
        entry: dict = {"status": "ok"}
        floor = res.floor(loss, dtype, shape)
        if "paired_floor_ratio" in ours:  # floor and ours alternating in one process: robust to drifting load
            entry["floor"] = ours["paired_floor_ratio"]
        elif floor:
            entry["floor"] = ours["median_s"] / floor
        name = (peers or {}).get(key)
        if name is None:
            best = res.best_peer(loss, dtype, shape)
            name = best[0] if best else None
        peer = recs.get(name) if name else None
        if peer and peer.get("status") == "ok":
            entry.update(peer=ours["median_s"] / peer["median_s"], peer_name=name)
        out[key] = entry
    return out


def _run(name: str) -> dict:
    path = run_main(["--preset", PRESET, "--run-name", name, "--fresh", "--no-report", "--paired-floor",
                     "--variants", ",".join(VARIANTS),
                     "--out", str(RESULTS / "runs" / f"{name}.json")])
    return json.loads(Path(path).read_text())


def record(repeats: int) -> dict:
    """Run the small suite `repeats` times; the baseline holds each ratio's median and spread."""
    runs = [_run(f"check_record_{i}") for i in range(repeats)]
    first = ratios(runs[0])
    peers = {k: v["peer_name"] for k, v in first.items() if "peer_name" in v}
    per_run = [ratios(r, peers) for r in runs]
    base: dict = {"preset": PRESET, "repeats": repeats, "machine": runs[0]["machine_info"].get("proxykd"),
                  "commit": (runs[0].get("commit_info") or {}).get("id"), "ratios": {}}
    for key in first:
        entry = {"peer_name": peers.get(key)}
        for kind in ("floor", "peer"):
            vals = [r[key][kind] for r in per_run if kind in r.get(key, {})]
            if len(vals) == repeats:
                med = statistics.median(vals)
                entry[kind] = {"median": med, "spread": (max(vals) - min(vals)) / med, "values": vals}
        base["ratios"][key] = entry
    BASELINE.write_text(json.dumps(base, indent=1))
    return base


def compare(base: dict, now: dict[str, dict]) -> list[tuple[str, str, str, bool]]:
    """(key, kind, text, ok) per baselined ratio."""
    rows = []
    for key, entry in base["ratios"].items():
        cur = now.get(key, {"status": "missing"})
        if cur.get("status") != "ok":
            rows.append((key, "ours", f"ours is {cur.get('status')}", False))
            continue
        for kind in ("floor", "peer"):
            if kind not in entry:
                continue
            ref = entry[kind]
            limit = ref["median"] * (1 + max(NOISE_FACTOR * ref["spread"], MIN_TOLERANCE))
            val = cur.get(kind)
            label = "ours / GEMM floor" if kind == "floor" else f"ours / {entry['peer_name']}"
            if val is None:
                rows.append((key, kind, f"{label}: not measured", False))
                continue
            rows.append((key, kind, f"{label}: {val:.3f} (baseline {ref['median']:.3f}, noise "
                                    f"{ref['spread']:.1%}, limit {limit:.3f})", val <= limit))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="record a new baseline (repeats the run)")
    ap.add_argument("--repeats", type=int, default=2, help="runs for --record (their spread is the noise)")
    args = ap.parse_args(argv)
    if args.record:
        base = record(args.repeats)
        print(f"recorded {BASELINE} ({len(base['ratios'])} loss/dtype points, {args.repeats} runs)")
        return 0
    if not BASELINE.exists():
        print(f"no baseline at {BASELINE}: run `python -m benchmarks.suite.check --record` first", file=sys.stderr)
        return 2
    base = json.loads(BASELINE.read_text())
    now = _run("check_now")
    rows = compare(base, ratios(now, {k: v["peer_name"] for k, v in base["ratios"].items() if v.get("peer_name")}))
    parity_bad = [r["id"] for r in now["suite"]["cases"] if r.get("status") == "failed-parity"
                  and r["case"]["variant"] in OURS]
    for key, _, text, ok in rows:
        print(f"{'ok  ' if ok else 'FAIL'} {key:28s} {text}")
    for case_id in parity_bad:
        print(f"FAIL {case_id}: ours fails the fp64 parity gate")
    failed = [r for r in rows if not r[3]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} ratios within the noise of {base['repeats']} recorded runs"
          + ("" if not failed else f"; {len(failed)} regressed"))
    return 1 if failed or parity_bad else 0


if __name__ == "__main__":
    sys.exit(main())
