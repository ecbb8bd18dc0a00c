"""Tests for the benchmark model zoo (``models``)."""

from __future__ import annotations

import inspect

import pytest
import torch
from partitioner.zoo import ZOO, get_model, list_models
from partitioner.zoo.randwire import GENERATORS, RandomDag, random_dag
from torch import fx

# Default-config example inputs: (model name, expected output shape).
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "resnet18": (1, 1000),
    "resnet50": (1, 1000),
    "inception": (1, 1000),
    "bert": (1, 128, 256),
    "randwire-ws": (1, 1000),
    "randwire-er": (1, 1000),
    "randwire-ba": (1, 1000),
}


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_runs_and_traces(name: str, expected: tuple[int, ...], **kwargs: object) -> None:
    model, inputs = get_model(name, **kwargs)
    assert not model.training
    assert isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs)
    with torch.no_grad():
        out = model(*inputs)
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        out_traced = traced(*inputs)
    torch.testing.assert_close(out_traced, out, rtol=0, atol=0)


def test_zoo_covers_every_default_entry() -> None:
    llms = {n for n in ZOO if n.startswith(("llama", "gpt2"))}  # tests/test_llm.py
    assert set(DEFAULT_SHAPES) | {"bert-base"} | llms == set(ZOO)


@pytest.mark.parametrize("name", [n if n in ("resnet18", "bert") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(DEFAULT_SHAPES)])
def test_default_model_runs_and_traces(name: str) -> None:
    _check_runs_and_traces(name, DEFAULT_SHAPES[name])


def test_bert_base_structure_and_trace() -> None:
    # Short sequence keeps the forward cheap; the structure is bert-base's.
    model, (ids,) = get_model("bert-base", seq=16, pooler=True)
    assert _param_count(model) == 109_482_240  # HF bert-base-uncased BertModel
    pooler = model.pooler  # type: ignore[attr-defined]
    assert _param_count(model) - _param_count(pooler) == 108_891_648  # without the pooler
    assert ids.dtype == torch.long and tuple(ids.shape) == (1, 16)
    layers = model.encoder  # type: ignore[attr-defined]
    assert len(layers) == 12
    assert layers[0].attention.heads == 12 and layers[0].intermediate.out_features == 3072
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(ids), model(ids), rtol=0, atol=0)
    assert tuple(traced(ids).shape) == (1, 768)
    defaults = {k: v.default for k, v in inspect.signature(ZOO["bert-base"]).parameters.items()}
    assert defaults == {"seq": 128, "batch": 1, "pooler": False}


def test_bert_operator_level_graph() -> None:
    model, _ = get_model("bert", layers=1)
    gm = fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.matmul) == 2
    assert torch.softmax in targets
    assert "permute" in targets and "unflatten" in targets
    linears = [t for t in targets if isinstance(t, str) and t.startswith("encoder.0.")]
    for sub in ("query", "key", "value", "attention_output", "intermediate", "output"):
        assert f"encoder.0.{sub}" in linears or f"encoder.0.attention.{sub}" in linears


def test_bert_pooler_and_batch_seq() -> None:
    model, (ids,) = get_model("bert", batch=3, seq=20, pooler=True, layers=2)
    assert tuple(ids.shape) == (3, 20)
    with torch.no_grad():
        out = model(ids)
    assert tuple(out.shape) == (3, 256)
    assert out.abs().max() <= 1.0  # tanh
    # One model accepts other sequence lengths (position ids come from the input).
    with torch.no_grad():
        assert tuple(model(ids[:, :7]).shape) == (3, 256)


def test_bert_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        get_model("bert", hidden=250, heads=4)
    with pytest.raises(ValueError):
        get_model("bert", seq=1000)


def test_resnet_parameter_counts_match_torchvision() -> None:
    model, _ = get_model("resnet50", image=32)
    assert _param_count(model) == 25_557_032
    assert _param_count(get_model("resnet18", image=32)[0]) == 11_689_512
    # Stride in the 3x3 conv (v1.5) and a conv1x1+BN downsample.
    block = model.layer2[0]  # type: ignore[attr-defined]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].kernel_size == (1, 1) and block.downsample[0].stride == (2, 2)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_resnet_batch_and_image_kwargs() -> None:
    _check_runs_and_traces("resnet50", (2, 1000), batch=2, image=64)


def test_inception_has_four_branch_concat() -> None:
    model, _ = get_model("inception", image=64)
    gm = fx.symbolic_trace(model)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 9
    assert all(len(n.args[0]) == 4 for n in cats)


def test_models_are_deterministic() -> None:
    cases: list[tuple[str, dict[str, int]]] = [
        ("resnet18", {"image": 32}),
        ("bert", {"layers": 1}),
        ("randwire-ws", {"nodes": 8, "image": 32}),
    ]
    for name, kwargs in cases:
        m1, x1 = get_model(name, **kwargs)
        m2, x2 = get_model(name, **kwargs)
        for a, b in zip(x1, x2):
            assert torch.equal(a, b)
        for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)


def test_factories_do_not_disturb_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    get_model("bert", layers=1)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_randwire_same_seed_same_graph(generator: str) -> None:
    name = f"randwire-{generator}"
    m1, _ = get_model(name, nodes=16, seed=7, image=32)
    m2, _ = get_model(name, nodes=16, seed=7, image=32)
    m3, _ = get_model(name, nodes=16, seed=8, image=32)
    d1, d2, d3 = m1.dags(), m2.dags(), m3.dags()  # type: ignore[operator]
    assert len(d1) == 3
    assert d1 == d2
    assert d1 != d3
    # Stages of one network are drawn with distinct seeds.
    assert len({d.edges for d in d1}) == 3
    g1 = fx.symbolic_trace(m1).graph
    g2 = fx.symbolic_trace(m2).graph
    assert [(n.op, str(n.target)) for n in g1.nodes] == [(n.op, str(n.target)) for n in g2.nodes]


@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_random_dag_is_a_valid_dag(generator: str) -> None:
    dag = random_dag(generator, 32, seed=0)
    assert isinstance(dag, RandomDag)
    assert all(u < v for u, v in dag.edges)
    assert len(set(dag.edges)) == len(dag.edges)
    assert dag.inputs and dag.outputs
    assert 0 in dag.inputs  # node 0 can have no predecessor
    for v, preds in enumerate(dag.preds):
        assert all(u < v for u in preds)
    succ = {u for u, _ in dag.edges}
    assert set(dag.outputs) == set(range(32)) - succ
    assert random_dag(generator, 32, seed=0) == dag


def test_random_dag_generator_parameters() -> None:
    sparse = random_dag("er", 40, seed=1, p=0.05)
    dense = random_dag("er", 40, seed=1, p=0.5)
    assert len(sparse.edges) < len(dense.edges)
    ws = random_dag("ws", 20, seed=0, k=6, p=0.0)  # no rewiring: the ring lattice
    assert len(ws.edges) == 20 * 6 // 2
    ba = random_dag("ba", 20, seed=0, m=2)
    assert len(ba.edges) == 2 * (20 - 2)
    with pytest.raises(ValueError):
        random_dag("xx", 10, seed=0)
    with pytest.raises(ValueError):
        random_dag("ws", 10, seed=0, k=3)
    with pytest.raises(ValueError):
        random_dag("ba", 10, seed=0, p=0.5)


def test_randwire_node_count_scales() -> None:
    small, _ = get_model("randwire-ws", nodes=8, image=32)
    big, _ = get_model("randwire-ws", nodes=64, image=32)
    n_small = len(fx.symbolic_trace(small).graph.nodes)
    n_big = len(fx.symbolic_trace(big).graph.nodes)
    assert n_big > 4 * n_small


def test_randwire_regular_regime() -> None:
    kwargs = {"regime": "regular", "nodes": 12, "channels": 16, "image": 64, "batch": 2}
    model, (x,) = get_model("randwire-ws", **kwargs)
    assert len(model.dags()) == 4  # type: ignore[operator]
    assert model.dags()[0].nodes == 6  # type: ignore[operator]
    assert tuple(x.shape) == (2, 3, 64, 64)
    _check_runs_and_traces("randwire-ba", (2, 1000), **kwargs)


def test_list_models() -> None:
    entries = list_models()
    names = [n for n, _ in entries]
    assert names == list(ZOO)
    assert all(isinstance(d, str) and d and "\n" not in d for _, d in entries)
    required = ["resnet50", "inception", "bert", "bert-base"]
    required += ["randwire-ws", "randwire-er", "randwire-ba"]
    assert set(required) <= set(names)


def test_get_model_unknown_name() -> None:
    with pytest.raises(KeyError) as info:
        get_model("resnet51")
    message = str(info.value)
    assert "resnet51" in message
    for name in ZOO:
        assert name in message


def test_get_model_bad_kwarg() -> None:
    with pytest.raises(TypeError):
        get_model("resnet50", nonsense=1)
