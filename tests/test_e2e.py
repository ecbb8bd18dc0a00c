"""End to end: compile ResNet-50 and a RandWire graph on every shipped spec with every
solver, and check each plan independently of the solver (issue 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from partitioner import api
from partitioner.bounds.lower import lower_bound
from partitioner.ir.settings import Settings
from partitioner.ir.spec import list_specs, load_spec
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import SOLVERS

MODELS = {"resnet50": {}, "randwire-ws": {"nodes": 8}}
SOLVER_NAMES = sorted(n for n in SOLVERS if n != "milp")  # milp is milp-highs or milp-cbc


@pytest.fixture(scope="module", params=sorted(MODELS))
def loaded(request):
    return api.load_model(request.param, model_kwargs=MODELS[request.param])


def _spec_params(quick: tuple[str, ...]):
    """Every shipped spec; all but ``quick`` run only in ``make test-all`` (marker ``slow``)."""
    return [pytest.param(s, marks=() if s in quick else pytest.mark.slow) for s in list_specs()]


def check_plan(res) -> None:
    """Every node placed once on a device that runs it; per-device starts never overlap;
    every consumer starts after its inputs arrive; memory fits; bound <= value."""
    p, plan, ev = res.problem, res.plan, res.evaluation
    assert len(plan.placement) == p.n
    assert all(p.supported[i, d] for i, d in enumerate(plan.placement))
    assert sorted(i for seq in ev.order for i in seq) == list(range(p.n))
    for d, seq in enumerate(ev.order):
        assert all(plan.placement[i] == d for i in seq)
        for a, b in zip(seq, seq[1:]):
            assert ev.start[b] >= ev.finish[a] - 1e-12
    for u in range(p.n):
        assert ev.finish[u] == pytest.approx(ev.start[u] + p.T[u, plan.placement[u]], rel=1e-9, abs=1e-15)
        for v, b in p.succ_bytes[u]:
            du, dv = plan.placement[u], plan.placement[v]
            assert ev.start[v] >= ev.finish[u] + p.comm(du, dv, b) * (1 - 1e-9) - 1e-15
    assert np.all(ev.memory_peak <= p.capacity * (1 + 1e-9))
    assert ev.feasible, ev.violations
    assert res.best_bound <= res.value * (1 + 1e-9)
    assert math.isfinite(res.value) and 0 <= res.gap < 1


# every shipped spec, the LLM-scale ones (hetero-2server, h100-server) included; the default
# run keeps the product's default spec (two-server routes: tests/machine/test_links.py and make test-all)
@pytest.mark.parametrize("spec", _spec_params(("server-cpu-2gpu",)))
def test_every_solver_on_every_spec(loaded, spec):
    hw = load_spec(spec)
    for objective in ("latency", "throughput"):
        problem = Problem(loaded.graph, hw, objective)
        bound = lower_bound(problem)  # shared by the solvers (compile_plan computes it per call)
        for name in SOLVER_NAMES:
            info = SOLVERS[name]
            coarsen = None
            if info.max_nodes is not None and problem.n > info.max_nodes:
                coarsen = 12 if objective == "throughput" else 20
            plan, _ = api.solve_problem(problem, name, Settings(time_limit=2.0), coarsen)
            res = api.grade(problem, plan, bound)
            check_plan(res)
            if coarsen is not None:
                assert res.status != "optimal"  # optimal on a coarse graph is no proof for the fine one


def test_compile_plan_front_door():
    """The user path: a zoo name in, a graded, feasible plan out."""
    res = api.compile_plan("resnet50", "server-cpu-2gpu", "latency", "heft")
    check_plan(res)
    assert res.status == "heuristic" and res.extra["compile_time_s"] > 0
    # its repr is a one-line summary (the dataclass's would print the model, arrays and inputs)
    text = repr(res)
    assert text.startswith("Result(model='resnet50'") and "gap=" in text and "\n" not in text and len(text) < 300
