"""A static check for in-place global-memory races inside one Triton program.

Triton orders a program's global loads and stores only per thread: when one thread reads
buf[i] and another later writes buf[i] (or the reverse), nothing stops the write landing
first unless a barrier (tl.debug_barrier -> bar.sync) lies between them. Whether two accesses
touch the same element is not decidable from the IR, so `in_place_hazards` is conservative:
two accesses to the same pointer argument, at least one a plain write, through different
pointer values (the same value means the same addresses in the same lanes, the streaming
load-then-store idiom) and with no barrier on some path between them, are a hazard. Inside a
loop the path that wraps around to the next iteration counts too. Atomics among themselves
commute and are not hazards.

Distinct pointer arguments are assumed not to alias (the launchers only alias buffers that the
kernel then only reads, or never touches). The AOT test runs this over every kernel's TTGIR;
tests/kernels/test_hazards.py runs it over hand-written IR, and tests/kernels/test_aot.py over a canary kernel with the
kd_epilogue label-logit race, with and without the barrier that fixes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import triton
import triton.language as tl

_DEF = re.compile(r"^\s*(%[\w$.-]+)(?::\d+)?\s*=\s*(\"?[\w.]+\"?)")
_USE = re.compile(r"%[\w$.-]+")
_ARG = re.compile(r"(%[\w$.-]+): !tt\.ptr")
_BLOCK_ARGS = re.compile(r"(%[\w$.-]+)\s*(?:=|:)")
_BARRIER = re.compile(r"\b(?:gpu\.barrier|ttg\.barrier)\b")
_READS = ("tt.load", "ttg.async_copy_global_to_local")
_WRITES = ("tt.store",)
_ATOMICS = ("tt.atomic_rmw", "tt.atomic_cas")
_LOOPS = ("scf.for", "scf.while")


@dataclass
class _Access:
    line: int
    kind: str  # "read", "write" or "atomic"
    root: str
    value: str
    loops: tuple[tuple[int, int], ...] = field(default_factory=tuple)  # enclosing loop (start, end) lines
    text: str = ""


def _region_spans(lines: list[str]) -> dict[int, tuple[int, bool]]:
    """For each line opening a region: (its closing line, whether the region is a loop body)."""
    spans, stack = {}, []
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("}") and stack:
            start, is_loop = stack.pop()
            spans[start] = (i, is_loop)
        if s.endswith("{"):
            stack.append((i, any(op in s for op in _LOOPS)))
    return spans


def _strip_locs(line: str) -> str:
    """The line without its `loc(...)` annotations (which nest parentheses)."""
    out, i = [], 0
    while (j := line.find("loc(", i)) >= 0:
        if j and (line[j - 1].isalnum() or line[j - 1] == "_"):  # the tail of a longer name
            out.append(line[i:j + 4])
            i = j + 4
            continue
        out.append(line[i:j])
        depth, k = 0, j + 3
        for k in range(j + 3, len(line)):
            depth += {"(": 1, ")": -1}.get(line[k], 0)
            if depth == 0:
                break
        i = k + 1
    out.append(line[i:])
    return "".join(out).rstrip()


def in_place_hazards(ir: str) -> list[str]:
    """Unsynchronized read/write pairs on the same pointer argument in Triton TTIR/TTGIR text."""
    lines = [_strip_locs(line) if not line.lstrip().startswith("#") else "" for line in ir.splitlines()]
    spans = _region_spans(lines)
    scopes: list[dict[str, tuple[str, str]]] = [{}]  # name -> (unique value id, root argument or "")
    loop_stack: list[tuple[int, int]] = []
    open_loops: list[bool] = []
    accesses: list[_Access] = []
    barriers: list[int] = []
    counter = 0

    def lookup(name: str) -> tuple[str, str]:
        for scope in reversed(scopes):
            if name in scope:
                return scope[name]
        return (name, "")

    def define(name: str, root: str) -> None:
        nonlocal counter
        counter += 1
        scopes[-1][name] = (f"{name}@{counter}", root)

    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("}") and len(scopes) > 1:
            scopes.pop()
            if open_loops and open_loops.pop():
                loop_stack.pop()
        if "tt.func" in s:
            scopes[-1].update({a: (a, a) for a in _ARG.findall(s)})
        body = s.lstrip("})").strip()
        m = _DEF.match(body)
        op = m.group(2).strip('"') if m else body.split(" ")[0].strip('"')
        uses = [u.split("#")[0] for u in _USE.findall(body[m.end():] if m else body)]
        if _BARRIER.search(body):
            barriers.append(i)
        kind = "read" if op in _READS else "write" if op in _WRITES else "atomic" if op in _ATOMICS else ""
        if kind and uses:
            ptr = next((u for u in uses if lookup(u)[1]), uses[0])
            value, root = lookup(ptr)
            if root:
                accesses.append(_Access(i, kind, root, value, tuple(loop_stack), s))
        if m:
            if op == "ttg.convert_layout" and uses:  # same addresses in a new layout: the same pointer value
                scopes[-1][m.group(1)] = lookup(uses[0])
            else:
                roots = [lookup(u)[1] for u in uses if lookup(u)[1]] if "!tt.ptr" in body else []
                define(m.group(1), roots[0] if roots else "")
        if s.endswith("{"):
            is_loop = spans.get(i, (i, False))[1]
            inner = [(a, lookup(b.split("#")[0])[1]) for a, b in re.findall(r"(%[\w$.-]+) = (%[\w$.-]+)", body)]
            scopes.append({})
            open_loops.append(is_loop)
            if is_loop:
                loop_stack.append((i, spans[i][0]))
            for name, root in inner:  # induction variable and iter_args(%a = %init, ...)
                define(name, root)
            block = re.search(r"\^bb\d+\((.*)", body)
            for name in _BLOCK_ARGS.findall(block.group(1)) if block else []:
                define(name, "")

    def fenced(lo: int, hi: int) -> bool:
        return any(lo < b < hi for b in barriers)

    hazards = []
    for a_i, a in enumerate(accesses):
        for b in accesses[a_i + 1:]:
            kinds = {a.kind, b.kind}
            if a.root != b.root or a.value == b.value or kinds in ({"read"}, {"atomic"}):
                continue
            common = [lp for lp in a.loops if lp in b.loops]
            safe = fenced(a.line, b.line)
            if safe and common:  # the next iteration's first access must also be fenced from this one's last
                start, end = common[-1]
                safe = fenced(b.line, end) or fenced(start, a.line)
            if not safe:
                hazards.append(f"{a.root}: {a.kind} at IR line {a.line + 1} ({a.text[:80]}) and {b.kind} at "
                               f"IR line {b.line + 1} ({b.text[:80]}) without a barrier between them")
    return hazards


@triton.jit
def label_race_canary(S, y_ptr, out, V, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """kd_epilogue's old bug in miniature: read S[y], then overwrite S in place (fenced if BARRIER)."""
    offs = tl.arange(0, BLOCK)
    s = tl.load(S + offs, mask=offs < V)
    y = tl.load(y_ptr)
    tl.store(out, tl.load(S + y))
    if BARRIER:
        tl.debug_barrier()
    tl.store(S + offs, s * 2.0, mask=offs < V)
