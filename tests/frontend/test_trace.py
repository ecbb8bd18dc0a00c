"""Tests for partitioner.frontend.trace: fx / export frontends, shapes, FLOPs, bytes and errors."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner.errors import PartitionerError, TraceError
from partitioner.frontend.trace import NodeCost, node_cost, trace

torch.manual_seed(0)


# ---- tiny models -------------------------------------------------------------------------
class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc(x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Mixed(nn.Module):
    """call_method, call_function, get_attr (parameter and buffer), split + getitem."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.gain = nn.Parameter(torch.full((6,), 0.5))
        self.register_buffer("offset", torch.arange(6, dtype=torch.float32))

    def forward(self, x):  # x: (B, 2, 3)
        b = x.size(0)
        y = x.view(b, 6)
        y = self.proj(y) * self.gain + self.offset
        a, c = torch.split(y, 3, dim=1)
        z = torch.cat([c, a], dim=1)
        z = operator.add(z, y)
        return z.view(b, 2, 3).permute(0, 2, 1).contiguous()


class MultiOut(nn.Module):
    """A tuple-returning op (torch.max with dim) and a tuple model output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc(x)
        values, indices = torch.max(h, dim=1)
        return h.softmax(-1), values, indices


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.fc(x)
        return {"logits": h, "probs": torch.softmax(h, dim=-1)}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight  # shared weight, separate biases

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.fc(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        if x.sum() > 0:
            return x * 2
        return x


class Gate(nn.Module):
    """Data-dependent but harmless as a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 1e9:
            y = y * 0
        return torch.relu(y)


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.gate(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)) + x)


class Stack(nn.Module):
    def __init__(self, d=8, n=2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.mean(dim=-1)


class Attn(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids))


# ---- helpers -----------------------------------------------------------------------------
def annotated(gm):
    return [n for n in gm.graph.nodes if n.op != "output"]


def by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def assert_all_annotated(gm):
    for n in gm.graph.nodes:
        if n.op == "output":
            assert "partitioner" not in n.meta
            continue
        c = n.meta.get("partitioner")
        assert isinstance(c, NodeCost), n.name
        assert c is node_cost(n)
        assert c.bytes_moved == c.input_bytes + c.output_bytes + c.param_bytes
        assert c.flops >= 0 and c.param_bytes >= 0 and c.output_bytes >= 0
        assert c.flops_source in ("counter", "fallback")


def assert_same_outputs(a, b):
    flat_a = torch.utils._pytree.tree_leaves(a)
    flat_b = torch.utils._pytree.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        torch.testing.assert_close(x, y)


def conv_flops(n, cin, cout, k, hout, wout, groups=1):
    return 2 * n * cout * hout * wout * (cin // groups) * k * k


# ---- costs -------------------------------------------------------------------------------
def test_linear_flops_params_and_bytes():
    model = OneLinear()
    x = torch.randn(4, 64)
    gm = trace(model, (x,))
    assert_all_annotated(gm)
    c = node_cost(by_name(gm)["fc"])
    assert c.op == "linear"
    assert c.flops == 2 * 4 * 64 * 32
    assert c.flops_source == "counter"
    assert c.param_bytes == (64 * 32 + 32) * 4
    assert c.output_bytes == 4 * 32 * 4
    assert c.input_bytes == 4 * 64 * 4
    assert c.shapes == ((4, 32),)
    assert c.dtype == "float32"
    assert c.module_path == "fc"
    ph = node_cost(by_name(gm)["x"])
    assert ph.op == "input" and ph.output_bytes == 4 * 64 * 4 and ph.shapes == ((4, 64),)
    assert ph.flops == 0 and ph.param_bytes == 0


def test_conv_flops_match_formula_and_model_outputs():
    model = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model, (x,))
    assert_all_annotated(gm)
    nodes = by_name(gm)
    conv = node_cost(nodes["conv"])
    assert conv.op == "conv2d"
    assert conv.flops == conv_flops(2, 3, 8, 3, 8, 8)
    assert conv.shapes == ((2, 8, 8, 8),)
    assert conv.param_bytes == (8 * 3 * 3 * 3 + 8) * 4
    bn = node_cost(nodes["bn"])
    assert bn.op == "batchnorm2d" and bn.flops_source == "fallback"
    assert bn.flops == 5 * 2 * 8 * 8 * 8
    assert bn.param_bytes == (4 * 8) * 4 + 8  # weight, bias, running mean/var + int64 counter
    relu = node_cost(nodes["relu"])
    assert relu.op == "relu" and relu.flops == 2 * 8 * 8 * 8 and relu.flops_source == "fallback"
    pool = node_cost(nodes["pool"])
    assert pool.op == "adaptiveavgpool2d" and pool.flops == 2 * 8 * 8 * 8  # input elements
    flat = node_cost(nodes["flatten"])
    assert flat.op == "flatten" and flat.flops == 0 and flat.flops_source == "counter"
    assert node_cost(nodes["fc"]).flops == 2 * 2 * 8 * 5
    assert_same_outputs(gm(x), model(x))


def test_mixed_ops_trace_and_compute_same_outputs():
    model = Mixed()
    x = torch.randn(3, 2, 3)
    gm = trace(model, (x,))
    assert_all_annotated(gm)
    ops = {n.op: set() for n in gm.graph.nodes}
    for n in annotated(gm):
        ops[n.op].add(node_cost(n).op)
    assert {"view", "permute", "contiguous", "size"} <= ops["call_method"]
    assert {"split", "getitem", "cat", "add", "mul"} <= ops["call_function"]
    assert ops["get_attr"] == {"get_attr"}
    nodes = by_name(gm)
    size = node_cost(nodes["size"])
    assert size.output_bytes == 0 and size.shapes == () and size.dtype == "" and size.flops == 0
    gain = node_cost(nodes["gain"])
    assert gain.param_bytes == 6 * 4 and gain.output_bytes == 6 * 4
    assert node_cost(nodes["offset"]).param_bytes == 6 * 4
    split = node_cost(nodes["split"])
    assert split.shapes == ((3, 3), (3, 3)) and split.output_bytes == 2 * 3 * 3 * 4 and split.flops == 0
    getitems = [node_cost(n) for n in gm.graph.nodes if n.target is operator.getitem]
    assert len(getitems) == 2 and all(g.shapes == ((3, 3),) for g in getitems)
    view = node_cost(nodes["view"])
    assert view.flops == 0 and view.shapes == ((3, 6),)
    assert_same_outputs(gm(x), model(x))


def test_tuple_op_and_tuple_output():
    model = MultiOut()
    x = torch.randn(5, 8)
    gm = trace(model, (x,))
    assert_all_annotated(gm)
    nodes = by_name(gm)
    mx = next(n for n in annotated(gm) if node_cost(n).op == "max")
    c = node_cost(mx)
    assert c.shapes == ((5,), (5,))
    assert c.output_bytes == 5 * 4 + 5 * 8  # float32 values + int64 indices
    assert c.dtype == "float32"
    assert c.flops == 5 * 4  # reduction: one per input element
    idx = [node_cost(n) for n in mx.users]
    assert sorted(i.dtype for i in idx) == ["float32", "int64"]
    soft = node_cost(nodes["softmax"])
    assert soft.op == "softmax" and soft.flops == 5 * 5 * 4
    out = gm(x)
    assert isinstance(out, tuple) and len(out) == 3
    assert_same_outputs(out, model(x))


def test_dict_output():
    model = DictOut()
    x = torch.randn(2, 8)
    gm = trace(model, (x,))
    assert_all_annotated(gm)
    out = gm(x)
    assert set(out) == {"logits", "probs"}
    assert_same_outputs(out, model(x))


def test_shared_parameter_counted_once():
    model = Tied()
    gm = trace(model, (torch.randn(2, 16),))
    nodes = by_name(gm)
    assert node_cost(nodes["a"]).param_bytes == (16 * 16 + 16) * 4
    assert node_cost(nodes["b"]).param_bytes == 16 * 4  # only its own bias
    unique = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(node_cost(n).param_bytes for n in annotated(gm)) == unique


def test_module_called_twice_charges_params_once():
    gm = trace(Twice(), (torch.randn(2, 16),))
    mods = [node_cost(n) for n in gm.graph.nodes if n.op == "call_module"]
    assert [m.param_bytes for m in mods] == [(16 * 16 + 16) * 4, 0]
    assert all(m.flops == 2 * 2 * 16 * 16 for m in mods)


def test_fallback_norm_activation_reduction_and_module_paths():
    model = Stack(d=8, n=2)
    x = torch.randn(3, 8)
    gm = trace(model, (x,))
    assert_all_annotated(gm)
    costs = {n.name: node_cost(n) for n in annotated(gm)}
    norm = costs["layers_0_norm"]
    assert norm.op == "layernorm" and norm.flops == 5 * 3 * 8 and norm.flops_source == "fallback"
    assert norm.module_path == "layers.0.norm"
    relu = costs["relu"]
    assert relu.flops == 3 * 8 and relu.module_path == "layers.0"
    assert costs["add_1"].module_path == "layers.1"
    mean = costs["mean"]
    assert mean.op == "mean" and mean.flops == 3 * 8 and mean.module_path == ""
    assert_same_outputs(gm(x), model(x))


def test_sdpa_counted_on_cpu():
    b, h, lq, s, e = 2, 3, 16, 12, 8
    q, k, v = torch.randn(b, h, lq, e), torch.randn(b, h, s, e), torch.randn(b, h, s, e)
    gm = trace(Attn(), (q, k, v))
    c = next(node_cost(n) for n in gm.graph.nodes if n.op == "call_function")
    assert c.op == "scaled_dot_product_attention"
    assert c.flops == 4 * b * h * lq * s * e
    assert_same_outputs(gm(q, k, v), Attn()(q, k, v))


class SelfAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_multihead_attention_fast_path_is_not_undercounted():
    model = SelfAttn().eval()
    x = torch.randn(2, 5, 16)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    gm = trace(model, (x,))
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # restored
    c = node_cost(by_name(gm)["attn"])
    projections = 2 * 10 * 16 * 48 + 2 * 10 * 16 * 16
    scores = 2 * (2 * 2 * 5 * 5 * 8)  # QK^T and AV
    assert c.flops >= projections + scores
    assert c.param_bytes == sum(p.numel() * 4 for p in model.parameters())
    exported = trace(model, (x,), frontend="export")
    assert sum(node_cost(n).flops for n in annotated(exported)) == pytest.approx(c.flops)
    assert_same_outputs(gm(x), model(x))


def test_embedding_with_integer_input():
    model = Emb()
    ids = torch.tensor([[1, 2, 3], [4, 5, 19]])
    gm = trace(model, (ids,))
    nodes = by_name(gm)
    assert node_cost(nodes["ids"]).dtype == "int64"
    emb = node_cost(nodes["emb"])
    assert emb.op == "embedding" and emb.flops == 0 and emb.param_bytes == 20 * 8 * 4
    assert emb.shapes == ((2, 3, 8),)
    assert_same_outputs(gm(ids), model(ids))


def test_leaf_modules_make_untraceable_block_a_node():
    model = WithGate()
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(TraceError):
        trace(model, (x,))
    gm = trace(model, (x,), leaf_modules=(Gate,))
    assert_all_annotated(gm)
    gate = node_cost(by_name(gm)["gate"])
    assert gate.op == "gate" and gate.module_path == "gate"
    # the convolution (counter) plus mean and relu (fallback), all inside one leaf
    assert gate.flops == conv_flops(1, 4, 4, 1, 5, 5) + 2 * 4 * 5 * 5
    assert gate.flops_source == "fallback"
    assert gate.param_bytes == (4 * 4 + 4) * 4
    assert_same_outputs(gm(x), model(x))


def test_training_mode_buffers_are_restored():
    model = ConvNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, (torch.randn(2, 3, 16, 16),))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)


# ---- export frontend ---------------------------------------------------------------------
def test_export_frontend_on_conv_model():
    model = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    gm = trace(model, (x,), frontend="export")
    assert isinstance(gm, torch.fx.GraphModule)
    assert_all_annotated(gm)
    assert not any(n.target == "_guards_fn" for n in gm.graph.nodes)
    convs = [node_cost(n) for n in gm.graph.nodes if node_cost_op(n) in ("conv2d", "convolution")]
    assert len(convs) == 1
    assert convs[0].flops == conv_flops(2, 3, 8, 3, 8, 8)
    assert convs[0].module_path == "conv"
    weights = [node_cost(n) for n in gm.graph.nodes if n.op == "get_attr"]
    unique = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert sum(w.param_bytes for w in weights) == unique
    assert_same_outputs(gm(x), model(x))
    # both frontends price the model the same
    fx_total = sum(node_cost(n).flops for n in annotated(trace(model, (x,))))
    assert sum(node_cost(n).flops for n in annotated(gm)) == pytest.approx(fx_total)


def node_cost_op(n):
    return node_cost(n).op if n.op != "output" else "output"


class CondBranch(nn.Module):
    """The data-dependent branch of Branchy, rewritten with torch.cond."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t.clone(), (x,))


def test_export_handles_torch_cond():
    model = CondBranch()
    x = torch.randn(2, 4)
    gm = trace(model, (x,), frontend="export")
    assert_all_annotated(gm)
    cond = next(node_cost(n) for n in annotated(gm) if node_cost(n).op == "cond")
    assert cond.shapes == ((2, 4),)
    assert_same_outputs(gm(x), model(x))
    assert all(p.requires_grad for p in model.parameters())


def test_export_handles_tuple_outputs():
    model = MultiOut()
    x = torch.randn(5, 8)
    gm = trace(model, (x,), frontend="export")
    assert_all_annotated(gm)
    assert_same_outputs(gm(x), model(x))


# ---- errors ------------------------------------------------------------------------------
def test_data_dependent_control_flow_raises_trace_error():
    with pytest.raises(TraceError) as info:
        trace(Branchy(), (torch.randn(2, 4),))
    err = info.value
    assert isinstance(err, PartitionerError)
    text = str(err)
    assert "Branchy" in text
    assert "if x.sum() > 0:" in text
    assert "test_trace.py:" in text
    assert "export" in text and err.hint and "export" in err.hint


def test_export_failure_is_wrapped():
    with pytest.raises(TraceError) as info:
        trace(Branchy(), (torch.randn(2, 4),), frontend="export")
    assert "Branchy" in str(info.value)


def test_wrong_input_shape_raises_trace_error():
    model = OneLinear()
    with pytest.raises(TraceError) as info:
        trace(model, (torch.randn(4, 63),))
    text = str(info.value)
    assert "'fc'" in text and "linear" in text and "(4, 63)" in text
    with pytest.raises(TraceError) as info:
        trace(model, (torch.randn(4, 63),), frontend="export")
    assert "(4, 63)" in str(info.value)


def test_wrong_number_of_inputs_raises_trace_error():
    with pytest.raises(TraceError, match="takes 1 input"):
        trace(OneLinear(), (torch.randn(4, 64), torch.randn(4, 64)))
    with pytest.raises(TraceError, match="input"):
        trace(OneLinear(), ())


def test_bad_arguments_raise_trace_error():
    with pytest.raises(TraceError, match="frontend"):
        trace(OneLinear(), (torch.randn(1, 64),), frontend="onnx")
    with pytest.raises(TraceError, match="nn.Module"):
        trace(lambda x: x, (torch.randn(1),))
    gm = trace(OneLinear(), (torch.randn(1, 64),))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with pytest.raises(TraceError):
        node_cost(out)


# ---- scale and integration ---------------------------------------------------------------
def test_large_graph_and_lowering_to_cost_graph():
    from partitioner.ir.graph import from_fx

    model = nn.Sequential(*[m for _ in range(300) for m in (nn.Linear(4, 4), nn.ReLU())])
    x = torch.randn(2, 4)
    gm = trace(model, (x,))
    assert len(annotated(gm)) == 601
    assert sum(node_cost(n).flops for n in annotated(gm)) == 300 * (2 * 2 * 4 * 4 + 2 * 4)
    cg = from_fx(gm, "seq")
    assert len(cg.nodes) == 600
    assert_same_outputs(gm(x), model(x))
