"""The loss suite's harness: plan, inputs, the fp64 oracle and parity gate, report, roofline, bench-check.

No timing is asserted anywhere: the measured numbers are synthetic or ignored; these tests check
that the harness computes and reports what it claims to, on tiny shapes in this process.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.suite import check, oracle, report, roofline, run
from benchmarks.suite.inputs import IGNORE, build_inputs, valid_rows
from benchmarks.suite.run import plan
from benchmarks.suite.spec import LOSSES, PRESETS, Case, Shape, dpo_layout, gemm_count, gemm_flops
from benchmarks.suite.variants import Unavailable, build, naive_loss, precheck, variants_for

CPU = torch.device("cpu")


def tiny(loss: str, variant: str = "ours", dtype: str = "float32", n: int = 64, h: int = 24, v: int = 200) -> Case:
    return Case(loss, variant, dtype, n, h, v)


def test_plan_puts_the_main_shape_first_and_ids_are_unique() -> None:
    preset = PRESETS["tiny"]
    cases = plan(preset, list(LOSSES), None, list(preset.dtypes))
    assert len({c.id for c in cases}) == len(cases)
    main = preset.main
    first_sweep = next(i for i, c in enumerate(cases) if (c.n, c.v) != (main.n, main.v))
    assert all((c.n, c.v) == (main.n, main.v) for c in cases[:first_sweep])
    assert {Shape(c.n, c.h, c.v) for c in cases} == set(preset.shapes())
    assert plan(preset, ["ce"], ["ours"], ["float32"], main_only=True) == [Case("ce", "ours", "float32", *vars(main).values())]


def test_gemm_counts_follow_the_issue() -> None:
    """3 GEMMs for CE / DPO-precomputed / offline KD, 4 with an online proxy or reference, 1 for top-k."""
    assert {k: gemm_count(k) for k in LOSSES} == {"ce": 3, "logprobs": 3, "logprobs_entropy": 3, "topk": 1,
                                                 "kd_online": 4, "kd_offline": 3, "dpo_online": 4,
                                                 "dpo_precomputed": 3}
    assert gemm_flops("ce", 10, 4, 7) == 3 * 2 * 10 * 4 * 7
    assert dpo_layout(64) == (2, 16)
    with pytest.raises(ValueError, match="divisible"):
        dpo_layout(66)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_inputs_are_deterministic_and_typed(loss: str) -> None:
    a, b = build_inputs(tiny(loss, dtype="bfloat16"), CPU), build_inputs(tiny(loss, dtype="bfloat16"), CPU)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["hidden"].dtype == a["weight"].dtype == torch.bfloat16
    assert 0 < valid_rows(tiny(loss), a) <= 64
    if loss.startswith("dpo"):
        assert a["hidden"].shape == (4, 16, 24) and (a["labels"] == IGNORE).any(1).all()


def _reference_backend(case: Case, x: dict) -> dict:
    """The same outputs through proxykd_fast's own oracle (backend='reference', fp64), unchunked."""
    from proxykd_fast import losses as L

    x = {k: (t.double() if t.is_floating_point() else t) for k, t in x.items()}
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    y, kw = x["labels"], {"backend": "reference"}
    if case.loss == "ce":
        out = L.linear_cross_entropy(h, w, y, **kw)
    elif case.loss == "kd_online":
        out = L.proxy_kd_loss(h, w, y, proxy_hidden=x["proxy_hidden"], proxy_weight=x["proxy_weight"], **kw)
    elif case.loss == "kd_offline":
        out = L.proxy_kd_loss(h, w, y, proxy_topk_ids=x["topk_ids"], proxy_topk_logprobs=x["topk_logprobs"], **kw)
    elif case.loss == "logprobs":
        lp = L.linear_log_probs(h, w, y, **kw)
        (lp * x["grad_logp"]).sum().backward()
        return {"logp": lp.detach(), "dX": h.grad, "dW": w.grad}
    else:
        ref = ({"ref_hidden": x["ref_hidden"], "ref_weight": x["ref_weight"]} if case.loss == "dpo_online"
               else {"ref_logps": x["ref_logps"]})
        out, _ = L.dpo_loss(h, w, y, beta=0.1, nll_alpha=1.0, **ref, **kw)
    out.backward()
    return {"loss": out.detach(), "dX": h.grad, "dW": w.grad}


@pytest.mark.parametrize("loss", ["ce", "kd_online", "kd_offline", "logprobs", "dpo_online", "dpo_precomputed"])
def test_chunked_fp64_oracle_matches_the_library_reference(loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two independent fp64 oracles agree (ours: plain torch, chunked in 7-row pieces to cross chunk edges)."""
    monkeypatch.setattr(oracle, "_rows", lambda v, device=None: 7)
    case = tiny(loss)
    x = build_inputs(case, CPU)
    got, want = oracle.reference(case, x), _reference_backend(case, x)
    for k, t in want.items():
        assert torch.allclose(got[k], t.reshape(got[k].shape), rtol=1e-10, atol=1e-12), k


def test_topk_oracle_and_id_check() -> None:
    case = tiny("topk")
    x = build_inputs(case, CPU)
    ref = oracle.reference(case, x)
    lp = torch.log_softmax(x["hidden"].double() @ x["weight"].double().T, -1)
    assert torch.allclose(ref["lps"], lp.topk(32, -1).values)
    good = naive_loss("topk", x, x["hidden"], x["weight"])
    assert oracle.errors(case, good, ref, x)["topk_ids"] < 1e-5
    bad = {"ids": good["ids"].clone(), "lps": good["lps"]}
    bad["ids"][3, 0] = bad["ids"][3, 1]  # right value, wrong id
    assert oracle.errors(case, bad, ref, x)["topk_ids"] > 1e-3


def test_parity_gate_passes_ours_and_fails_a_perturbed_or_nan_output(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(oracle, "CACHE", tmp_path)
    case = tiny("ce")
    x = build_inputs(case, CPU)
    orc = oracle.compute_oracle(case, CPU)
    assert oracle.oracle_path(case).exists() and "plain_err/loss" in orc
    runner = build(case, x, CPU)
    out = runner.step()
    assert oracle.check(case, out, orc, x)["ok"]
    wrong = dict(out, loss=out["loss"] * 1.001)
    res = oracle.check(case, wrong, orc, x)
    assert not res["ok"] and res["failed"] == ["loss"]
    nan = dict(out, dW=out["dW"] * float("nan"))
    assert oracle.check(case, nan, orc, x)["failed"] == ["dW"]
    assert oracle.load_oracle(case, CPU).keys() == orc.keys()  # read back from the cache


def test_tolerance_is_the_floor_or_four_times_plain_torch() -> None:
    assert oracle.tolerances(tiny("ce"), {"loss": 1e-9, "dW": 1e-3}) == {"loss": 1e-4, "dW": 4e-3}
    assert oracle.tolerances(tiny("ce", dtype="bfloat16"), {"loss": 1e-9}) == {"loss": 1e-2}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_ours_naive_and_floor_run_and_pass_parity(loss: str, tmp_path, monkeypatch) -> None:
    """Every loss end to end at a tiny shape: ours and naive pass the gate, the floor runs, skips say why."""
    monkeypatch.setattr(oracle, "CACHE", tmp_path)
    case = tiny(loss)
    x = build_inputs(case, CPU)
    orc = oracle.compute_oracle(case, CPU)
    for variant in ("ours", "naive"):
        c = Case(loss, variant, "float32", case.n, case.h, case.v)
        if precheck(c, CPU):
            with pytest.raises(Unavailable):
                build(c, x, CPU)
            continue
        res = oracle.check(c, build(c, x, CPU).step(), orc, x)
        assert res["ok"], (variant, res)
    build(Case(loss, "gemm-floor", "float32", case.n, case.h, case.v), x, CPU).step()
    assert precheck(Case(loss, "ours-fused", "float32", 64, 24, 200), CPU).startswith("backend 'triton-fused'")


def test_peer_variants_pass_parity(tmp_path, monkeypatch) -> None:
    """The eager peers (TRL, torch's linear_cross_entropy) compute the same functions as ours."""
    monkeypatch.setattr(oracle, "CACHE", tmp_path)
    for loss, variant in (("ce", "trl"), ("ce", "torch-lce"), ("logprobs", "trl"), ("logprobs", "torch-lce"),
                          ("kd_online", "trl"), ("dpo_online", "trl"), ("dpo_precomputed", "trl")):
        case = tiny(loss, variant)
        if precheck(case, CPU):
            continue
        x = build_inputs(case, CPU)
        res = oracle.check(case, build(case, x, CPU).step(), oracle.compute_oracle(case, CPU), x)
        assert res["ok"], (case.id, res)
    assert precheck(tiny("ce", "quack"), CPU).startswith("QuACK")
    assert precheck(tiny("topk", "trl"), CPU) == "trl does not implement topk"
    assert "liger" in variants_for("kd_online") and "liger" not in variants_for("kd_offline")


def _record(case: Case, median: float | None, mem: float = 100.0, status: str = "ok") -> dict:
    rec = {"case": case.to_dict(), "id": case.id, "status": status, "versions": {}, "note": ""}
    if status == "ok":
        rec.update(median_s=median, times_s=[median * 0.9, median, median * 1.2], peak_above_inputs_mb=mem,
                   gemm_flops=1e12, parity={"ok": True, "errors": {"loss": 1e-7}, "tolerances": {"loss": 1e-4}})
    else:
        rec["reason"] = "QuACK is CuTe-DSL GPU code (H100/B200): CUDA only"
    return rec


def _suite(times: dict[str, float], preset: str = "small") -> dict:
    m = PRESETS[preset].main
    cases = []
    for loss in ("ce", "kd_online"):
        for variant, t in times.items():
            cases.append(_record(Case(loss, variant, "float32", m.n, m.h, m.v), t))
        cases.append(_record(Case(loss, "quack", "float32", m.n, m.h, m.v), None, status="skipped"))
    return {"machine_info": {"proxykd": {"device": "cpu", "cpu": "test cpu", "cpu_count": 2},
                             "libraries": {"torch": "2.13.0"}},
            "commit_info": {"id": "abc", "dirty": False},
            "suite": {"preset": preset, "device": "cpu", "repeats": 5, "threads": 2, "cases": cases}}


def test_report_ratios_reasons_and_roofline(tmp_path) -> None:
    data = _suite({"gemm-floor": 2.0, "ours": 2.2, "naive": 4.4, "trl": 3.3})
    path = tmp_path / "suite_small_cpu.json"
    path.write_text(json.dumps(data))
    out = report.write_report(path, report=tmp_path / "REPORT.md")
    text = out.read_text()
    assert "| **ours** | 2.20 s (1.98 s–2.64 s) | 1.10 |" in text  # x GEMM floor from the same run
    assert "| `naive` | 4.40 s (3.96 s–5.28 s) | 2.20 |" in text
    assert "`quack`: **skipped**, QuACK is CuTe-DSL GPU code" in text
    assert "| ce | fp32 | 2.20 s | 1.10 | `trl` 3.30 s, 100 MB | 0.67 | 1.00 (100 MB) |" in text
    assert "not measured (no GPU lent yet)" in text and "test cpu" in text
    block = report.summary_markdown(data)
    assert block.splitlines()[-1].startswith("| kd_online | fp32 | 2.20 s | 1.10 |")


def test_report_names_the_commit_and_every_commit_of_a_resumed_run() -> None:
    data = _suite({"gemm-floor": 2.0, "ours": 2.2})
    assert "- Commit: `abc`, run" in report.render(data, {}, {})
    data["suite"]["commits"] = {"abc": 3, "def (dirty)": 1}  # a run resumed at a later commit
    assert "- Commits: `abc` (3 cases), `def (dirty)` (1 case), run" in report.render(data, {}, {})
    assert "rerun `BENCH_PRESET=small make bench`" in report.render(data, {}, {})


def test_a_resumed_run_keeps_its_first_start_and_lists_each_segment(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    m = PRESETS["tiny"].main
    case = Case("ce", "quack", "float32", m.n, m.h, m.v)
    cases = tmp_path / "runs" / "r" / "cases"
    cases.mkdir(parents=True)
    (cases / f"{case.id}.json").write_text(json.dumps(_record(case, None, status="skipped")))  # nothing left to run
    (cases.parent / "meta.json").write_text(json.dumps({"started": "first", "uptime_start": "up 1"}))
    argv = ["--preset", "tiny", "--losses", "ce", "--variants", "quack", "--dtypes", "float32", "--main-only",
            "--run-name", "r", "--no-report", "--device", "cpu"]
    suite = json.loads(run.main(argv).read_text())["suite"]
    assert suite["started"] == "first" and suite["uptime_start"] == "up 1" and len(suite["resumed"]) == 1
    merged = json.loads(run.main([*argv, "--merge-only"]).read_text())["suite"]  # merging keeps the whole span
    assert (merged["started"], merged["finished"], merged["resumed"]) == ("first", suite["finished"], suite["resumed"])


def test_roofline_counts_gemms_and_epilogue_bytes() -> None:
    n, h, v = roofline.TARGET
    ce = roofline.predict("ce", "H100")
    assert math.isclose(ce.flops, 3 * 2 * n * h * v) and math.isclose(ce.bytes, 10 * n * v)
    assert math.isclose(ce.total_s, ce.flops / 989.4e12 + ce.bytes / 3.35e12)
    assert roofline.predict("kd_online", "H200").bytes == 18 * n * v
    assert roofline.predict("ce", "H200").total_s < ce.total_s  # more bandwidth, same FLOPs


def test_bench_check_flags_a_regression_beyond_the_noise() -> None:
    base_runs = [_suite({"gemm-floor": 2.0, "ours": t, "trl": 3.0}) for t in (2.2, 2.3, 2.25)]
    peers = {k: v["peer_name"] for k, v in check.ratios(base_runs[0]).items()}
    assert peers == {"ce/float32": "trl", "kd_online/float32": "trl"}
    per = [check.ratios(r, peers) for r in base_runs]
    base = {"repeats": 3, "ratios": {}}
    for key in per[0]:
        entry = {"peer_name": peers[key]}
        for kind in ("floor", "peer"):
            vals = [p[key][kind] for p in per]
            med = sorted(vals)[1]
            entry[kind] = {"median": med, "spread": (max(vals) - min(vals)) / med}
        base["ratios"][key] = entry
    same = check.compare(base, check.ratios(_suite({"gemm-floor": 2.0, "ours": 2.3, "trl": 3.0}), peers))
    assert all(ok for *_, ok in same)
    slow = check.compare(base, check.ratios(_suite({"gemm-floor": 2.0, "ours": 2.9, "trl": 3.0}), peers))
    assert [kind for _, kind, _, ok in slow if not ok] == ["floor", "peer", "floor", "peer"]
    gone = _suite({"gemm-floor": 2.0, "trl": 3.0})
    assert not any(ok for *_, ok in check.compare(base, check.ratios(gone, peers)))


def test_bench_check_prefers_the_in_process_floor_ratio() -> None:
    data = _suite({"gemm-floor": 2.0, "ours": 3.0, "trl": 3.0})
    for rec in data["suite"]["cases"]:
        if rec["case"]["variant"] == "ours":
            rec["paired_floor_ratio"] = 1.05
    assert check.ratios(data)["ce/float32"]["floor"] == 1.05
