"""The cuts bound (partitioner.bounds.cuts, issue 19): the transfers and slow devices that the
accelerators' capacities force onto a path, below the brute-force optimum, and binding where
neither the memory-blind path bound nor the transfer-blind load LP sees them."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from instances import chain_graph, tight_spec
from test_bounds import brute_latency

from partitioner.bounds.cuts import _heaviest_path, cuts_bound
from partitioner.bounds.lower import lower_bound, path_labels
from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.machine.problem import Problem


def _weights(g: CostGraph) -> float:
    return max(float(sum(n.param_bytes for n in g.nodes)), 1e6)


@hsettings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(3, 6), factor=st.sampled_from([1.05, 1.3, 1.8]),
       blocks=st.booleans(), mixed=st.booleans(), ring=st.booleans())
def test_cuts_bound_below_brute_force(seed, n, factor, blocks, mixed, ring):
    g = chain_graph(seed, n, skip=0.4)
    p = Problem(g, tight_spec(_weights(g), 2, factor, blocks=blocks, mixed=mixed, ring=ring))
    lab = path_labels(p)
    cuts, _ = cuts_bound(p, lab.head, lab.tail, lab.T)
    opt = brute_latency(p)
    assert np.isfinite(opt)
    assert cuts <= opt * (1 + 1e-9), (cuts, opt)
    assert lower_bound(p).value <= opt * (1 + 1e-9)


def heavy_chain(n: int = 5, input_bytes: float = 1_000) -> CostGraph:
    """Equal short layers with 4 MB of weights and 1 MB activations: an accelerator holding
    16 MB runs three of them."""
    nodes = [Node(id=f"l{i}", op="matmul", flops=4e8, param_bytes=4_000_000, output_bytes=1_000_000)
             for i in range(n)]
    edges = [(f"l{i}", f"l{i + 1}", 1_000_000) for i in range(n - 1)]
    return CostGraph("heavy", nodes, edges, [InputTensor("x", input_bytes, ("l0",))], [("l4", 1_000)])


def test_cuts_bind_where_memory_forces_a_transfer():
    """Five layers, two accelerators holding three each: every plan either cuts the chain
    between the accelerators (a transfer through the host's links, two hops) or runs layers on
    the slow host. The cuts part sees it; the other parts do not, and it stays below the optimum."""
    g = heavy_chain()
    p = Problem(g, tight_spec(_weights(g), 2, 1.6))
    b = lower_bound(p)
    others = max(v for k, v in b.parts.items() if k != "cuts")
    assert b.binding == "cuts" and b.parts["cuts"] > 1.3 * others, b.parts
    opt = brute_latency(p)
    assert b.value <= opt * (1 + 1e-9) and b.value >= 0.9 * opt, (b.value, opt)
    assert b.info["cuts_runs"] == 2
    # with room for the whole model on one accelerator no cut is forced: the part is no more than `path`
    roomy = Problem(g, tight_spec(_weights(g), 2, 2.5))
    lab = path_labels(roomy)
    assert cuts_bound(roomy, lab.head, lab.tail, lab.T)[0] <= lower_bound(roomy).parts["path"] * (1 + 1e-9)


def test_heaviest_path_follows_the_weights():
    g = chain_graph(3, 8, skip=0.6)
    p = Problem(g, tight_spec(_weights(g), 2, 1.1))
    w = np.ones(p.n)
    path, nbytes = _heaviest_path(p, w)
    assert path == list(range(p.n)) and len(nbytes) == p.n - 1  # the chain itself is the longest
    assert all(j in p.succs[i] for i, j in zip(path, path[1:]))


def test_cuts_bound_survives_a_host_whose_inputs_exceed_its_memory():
    """The host's usable capacity minus the model's inputs and outputs can be negative: the
    plan is infeasible, and the bound must say so cleanly (or stay finite), never crash."""
    from partitioner.errors import InfeasibleError
    from partitioner.ir.spec import parse_spec

    g = heavy_chain(input_bytes=2e9)
    dev = lambda i, k, cap: {"id": i, "host": "h", "kind": k, "peak_flops": {"fp32": 1e13},  # noqa: E731
                             "memory": {"capacity_bytes": cap, "bandwidth_Bps": 1e12}}
    spec = parse_spec({"name": "small-host", "memory_reserve": 0.0,
                       "devices": [dev("cpu0", "cpu", 1e9), dev("acc0", "accelerator", 1e10),
                                   dev("acc1", "accelerator", 1e10)],
                       "links": [{"a": "cpu0", "b": "acc0", "bandwidth_Bps": 1e10},
                                 {"a": "cpu0", "b": "acc1", "bandwidth_Bps": 1e10}]})
    p = Problem(g, spec)
    assert p.capacity[p.host] < 0
    lab = path_labels(p)
    value, _ = cuts_bound(p, lab.head, lab.tail, lab.T)
    assert np.isfinite(value)
    try:
        assert np.isfinite(lower_bound(p).value)
    except InfeasibleError:
        pass
