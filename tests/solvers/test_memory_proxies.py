"""The memory proxies of the linear models and of pipeline-dp against the evaluator, on random plans.

A conservative proxy never accepts a plan whose memory the evaluator rejects; a relaxed one
never rejects a plan whose memory the evaluator accepts.
"""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from instances import mixed_graph, random_plan, random_spec
from ortools.sat.python import cp_model

from partitioner.ir.plan import Plan
from partitioner.machine.evaluate import evaluate
from partitioner.machine.memory import memory_upper_bound
from partitioner.machine.problem import Boundary, Problem
from partitioner.solvers.baselines.cuts import crossing, dfs_order
from partitioner.solvers.baselines.peft import allowed_mask
from partitioner.solvers.baselines.pipeline_dp import _Tables
from partitioner.solvers.cpsat import model as cpm
from partitioner.solvers.milp import model as milp


def _problem(seed: int, n: int, D: int) -> Problem:
    """A random graph on a spec whose capacity is near what random plans need (both verdicts occur)."""
    g = mixed_graph(seed, n)
    loose = Problem(g, random_spec(seed, D, unsupported=False))
    need = memory_upper_bound(loose, random_plan(loose, seed).placement).max()
    return Problem(g, random_spec(seed, D, unsupported=False, capacity=need * random.Random(seed).uniform(0.4, 1.2)))


def _fits(p: Problem, plan: Plan) -> np.ndarray:
    return evaluate(p, plan).memory_peak <= p.capacity * (1 + 1e-9)


def _milp_accepts(p: Problem, mode: str, plan: Plan) -> bool:
    """Whether the MILP's memory rows hold at ``plan`` (auxiliary variables at their least values)."""
    m = milp.MilpModel(p, Boundary.full(p), "memory", 1.0)
    m.add_memory(mode, p.capacity)
    vals = {var: float(plan.placement[v] == d) for (v, d), var in m.x.items()}
    for var, covers in m.covers.items():
        vals[var] = max([0.0] + [c.value(vals) for c in covers])
    rows = [c for c in m.lp.constraints() if c.name.startswith("mem")]
    return all(sum(k * vals.get(var, 0.0) for var, k in c.items()) + c.constant <= 1e-12 for c in rows)


def _cpsat_accepts(p: Problem, mode: str, plan: Plan) -> bool:
    """Whether the CP-SAT model's memory part admits ``plan``'s placement."""
    B = cpm.build_model(p, Boundary.full(p), unit=1e-6, horizon_int=2**20, mode=mode, side=cpm.Side(memory=True),
                        objective="period", load_unit=1e-6, schedule=False)
    for v, d in enumerate(plan.placement):
        B.model.add(B.p[(v, d)] == 1)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = 10.0
    status = solver.solve(B.model)
    assert status in (cp_model.OPTIMAL, cp_model.FEASIBLE, cp_model.INFEASIBLE)
    return status != cp_model.INFEASIBLE


def _brackets(p: Problem, plan: Plan, accepts, conservative: str, relaxed: str) -> None:
    """The conservative model accepts only what fits; the relaxed one rejects only what does not."""
    fits = bool(_fits(p, plan).all())
    assert fits or not accepts(p, conservative, plan)
    assert not fits or accepts(p, relaxed, plan)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 10), D=st.integers(2, 3))
def test_milp_memory_rows_bracket_the_evaluator(seed, n, D):
    p = _problem(seed, n, D)
    for k in range(3):
        _brackets(p, random_plan(p, seed + k), _milp_accepts, milp.CONSERVATIVE, milp.RELAXED)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 8), D=st.integers(2, 3))
def test_cpsat_memory_part_brackets_the_evaluator(seed, n, D):
    p = _problem(seed, n, D)
    _brackets(p, random_plan(p, seed), _cpsat_accepts, cpm.CONSERVATIVE, cpm.RELAXED)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 16), D=st.integers(2, 4), dfs=st.booleans())
def test_pipeline_dp_segment_memory_is_never_below_the_evaluator(seed, n, D, dfs):
    p = Problem(mixed_graph(seed, n), random_spec(seed, D, unsupported=False))
    order = dfs_order(p) if dfs else np.arange(p.n)
    pos = np.empty(p.n, dtype=np.int64)
    pos[order] = np.arange(p.n)
    P = np.arange(p.n + 1)
    tab = _Tables(p, order, P, crossing(p, pos), list(range(p.D)), allowed_mask(p))
    mem = tab.need("acts")  # the activation-aware model of a stage's memory
    rng = random.Random(seed)
    k = rng.randint(1, min(D, p.n))
    cuts = sorted(rng.sample(range(1, p.n), k - 1))
    stages = list(zip((0, *cuts), (*cuts, p.n)))
    devs = rng.sample(range(p.D), k)
    pl = np.zeros(p.n, dtype=np.int64)
    per_dev: list[tuple[int, ...]] = [()] * p.D
    for (i, j), d in zip(stages, devs):
        pl[order[i:j]] = d
        per_dev[d] = tuple(int(v) for v in order[i:j])
    ev = evaluate(p, Plan(tuple(int(x) for x in pl), tuple(per_dev)))
    for (i, j), d in zip(stages, devs):
        assert ev.memory_peak[d] <= mem[i, j] * (1 + 1e-12)
