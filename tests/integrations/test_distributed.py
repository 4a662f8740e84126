"""Two gloo ranks under torchrun (DDP and FSDP2, the head sharded with the root or as its own unit) give the
gradients of one process on the whole batch, with the fused head computing the loss inside the model's forward."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.support.tiny_lm import batch, build, grads

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_and_fsdp2_gradients_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.integrations.dist_worker", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    model = build("llama")
    model(**batch(rows=4, width=9, seed=5)).loss.backward()
    want = grads(model)
    assert set(results) == {"ddp", "fsdp2", "fsdp2_head_unit", "fsdp2_hidden_and_head"}
    for setup, got in results.items():
        assert got.keys() == want.keys(), setup
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=f"{setup}: {name}")
