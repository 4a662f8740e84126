"""The smollm2 preset's code path in miniature: a tiny chat model stands in for SmolLM2 (no download, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from proxykd_fast.demo.bayes import bayes_targets


def _tiny_smollm2(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-layer tiny Llama with a chat template as both the teacher and the cached proxy weights."""
    from proxykd_fast.teacher.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=0, hidden_size=16, num_layers=2)
    cache = root / "cache"
    model.save_pretrained(cache / "smollm2")
    tok.save_pretrained(cache / "smollm2")
    monkeypatch.setenv("PROXYKD_CACHE_DIR", str(cache))
    monkeypatch.setattr("proxykd_fast.teacher.presets.load_preset", lambda name, cache_dir=None: (model, tok))


@pytest.mark.slow
def test_smollm2_preset_miniature_reports_v1_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import proxykd_fast.demo.bayes as bayes
    import proxykd_fast.demo.default as default
    import proxykd_fast.demo.smollm2 as smol
    import proxykd_fast.prior as prior_pkg

    _tiny_smollm2(tmp_path, monkeypatch)
    out = tmp_path / "smollm2"
    assert smol.run_smollm2(out, 0, n_train=40, n_val=10) == 0
    report = json.loads((out / "results.json").read_text())
    nll = report["heldout_nll"]
    assert set(nll) == {"sft_only", "proxykd", "bayes_prior", "bayes_posterior", "proxy_aligned", "proxy_raw"}
    assert all(math.isfinite(v) and v > 0 for v in nll.values())
    fit = report["posterior_fit"]
    assert fit["fit_samples_in_prior"] == 0 and fit["fit_samples"] == report["val_answers"]  # fitted on val
    assert fit["fit_tokens"] == report["val_tokens"]
    # The targets' proxy row is the aligned proxy's own held-out NLL (two computations of one number).
    assert report["targets_heldout_nll"]["proxy"] == pytest.approx(nll["proxy_aligned"], rel=1e-4)
    assert set(report["targets_heldout_nll"]) == {"prior", "proxy", "posterior"}
    # The prior counts the student's training answers, tokenized as distill reads them (chat template included).
    from proxykd_fast.pipeline.data import load_records, tokenize_records
    from proxykd_fast.pipeline.modeling import load_tokenizer

    train = tokenize_records(load_records(out / "train.jsonl"), load_tokenizer(str(out / "proxy_aligned")), 1024)
    assert report["prior"]["num_events"] == sum(len(e.answer) for e in train)
    cov = list(report["context_coverage"].values())
    assert len(cov) == 2 and 1 >= cov[0] >= cov[1] >= 0  # a seen context's suffix is seen too
    md = (out / "results.md").read_text()
    for text in ("Bayesian (v1): posterior", "Bayesian (v1): prior only", "Proxy-KD", "Dirichlet posterior",
                 "kappa"):
        assert text in md
    manifest = json.loads((out / "targets_posterior" / "manifest.json").read_text())
    assert manifest["posterior"]["posterior"] == "dirichlet"

    # A re-run reuses every finished stage: no student is trained again, no shard is rewritten.
    written: list[tuple[str, int]] = []

    def spy(fn: Any, stage: str) -> Any:
        def wrapped(cfg: Any) -> dict[str, Any]:
            res = fn(cfg)
            written.append((stage, res["written"]))
            return res
        return wrapped

    monkeypatch.setattr(smol, "precompute", spy(smol.precompute, "precompute"))
    monkeypatch.setattr(bayes, "precompute", spy(bayes.precompute, "precompute"))
    monkeypatch.setattr(prior_pkg, "build_prior", spy(prior_pkg.build_prior, "prior"))
    monkeypatch.setattr(default, "distill", lambda cfg: pytest.fail(f"{cfg.output_dir} was distilled again"))
    assert smol.run_smollm2(out, 0, n_train=40, n_val=10) == 0
    assert written == [("precompute", 0), ("prior", 0), ("precompute", 0), ("precompute", 0)]
    again = json.loads((out / "results.json").read_text())
    assert again["heldout_nll"] == pytest.approx(nll, rel=1e-6)
    assert again["posterior_fit"] == fit


def test_smollm2_refuses_unknown_students(tmp_path: Path) -> None:
    from proxykd_fast.demo.smollm2 import run_smollm2

    with pytest.raises(ValueError, match="students"):
        run_smollm2(tmp_path, 0, students=("sft_only", "whitebox_kd"))
    with pytest.raises(ValueError, match="students"):
        run_smollm2(tmp_path, 0, students=("proxykd",))


def test_bayes_targets_refuses_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sources"):
        bayes_targets(tmp_path, tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path, 3, {}, ("proxy",))
    with pytest.raises(ValueError, match="sources"):
        bayes_targets(tmp_path, tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path, 3, {}, ())
