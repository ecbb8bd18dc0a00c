"""frontend.capture and frontend auto: keyword inputs, mapping outputs, caches, shapes, on
plain torch models (the Hugging Face matrix is tests/test_hf.py)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from instances import two_gpu_spec
from torch import nn
from typer.testing import CliRunner

from partitioner import api, dropin
from partitioner.cli.main import app
from partitioner.emit.artifact import load_artifact, pack_outputs, unpack_outputs
from partitioner.emit.build import emit
from partitioner.errors import ArtifactError, TraceError
from partitioner.frontend.capture import call_inputs
from partitioner.frontend.trace import trace
from partitioner.ir.plan import Plan
from partitioner.ir.tree import resolve_type, tree_encode, tree_unflatten
from partitioner.machine.problem import Problem
from partitioner.runtime.local import LocalRuntime

T = torch.get_num_threads()


class Out(OrderedDict):
    """A mapping output class, registered with pytree as a Hugging Face ModelOutput is."""


torch.utils._pytree.register_pytree_node(
    Out, lambda d: (list(d.values()), list(d.keys())), lambda values, keys: Out(zip(keys, values)),
    serialized_type_name=f"{__name__}.Out")


class Masked(nn.Module):
    """Keyword inputs with defaults; a shape-dependent branch fx cannot follow."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, mask=None, scale=2.0):
        h = torch.tanh(self.fc(x))
        if x.shape[0] > 1:  # fx: a Proxy in a branch
            h = h * 1.5
        if mask is not None:
            h = h * mask
        return Out(hidden=h, logits=self.head(h) * scale)


class DynamicCache:
    """A cache object no graph can return (as transformers' own)."""

    def __init__(self, keys):
        self.keys = keys


class Cached(nn.Module):
    """Returns a cache object when its config says use_cache, as Hugging Face decoders do."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(use_cache=True)
        self.fc = nn.Linear(4, 4)

    def forward(self, x, use_cache=None):
        y = self.fc(x)
        if self.config.use_cache if use_cache is None else use_cache:
            return y, DynamicCache([y])
        return (y,)


def _masked():
    torch.manual_seed(0)
    return Masked().eval(), {"x": torch.randn(3, 4), "mask": torch.rand(3, 4)}


def _same(a, b):
    assert type(a) is type(b)
    torch.testing.assert_close(dict(a), dict(b), rtol=1e-4, atol=1e-5)


# ---- frontend auto -----------------------------------------------------------------------
def test_auto_keeps_fx_when_it_traces():
    gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    assert gm.meta["partitioner_frontend"] == "fx"


def test_auto_falls_back_to_export_and_logs_why(caplog):
    model, kw = _masked()
    with caplog.at_level(logging.INFO, logger="partitioner"):
        gm = trace(model, kw)
    assert gm.meta["partitioner_frontend"] == "export"
    assert "fx cannot trace Masked" in caplog.text and "traced Masked with export" in caplog.text
    with torch.no_grad():
        _same(gm(*gm.meta["partitioner_inputs"]), model(**kw))


def test_keyword_inputs_reach_their_parameters_by_name():
    model, kw = _masked()
    gm = trace(model, kw, frontend="export")
    assert call_inputs(gm, (), {"mask": kw["mask"], "x": kw["x"]})[0] is kw["x"]
    with pytest.raises(TraceError, match="no input 'maks'") as info:
        call_inputs(gm, (), {"maks": kw["mask"]})
    assert info.value.hint


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_failed_traces_leave_no_functorch_layer():
    class LeavesVmapLayer(nn.Module):
        def forward(self, x):
            torch._C._functorch._vmap_increment_nesting(3, "error")  # what HF masks' vmap runs
            if x.sum() > 0:  # no frontend follows this
                return x * 2
            return x

    with pytest.raises(TraceError, match="no frontend could trace"):
        trace(LeavesVmapLayer(), (torch.randn(3, 4),))
    assert torch._C._functorch.get_dynamic_layer_stack_depth() == 0


def test_stride0_buffer_is_not_restored_with_copy():
    class Expanded(nn.Module):  # a broadcast constant, as dynamo lifts one from HF BERT
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.arange(4.0).expand(3, 4))

        def forward(self, x):
            return x + self.b

    gm = trace(Expanded(), (torch.randn(3, 4),))
    assert gm.b.stride() == (0, 1)


def test_cache_is_turned_off_for_the_trace_and_said(caplog):
    model = Cached()
    with caplog.at_level(logging.INFO, logger="partitioner"):
        gm = trace(model, (torch.randn(2, 4),), frontend="export")
    assert "use_cache disabled" in caplog.text and model.config.use_cache is True
    assert len(gm(torch.randn(2, 4))) == 1
    with pytest.raises(TraceError, match="DynamicCache") as info:  # asked for: the hint says what to do
        trace(Cached(), {"x": torch.randn(2, 4), "use_cache": True})
    assert "use_cache=False" in info.value.hint


def test_constant_output_is_computed_by_a_node():
    class ReturnsBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(6.0))

        def forward(self, x):
            return x * 2, self.table

    x = torch.randn(2, 3)
    lm = api.load_model(ReturnsBuffer(), (x,))
    p = Problem(lm.graph, two_gpu_spec(), "latency")
    art = emit((lm.gm, p, Plan(tuple(i % 2 for i in range(p.n)))))
    with torch.no_grad():
        out = art.run_sequential(x)
    torch.testing.assert_close(out[1], torch.arange(6.0))


# ---- outputs -----------------------------------------------------------------------------
def test_mapping_outputs_keep_their_class():
    tree = tree_encode(Out(a=1, b=2.5), lambda x: None, lambda x: pytest.fail(f"{x!r}"))
    assert tree["object"]["type"].endswith(":Out")
    back = tree_unflatten(tree, None)
    assert type(back) is Out and back == {"a": 1, "b": 2.5}
    assert resolve_type("no_such_package.mod:Thing") is None and resolve_type("os:path") is None


def test_unknown_output_class_comes_back_as_a_dict(caplog):
    tree = {"object": {"type": "no_such_package.outputs:ModelOutput", "dict": [["a", {"const": 1}]]}}
    with caplog.at_level(logging.WARNING, logger="partitioner"):
        assert tree_unflatten(tree, None) == {"a": 1}
    assert "plain dict" in caplog.text


def test_packed_outputs_load_weights_only(tmp_path):
    out = Out(h=torch.randn(2, 3), rest=(torch.ones(1), None, 3))
    torch.save(pack_outputs(out), tmp_path / "o.pt")
    back = unpack_outputs(torch.load(tmp_path / "o.pt", weights_only=True))
    assert type(back) is Out and back["rest"][1:] == (None, 3)
    torch.testing.assert_close(back["h"], out["h"])


# ---- entry points ------------------------------------------------------------------------
def test_dropin_takes_keywords_returns_the_class_and_replans_new_shapes(caplog):
    model, kw = _masked()
    fast = dropin.compile(model, kw, hw=two_gpu_spec(), threads=T)
    assert fast.artifact.schedule.meta["frontend"] == "export"
    with torch.no_grad():
        _same(fast(**kw), model(**kw))
        _same(fast(kw["x"], mask=kw["mask"]), model(**kw))
        kw2 = {"x": torch.randn(5, 4), "mask": torch.rand(5, 4)}
        with caplog.at_level(logging.INFO, logger="partitioner"):
            _same(fast(**kw2), model(**kw2))
    assert "planning for new input shapes (5, 4) float32" in caplog.text and len(fast.plans) == 2


def test_artifact_of_a_specialised_graph_refuses_other_shapes(tmp_path):
    model, kw = _masked()
    res = api.compile_plan(model, two_gpu_spec(), example_inputs=kw)
    art = emit(res)
    art.save(tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert type(loaded.expected_outputs) is Out
    with LocalRuntime(loaded, threads=T) as rt, torch.no_grad():
        _same(rt.run(**kw), model(**kw))
        with pytest.raises(ArtifactError, match=r"compiled for other input shapes.*\(5, 4\)") as info:
            rt.run(torch.randn(5, 4), mask=torch.rand(5, 4))
    assert "re-plans" in info.value.hint


def test_self_check_runs_each_side_on_its_own_arguments(tmp_path):
    class MutatesInput(nn.Module):  # T5's `relative_buckets += ...` on a segment's argument
        def forward(self, x):
            y = x * 2
            y += 1
            return y * 3

    x = torch.randn(2, 4)
    lm = api.load_model(MutatesInput(), (x,), frontend="fx")
    p = Problem(lm.graph, two_gpu_spec(), "latency")
    names = p.graph.order
    art = emit((lm.gm, p, Plan(tuple(1 if names[i] == "mul" else 0 for i in range(p.n)))), example_inputs=(x,))
    assert len(art.schedule.segments) >= 2
    art.save(tmp_path / "a")  # verifies every segment
    torch.testing.assert_close(load_artifact(tmp_path / "a").run_sequential(x), (x * 2 + 1) * 3)


def test_cli_factory_with_keyword_inputs(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import torch\n"
                   "class M(torch.nn.Module):\n"
                   "    def __init__(self):\n"
                   "        super().__init__(); self.fc = torch.nn.Linear(4, 4)\n"
                   "    def forward(self, x, mask=None):\n"
                   "        return {'y': self.fc(x) * mask}\n"
                   "def factory():\n"
                   "    torch.manual_seed(0)\n"
                   "    return M().eval(), {'x': torch.randn(2, 4), 'mask': torch.rand(2, 4)}\n")
    runner = CliRunner()
    r = runner.invoke(app, ["compile", f"{src}:factory", "--out", str(tmp_path / "o"), "--no-gantt", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", str(tmp_path / "o"), "--check"])
    assert r.exit_code == 0 and "outputs match" in r.output, r.output
