"""Kill the collector with SIGKILL mid-run, resume, and get exactly the uninterrupted run's records.

Each kill lands at a known point: a gate in front of the server answers a set number of
requests and holds the next ones, the test waits until exactly `--concurrency` requests are
held (all the collector can have in flight), and only then kills it. So the asserted counts
(records, re-sent units, generations billed) do not depend on when the kill signal lands.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxykd_fast.teacher import CollectConfig, collect, load_records
from proxykd_fast.teacher.cli import main as cli_main
from proxykd_fast.teacher.records import strip_volatile
from proxykd_fast.teacher.server import TeacherServer
from proxykd_fast.teacher.store import RECORDS_FILE
from proxykd_fast.teacher.testing import count_lines, write_prompts
from proxykd_fast.teacher.tiny import tiny_teacher
from tests.support.teacher import RequestGate, SubmissionCounter, torch_single_thread, wait_until

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
N_PROMPTS = 24
CONCURRENCY = 4
ANSWERED_PER_RUN = (3, 5, 4)  # answers each killed run gets before the kill


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OPENAI_API_KEY", None)
    env.pop("PROXYKD_SYSTEM_PROMPT", None)
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
        "120",
        "--no-progress",
        *extra,
    ]


def _canonical(rows: list[dict]) -> dict[str, str]:
    return {r["prompt_hash"]: json.dumps(strip_volatile(r), sort_keys=True) for r in rows}


@pytest.fixture(scope="module")
def tiny():
    with torch_single_thread():
        yield tiny_teacher(seed=3)


def _kill_and_resume(srv: TeacherServer, gate: RequestGate, tmp_path: Path) -> tuple[int, str]:
    """Kill the collector once per ANSWERED_PER_RUN entry, then let a last run finish.

    Returns the generations the server ran for it (rows sent to the model) and the last run's stdout.
    """
    prompts = write_prompts(tmp_path / "prompts.jsonl", N_PROMPTS, seed=4)
    out = tmp_path / "out"
    cmd = _collect_cmd(prompts, out, srv.base_url)
    billed = SubmissionCounter(srv.engine)
    for run, answered in enumerate(ANSWERED_PER_RUN):
        base = gate.arrived
        gate.limit = base + answered  # the previous run's held requests go through now, as a server would finish them
        log = tmp_path / f"run{run}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            target = base + answered + CONCURRENCY
            wait_until(lambda t=target, p=proc: gate.arrived >= t or p.poll() is not None, "the collector's requests")
            assert proc.poll() is None, log.read_text()
            assert gate.arrived == target  # `answered` answers given, CONCURRENCY requests in flight
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        assert count_lines(out / RECORDS_FILE) == sum(ANSWERED_PER_RUN[: run + 1])
    gate.limit = math.inf
    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stderr
    assert f"units: {N_PROMPTS} total" in final.stdout and "0 remaining" in final.stdout
    wait_until(gate.settled, "the server to finish every request")

    raw_lines = (out / RECORDS_FILE).read_text().splitlines()
    hashes = [json.loads(line)["prompt_hash"] for line in raw_lines]
    assert len(hashes) == N_PROMPTS and len(set(hashes)) == N_PROMPTS  # none lost, none duplicated

    reference_cfg = CollectConfig(
        prompts=prompts,
        out=tmp_path / "reference",
        base_url=srv.base_url,
        model="tiny",
        max_tokens=10,
        temperature=0.0,
        concurrency=1,  # the reference run never batches: the resumed one must still match it
        progress=False,
    )
    generations = billed.rows
    assert collect(reference_cfg).completed == N_PROMPTS
    assert _canonical(load_records(out)) == _canonical(load_records(reference_cfg.out))
    return generations, final.stdout


def test_sigkill_and_resume_bills_nothing_twice_with_idempotency(tiny, tmp_path):
    """With a server that honours Idempotency-Key (serve-teacher does), kills cost no extra generation."""
    model, tok = tiny
    srv = TeacherServer(model, tok, model_name="tiny")
    gate = srv.app = RequestGate(srv.app)
    with srv:
        generations, stdout = _kill_and_resume(srv, gate, tmp_path)
    assert generations == N_PROMPTS
    # The resumed run knew which units the last kill caught in flight.
    assert re.search(rf"resumed: {CONCURRENCY} unit\(s\) were in flight", stdout)


def test_sigkill_without_server_idempotency_bills_at_most_concurrency_per_kill(tiny, tmp_path):
    """The documented bound for servers that ignore the key: up to --concurrency re-billed per interruption."""
    model, tok = tiny
    srv = TeacherServer(model, tok, model_name="tiny", idempotency_cache=0)
    gate = srv.app = RequestGate(srv.app)
    with srv:
        generations, stdout = _kill_and_resume(srv, gate, tmp_path)
    kills = len(ANSWERED_PER_RUN)
    assert N_PROMPTS < generations <= N_PROMPTS + kills * CONCURRENCY
    assert re.search(rf"resumed: {CONCURRENCY} unit\(s\) were in flight", stdout)


def test_cli_server_and_cli_collector_end_to_end(tmp_path, capsys):
    """Both subcommands as a user runs them: serve-teacher with faults, collect against it."""
    secret = tmp_path / "system_prompt.txt"
    secret.write_text("You are a terse teacher.\n", encoding="utf-8")
    server_cmd = [sys.executable, "-m", "proxykd_fast.teacher", "serve-teacher", "--model", "tiny"]
    server_cmd += ["--port", "0", "--served-model-name", "tiny", "--num-threads", "1", "--log-level", "warning"]
    server_cmd += ["--fault-rate", "0.25", "--fault-kinds", "429,500,503,drop,malformed", "--fault-retry-after", "0.2"]
    server_cmd += ["--fault-seed", "4", "--system-prompt-file", str(secret)]
    log = tmp_path / "server.log"
    with log.open("w") as err:  # port 0: the server picks a free port and prints its URL (no port race)
        server = subprocess.Popen(server_cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        found: list[str] = []

        def url_printed() -> bool:
            assert server.poll() is None, log.read_text()
            found[:] = re.findall(r"serving 'tiny' at (http://\S+/v1)", log.read_text())
            return bool(found)

        wait_until(url_printed, "the server to start")
        base_url = found[0]
        models = httpx.get(base_url + "/models", timeout=30).json()
        assert models["data"][0]["max_model_len"] == 1024 - 256  # the file's prompt is hidden behind a reserve
        prompts = write_prompts(tmp_path / "p.jsonl", 20)
        summary_path = tmp_path / "summary.json"
        cmd = _collect_cmd(prompts, tmp_path / "out", base_url, "--backoff-base", "0.05", "--timeout", "60")
        # The collector CLI runs in-process here (the kill tests above run it as a subprocess).
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
