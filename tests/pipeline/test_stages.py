"""Stage behaviour: streaming precompute, online-proxy dataset weights, the divergence option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from proxykd_fast.pipeline import DistillConfig, PipelineError, PrecomputeConfig, distill, precompute, sigmoid_weights
from proxykd_fast.pipeline.data import iter_records, load_records, pad_batch, tokenize_records
from proxykd_fast.pipeline.metrics import read_metrics
from proxykd_fast.pipeline.modeling import HiddenAndHead, load_model, load_tokenizer
from tests.support.pipeline_data import tiny_model, write_data


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    return {"root": root, "train": write_data(root / "train.jsonl", 24, 1),
            "proxy": tiny_model(root / "proxy", 0, hidden=24), "student": tiny_model(root / "student", 1)}


def test_record_sources_stream(files: dict[str, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = load_records(files["train"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    stream = iter_records(tmp_path / "train.parquet")
    assert next(stream) == rows[0]  # a generator, not a list
    assert list(stream) == rows[1:]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.jsonl").write_text((files["train"]).read_text())
    assert list(iter_records(tmp_path / "dir")) == rows


def test_precompute_reads_records_shard_by_shard(files: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    mod = importlib.import_module("proxykd_fast.pipeline.precompute")
    pulled = [0]
    seen_at_write: list[int] = []

    def counting(path: Any) -> Any:
        for rec in iter_records(path):
            pulled[0] += 1
            yield rec

    real_write = mod.write_shard

    def write(path: Path, rows: list, k: int, fmt: str) -> None:
        seen_at_write.append(pulled[0])
        real_write(path, rows, k, fmt)

    monkeypatch.setattr(mod, "iter_records", counting)
    monkeypatch.setattr(mod, "write_shard", write)
    monkeypatch.setattr(mod, "load_records", None, raising=False)
    res = precompute(PrecomputeConfig(proxy=str(files["proxy"]), data=str(files["train"]), output_dir=str(tmp_path),
                                      top_k=3, shard_size=5, split="0.25:1", progress=False))
    # The split starts at record 6; shard s is written after at most 6 + 5 (s + 1) records were read.
    assert res["num_samples"] == 18 and len(seen_at_write) == 4
    assert all(n <= 6 + 5 * (s + 1) for s, n in enumerate(seen_at_write)), seen_at_write


def _proxy_logliks(files: dict[str, Path]) -> torch.Tensor:
    """The proxy's summed log-likelihood of every training answer, computed directly."""
    from proxykd_fast.losses import sequence_log_probs

    tok = load_tokenizer(str(files["proxy"]))
    proxy = load_model(str(files["proxy"])).eval()
    ex = tokenize_records(load_records(files["train"]), tok, 1024)
    b = pad_batch([e.prompt + e.answer for e in ex], [len(e.prompt) for e in ex], tok.pad_token_id)
    with torch.no_grad():
        h, w, bias = HiddenAndHead(proxy)(b["input_ids"], b["attention_mask"])
        return sequence_log_probs(h, w, b["labels"], bias=bias).double()


def test_online_proxy_dataset_weights_use_the_whole_training_set(files: dict[str, Path], tmp_path: Path) -> None:
    base = dict(student=str(files["student"]), proxy=str(files["proxy"]), data=str(files["train"]), split="0:1",
                alpha=1.0, batch_size=1, max_steps=24, learning_rate=0.0, progress=False)
    distill(DistillConfig(output_dir=str(tmp_path / "batch"), weight_stats="batch", **base))
    assert {r["weight_mean"] for r in read_metrics(tmp_path / "batch" / "metrics.jsonl")} == {0.5}  # sigma = 0
    distill(DistillConfig(output_dir=str(tmp_path / "data"), weight_stats="dataset", **base))
    got = sorted(r["weight_mean"] for r in read_metrics(tmp_path / "data" / "metrics.jsonl"))
    ll = _proxy_logliks(files)
    want = sorted(sigmoid_weights(ll, torch.ones_like(ll)).tolist())  # 24 steps of 1 = one epoch, each row once
    assert got == pytest.approx(want, abs=1e-5) and max(got) - min(got) > 0.1


def test_divergence_option(files: dict[str, Path], tmp_path: Path) -> None:
    base = dict(student=str(files["student"]), data=str(files["train"]), split="0:1", alpha=1.0, batch_size=4,
                max_steps=1, progress=False)
    res = distill(DistillConfig(output_dir=str(tmp_path / "rkl"), proxy=str(files["proxy"]), divergence="reverse_kl",
                                **base))
    assert res["finished"]
    assert json.loads((tmp_path / "rkl" / "distill_run.json").read_text())["divergence"] == "reverse_kl"
    targets = tmp_path / "targets"
    precompute(PrecomputeConfig(proxy=str(files["proxy"]), data=str(files["train"]), output_dir=str(targets),
                                top_k=3, split="0:1", progress=False))
    with pytest.raises(PipelineError, match="online --proxy"):
        distill(DistillConfig(output_dir=str(tmp_path / "off"), student=str(files["student"]), targets=str(targets),
                              divergence="jsd", max_steps=1, progress=False))


def test_eval_honours_progress(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from proxykd_fast.pipeline import EvalConfig, evaluate

    base = dict(model=str(files["student"]), data=str(files["train"]), num_samples=0, batch_size=8)
    res = evaluate(EvalConfig(progress=True, **base))
    assert "held-out NLL" in capsys.readouterr().err and res["device"] in ("cpu", "cuda")
    evaluate(EvalConfig(progress=False, **base))
    assert "held-out NLL" not in capsys.readouterr().err


def test_a_collect_dir_reads_the_same_in_the_pipeline_and_the_teacher(tmp_path: Path) -> None:
    """One reader and one dedup key: retried duplicates, a corrupt line and a torn last line alike."""
    from proxykd_fast.teacher import load_records as teacher_records

    rows = [{"prompt": f"t{i}", "completion": "t9", "prompt_hash": f"h{i}", "sample_index": 0} for i in range(3)]
    lines = [json.dumps(r) for r in rows] + [json.dumps({**rows[1], "completion": "retried"}), "{corrupt",
                                             json.dumps({"prompt": "t5", "completion": "t6"})]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + '\n{"prompt": "t7", "compl')  # killed mid-write
    want = [*rows, {"prompt": "t5", "completion": "t6"}]
    assert load_records(tmp_path) == teacher_records(tmp_path) == want
