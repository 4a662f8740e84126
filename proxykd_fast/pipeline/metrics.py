"""Per-step metrics: a JSONL file that survives kills and resumes, plus optional tensorboard / wandb."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from proxykd_fast.jsonl import JsonlAppender, read_jsonl, write_jsonl

from .modeling import PipelineError

# report_to name -> (module its writer imports, package to install)
REPORTER_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def reporters(report_to: str) -> list[str]:
    """The reporter names of a comma list such as 'tensorboard,wandb' ('none' and blanks dropped)."""
    return [r.strip() for r in report_to.split(",") if r.strip() and r.strip() != "none"]


def check_reporters(report_to: str) -> None:
    """Refuse, before any training, a reporter whose package is not installed (naming the package)."""
    for name in reporters(report_to):
        module, package = REPORTER_PACKAGES[name]
        try:
            __import__(module)
        except ImportError as exc:
            raise PipelineError(f"--report-to {name} needs the {package!r} package, which is not installed "
                                f"({exc}): pip install {package}, or drop {name} from --report-to") from None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics JSONL file (a line truncated by a kill is dropped, a corrupt one skipped with a warning)."""
    return list(read_jsonl(path, on_bad_line="skip"))


class MetricsLogger:
    """Per-step metrics to JSONL, plus tensorboard/wandb when asked for and installed; `close()` at the end."""

    def __init__(self, path: Path, report_to: str, enabled: bool, resume_step: int | None,
                 run_config: dict[str, Any] | None = None, run_name: str | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.tb: Any = None
        self.wandb_run: Any = None
        self._owns_wandb = False
        self._out: JsonlAppender | None = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            write_jsonl(path, [r for r in read_metrics(path) if int(r.get("step", 0)) <= resume_step])
        elif path.exists():
            path.unlink()
        names = reporters(report_to)
        check_reporters(",".join(names))
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tb"))
        if "wandb" in names:
            self._start_wandb(run_config, run_name)
        self._out = JsonlAppender(path, fsync_every=64, fsync_interval=30.0)

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
        if self._out is None:
            return
        self._out.write(row)
        nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(nums, step=row["step"])

    def close(self) -> None:
        """Close the JSONL file, flush and close tensorboard; finish the wandb run this logger started."""
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None and self._owns_wandb:
            self.wandb_run.finish()
        self.wandb_run = None
