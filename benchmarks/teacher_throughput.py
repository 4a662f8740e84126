"""Collection throughput against the local teacher server, at several client concurrencies.

Starts `serve-teacher` in a subprocess (so server and client do not share a GIL), then runs
`collect` in-process for each concurrency into a fresh directory and prints one line each.

    python benchmarks/teacher_throughput.py --model tiny --prompts 64 --max-tokens 32
    python benchmarks/teacher_throughput.py --model smollm2 --prompts 16 --max-tokens 32 --num-threads 1

On a small shared CPU, --num-threads 1 avoids torch thread oversubscription (2 threads on a
busy 2-core machine ran several times slower in our measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxykd_fast.teacher import CollectConfig, collect  # noqa: E402
from proxykd_fast.teacher.testing import free_port, write_prompts  # noqa: E402


def start_server(model: str, port: int, max_batch_size: int, num_threads: int | None) -> subprocess.Popen:
    """Launch `serve-teacher` and wait until /health answers."""
    cmd = [sys.executable, "-m", "proxykd_fast.teacher", "serve-teacher", "--model", model, "--port", str(port)]
    cmd += ["--max-batch-size", str(max_batch_size), "--log-level", "warning"]
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> int:
    """Parse flags, run the measurements, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="preset or local model path")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,8", help="comma list")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--num-threads", type=int, default=None, help="server torch threads")
    p.add_argument("--warmup", type=int, default=4, help="requests sent first and not timed")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "teacher_throughput.json",
                   help="JSON file for the results")
    args = p.parse_args()
    rows: list[dict] = []

    port = free_port()
    server = start_server(args.model, port, args.max_batch_size, args.num_threads)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            common = dict(
                base_url=base_url, model=args.model, max_tokens=args.max_tokens, temperature=0.0, progress=False
            )
            warm = write_prompts(tmp_path / "warm.jsonl", args.warmup, seed=99)
            collect(CollectConfig(prompts=warm, out=tmp_path / "warm", concurrency=4, **common))
            prompts = write_prompts(tmp_path / "prompts.jsonl", args.prompts)
            print(
                f"model={args.model} prompts={args.prompts} max_tokens={args.max_tokens} "
                f"max_batch_size={args.max_batch_size} server_threads={args.num_threads or 'default'} "
                f"machine={platform.machine()} cpus={os.cpu_count()}"
            )
            print(f"{'concurrency':>11} {'seconds':>8} {'req/s':>8} {'gen tok/s':>10}")
            for conc in [int(c) for c in args.concurrency.split(",")]:
                cfg = CollectConfig(prompts=prompts, out=tmp_path / f"c{conc}", concurrency=conc, **common)
                summary = collect(cfg)
                if summary.failed:
                    print(f"warning: {summary.failed} failures at concurrency {conc}")
                s = summary.elapsed_s
                print(f"{conc:>11} {s:>8.2f} {summary.completed / s:>8.2f} {summary.completion_tokens / s:>10.1f}")
                rows.append({"concurrency": conc, "seconds": s, "completed": summary.completed,
                             "failed": summary.failed, "requests_per_s": summary.completed / s,
                             "completion_tokens_per_s": summary.completion_tokens / s})
    finally:
        server.terminate()
        server.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": f"{os.cpu_count()}-core CPU ({platform.machine()})", "model": args.model,
              "prompts": args.prompts, "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
              "server_threads": args.num_threads, "results": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
