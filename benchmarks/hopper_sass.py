"""Static SASS study of the tile-fused logits loop on sm_90a: pointer loads vs TMA, split vs persistent grid.

No GPU needed (triton's bundled ptxas / cuobjdump). Compiles, at the bf16 launch config of
proxykd_fast's `linear_lse` (128 x 128 x 64 tiles, 8 warps, 3 stages, aligned strides as at
N=16384, H=4096, V=128256), three versions of the same row log-sum-exp kernel:

  pointer     kernels/linear_lse.py as shipped (tl.load of pointer tiles -> cp.async)
  tma         the same loop with device-side tensor descriptors (tl.make_tensor_descriptor -> TMA)
  tma-persist TMA plus a persistent grid: one program per SM walks (row tile, vocab split) work items

and reports, for the innermost loop (the K loop around the wgmma: what runs once per 64-wide K
step of every 128 x 128 logits tile), its instruction count by kind, and each kernel's registers
and spills. These are the prototypes HOPPER_NOTES.md judges; none is used by the library.

    python benchmarks/hopper_sass.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxykd_fast.kernels.linear_lse import linear_lse_kernel  # noqa: E402
from proxykd_fast.kernels.logit_tile import fold_tile  # noqa: E402

BM, BN, BK, WARPS, STAGES = 128, 128, 64, 8, 3
KINDS = {  # SASS opcode prefix -> what it is
    "HGMMA": "wgmma (tensor core)", "UTMALDG": "TMA load", "LDGSTS": "cp.async load", "LDG": "global load",
    "LDSM": "shared->reg matrix load", "SYNCS": "mbarrier op", "BAR": "barrier", "WARPGROUP": "warpgroup fence",
    "IMAD": "int mul-add", "IADD3": "int add", "LEA": "address calc", "ISETP": "int compare", "SEL": "select",
    "MOV": "move", "UIADD3": "uniform int add", "UIMAD": "uniform int mul-add", "ULEA": "uniform address calc",
    "DEPBAR": "async-copy wait", "BRA": "branch",
}


@triton.jit
def _lse_item_tma(x_desc, w_desc, lse1, N, V, H, pid_m, pid_s, cols_per_split, scale1,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One (row tile, vocab split) work item through TMA: out-of-range rows read as zeros."""
    row0 = pid_m * BM
    v_start = pid_s * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    m1 = tl.full([BM], -float("inf"), tl.float32)
    l1 = tl.zeros([BM], tl.float32)
    for n0 in range(v_start, v_end, BN):
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            a = x_desc.load([row0, k0])
            b = w_desc.load([n0, k0])
            acc = tl.dot(a, b.T, acc)
        cols = n0 + tl.arange(0, BN)
        m1, l1 = fold_tile(m1, l1, tl.where((cols < v_end)[None, :], acc * scale1, -float("inf")))
    rows = row0 + tl.arange(0, BM)
    tl.store(lse1 + pid_s * N + rows, m1 + tl.log(l1), mask=rows < N)


@triton.jit
def lse_tma_kernel(X, W, lse1, N, V, H, stride_x, stride_w, cols_per_split, scale1,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """linear_lse (one scale, no bias) with TMA tensor descriptors, one program per work item."""
    x_desc = tl.make_tensor_descriptor(X, shape=[N, H], strides=[stride_x, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(W, shape=[V, H], strides=[stride_w, 1], block_shape=[BN, BK])
    _lse_item_tma(x_desc, w_desc, lse1, N, V, H, tl.program_id(0), tl.program_id(1), cols_per_split, scale1,
                  BM, BN, BK)


@triton.jit
def lse_tma_persistent_kernel(X, W, lse1, N, V, H, stride_x, stride_w, cols_per_split, n_split, scale1,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """As lse_tma_kernel, but a fixed grid of programs loops over the (row tile, split) work items."""
    x_desc = tl.make_tensor_descriptor(X, shape=[N, H], strides=[stride_x, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(W, shape=[V, H], strides=[stride_w, 1], block_shape=[BN, BK])
    for item in range(tl.program_id(0), tl.cdiv(N, BM) * n_split, tl.num_programs(0)):
        _lse_item_tma(x_desc, w_desc, lse1, N, V, H, item // n_split, item % n_split, cols_per_split, scale1,
                      BM, BN, BK)


def _compile(kernel, signature: dict, constexprs: dict, warps: int = WARPS) -> object:
    from triton.backends.compiler import GPUTarget

    aligned = {"stride_x", "stride_w", "H", "V", "N", "cols_per_split"}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, ty in signature.items()
             if ty.startswith("*") or n in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                                    constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": STAGES})


def _sass(cubin: bytes) -> tuple[str, dict]:
    from triton.knobs import nvidia

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([nvidia.cuobjdump.path, "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return sass, {"regs": int(res["REG"]), "spill": int(res["STACK"]) + int(res["LOCAL"])}


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, text) of every SASS instruction."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass):
        out.append((int(m.group(1), 16), m.group(3), m.group(3) + m.group(4)))
    return out


def inner_loop(sass: str) -> list[tuple[int, str, str]]:
    """Instructions of the smallest backward-branch loop (BRA to a lower address) that contains a wgmma."""
    instrs = _instructions(sass)
    best = None
    for addr, op, text in instrs:
        m = re.search(r"0x([0-9a-f]+)", text) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            body = [i for i in instrs if int(m.group(1), 16) <= i[0] <= addr]
            if any(i[1].startswith("HGMMA") for i in body) and (best is None or len(body) < len(best)):
                best = body
    return best or []


def profile(name: str, compiled: object) -> dict:
    sass, res = _sass(compiled.asm["cubin"])
    loop = inner_loop(sass)
    kinds = Counter()
    for _, op, _ in loop:
        base = op.split(".")[0]
        kinds[base if base in KINDS else "other"] += 1
    return {"kernel": name, **res, "shared": compiled.metadata.shared, "total_sass": len(_instructions(sass)),
            "loop_sass": len(loop), "loop_kinds": dict(kinds.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base_sig = {"X": "*bf16", "W": "*bf16", "lse1": "*fp32", "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32",
                "stride_w": "i32", "cols_per_split": "i32"}
    rows = []
    # (BM, BN, BK, warps): linear_lse / linear_grad's bf16 tile, and linear_topk's bf16 tile
    for bm, bn, bk, warps in ((BM, BN, BK, WARPS), (64, 64, 64, 8)):
        tiles = {"BM": bm, "BN": bn, "BK": bk}
        shipped = _compile(linear_lse_kernel, {**base_sig, "B": "*bf16", "lse2": "*fp32", "scale1": "fp32",
                                               "scale2": "fp32"},
                           {"HAS_BIAS": False, "TWO": False, **tiles, "EVEN_K": True, "UPCAST": False, "PREC": "tf32"},
                           warps)
        tma = _compile(lse_tma_kernel, {**base_sig, "scale1": "fp32"}, tiles, warps)
        persist = _compile(lse_tma_persistent_kernel, {**base_sig, "n_split": "i32", "scale1": "fp32"}, tiles, warps)
        for name, compiled in (("pointer (shipped loop)", shipped), ("tma", tma), ("tma-persist", persist)):
            rows.append({"tile": f"{bm}x{bn}x{bk}/{warps}w", **profile(name, compiled)})
    print(f"triton {triton.__version__}, sm_90a, bf16, {STAGES} stages, aligned strides\n")
    for r in rows:
        print(f"{r['tile']:14s} {r['kernel']:24s} {r['regs']:3d} regs, {r['spill']} B spill, {r['shared']} B shared, "
              f"{r['total_sass']} SASS total, {r['loop_sass']} in the K loop: {r['loop_kinds']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
