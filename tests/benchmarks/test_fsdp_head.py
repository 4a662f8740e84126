"""benchmarks/fsdp_head.py: both ways of feeding an FSDP2-sharded head to a fused loss give the fp64 result.

3 gloo ranks with V=37 (FSDP2 shards of 13, 13 and 11 rows, padded to 13 in its collectives), different
tokens and valid counts per rank, CE and offline top-k KD: the gathered DTensor head (A) and vocab-parallel
over gathered tokens (B) both give the single-process fp64 loss, every rank's hidden gradient and the head
gradient; the bytes counted from the collectives they issue equal the script's formula from the shapes.
No timing is asserted.
"""

from __future__ import annotations

import pytest

from benchmarks.fsdp_head import IGNORE, PATHS, Config, analytic_bytes, rank_tokens, run

CFG = Config(n=24, h=8, v=37, world=3, repeats=1, warmup=0, topk=4, threads=1)


@pytest.fixture(scope="module")
def results() -> dict:
    return run(CFG)


def test_both_paths_equal_the_single_process_fp64_result(results: dict) -> None:
    assert results["shape"]["shard_rows"] == [13, 13, 11]
    for kind in ("ce", "kd"):
        for path in PATHS:
            r = results["results"][kind][path]
            assert r["agree"], (kind, path, r["errors"])
            assert max(r["errors"][k] for k in ("loss", "hidden", "weight")) < 1e-5, (kind, path, r["errors"])
        assert results["results"][kind]["vocab_parallel"]["errors"]["ranks_disagree"] == 0.0


def test_counted_bytes_equal_the_formula(results: dict) -> None:
    ignored = sum(int((rank_tokens(CFG, r)["labels"] == IGNORE).sum()) for r in range(CFG.world))
    share = 2 * (CFG.world - 1) / CFG.world  # a ring all-reduce: what one rank sends, per byte reduced
    for kind, stats in (("ce", 12), ("kd", 12 + 4 * CFG.topk)):
        gather = results["results"][kind]["gather"]
        assert gather["sent_bytes_counted"] == sum(analytic_bytes(CFG, kind, "gather").values())
        assert gather["uncounted_collectives"] == {}
        vp = results["results"][kind]["vocab_parallel"]
        # the formula counts every token's row statistics; the loss skips the ignored rows
        want = sum(analytic_bytes(CFG, kind, "vocab_parallel").values()) - share * stats * ignored
        assert abs(vp["sent_bytes_counted"] - want) <= 16, (kind, vp["sent_bytes_counted_by_op"], want)
        assert vp["uncounted_collectives"] == {}


@pytest.mark.parametrize(("field", "value"), [("world", 1), ("v", 4), ("dtype", "fp16"), ("losses", ("dpo",)),
                                              ("n", 0)])
def test_bad_configs_are_refused(field: str, value: object) -> None:
    kw = {"world": 3} | {field: value}
    with pytest.raises(ValueError, match=field):
        Config(**kw)
