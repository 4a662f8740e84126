"""Launch-grid sizing of the split-vocabulary kernels (linear_lse, linear_topk): whole waves on the GPU."""

from __future__ import annotations

import pytest

from proxykd_fast.ops.configs import split_count


def _waves(n_row_tiles: int, splits: int, n_col_tiles: int, sms: int) -> float:
    per = -(-n_col_tiles // splits)
    programs = n_row_tiles * -(-n_col_tiles // per)
    return programs / (-(-programs // sms) * sms)


@pytest.mark.parametrize("n_row_tiles,n_col_tiles", [(16, 1002), (32, 1002), (64, 1002), (128, 1002),
                                                     (64, 2004), (256, 2004), (3, 250), (1, 8)])
@pytest.mark.parametrize("sms", [132, 108, 78])
def test_split_count_fills_whole_waves(n_row_tiles: int, n_col_tiles: int, sms: int) -> None:
    want = max(1, min(-(-2 * sms // n_row_tiles), n_col_tiles))
    s = split_count(n_row_tiles, n_col_tiles, sms)
    assert want <= s <= max(want, min(4 * want, n_col_tiles))
    assert _waves(n_row_tiles, s, n_col_tiles, sms) >= _waves(n_row_tiles, want, n_col_tiles, sms)


def test_the_hopper_notes_case_has_no_idle_tail() -> None:
    """N=2048 (16 row tiles of 128), V=128256 (1002 tiles of 128), 132 SMs: 17 splits ran 2.06 waves."""
    assert _waves(16, 17, 1002, 132) < 0.7
    s = split_count(16, 1002, 132)
    assert s == 33 and _waves(16, s, 1002, 132) == 1.0
