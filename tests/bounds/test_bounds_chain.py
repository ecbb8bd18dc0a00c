"""The chain bound (partitioner.bounds.chain): at most the exact optimum (brute force and the
MILP) on small random DAGs, stronger than the path and LP parts where branches contend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bounds import brute_latency, independent_labels, make_problem

from partitioner.bounds import chain as C
from partitioner.bounds import lower as B
from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.settings import Settings
from partitioner.ir.spec import parse_spec
from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import solve

REL = 1e-9


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), n=st.integers(2, 6), D=st.integers(2, 3), tight=st.booleans())
def test_chain_below_brute_force(seed, n, D, tight):
    """Every placement x every per-device order, evaluated: the chain part is at most the optimum."""
    p = make_problem(seed, n, D, "latency", tight_memory=tight)
    opt = brute_latency(p) if D == 2 or n <= 5 else math.inf
    if not math.isfinite(opt):
        return
    value, _ = C.chain_bound(p, B.path_labels(p))
    assert value <= opt * (1 + REL), (value, opt)


@pytest.mark.parametrize("seed", range(6))
def test_chain_below_milp_optimum(seed):
    """Larger DAGs (10-13 nodes, 2-3 devices): at most the MILP's proven optimum."""
    p = make_problem(500 + seed, 10 + seed % 4, 2 + seed % 2, "latency", groups=False)
    plan = solve(p, "milp", Settings(seed=0, time_limit=60))
    if plan.status != "optimal":
        pytest.skip(f"MILP not proven optimal ({plan.status})")
    value, info = C.chain_bound(p, B.path_labels(p))
    assert value <= evaluate(p, plan).latency * (1 + 1e-6), (value, evaluate(p, plan).latency, info)
    assert B.lower_bound(p).value <= evaluate(p, plan).latency * (1 + 1e-6)


def fork_join(k: int, t: float, nbytes: float, depth: int = 1, diamond: bool = False) -> Problem:
    """A source, ``k`` parallel branches of time ``t`` per node and a sink on two identical
    GPUs joined through a host that is too slow to help: branches on one GPU serialise, on
    the other they pay two transfers. A branch is a chain of ``depth`` nodes, or with
    ``diamond`` two nodes feeding a third."""
    if diamond:
        br = [[f"x{i}", f"y{i}", f"z{i}"] for i in range(k)]
        inner = [(b[0], b[2], nbytes) for b in br] + [(b[1], b[2], nbytes) for b in br]
        heads = [b[:2] for b in br]
    else:
        br = [[f"b{i}" if depth == 1 else f"b{i}_{j}" for j in range(depth)] for i in range(k)]
        inner = [(b[j], b[j + 1], nbytes) for b in br for j in range(depth - 1)]
        heads = [b[:1] for b in br]
    nodes = [Node(id="s")] + [Node(id=x) for b in br for x in b] + [Node(id="j")]
    edges = [("s", h, nbytes) for hs in heads for h in hs] + [(b[-1], "j", nbytes) for b in br] + inner
    g = CostGraph("fj", nodes, edges, [InputTensor("x", 1000, ("s",))], [("j", 1000)])
    dev = lambda i, kind: {"id": i, "host": "h", "kind": kind, "memory": {"capacity_bytes": 1e12}}  # noqa: E731
    spec = parse_spec({"name": "fj", "devices": [dev("cpu0", "cpu"), dev("g1", "gpu"), dev("g2", "gpu")],
                       "links": [{"a": "cpu0", "b": "g1", "bandwidth_Bps": 1e10, "latency_s": 1e-5},
                                 {"a": "cpu0", "b": "g2", "bandwidth_Bps": 1e10, "latency_s": 1e-5}]})
    T = np.array([[1.0, t, t]] * len(nodes))
    T[0] = T[-1] = [1.0, 1e-5, 1e-5]
    return Problem(g, spec, "latency", T=T)


def test_chain_sees_contention_the_lps_miss():
    """Four diamonds of three 10 us nodes, transfers of 40 us per hop: the optimum runs them
    on one GPU one after the other; the path part sees each join's inputs contend but not
    the diamonds with one another, the LPs spread them over both GPUs."""
    p = fork_join(4, 1e-5, 3e5, diamond=True)
    b = B.lower_bound(p)
    opt = solve(p, "cpsat", Settings(seed=0, time_limit=60))
    assert opt.status == "optimal"
    assert b.binding == "chain"
    assert b.parts["chain"] > 1.15 * max(b.parts["path"], b.parts["coupled"])
    assert b.value <= evaluate(p, opt).latency * (1 + 1e-6)
    assert b.value >= evaluate(p, opt).latency * 0.95  # transfers to and from the host are all the rest


@pytest.mark.parametrize("depth", [1, 2])
def test_path_sees_contention_at_a_join(depth):
    """Chain branches: the join's inputs, each with the chain that feeds only it, either ran
    on its GPU one at a time or pay the transfers, so the path part alone reaches the
    optimum; v1's labels, pricing each input on its own, see one branch."""
    p = fork_join(4, 1e-5, 3e5, depth=depth)
    b = B.lower_bound(p)
    opt = evaluate(p, solve(p, "milp", Settings(seed=0, time_limit=60))).latency
    head, tail = independent_labels(p)
    assert b.parts["path"] <= opt * (1 + 1e-9)
    assert b.parts["path"] >= opt * 0.99
    assert b.parts["path"] > 1.3 * float((head + tail).min(axis=1).max())


def test_chain_budget_zero_falls_back_to_segment_paths(monkeypatch):
    """Without CP-SAT time the segments keep their path values: still a bound (at most the
    optimum), at least the forward labels along the chain (v1's path here), and
    deterministic."""
    p = fork_join(4, 1e-5, 3e5, diamond=True)
    monkeypatch.setitem(C.LIMITS, "chain_det", 0.0)
    lab = B.path_labels(p)
    value, info = C.chain_bound(p, lab)
    assert info["chain_cpsat"] == 0
    head, tail = independent_labels(p)
    assert value >= float((head + tail).min(axis=1).max()) * (1 - 1e-9)
    assert value >= float(lab.head[-1].min() + lab.tail[-1].min()) * (1 - 1e-9)
    assert value <= evaluate(p, solve(p, "cpsat", Settings(seed=0, time_limit=60))).latency * (1 + 1e-9)
    assert C.chain_bound(p, lab)[0] == value


def test_critical_chain_is_a_path():
    p = make_problem(7, 20, 3, "latency")
    chain = C.critical_chain(p, B.path_labels(p))
    assert all(b in p.succs[a] for a, b in zip(chain, chain[1:]))
    assert not p.preds[chain[0]] and not p.succs[chain[-1]]
