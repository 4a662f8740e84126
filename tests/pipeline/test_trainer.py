"""The trainer: multi-part losses exact under accumulation, metrics logging, step timing."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from proxykd_fast.demo.world import build_llama
from proxykd_fast.pipeline.align import dpo_count_fn, dpo_loss_fn
from proxykd_fast.pipeline.config import AlignProxyConfig, TrainConfig
from proxykd_fast.pipeline.data import Example, pad_batch, preference_batch
from proxykd_fast.pipeline.metrics import MetricsLogger, read_metrics
from proxykd_fast.pipeline.modeling import HiddenAndHead
from proxykd_fast.pipeline.trainer import accumulate_gradients, make_accelerator, train

VOCAB = 44


def _pairs() -> list[Example]:
    """4 preference pairs whose chosen answers have very different lengths (2 .. 11 tokens)."""
    g = torch.Generator().manual_seed(3)

    def seq(n: int) -> list[int]:
        return torch.randint(4, VOCAB, (n,), generator=g).tolist()

    return [Example(i, seq(3), seq(c), seq(r)) for i, (c, r) in enumerate([(11, 4), (2, 6), (9, 3), (3, 8)])]


def _batch(pairs: list[Example], ref: torch.Tensor) -> dict[str, Any]:
    b: dict[str, Any] = preference_batch(pairs, 0)
    b["ref_logps"] = ref
    return b


def _grads(batches: list[dict[str, Any]], count: Any, loss: Any) -> dict[str, torch.Tensor]:
    model = build_llama(VOCAB, 16, 1, 32, 2, 0)
    acc = make_accelerator()
    accumulate_gradients(acc, acc.prepare(HiddenAndHead(model)), batches, count, loss)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_dpo_round_loss_two_micro_batches_equal_one_full_batch() -> None:
    cfg = AlignProxyConfig(beta=0.5, nll_alpha=1.0)
    pairs = _pairs()
    ref = torch.randn(4, 2, generator=torch.Generator().manual_seed(4)) - 20
    full = _grads([_batch(pairs, ref)], dpo_count_fn(cfg), dpo_loss_fn(cfg))
    split = _grads([_batch(pairs[:2], ref[:2]), _batch(pairs[2:], ref[2:])], dpo_count_fn(cfg), dpo_loss_fn(cfg))
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-7, msg=k)

    # The old single-count form (loss incl. per-micro-batch NLL mean, times pairs) is not exact: the test can tell.
    from proxykd_fast.losses import dpo_loss

    def old_loss(wrapped: Any, b: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        hidden, w, bias = wrapped(b["input_ids"], b["attention_mask"])
        r = b["ref_logps"]
        loss, _ = dpo_loss(hidden, w, b["labels"], ref_logps=torch.cat([r[:, 0], r[:, 1]]), beta=0.5, nll_alpha=1.0)
        return loss * r.shape[0], {}

    old = _grads([_batch(pairs[:2], ref[:2]), _batch(pairs[2:], ref[2:])], lambda b: b["ref_logps"].shape[0], old_loss)
    assert any(not torch.allclose(old[k], full[k], rtol=1e-3, atol=1e-6) for k in full)


def test_single_count_losses_still_work() -> None:
    from proxykd_fast.pipeline.align import count_tokens, sft_loss_fn

    seqs = [[5, 6, 7, 8, 9, 10], [5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18]]
    full = _grads([pad_batch(seqs, [2, 2, 2], 0)], count_tokens, sft_loss_fn(None, "torch"))
    split = _grads([pad_batch([s], [2], 0) for s in seqs], count_tokens, sft_loss_fn(None, "torch"))
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-7, msg=k)


def test_metrics_logger_drops_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 2, "loss": 0.9}) + "\n"
                    + json.dumps({"step": 3, "loss": 0.8}) + "\n" + '{"step": 4, "lo')  # killed mid-write
    logger = MetricsLogger(path, "none", True, resume_step=2)
    logger.log({"step": 3, "loss": 0.7})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert read_metrics(path)[-1]["loss"] == 0.7


def test_wandb_is_initialised_with_the_config_and_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    class Run:
        def log(self, data: dict[str, Any], step: int) -> None:
            calls.append(("log", step))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: Any) -> Run:
        calls.append(("init", kwargs["config"]))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=None, init=init))
    logger = MetricsLogger(tmp_path / "m.jsonl", "wandb", True, None, run_config={"lr": 0.1}, run_name="x")
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert calls == [("init", {"lr": 0.1}), ("log", 1), ("finish", None)]


def test_tensorboard_writer_is_flushed_and_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    class Writer:
        def __init__(self, log_dir: str) -> None:
            events.append("open")

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            events.append(f"{tag}@{step}")

        def flush(self) -> None:
            events.append("flush")

        def close(self) -> None:
            events.append("close")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logger = MetricsLogger(tmp_path / "m.jsonl", "tensorboard", True, None)
    logger.log({"step": 2, "loss": 1.0})
    logger.close()
    assert events == ["open", "loss@2", "flush", "close"]


def test_tokens_per_s_measures_the_step_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxykd_fast.pipeline import trainer as trainer_mod
    from proxykd_fast.pipeline.align import count_tokens, sft_loss_fn

    clock = [0.0]

    def perf_counter() -> float:  # a fake clock: 1 ms per reading, and evals take 100 s
        clock[0] += 1e-3
        return clock[0]

    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=perf_counter))

    def slow_eval(m: torch.nn.Module) -> float:
        clock[0] += 100.0
        return 1.0

    model = build_llama(VOCAB, 16, 1, 32, 2, 0)
    seqs = [[5 + (i + j) % 30 for j in range(12)] for i in range(4)]
    cfg = TrainConfig(batch_size=2, eval_every=1, progress=False, output_dir=str(tmp_path))
    res = train(cfg, model, n_train=4, make_batch=lambda idx: pad_batch([seqs[i] for i in idx], [2] * len(idx), 0),
                count_items=count_tokens, loss_fn=sft_loss_fn(None, "torch"), out_dir=tmp_path, steps=2,
                eval_fn=slow_eval)
    tokens = 2 * 12
    assert [r["tokens_per_s"] for r in res.history] == pytest.approx([tokens / 1e-3] * 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_reference_logps_are_on_the_loss_scale(loss_type: str) -> None:
    from proxykd_fast.pipeline.align import reference_logps

    model = build_llama(VOCAB, 16, 1, 32, 2, 0)
    cfg = AlignProxyConfig(dpo_loss_type=loss_type, eval_batch_size=3, progress=False)
    pairs = _pairs()
    ref = reference_logps(model, pairs, 0, cfg)
    parts, metrics = dpo_loss_fn(cfg)(HiddenAndHead(model), _batch(pairs, ref))
    # Reference = the policy itself: every reward is 0 only if both use the same (sum or mean) scale.
    assert metrics["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(0, abs=1e-5)
    if loss_type == "sigmoid":
        smoothed, _ = dpo_loss_fn(AlignProxyConfig(label_smoothing=0.2))(HiddenAndHead(model), _batch(pairs, ref))
        assert float(smoothed["dpo"].detach()) == pytest.approx(float(parts["dpo"].detach()))  # h = 0: smoothing is symmetric
        shifted = _batch(pairs, ref + torch.tensor([[1.0, -1.0]]))
        plain, _ = dpo_loss_fn(cfg)(HiddenAndHead(model), shifted)
        smoothed, _ = dpo_loss_fn(AlignProxyConfig(label_smoothing=0.2))(HiddenAndHead(model), shifted)
        assert float(smoothed["dpo"].detach()) != pytest.approx(float(plain["dpo"].detach()))  # label_smoothing reaches the loss


@pytest.mark.parametrize("scheduler", ["constant", "linear"])
def test_warmup_steps_warm_up_every_scheduler(tmp_path: Path, scheduler: str) -> None:
    """transformers' 'constant' ignores warm-up steps; ours turns it into constant_with_warmup."""
    from proxykd_fast.pipeline.align import count_tokens, sft_loss_fn

    model = build_llama(VOCAB, 16, 1, 32, 2, 0)
    seqs = [[5 + (i + j) % 30 for j in range(8)] for i in range(4)]
    cfg = TrainConfig(batch_size=2, progress=False, output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=4,
                      lr_scheduler=scheduler)
    res = train(cfg, model, n_train=4, make_batch=lambda idx: pad_batch([seqs[i] for i in idx], [2] * len(idx), 0),
                count_items=count_tokens, loss_fn=sft_loss_fn(None, "torch"), out_dir=tmp_path, steps=8)
    lrs = [r["lr"] for r in res.history]
    assert lrs[:3] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert lrs[3] == pytest.approx(1e-3)


def _sft_run(tmp_path: Path, steps: int = 2, **overrides: Any) -> tuple[torch.nn.Module, Any]:
    """A tiny SFT run through the trainer."""
    from proxykd_fast.pipeline.align import count_tokens, sft_loss_fn

    model = build_llama(VOCAB, 16, 2, 32, 2, 0)
    seqs = [[5 + (i * 3 + j) % 30 for j in range(10)] for i in range(4)]
    cfg = TrainConfig(**{**dict(batch_size=2, progress=False, output_dir=str(tmp_path), learning_rate=1e-2), **overrides})
    res = train(cfg, model, n_train=4, make_batch=lambda idx: pad_batch([seqs[i] for i in idx], [2] * len(idx), 0),
                count_items=count_tokens, loss_fn=sft_loss_fn(None, "torch"), out_dir=tmp_path, steps=steps)
    return model, res


def test_gradient_checkpointing_gives_the_same_training(tmp_path: Path) -> None:
    plain, a = _sft_run(tmp_path / "plain")
    ckpt, b = _sft_run(tmp_path / "ckpt", gradient_checkpointing=True)
    def checkpointed(m: torch.nn.Module) -> bool:
        return any(getattr(x, "gradient_checkpointing", False) for x in m.modules())

    assert checkpointed(ckpt) and not checkpointed(plain)
    assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], rel=1e-6)
    for (name, x), y in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocasts_the_backbone_only(tmp_path: Path) -> None:
    _, full = _sft_run(tmp_path / "fp32", steps=1)
    model, mixed = _sft_run(tmp_path / "bf16", steps=1, bf16=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and optimizer stay fp32
    loss32, loss16 = full.history[0]["loss"], mixed.history[0]["loss"]
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=2e-2)  # bf16 matmuls: close, not equal


def test_warmup_ratio_sets_the_warmup_steps(tmp_path: Path) -> None:
    _, res = _sft_run(tmp_path, steps=8, warmup_ratio=0.3, lr_scheduler_type="linear", learning_rate=1e-3)
    lrs = [r["lr"] for r in res.history]  # ceil(0.3 * 8) = 3 warm-up steps
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])


def test_report_to_without_its_package_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    from proxykd_fast.cli import main

    out = tmp_path / "out"
    rc = main(["distill", "--student", "/nonexistent/student", "--data", "x.jsonl", "--alpha", "0",
               "--report-to", "tensorboard", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "tensorboard" in err and "pip install tensorboard" in err
    assert "/nonexistent/student" not in err and not out.exists()  # refused before loading anything
