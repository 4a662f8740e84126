"""TRL data formats beyond prompt/completion: text, implicit-prompt preferences, datasets dirs and names, and
align-proxy's handling of a rejected column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxykd_fast.demo.world import build_tokenizer
from proxykd_fast.pipeline import AlignProxyConfig, DistillConfig, PipelineError, align_proxy, distill
from proxykd_fast.pipeline.chat import split_record
from proxykd_fast.pipeline.data import IGNORE, load_records, sft_batch, tokenize_records
from proxykd_fast.pipeline.metrics import read_metrics
from tests.support.pipeline_data import N_WORDS, tiny_model, write_data


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {"root": root, "train": write_data(root / "train.jsonl", 12, 1), "proxy": tiny_model(root / "proxy", 0)}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_records_train_every_token_after_the_first() -> None:
    tok = build_tokenizer(N_WORDS)
    (ex,) = tokenize_records([{"text": "t1 t2 t3"}], tok, 64)
    ids = list(tok("t1 t2 t3", add_special_tokens=True)["input_ids"]) + [tok.eos_token_id]
    assert ex.language_modeling and ex.prompt + ex.answer == ids and len(ex.prompt) == 1
    b = sft_batch([ex], tok.pad_token_id)
    assert b["labels"][0, : len(ids) - 1].tolist() == ids[1:]  # every next token is a target
    assert (b["labels"][0, len(ids) - 1 :] == IGNORE).all()
    with pytest.raises(ValueError, match="non-empty 'text'"):
        tokenize_records([{"text": ""}], tok, 64)


def test_implicit_prompt_preferences_are_split_like_trl() -> None:
    from trl.data_utils import maybe_extract_prompt

    conv = {"chosen": [{"role": "user", "content": "t1 t2"}, {"role": "assistant", "content": "t3 t4"}],
            "rejected": [{"role": "user", "content": "t1 t2"}, {"role": "assistant", "content": "t5"}]}
    assert split_record(conv) == ([{"role": "user", "content": "t1 t2"}], "t3 t4", "t5")
    text = {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}
    want = maybe_extract_prompt(text)
    assert split_record(text) == (want["prompt"], want["chosen"], want["rejected"])
    with pytest.raises(ValueError, match="share no prefix"):
        split_record({"chosen": "blue", "rejected": "green"})


def test_distill_on_text_records(files: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"text": r["prompt"] + " " + r["completion"]} for r in load_records(files["train"])]
    data = _write(tmp_path / "lm.jsonl", rows)
    res = distill(DistillConfig(student=str(files["proxy"]), data=str(data), split="0:1", alpha=0.0, max_steps=2,
                                batch_size=4, progress=False, output_dir=str(tmp_path / "out")))
    assert res["finished"] and read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]["nll"] > 0


def test_a_datasets_directory_and_name_are_read_with_load_dataset(files: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    from proxykd_fast.pipeline.sources import iter_records

    rows = load_records(files["train"])
    (tmp_path / "ds" / "data").mkdir(parents=True)  # the Hub layout: data/<split>-*.parquet
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    assert list(iter_records(tmp_path / "ds")) == rows
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: a name resolves locally only
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="nor a dataset datasets.load_dataset could load"):
        list(iter_records("no-such-org/no-such-dataset"))
    with pytest.raises(FileNotFoundError, match="data file not found"):  # a missing local file fails at once
        list(iter_records("missing/train.jsonl"))


def _pairs(files: dict[str, Path], tmp_path: Path) -> Path:
    rows = load_records(files["train"])
    return _write(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                              "rejected": rows[(i + 1) % len(rows)]["completion"]}
                                             for i, r in enumerate(rows)])


def _align(files: dict[str, Path], data: Path, out: Path, **kw: Any) -> dict[str, Any]:
    opts: dict[str, Any] = dict(warmup_split="0:0.5", align_split="0.5:1", warmup_steps_sft=1, rounds=1, round_steps=1,
                                batch_size=3, gen_max_new_tokens=3, progress=False)
    return align_proxy(AlignProxyConfig(proxy=str(files["proxy"]), data=str(data), output_dir=str(out),
                                        **{**opts, **kw}))


def test_align_refuses_an_unasked_rejected_column(files: dict[str, Path], tmp_path: Path) -> None:
    data = _pairs(files, tmp_path)
    with pytest.raises(PipelineError, match="has rejected answers .* --dataset-rejected first_round"):
        _align(files, data, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before anything is written


def test_align_uses_the_rejected_column_in_round_one(files: dict[str, Path], tmp_path: Path) -> None:
    data = _pairs(files, tmp_path)
    tok = build_tokenizer(N_WORDS)
    want = [e.rejected for e in tokenize_records(load_records(data)[6:], tok, 1024)]
    assert _align(files, data, tmp_path / "first", dataset_rejected="first_round")["finished"]
    assert json.loads((tmp_path / "first" / "round-1" / "rejected.json").read_text()) == want
    assert _align(files, data, tmp_path / "ignored", dataset_rejected="ignore")["finished"]
    assert json.loads((tmp_path / "ignored" / "round-1" / "rejected.json").read_text()) != want  # sampled
    with pytest.raises(PipelineError, match="first_round: 6 of 6 records .* no rejected answer"):
        _align(files, files["train"], tmp_path / "none", dataset_rejected="first_round")


def test_align_rounds_refuse_text_records(files: dict[str, Path], tmp_path: Path) -> None:
    data = _write(tmp_path / "lm.jsonl", [{"text": r["prompt"] + " " + r["completion"]}
                                          for r in load_records(files["train"])])
    with pytest.raises(PipelineError, match="language-modeling .* --rounds 0"):
        _align(files, data, tmp_path / "lm")
    assert _align(files, data, tmp_path / "lm0", rounds=0)["finished"]
