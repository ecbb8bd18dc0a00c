"""Segments run as TorchScript traces (partitioner.runtime.traced, LocalRuntime(segments="traced"))."""

from __future__ import annotations

import pytest
import torch
from instances import two_gpu_spec
from torch import nn

from partitioner import api
from partitioner.emit.build import emit
from partitioner.errors import UsageError
from partitioner.ir.plan import Plan
from partitioner.machine.problem import Problem
from partitioner.runtime.local import LocalRuntime
from partitioner.runtime.traced import MAX_SIGNATURES, TracedSegment


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return (torch.relu(self.a(x)), self.b(x))


class Branchy(nn.Module):
    """Python control flow on a tensor's value: a trace would bake in one branch."""

    def forward(self, x):
        return (x * 2,) if x.sum() > 0 else (x - 1,)


class InPlace(nn.Module):
    """Changes its input in place (allowed for a segment whose input no other segment reads)."""

    def forward(self, x):
        x.add_(1.0)
        return (x * 2,)


class Scale(nn.Module):
    def forward(self, x, k):
        return (x * k,)


def test_a_traced_segment_matches_its_module_for_every_signature():
    torch.manual_seed(0)
    m = Two().eval()
    seg = TracedSegment(m, "s0")
    with torch.inference_mode():
        for b in (2, 3, 2):  # one trace per batch size, reused
            x = torch.randn(b, 8)
            torch.testing.assert_close(seg(x), m(x))
    assert not seg.eager and len(seg.traces) == 2
    assert all(isinstance(t, torch.jit.ScriptModule) for t in seg.traces.values())
    with torch.inference_mode():
        xs = [torch.randn(b, 8) for b in range(4, 5 + MAX_SIGNATURES)]
        for x in xs:
            torch.testing.assert_close(seg(x), m(x))
    assert seg.eager and not seg.traces  # too many signatures: eager for good


@pytest.mark.parametrize("case", ["control-flow", "not-a-tensor", "grad"])
def test_segments_that_cannot_be_traced_faithfully_stay_eager(case):
    m = {"control-flow": Branchy(), "not-a-tensor": Scale(), "grad": Two().eval()}[case]
    seg = TracedSegment(m, "s0")
    pos, neg = torch.ones(2, 8), -torch.ones(2, 8)
    if case == "grad":
        with torch.enable_grad():
            out = seg(pos)
        assert out[0].requires_grad and not seg.traces and not seg.eager
        return
    with torch.inference_mode():
        if case == "not-a-tensor":
            torch.testing.assert_close(seg(pos, 3), (pos * 3,))
            torch.testing.assert_close(seg(pos, 5), (pos * 5,))
            assert seg.eager and not seg.traces
            return
        torch.testing.assert_close(seg(pos), (pos * 2,))
        torch.testing.assert_close(seg(neg), (neg - 1,))  # the other branch: a baked trace would give neg * 2
    assert seg.eager and not seg.traces


def test_runtime_streams_traced_segments_in_threads():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(4)]).eval()
    x = torch.randn(4, 16)
    lm = api.load_model(model, (x,))
    p = Problem(lm.graph, two_gpu_spec(), "throughput")
    plan = Plan(tuple(0 if i < p.n // 2 else 1 for i in range(p.n)), solver="by-hand")
    art = emit((lm.gm, p, plan), example_inputs=(x,))
    xs = [torch.randn(4 + k % 2, 16) for k in range(6)]
    with torch.inference_mode(), LocalRuntime(art, threads=1, segments="traced") as rt:
        outs, _ = rt.stream(xs)
        assert rt.segments == "traced"
    with torch.inference_mode():
        for o, xi in zip(outs, xs):
            torch.testing.assert_close(o, model(xi))
    with pytest.raises(UsageError, match="segments must be"):
        LocalRuntime(art, segments="jit")


def test_a_segment_that_changes_its_input_in_place_changes_it_once():
    """The trace is made and checked on copies; the module runs once on the real input, so
    the first call's outputs and input are the module's own, and the trace agrees."""
    seg = TracedSegment(InPlace(), "s0")
    with torch.no_grad():
        for _ in range(2):  # traced on the first call, the trace on the second
            x = torch.randn(2, 3)
            x0 = x.clone()
            (out,) = seg(x)
            torch.testing.assert_close(x, x0 + 1)
            torch.testing.assert_close(out, (x0 + 1) * 2)
    assert not seg.eager and len(seg.traces) == 1
