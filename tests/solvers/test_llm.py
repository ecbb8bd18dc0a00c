"""LLM zoo models (Llama-style and GPT-2-style decoders), meta-device tracing, the KV cache as
resident bytes, and the LLM hardware specs."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from partitioner.zoo.gpt2 import gpt2
from partitioner.zoo.llama import CONFIGS, cost_graph, llama, param_count

from partitioner.ir.settings import Settings
from partitioner.ir.spec import load_spec
from partitioner.machine.evaluate import evaluate
from partitioner.machine.links import link_table
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import solve

gpt2mod = importlib.import_module("models.gpt2")  # the attribute `models.gpt2` is the factory
llamamod = importlib.import_module("models.llama")


def test_llama_tiny_runs_with_gqa_and_kv_cache():
    cfg = CONFIGS["llama-tiny"]
    assert cfg.kv_heads < cfg.heads  # grouped-query attention
    model, (ids,) = llama("llama-tiny", batch=2, seq=8)
    assert model(ids).shape == (2, 8, cfg.vocab)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    cached, (ids2,) = llama("llama-tiny", batch=2, seq=8, kv_cache_tokens=5)
    out = cached(ids2)
    assert out.shape == (2, 8, cfg.vocab) and torch.isfinite(out).all()
    # causality: the logits of the first tokens do not depend on later ones
    ids3 = ids.clone()
    ids3[:, -1] = (ids3[:, -1] + 1) % cfg.vocab
    assert torch.allclose(model(ids3)[:, :-1], model(ids)[:, :-1], atol=1e-5)
    assert not torch.allclose(model(ids3)[:, -1], model(ids)[:, -1])


def test_meta_trace_matches_cpu_trace():
    cpu_model, cpu_in = llama("llama-tiny", batch=1, seq=16)
    meta_model, meta_in = llama("llama-tiny", batch=1, seq=16, device="meta")
    assert meta_in[0].device.type == "meta" and next(meta_model.parameters()).device.type == "meta"
    a, b = cost_graph(cpu_model, cpu_in, "t"), cost_graph(meta_model, meta_in, "t")
    assert a.order == b.order
    for x, y in zip(a.nodes, b.nodes):
        assert (x.op, x.param_bytes, x.output_bytes) == (y.op, y.param_bytes, y.output_bytes)
        assert x.flops == pytest.approx(y.flops)
    buffers = sum(t.numel() * t.element_size() for t in cpu_model.buffers())
    assert sum(n.param_bytes for n in b.nodes) == param_count(CONFIGS["llama-tiny"]) * 4 + buffers


def test_export_frontend_traces_llama():
    model, inputs = llama("llama-tiny", batch=1, seq=8)
    g = cost_graph(model, inputs, "t", frontend="export")
    assert len(g) > 100
    assert sum(n.param_bytes for n in g.nodes) >= param_count(CONFIGS["llama-tiny"]) * 4


def test_large_configs_on_meta_without_weights():
    model, (ids,) = llama("llama-70b", layers=2)  # a 2-layer slice of the 70B-class width
    assert ids.device.type == "meta" and all(p.device.type == "meta" for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float16
    cfg = CONFIGS["llama-70b"]
    assert (cfg.layers, cfg.dim, cfg.heads, cfg.kv_heads, cfg.ffn) == (80, 8192, 64, 8, 28672)
    assert 68e9 < param_count(cfg) < 70e9
    g = cost_graph(model, (ids,), "slice")
    rope = 2 * cfg.max_position * cfg.head_dim * 2  # cos and sin tables, fp16
    two = param_count(llamamod.LlamaConfig(**{**cfg.__dict__, "layers": 2}))
    assert sum(n.param_bytes for n in g.nodes) == two * 2 + rope
    qproj = next(n for n in g.nodes if n.module_path == "layers.0.attn.q_proj")
    assert qproj.flops == pytest.approx(2 * 128 * 8192 * 8192)
    assert gpt2mod.param_count(gpt2mod.CONFIGS["gpt2"]) == 124_439_808


def test_kv_cache_is_resident_bytes_on_the_layers():
    base_model, base_in = llama("llama-tiny", batch=2, seq=4, device="meta")
    kv_model, kv_in = llama("llama-tiny", batch=2, seq=4, kv_cache_tokens=100, device="meta")
    base, kv = cost_graph(base_model, base_in, "b"), cost_graph(kv_model, kv_in, "k")
    cfg = CONFIGS["llama-tiny"]
    per_layer = 2 * 2 * cfg.kv_heads * 100 * cfg.head_dim * 4  # k and v, batch 2, fp32
    caches = [n for n in kv.nodes if n.op == "get_attr" and n.id.endswith(("k_cache", "v_cache"))]
    assert len(caches) == 2 * cfg.layers
    assert sum(n.param_bytes for n in caches) == cfg.layers * per_layer
    assert 104 <= cfg.max_position  # the rotary tables already cover the cached positions
    assert sum(n.param_bytes for n in kv.nodes) - sum(n.param_bytes for n in base.nodes) == cfg.layers * per_layer
    assert all(n.module_path.startswith("layers.") for n in caches)
    mm = lambda g: sum(n.flops for n in g.nodes if n.op == "matmul")  # noqa: E731
    assert mm(kv) > mm(base)  # attention covers the cached tokens


def test_gpt2_tiny_tied_head_counted_once():
    model, (ids,) = gpt2("gpt2-tiny", batch=2, seq=8)
    assert model(ids).shape == (2, 8, 256)
    g = cost_graph(model, (ids,), "g")
    assert sum(n.param_bytes for n in g.nodes) == gpt2mod.param_count(gpt2mod.CONFIGS["gpt2-tiny"]) * 4
    kv_model, kv_in = gpt2("gpt2-tiny", batch=2, seq=8, kv_cache_tokens=3)
    assert kv_model(*kv_in).shape == (2, 8, 256)


def test_llm_specs():
    het = load_spec("hetero-2server")
    gpus = [d for d in het.devices if d.kind == "gpu"]
    assert sorted(d.model for d in gpus) == ["a100-pcie-80gb"] * 2 + ["v100-sxm2-32gb"] * 4
    assert len({d.host for d in het.devices}) == 2
    usable = [d.memory.capacity_bytes * (1 - het.memory_reserve) for d in het.devices]
    weights_70b = param_count(CONFIGS["llama-70b"]) * 2
    assert weights_70b > max(usable) and weights_70b < sum(usable)  # fits on no single device
    t = link_table(het)
    hops = (("gpu0", "cpu0"), ("cpu0", "cpu1"), ("cpu1", "gpu4"))  # store and forward over 100 GbE
    assert t.transfer_time("gpu0", "gpu4", 1e6) == pytest.approx(sum(t.transfer_time(a, b, 1e6) for a, b in hops))
    h = load_spec("h100-server")
    hg = [d.id for d in h.devices if d.kind == "gpu"]
    assert len(hg) == 8 and all(d.peak("float16") > 9e14 for d in h.devices if d.kind == "gpu")
    links = {frozenset((ln.a, ln.b)): ln.bandwidth_Bps for ln in h.links}
    assert all(links[frozenset(p)] == 450e9 for p in itertools.combinations(hg, 2))


def test_symmetry_on_a_70b_slice_on_the_hetero_spec():
    model, inputs = llama("llama-70b", layers=4, seq=64)
    g = cost_graph(model, inputs, "llama-70b-slice")
    for objective in ("latency", "throughput"):
        p = Problem(g, load_spec("hetero-2server"), objective)
        plan = solve(p, "symmetry", Settings())
        ev = evaluate(p, plan)
        assert ev.feasible and plan.info["symmetry"] and plan.info["blocks"] == 4
        assert plan.claimed == pytest.approx(ev.value(objective))


def test_meta_model_compiles_without_an_artifact(tmp_path):
    """A model on the meta device has no weights: compile writes the plan and says so."""
    from partitioner import api
    from partitioner.cli import run as cli_run

    model, inputs = llama("llama-tiny", batch=1, seq=8, device="meta")
    res = api.compile_plan(api.load_model(model, inputs), "hetero-2server", "latency", "symmetry")
    note = cli_run.write_artifact(res, tmp_path)
    assert "meta device" in note and not any(tmp_path.iterdir())
