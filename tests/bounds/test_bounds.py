"""Lower bounds (partitioner.bounds.lower): every part is at most every plan's value and at most
the brute-force optimum; the coupled LP dominates the v1 parts; size fallbacks stay valid."""

from __future__ import annotations

import itertools
import logging
import math
import random
import time

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.bounds import lower as B
from partitioner.bounds import lp as bounds_lp
from partitioner.errors import InfeasibleError
from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.plan import Constraints, Plan
from partitioner.ir.settings import Settings
from partitioner.ir.spec import parse_spec
from partitioner.machine.evaluate import evaluate
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import solve

HEURISTICS = ("heft", "greedy", "single")
REL = 1e-9


# ---- instances ---------------------------------------------------------------------------

def make_spec(rng: random.Random, D: int, blocks: bool, capacity: float = 1e12):
    """cpu0 (host) plus D-1 gpus; each gpu linked to the host or to an earlier gpu, some
    extra links; everything else routes through others (store and forward)."""
    devs = [{"id": "cpu0", "host": "h0", "kind": "cpu", "memory": {"capacity_bytes": capacity}}]
    devs += [{"id": f"g{k}", "host": f"h{rng.randint(0, 1)}", "kind": "gpu", "memory": {"capacity_bytes": capacity}}
             for k in range(1, D)]
    ids = [d["id"] for d in devs]
    links, seen = [], set()

    def link(a, b):
        if a != b and frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            links.append({"a": ids[a], "b": ids[b], "bandwidth_Bps": 10 ** rng.uniform(8.5, 10.5),
                          "latency_s": 10 ** rng.uniform(-6, -4)})

    for k in range(1, D):
        link(k, 0 if rng.random() < 0.7 else rng.randrange(k))
    for a, b in itertools.combinations(range(D), 2):
        if rng.random() < 0.3:
            link(a, b)
    return parse_spec({"name": "t", "comm_blocks_device": blocks, "devices": devs, "links": links})


def make_problem(seed: int, n: int, D: int, objective: str = "latency", p: float | None = None,
                 blocks: bool | None = None, tight_memory: bool = False, groups: bool = True) -> Problem:
    """A random DAG on a random spec: heterogeneous times, some ops unsupported off the host,
    varied edge sizes (several per producer at times), inputs, outputs, groups."""
    rng = random.Random(seed)
    p = rng.uniform(0.15, 0.5) if p is None else p
    blocks = rng.random() < 0.3 if blocks is None else blocks
    nodes, edges = [], []
    for i in range(n):
        grp = f"G{i // 2}" if groups and i % 2 == 0 and i + 1 < n and rng.random() < 0.15 else None
        if grp is None and groups and i % 2 == 1 and nodes and nodes[-1].group == f"G{(i - 1) // 2}":
            grp = nodes[-1].group
        nodes.append(Node(id=f"v{i}", param_bytes=rng.randint(0, 10 ** 6), output_bytes=10 ** 5, group=grp))
        out_b = 10 ** rng.uniform(3, 7)
        for j in range(i):
            if rng.random() < p:
                edges.append((f"v{j}", f"v{i}", out_b if rng.random() < 0.7 else 10 ** rng.uniform(3, 7)))
    has_pred = {v for _, v, _ in edges}
    has_succ = {u for u, _, _ in edges}
    srcs = tuple(x.id for x in nodes if x.id not in has_pred)
    inputs = [InputTensor("x", int(10 ** rng.uniform(3, 6.5)), srcs)]
    if n > 2 and rng.random() < 0.5:
        inputs.append(InputTensor("y", int(10 ** rng.uniform(3, 6)), (f"v{rng.randrange(n)}",)))
    outputs = [(x.id, 10 ** rng.uniform(3, 6)) for x in nodes if x.id not in has_succ]
    if rng.random() < 0.3:
        outputs.append((f"v{rng.randrange(n)}", 10 ** rng.uniform(3, 6)))
    g = CostGraph(f"r{seed}", nodes, edges, inputs, outputs)
    speed = [1.0] + [10 ** rng.uniform(-1, 1) for _ in range(D - 1)]
    T = np.array([[10 ** rng.uniform(-4, -2) / speed[d] * rng.uniform(0.5, 2) for d in range(D)] for _ in range(n)])
    T[:, 1:][np.array([[rng.random() < 0.15 for _ in range(D - 1)] for _ in range(n)], dtype=bool)] = math.inf
    cap = 1e12
    if tight_memory:
        cap = sum(x.param_bytes for x in nodes) * rng.uniform(0.4, 0.8) + 2e6
    spec = make_spec(rng, D, blocks, cap)
    return Problem(g, spec, objective, Constraints(memory=True), T=T)


def large_problem(n: int, D: int, objective: str = "latency", seed: int = 0) -> Problem:
    """A DNN-like DAG (each node reads one or two recent nodes) for timing."""
    rng = random.Random(seed)
    nodes = [Node(id=f"v{i}", param_bytes=rng.randint(0, 10 ** 6), output_bytes=10 ** 5) for i in range(n)]
    edges = []
    for i in range(1, n):
        for j in sorted(set(rng.randint(max(0, i - 8), i - 1) for _ in range(1 + (rng.random() < 0.4)))):
            edges.append((f"v{j}", f"v{i}", 10 ** rng.uniform(4, 6.5)))
    g = CostGraph("big", nodes, edges, [InputTensor("x", 600_000, ("v0",))], [(f"v{n - 1}", 4000)])
    speed = [1.0] + [rng.uniform(3, 20) for _ in range(D - 1)]
    T = np.array([[10 ** rng.uniform(-5, -3) / speed[d] for d in range(D)] for _ in range(n)])
    T[:, -1][np.array([rng.random() < 0.1 for _ in range(n)])] = math.inf
    return Problem(g, make_spec(rng, D, False), objective, T=T)


# ---- brute force -------------------------------------------------------------------------

def _orders(problem: Problem, pl):
    """Per-device orders of every topological order (all semi-active schedules)."""
    g = nx.DiGraph()
    g.add_nodes_from(range(problem.n))
    g.add_edges_from((u, v) for u in range(problem.n) for v in problem.succs[u])
    seen = set()
    for topo in nx.all_topological_sorts(g):
        od = tuple(tuple(v for v in topo if pl[v] == d) for d in range(problem.D))
        if od not in seen:
            seen.add(od)
            yield od


def _placements(problem: Problem, devices):
    A = B.allowed_mask(problem)
    choices = [[d for d in devices if A[v, d]] for v in range(problem.n)]
    return itertools.product(*choices)


def brute_latency(problem: Problem) -> float:
    best = math.inf
    for pl in _placements(problem, range(problem.D)):
        for od in _orders(problem, pl):
            ev = evaluate(problem, Plan(pl, od))
            if ev.feasible:
                best = min(best, ev.latency)
    return best


def brute_period(problem: Problem) -> tuple[float, float]:
    """Optimal period over single plans and data-parallel replicas on any device partition,
    and the optimum over single-group plans only."""
    group_best = {}
    for r in range(1, problem.D + 1):
        for G in itertools.combinations(range(problem.D), r):
            best = math.inf
            for pl in _placements(problem, G):
                if len(set(pl)) != len(G):
                    continue  # the group's plan uses all of G (a smaller G covers the rest)
                ev = evaluate(problem, Plan(pl))
                if not ev.feasible:  # memory may depend on the order
                    ev = next((e for e in (evaluate(problem, Plan(pl, od)) for od in _orders(problem, pl))
                               if e.feasible), ev)
                if ev.feasible:
                    best = min(best, ev.period)
            group_best[G] = best
    best = math.inf
    for part in B._set_partitions(list(range(problem.D))):
        for r in range(1, len(part) + 1):  # replicas on some of the blocks
            for sub in itertools.combinations(part, r):
                best = min(best, B._combine(group_best[tuple(sorted(b))] for b in sub))
    return best, min(group_best.values())


def _all_parts(problem: Problem) -> dict[str, float]:
    """Every part and every LP variant this module has, for validity checks."""
    lab = B.path_labels(problem)
    out = dict(B.lower_bound(problem).parts)
    if problem.objective.value == "latency":
        for v in ("flow", "nocomm"):
            out["coupled-" + v] = B.coupled_lp_bound(problem, lab, v).value
    else:
        for v in ("full", "transport", "partial", "io"):
            out["period-" + v + "(1 group)"] = B.period_lp(problem, variant=v).value
    return out


# ---- tests -------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), n=st.integers(5, 30), D=st.integers(2, 4),
       objective=st.sampled_from(["latency", "throughput"]), tight=st.booleans())
def test_parts_below_heuristics(seed, n, D, objective, tight):
    p = make_problem(seed, n, D, objective, tight_memory=tight)
    try:
        b = B.lower_bound(p)
    except InfeasibleError:
        assert tight
        return
    assert b.value == max(b.parts.values()) and b.binding in b.parts
    parts = _all_parts(p)
    for name in HEURISTICS:
        try:
            plan = solve(p, name, Settings(seed=seed))
        except InfeasibleError:
            continue
        ev = evaluate(p, plan)
        if ev.feasible:  # heuristic plans are single-group plans: every part bounds them
            val = ev.value(objective)
            for k, x in parts.items():
                assert x <= val * (1 + REL), (k, x, name, val)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), n=st.integers(2, 5), tight=st.booleans())
def test_latency_parts_below_brute_force(seed, n, tight):
    """Brute force over placements x per-device orders (2 devices), with the evaluator."""
    p = make_problem(seed, n, 2, "latency", tight_memory=tight)
    opt = brute_latency(p)
    if not math.isfinite(opt):
        return
    for k, x in _all_parts(p).items():
        assert x <= opt * (1 + REL), (k, x, opt)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), n=st.integers(2, 5), D=st.integers(2, 3), tight=st.booleans())
def test_period_parts_below_brute_force(seed, n, D, tight):
    """The brute force covers single plans and replicas on every device partition; the
    single-group LPs are checked against the single-group optimum only."""
    p = make_problem(seed, n, D, "throughput", tight_memory=tight)
    opt, opt_single = brute_period(p)
    if not math.isfinite(opt):
        return
    for k, x in _all_parts(p).items():
        assert x <= (opt_single if "1 group" in k else opt) * (1 + REL), (k, x, opt, opt_single)


def independent_labels(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """v1's path labels, every input (output) priced on its own: the reference the
    contention-aware labels must dominate."""
    n, D, host = problem.n, problem.D, problem.host
    T = np.where(B.allowed_mask(problem), problem.T, np.inf)
    head, tail = np.empty((n, D)), np.zeros((n, D))
    for v in range(n):
        ready = np.zeros(D)
        for k in problem.node_inputs[v]:
            ready = np.maximum(ready, problem.comm_matrix(problem.in_tensors[k][0])[host])
        for u, b in problem.pred_bytes[v]:
            ready = np.maximum(ready, (head[u][:, None] + problem.comm_matrix(b)).min(axis=0))
        head[v] = ready + T[v]
    for s, b in problem.outputs:
        tail[s] = np.maximum(tail[s], problem.comm_matrix(b)[:, host])
    for v in range(n - 1, -1, -1):
        for s, b in problem.succ_bytes[v]:
            tail[v] = np.maximum(tail[v], (problem.comm_matrix(b) + (T[s] + tail[s])[None, :]).min(axis=1))
    return head, tail


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10 ** 6), n=st.integers(3, 6), D=st.integers(2, 3), tight=st.booleans())
def test_contention_aware_path_below_brute_force_and_above_v1(seed, n, D, tight):
    """Dense DAGs (joins and forks everywhere): the labels dominate v1's elementwise, and the
    path part stays at most the brute-force optimum."""
    p = make_problem(seed, n, D, "latency", p=0.7, tight_memory=tight)
    lab = B.path_labels(p)
    head, tail = independent_labels(p)
    fin = np.isfinite(head)
    assert np.array_equal(fin, np.isfinite(lab.head))
    assert (lab.head[fin] >= head[fin] * (1 - REL)).all() and (lab.tail >= tail * (1 - REL)).all()
    opt = brute_latency(p) if D == 2 or n <= 5 else math.inf
    if math.isfinite(opt):
        assert B.critical_path_bound(p, lab) <= opt * (1 + REL), (B.critical_path_bound(p, lab), opt)


def test_replicas_can_beat_the_single_group_lp():
    """Two GPUs fed over their own links by a host that is blocked while it sends: one
    pipeline must send the input from the host once per sample, two replicas each send
    their own. Combined additively (an optimistic view of replicas, and the one the bound
    must stay below) the single-group LP exceeds the replicas' period, so the bound must
    cover replicas; the evaluator charges the shared host each replica's share."""
    nodes = [Node(id=f"v{i}") for i in range(3)]
    g = CostGraph("chain", nodes, [("v0", "v1", 1e3), ("v1", "v2", 1e3)],
                  [InputTensor("x", int(1e8), ("v0",))], [("v2", 1e3)])
    dev = lambda i, k: {"id": i, "host": "h", "kind": k, "memory": {"capacity_bytes": 1e12}}  # noqa: E731
    spec = parse_spec({"name": "dp", "comm_blocks_device": True,
                       "devices": [dev("cpu0", "cpu"), dev("g1", "gpu"), dev("g2", "gpu")],
                       "links": [{"a": "cpu0", "b": "g1", "bandwidth_Bps": 1e10},
                                 {"a": "cpu0", "b": "g2", "bandwidth_Bps": 1e10}]})
    T = np.array([[0.03, 1e-3, 1e-3]] * 3)
    p = Problem(g, spec, "throughput", T=T)
    reps = (Plan((1, 1, 1)), Plan((2, 2, 2)), Plan((0, 0, 0)))
    dp = evaluate(p, Plan((1, 1, 1), replicas=reps))
    assert dp.feasible
    additive = 1.0 / sum(evaluate(p, r).throughput for r in reps)
    # the blocked host sends every replica's input: the evaluator charges it each share
    assert dp.period > additive * 1.2
    opt_add, opt_single = brute_period(p)  # replicas combined additively: at most the optimum
    assert B.period_lp(p).value > opt_add * 1.2  # the single-group LP is no bound for replicas
    assert opt_add <= additive * (1 + 1e-12) < opt_single
    b = B.lower_bound(p)
    assert b.value <= opt_add * (1 + REL) and b.value <= dp.period
    assert b.parts["links"] >= b.parts["load"] * (1 - 1e-6)


def test_set_partitions_are_bell_numbers():
    for k, bell in enumerate([1, 1, 2, 5, 15, 52, 203]):
        parts = list(B._set_partitions(list(range(k))))
        assert len(parts) == bell
        assert len({tuple(sorted(tuple(sorted(b)) for b in q)) for q in parts}) == bell


@pytest.mark.parametrize("seed", range(8))
def test_coupled_lp_dominates_v1_parts(seed):
    rng = random.Random(seed)
    p = make_problem(seed, rng.randint(5, 30), rng.randint(1, 4), "latency")
    lab = B.path_labels(p)
    path, load = B.critical_path_bound(p, lab), B.load_lp(p)
    res = B.coupled_lp_bound(p, lab)
    assert res.variant == "coupled-flow"
    assert res.primal >= max(path, load.primal) * (1 - REL)
    # the certified value loses only the shave
    assert res.value >= res.primal * (1 - 2 * bounds_lp.SHAVE) and load.value >= load.primal * (1 - 2 * bounds_lp.SHAVE)


def test_v2_parts_are_stronger_on_some_instances():
    """A guard against a silently weakened LP: on these fixed instances the coupled LP beats
    max(path, load), and the link LP beats the load LP, by over 1% on several of them."""
    gains = {"latency": 0, "throughput": 0}
    for objective in gains:
        for seed in range(10):
            rng = random.Random(seed)
            p = make_problem(seed, rng.randint(5, 30), rng.randint(2, 4), objective)
            b = B.lower_bound(p)
            best_v1 = max(b.parts["load"], b.parts.get("path", 0.0))
            gains[objective] += b.parts.get("coupled", b.parts.get("links")) > 1.01 * best_v1
    assert gains["latency"] >= 4 and gains["throughput"] >= 3, gains


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_size_fallbacks_stay_valid(objective, monkeypatch):
    """Tiny limits force the partial / subset variants and skip replica LPs."""
    for key, val in (("coupled_z", 24), ("coupled_nodes", 7), ("period_nnz", 400), ("replica_lps", 0),
                     ("jackson_nnz", 0)):
        monkeypatch.setitem(B.LIMITS, key, val)
    for seed in range(6):
        p = make_problem(100 + seed, 25, 3 + seed % 2, objective)
        b = B.lower_bound(p)
        if objective == "latency":
            assert b.info["coupled"].startswith("coupled-subset-partial")
        else:
            assert b.info["period_lp"] == "period-partial"
        for name in HEURISTICS:
            try:
                ev = evaluate(p, solve(p, name))
            except InfeasibleError:
                continue
            if ev.feasible:
                assert b.value <= ev.value(objective) * (1 + REL)


def test_memory_infeasible_raises_and_results_are_cached():
    p = make_problem(5, 8, 2, "latency")
    tiny = Problem(p.graph, p.spec.model_copy(update={"devices": tuple(
        d.model_copy(update={"memory": d.memory.model_copy(update={"capacity_bytes": 1.0})})
        for d in p.spec.devices)}), "latency", T=p.T)
    if tiny.param_bytes.sum() > 2:
        with pytest.raises(InfeasibleError, match="parameters"):
            B.lower_bound(tiny)
    assert B.lower_bound(p) is B.lower_bound(p)
    q = make_problem(5, 8, 2, "latency")
    assert B.lower_bound(q).value == B.lower_bound(p).value  # deterministic


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_timing_smoke_2000_nodes(objective, caplog):
    p = large_problem(2000, 4, objective)
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="partitioner.bounds.lower"):
        b = B.lower_bound(p)
    dt = time.perf_counter() - t0
    logging.getLogger(__name__).info("lower bound at 2000 nodes (%s): %.2f s, %s", objective, dt, b.info)
    assert math.isfinite(b.value) and b.value > 0  # a smoke test: its speed is measured by bench/heuristic.py


@pytest.mark.parametrize("seed", range(6))
def test_window_dominates_load_and_stays_below_heuristics(seed):
    """The window ``t1 = t2 = 0`` with the load LP's duals is the load LP (no memory rows
    here), so ``window`` is at least ``load``; like every part it is below HEFT's plan."""
    rng = random.Random(seed)
    p = make_problem(seed, rng.randint(8, 30), rng.randint(2, 4), "latency")
    b = B.lower_bound(p)
    assert b.parts["window"] >= b.parts["load"] * (1 - 1e-6)
    assert b.parts["window"] <= evaluate(p, solve(p, "heft", Settings(seed=0))).latency * (1 + REL)
