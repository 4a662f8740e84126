"""Tests of the static in-place race check (tests/support/triton_ir.py) on hand-written IR."""

from __future__ import annotations

from tests.support.triton_ir import in_place_hazards

_FUNC = "  tt.func public @k(%S: !tt.ptr<f32>, %O: !tt.ptr<f32>, %n: i32) {\n"


def test_scalar_read_then_streaming_write_is_a_hazard() -> None:
    """The label-logit pattern: a scalar load of S[y], then a tensor store over S, no barrier."""
    ir = (_FUNC + "    %p = tt.addptr %S, %n : !tt.ptr<f32>, i32\n    %v = tt.load %p : !tt.ptr<f32>\n"
          "    %t = tt.splat %S : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>>\n    tt.store %t, %z : tensor<4x!tt.ptr<f32>>\n"
          "  }\n")
    assert len(in_place_hazards(ir)) == 1
    fenced = ir.replace("    tt.store", "    ttg.barrier all\n    tt.store")
    assert in_place_hazards(fenced) == []
    assert in_place_hazards(ir.replace("tt.store %t", "tt.store %p")) == []  # same pointer value: same lanes


def test_loop_wraparound_and_other_buffers() -> None:
    """A barrier between a loop body's read and write does not fence the next iteration's read."""
    ir = (_FUNC + "    %t = tt.splat %S : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>>\n"
          "    scf.for %i = %c0 to %n step %c1 iter_args(%q = %t) -> (tensor<4x!tt.ptr<f32>>) : i32 {\n"
          "      %a = tt.load %q : tensor<4x!tt.ptr<f32>>\n      ttg.barrier all\n"
          "      %r = tt.addptr %q, %off : tensor<4x!tt.ptr<f32>>, tensor<4xi32>\n"
          "      tt.store %r, %a : tensor<4x!tt.ptr<f32>>\n      scf.yield %r : tensor<4x!tt.ptr<f32>>\n"
          "    }\n    %o = tt.splat %O : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>>\n"
          "    %b = tt.load %t : tensor<4x!tt.ptr<f32>>\n    tt.atomic_rmw fadd, relaxed, gpu, %o, %b\n  }\n")
    found = in_place_hazards(ir)
    assert len(found) == 2 and all(h.startswith("%S") for h in found)  # in-loop wrap-around, and loop store vs %b
    assert in_place_hazards(ir.replace("scf.yield", "ttg.barrier all\n      scf.yield")) == []
