"""Kill the collector with SIGKILL mid-run, resume, and get exactly the uninterrupted run's records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from proxykd_fast.teacher import CollectConfig, collect, load_records
from proxykd_fast.teacher.cli import main as cli_main
from proxykd_fast.teacher.faults import FaultConfig
from proxykd_fast.teacher.records import strip_volatile
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.store import RECORDS_FILE
from proxykd_fast.teacher.testing import count_lines, free_port, write_prompts
from proxykd_fast.teacher.tiny import tiny_teacher

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
N_PROMPTS = 48
CONCURRENCY = 4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OPENAI_API_KEY", None)
    return env


def _collect_cmd(prompts: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxykd_fast.teacher",
        "collect",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--base-url",
        base_url,
        "--model",
        "tiny",
        "--max-tokens",
        "10",
        "--temperature",
        "0",
        "--concurrency",
        str(CONCURRENCY),
        "--timeout",
        "30",
        "--no-progress",
        *extra,
    ]


def _canonical(rows: list[dict]) -> dict[str, str]:
    return {r["prompt_hash"]: json.dumps(strip_volatile(r), sort_keys=True) for r in rows}


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_teacher(seed=3)
    # Added latency makes a run last a few seconds, so the kills land mid-run.
    srv = TeacherServer(model, tok, model_name="tiny", faults=FaultConfig(latency=0.05))
    srv.start()
    yield srv
    srv.stop()
    torch.set_num_threads(threads)


def test_sigkill_and_resume_equals_uninterrupted_run(server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", N_PROMPTS, seed=4)
    reference_cfg = CollectConfig(
        prompts=prompts,
        out=tmp_path / "reference",
        base_url=server.base_url,
        model="tiny",
        max_tokens=10,
        temperature=0.0,
        concurrency=1,  # the reference run never batches: the resumed one must still match it
        progress=False,
    )
    assert collect(reference_cfg).completed == N_PROMPTS
    reference = _canonical(load_records(reference_cfg.out))

    out = tmp_path / "out"
    records = out / RECORDS_FILE
    served_before = server.handler.requests_ok
    kills = 0
    for threshold in (3, 14, 26, 38):
        proc = subprocess.Popen(
            _collect_cmd(prompts, out, server.base_url),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and count_lines(records) < threshold and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        proc.stderr.close()
    assert kills >= 3, "the collector finished before it could be killed"
    assert count_lines(records) < N_PROMPTS

    final = subprocess.run(
        _collect_cmd(prompts, out, server.base_url), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert final.returncode == 0, final.stderr
    assert f"units: {N_PROMPTS} total" in final.stdout and "0 remaining" in final.stdout

    raw_lines = records.read_text().splitlines()
    hashes = [json.loads(line)["prompt_hash"] for line in raw_lines]
    assert len(hashes) == N_PROMPTS and len(set(hashes)) == N_PROMPTS  # none lost, none duplicated
    assert _canonical(load_records(out)) == reference
    # Nothing already on disk was asked for again: at most the requests in flight at each kill.
    extra = server.handler.requests_ok - served_before - N_PROMPTS
    assert 0 <= extra <= kills * CONCURRENCY


def test_cli_server_and_cli_collector_end_to_end(tmp_path, capsys):
    """Both subcommands as a user runs them: serve-teacher with faults, collect against it."""
    port = free_port()
    server_cmd = [sys.executable, "-m", "proxykd_fast.teacher", "serve-teacher", "--model", "tiny"]
    server_cmd += ["--port", str(port), "--served-model-name", "tiny", "--num-threads", "1", "--log-level", "warning"]
    server_cmd += ["--fault-rate", "0.25", "--fault-kinds", "429,500,503,drop,malformed", "--fault-retry-after", "0.2"]
    server_cmd += ["--fault-seed", "4"]  # faults among the first requests
    server = subprocess.Popen(server_cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        prompts = write_prompts(tmp_path / "p.jsonl", 20)
        summary_path = tmp_path / "summary.json"
        cmd = _collect_cmd(prompts, tmp_path / "out", f"http://127.0.0.1:{port}/v1", "--backoff-base", "0.05")
        # The collector CLI runs in-process here (the kill test above runs it as a subprocess).
        assert cli_main(cmd[3:] + ["--summary-json", str(summary_path)]) == 0
        summary = json.loads(summary_path.read_text())
        assert summary["completed"] == 20 and summary["failed"] == 0 and summary["retries"] > 0
        assert "retries:" in capsys.readouterr().out
        assert len(load_records(tmp_path / "out")) == 20
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        server.stderr.close()
