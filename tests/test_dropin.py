"""frontends: the drop-in compile() and the torch.compile backend."""

from __future__ import annotations

import functools
import warnings

import partitioner.zoo as models
import pytest
import torch
from instances import two_gpu_spec
from torch import nn

from partitioner import dropin as frontends
from partitioner.errors import UsageError

# Workers get the caller's intra-op thread count: oneDNN picks other kernels for other
# counts (tiny float differences); with equal counts the outputs are identical.
T = torch.get_num_threads()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.bias = nn.Parameter(torch.linspace(-1, 1, 4))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        f = h.mean((2, 3))
        return self.fc(f) + self.bias, f


def _net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 8, 8),)


def test_compile_drop_in_equals_model():
    model, (x,) = _net()
    pm = frontends.compile(model, (x,), hw=two_gpu_spec(), solver="greedy", threads=T)
    assert isinstance(pm, nn.Module) and len(pm.segments) >= 1
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x))
        x2 = torch.randn(5, 3, 8, 8)
        torch.testing.assert_close(pm(x2), model(x2))
    assert pm.result.plan.solver == "greedy" and pm.last_stats.wall_s > 0
    assert "segments on" in repr(pm)


def test_compile_resnet18_on_the_default_spec():
    model, inputs = models.get_model("resnet18", image=32)
    pm = frontends.compile(model, inputs, threads=T)  # server-cpu-2gpu, latency, heft; all on cpu
    with torch.no_grad():
        torch.testing.assert_close(pm(*inputs), model(*inputs))
    assert len({s.device for s in pm.artifact.schedule.segments}) >= 2  # the plan really splits the model


def test_compile_options_are_checked():
    model, inputs = _net()
    with pytest.raises(UsageError, match="unknown partitioner option"):
        frontends.compile(model, inputs, warp=9)


def _capture(**opts):
    """A backend that records what dynamo_backend returns."""
    seen = []

    def backend(gm, example_inputs, **kw):
        fn = frontends.dynamo_backend(gm, example_inputs, **kw, **{"threads": T, **opts})
        seen.append((gm, list(example_inputs), fn))
        return fn

    return backend, seen


def test_torch_compile_backend_equals_model():
    torch._dynamo.reset()
    model, (x,) = _net()
    backend, seen = _capture()
    cm = torch.compile(model, backend=backend, options={"hw": two_gpu_spec(), "solver": "heft"})
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
        torch.testing.assert_close(cm(x), model(x))
    assert len(seen) == 1
    gm, ex, fn = seen[0]
    res, art, rt = fn.partitioner
    n_params = len(list(model.parameters())) + 2  # bn running stats
    if sum(isinstance(e, nn.Parameter) for e in ex):  # torch lifted parameters into inputs: we lifted them back
        assert len(art.schedule.inputs) == 1 and len(ex) >= n_params
    torch._dynamo.reset()


def test_torch_compile_by_name_and_partial():
    torch._dynamo.reset()
    from torch._dynamo.backends.registry import (
        _BACKENDS,
        lookup_backend,
        register_backend,
    )

    try:
        lookup_backend("partitioner")  # installed through the torch_dynamo_backends entry point
    except Exception:  # noqa: BLE001 - not installed yet: register it the way the entry point would
        if "partitioner" not in _BACKENDS:
            register_backend(compiler_fn=frontends.dynamo_backend, name="partitioner")
    model, (x,) = _net()
    cm = torch.compile(model, backend="partitioner", options={"solver": "greedy", "threads": T})
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
    torch._dynamo.reset()
    cm = torch.compile(model, backend=functools.partial(frontends.dynamo_backend, solver="single", threads=T))
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
    torch._dynamo.reset()


def test_graph_breaks_give_several_plans():
    class Breaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            torch._dynamo.graph_break()
            return self.b(h * 2)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = Breaky().eval(), torch.randn(4, 8)
    backend, seen = _capture(hw=two_gpu_spec())
    cm = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
    assert len(seen) == 2
    torch._dynamo.reset()


def test_other_parameters_fall_back_to_eager():
    torch._dynamo.reset()
    model, (x,) = _net()
    backend, seen = _capture(hw=two_gpu_spec())
    cm = torch.compile(model, backend=backend)
    with torch.no_grad():
        cm(x)
    gm, ex, fn = seen[0]
    _, art, _ = fn.partitioner
    if len(art.schedule.inputs) == len(ex):
        pytest.skip("this torch passes no parameters as graph inputs")
    other = [e.detach().clone() + 1 if isinstance(e, nn.Parameter) else e for e in ex]
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.testing.assert_close(fn(*other), gm(*other))
    assert any("other parameters" in str(m.message) for m in w)
    torch._dynamo.reset()


def test_backend_rejects_unknown_options():
    torch._dynamo.reset()
    model, (x,) = _net()
    cm = torch.compile(model, backend=frontends.dynamo_backend, options={"nonsense": 1})
    with pytest.raises(Exception, match="unknown partitioner option"):
        cm(x)
    torch._dynamo.reset()
