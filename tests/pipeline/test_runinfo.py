"""Run identities across versions: a record written before an option existed resumes when that
option is at its default, and is refused when it is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxykd_fast.pipeline.config import DistillConfig
from proxykd_fast.pipeline.modeling import PipelineError
from proxykd_fast.pipeline.runinfo import option_defaults, run_identity, start_run


def _old_record(tmp_path: Path, cfg: DistillConfig, missing: tuple[str, ...]) -> Path:
    """A run record as an older version wrote it: without the options named in `missing`."""
    path = tmp_path / "distill_run.json"
    info = {k: v for k, v in run_identity(cfg).items() if k not in missing}
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


NEW_OPTIONS = ("attn_implementation", "fp16", "fsdp", "mixed_precision", "packing")


def test_a_record_without_newer_options_resumes_at_their_defaults(tmp_path: Path) -> None:
    cfg = DistillConfig(student="s", targets="t", output_dir=str(tmp_path))
    path = _old_record(tmp_path, cfg, NEW_OPTIONS)
    start_run(path, run_identity(cfg), True, True, "distill", defaults=option_defaults(cfg))


def test_a_record_without_an_option_refuses_a_non_default_value(tmp_path: Path) -> None:
    cfg = DistillConfig(student="s", targets="t", output_dir=str(tmp_path))
    path = _old_record(tmp_path, cfg, NEW_OPTIONS)
    changed = DistillConfig(student="s", targets="t", output_dir=str(tmp_path), packing=True)
    with pytest.raises(PipelineError, match="packing: stored None, now True"):
        start_run(path, run_identity(changed), True, True, "distill", defaults=option_defaults(changed))
    # without defaults (the old behaviour) even the default values were refused
    with pytest.raises(PipelineError, match="options differ"):
        start_run(path, run_identity(cfg), True, True, "distill")
