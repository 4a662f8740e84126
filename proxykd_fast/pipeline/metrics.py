"""Per-step metrics: a JSONL file that survives kills and resumes, plus optional tensorboard / wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics JSONL file, skipping blank lines and a line truncated by a kill."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLogger:
    """Per-step metrics to JSONL, plus tensorboard/wandb when asked for and installed; `close()` at the end."""

    def __init__(self, path: Path, report_to: str, enabled: bool, resume_step: int | None,
                 run_config: dict[str, Any] | None = None, run_name: str | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.tb: Any = None
        self.wandb_run: Any = None
        self._owns_wandb = False
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        elif path.exists():
            path.unlink()
        for name in [r.strip() for r in report_to.split(",") if r.strip() and r.strip() != "none"]:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(path.parent / "tb"))
                elif name == "wandb":
                    self._start_wandb(run_config, run_name)
            except ImportError:
                print(f"report_to={name}: not installed, skipping")

    def _start_wandb(self, run_config: dict[str, Any] | None, run_name: str | None) -> None:
        """Use the caller's wandb run if one is active, else start one with the run config."""
        import wandb

        if wandb.run is not None:
            self.wandb_run = wandb.run
            return
        self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "proxykd"), name=run_name,
                                    config=run_config or {}, dir=str(self.path.parent))
        self._owns_wandb = True

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (a dict with 'step') and forward its numbers to the reporters."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(nums, step=row["step"])

    def close(self) -> None:
        """Flush and close tensorboard; finish the wandb run this logger started."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None and self._owns_wandb:
            self.wandb_run.finish()
        self.wandb_run = None
