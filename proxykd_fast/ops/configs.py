"""Launch shapes of every Triton kernel, as data: tile configs per kernel kind and operand width.

Chosen for Hopper/Ampere (sm_90 / sm_80) from ptxas figures; the AOT test (tests/kernels/
test_aot.py) checks they compile without spills, fit shared memory and keep register headroom
(spill-free when capped at 224 registers), on triton 3.7.1 and, checked by hand, 3.6. Keys:
(kind, operand bits); "topk64" is top-k with k > 32. ptxas takes up to all 255 registers for the
bf16 lse / grad tiles but needs <= 200 of them (no spill at maxnreg=200, both archs, triton 3.6
and 3.7.1). The top-k tiles need what they use (packed int64 keys, bitonic merge): 64-row tiles
took 237-255 registers and most spilled when capped at 224-232, so they are 32 x 64 (168-206
registers); top-k is a no-grad precompute step, off the training step's critical path.
Under the CPU interpreter the tiles are small so tests cover several row / vocab tiles and masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .runtime import interpreting


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one tile kernel."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group_m: int = 8


GPU_CONFIGS: dict[tuple[str, int], TileConfig] = {
    ("lse", 16): TileConfig(128, 128, 64, 8, 3),
    ("grad", 16): TileConfig(128, 128, 64, 8, 3),
    ("topk", 16): TileConfig(64, 64, 64, 8, 3),
    ("topk64", 16): TileConfig(64, 64, 64, 8, 3),
    ("lse", 32): TileConfig(64, 64, 32, 8, 3),
    ("grad", 32): TileConfig(64, 64, 32, 8, 3),
    ("topk", 32): TileConfig(32, 64, 32, 8, 3),
    ("topk64", 32): TileConfig(32, 64, 32, 8, 3),
}
INTERPRETER_CONFIGS: dict[str, TileConfig] = {
    "lse": TileConfig(16, 64, 16, 1, 1),
    "grad": TileConfig(16, 64, 16, 1, 1, 2),
    "topk": TileConfig(64, 128, 16, 1, 1),
    "topk64": TileConfig(64, 128, 16, 1, 1),
}
# Row epilogue: the widest column block (GPU, interpreter) and the warps for the widest block.
EPILOGUE_MAX_BLOCK = {"gpu": 2048, "interpreter": 256}


def tile_config(kind: str, dtype: torch.dtype) -> TileConfig:
    """The tile shape for a kernel kind ('lse', 'grad', 'topk', 'topk64') and operand dtype."""
    if interpreting():
        return INTERPRETER_CONFIGS[kind]
    return GPU_CONFIGS[(kind, 32 if dtype == torch.float32 else 16)]


def epilogue_block(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row program over `vocab` columns (small blocks under the interpreter
    so tests walk several blocks and a masked tail)."""
    block = min(triton.next_power_of_2(vocab), EPILOGUE_MAX_BLOCK["interpreter" if interpreting() else "gpu"])
    return block, 8 if block >= 2048 else 4


def split_count(n_row_tiles: int, n_col_tiles: int, sms: int) -> int:
    """Vocab splits for a grid of row tiles x splits, one program per SM at a time: at least about two
    waves, and among 1-4x that many the count whose last wave is fullest (fewest splits on a tie).

    At N=2048, V=128256 on 132 SMs the plain two-wave count (17 splits, 272 programs) leaves 31% of
    the pass as idle tail; 33 splits (528 programs, 4 full waves) leave none (benchmarks/HOPPER_NOTES.md).
    """
    want = max(1, min(triton.cdiv(2 * sms, n_row_tiles), n_col_tiles))
    best, best_eff = want, -1.0
    for s in range(want, min(4 * want, n_col_tiles) + 1):
        actual = triton.cdiv(n_col_tiles, triton.cdiv(n_col_tiles, s))  # splits after rounding to whole tiles
        programs = n_row_tiles * actual
        eff = programs / (triton.cdiv(programs, sms) * sms)
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def vocab_splits(n: int, vocab: int, cfg: TileConfig, device: torch.device) -> tuple[int, int]:
    """(n_splits, cols_per_split): split the vocab so row tiles x splits fill the GPU in whole waves."""
    n_m = triton.cdiv(max(n, 1), cfg.bm)
    n_tiles = triton.cdiv(vocab, cfg.bn)
    if interpreting() or device.type != "cuda":
        want = min(2, n_tiles)
    else:
        want = split_count(n_m, n_tiles, torch.cuda.get_device_properties(device).multi_processor_count)
    per = triton.cdiv(n_tiles, max(1, want)) * cfg.bn
    return triton.cdiv(vocab, per), per
