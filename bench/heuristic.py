"""Heuristic benchmark (issue 4): the split heuristic against the other heuristics, the
exact MILP and the lower bound, DiviML-style.

Sections (every figure is measured here, on this machine, by this script):

1. **Zoo table.** ResNet-50, the Inception-style CNN, the BERT-style encoder and RandWire
   WS/ER/BA at several sizes (traced with ``partitioner.api.load_model``) x every shipped
   spec x both objectives: ``value / bound`` of every registered heuristic (single, greedy,
   heft, peft, pipeline-dp for throughput, metis, split), with ``bound`` the larger of
   :func:`partitioner.bounds.lower.lower_bound` and the solver's own proven bound, and the
   margin of split over the best of HEFT, PEFT and greedy.
2. **Split vs MILP.** Zoo graphs coarsened (``partitioner.transform.coarsen``) to sizes the MILP can
   finish, plus small random DAGs (the MILP's hard cases), both objectives: split/MILP
   where the MILP proves optimality, and the speed ratio MILP time / split time.
3. **Scale.** Solve times of split (and HEFT, PEFT, greedy) on DNN-like cost graphs of
   100, 1,000 and 10,000 nodes built directly (no tracing), both objectives, and the
   peak RSS of a whole compile (build the problem, split, grade with the bound) in a
   fresh subprocess.
4. **Speedups** of split over the best single device (``single``) on ``server-cpu-2gpu``.

Usage::

    python bench/heuristic.py            # full run (about 25 minutes on 2 cores)
    python bench/heuristic.py --quick    # a smaller matrix, MILP limit 10 s (under 3 minutes)

Writes ``bench/results/heuristic.json``, ``heuristic.md`` and ``heuristic.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioner.zoo.synthetic import dnn_cost_graph

from partitioner import api  # noqa: E402
from partitioner.bounds.lower import lower_bound  # noqa: E402
from partitioner.errors import PartitionerError  # noqa: E402
from partitioner.ir.graph import CostGraph, InputTensor, Node  # noqa: E402
from partitioner.ir.settings import Settings  # noqa: E402
from partitioner.ir.spec import list_specs, load_spec, parse_spec  # noqa: E402
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import solve  # noqa: E402
from partitioner.transform.coarsen import coarsen  # noqa: E402
from partitioner.transform.mapping import coarse_problem

log = logging.getLogger("bench.heuristic")

HEURISTICS = ("single", "greedy", "heft", "peft", "pipeline-dp", "metis", "split")
LIST_SCHEDULERS = ("heft", "peft", "greedy")
OBJECTIVES = ("latency", "throughput")


def geomean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


# ---- graphs ----------------------------------------------------------------------------------
def zoo_graphs(quick: bool) -> list[tuple[str, str, dict]]:
    """(label, zoo model, factory kwargs)."""
    out = [("resnet50", "resnet50", {}), ("inception", "inception", {}), ("bert", "bert", {})]
    sizes = (16,) if quick else (16, 32, 64)
    gens = ("ws",) if quick else ("ws", "er", "ba")
    for g in gens:
        for s in sizes:
            out.append((f"randwire-{g}-{s}", f"randwire-{g}", {"nodes": s}))
    return out


dnn_graph = dnn_cost_graph


def random_dag(seed: int, n: int, p: float = 0.25) -> tuple[CostGraph, object]:
    """A random DAG and a random 2-4 device spec (as in the tests): the MILP's hard cases."""
    import networkx as nx

    rng = random.Random(seed)
    g = nx.gnp_random_graph(n, p, seed=seed, directed=True)
    ops = ("conv2d", "matmul", "relu", "add", "softmax", "layernorm")
    nodes = [Node(id=f"n{i}", op=rng.choice(ops), flops=rng.uniform(1e6, 5e9), param_bytes=rng.randint(0, 4_000_000),
                  output_bytes=rng.randint(1_000, 4_000_000)) for i in range(n)]
    ob = {x.id: x.output_bytes for x in nodes}
    edges = [(f"n{u}", f"n{v}", ob[f"n{u}"]) for u, v in sorted(g.edges()) if u < v]
    has_pred = {v for _, v, _ in edges}
    has_succ = {u for u, _, _ in edges}
    graph = CostGraph(f"rand{seed}-{n}", nodes, edges,
                      [InputTensor("x", 600_000, tuple(x.id for x in nodes if x.id not in has_pred))],
                      [(x.id, ob[x.id]) for x in nodes if x.id not in has_succ])
    D = 2 + seed % 3
    devices = [{"id": "cpu0", "host": "h0", "kind": "cpu", "peak_flops": {"fp32": rng.uniform(2e11, 2e12)},
                "memory": {"capacity_bytes": 64e9, "bandwidth_Bps": 1e11}}]
    for k in range(1, D):
        kind = "accelerator" if k == D - 1 and D > 2 else "gpu"
        devices.append({"id": f"d{k}", "host": "h0", "kind": kind, "peak_flops": {"fp32": rng.uniform(2e12, 2e13)},
                        "memory": {"capacity_bytes": 64e9, "bandwidth_Bps": rng.uniform(3e11, 2e12)},
                        "unsupported_ops": ["softmax", "layernorm"] if kind == "accelerator" else []})
    links = [{"a": "cpu0", "b": f"d{k}", "bandwidth_Bps": rng.uniform(5e9, 3e10), "latency_s": rng.uniform(1e-6, 2e-5)}
             for k in range(1, D)]
    for a in range(1, D):
        for b in range(a + 1, D):
            if rng.random() < 0.5:
                links.append({"a": f"d{a}", "b": f"d{b}", "bandwidth_Bps": rng.uniform(2e10, 1e11),
                              "latency_s": rng.uniform(1e-6, 1e-5)})
    return graph, parse_spec({"name": f"rspec{seed}", "devices": devices, "links": links})


# ---- runs -------------------------------------------------------------------------------------
def run_solver(problem: Problem, name: str, bound, settings: Settings | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        plan = solve(problem, name, settings or Settings(seed=0))
        dt = time.perf_counter() - t0
        res = api.grade(problem, plan, bound=bound)
    except PartitionerError as err:
        return {"solver": name, "status": "error", "error": err.message, "time_s": time.perf_counter() - t0}
    vb = res.value / res.best_bound if res.best_bound > 0 and res.status != "infeasible" else math.nan
    return {"solver": name, "status": res.status, "value_s": res.value, "bound_s": res.best_bound,
            "value_over_bound": vb, "time_s": dt, "latency_s": res.evaluation.latency,
            "period_s": res.evaluation.period, "replicas": len(plan.replicas) if plan.replicas else 0}


def zoo_section(quick: bool) -> list[dict]:
    rows = []
    specs = ["server-cpu-2gpu", "edge-soc"] if quick else list_specs()
    for label, model, kw in zoo_graphs(quick):
        t0 = time.perf_counter()
        loaded = api.load_model(model, model_kwargs=kw)
        log.info("zoo: %s traced (%d nodes) in %.1f s", label, len(loaded.graph), time.perf_counter() - t0)
        for spec_name in specs:
            spec = load_spec(spec_name)
            for obj in OBJECTIVES:
                problem = Problem(loaded.graph, spec, obj)
                try:
                    problem.check_supported()
                except PartitionerError as err:
                    rows.append({"graph": label, "spec": spec_name, "objective": obj, "status": "unsupported",
                                 "error": err.message})
                    continue
                t1 = time.perf_counter()
                bound = lower_bound(problem)
                row = {"graph": label, "nodes": problem.n, "spec": spec_name, "objective": obj,
                       "bound_s": bound.value, "bound_binding": bound.binding,
                       "bound_time_s": time.perf_counter() - t1, "solvers": {}}
                for name in HEURISTICS:
                    if name == "pipeline-dp" and obj == "latency":
                        continue
                    row["solvers"][name] = run_solver(problem, name, bound)
                _margins(row)
                rows.append(row)
                sp = row["solvers"]["split"]
                log.info("zoo: %s %s %s split %.4g x bound (%.2f s), margin %.4f", label, spec_name, obj,
                         sp.get("value_over_bound", math.nan), sp.get("time_s", math.nan), row.get("split_margin", 1))
    return rows


def _margins(row: dict) -> None:
    s = row["solvers"]
    base = [s[n]["value_s"] for n in LIST_SCHEDULERS if s.get(n, {}).get("status") not in (None, "error", "infeasible")]
    sp = s.get("split", {})
    if base and sp.get("status") not in (None, "error", "infeasible"):
        row["best_list_s"] = min(base)
        row["split_margin"] = sp["value_s"] / min(base)  # < 1: split better


def milp_section(quick: bool, limit: float) -> list[dict]:
    cases = []
    zoo = [("resnet50", {}), ("inception", {}), ("bert", {})] if quick else \
        [("resnet50", {}), ("inception", {}), ("bert", {}), ("randwire-ws", {"nodes": 16}), ("randwire-er", {"nodes": 16})]
    specs = ["server-cpu-2gpu"] if quick else ["server-cpu-2gpu", "edge-soc"]
    targets = (20,) if quick else (16, 28)
    for model, kw in zoo:
        loaded = api.load_model(model, model_kwargs=kw)
        for spec_name in specs:
            fine = Problem(loaded.graph, load_spec(spec_name))
            for tgt in targets:
                c = coarsen(loaded.graph, tgt, problem=fine)
                cases.append((f"{model}@{len(c.coarse)}", spec_name, coarse_problem(fine, c)))
    for seed in (range(1) if quick else range(6)):
        n = 16 + (seed * 3) % 10
        g, spec = random_dag(200 + seed, n)
        cases.append((f"random-{n}-s{seed}", spec.name, Problem(g, spec)))
    rows = []
    for label, spec_name, base in cases:
        for obj in OBJECTIVES:
            problem = base if obj == "latency" else base.with_objective(obj)
            bound = lower_bound(problem)
            m = run_solver(problem, "milp", bound, Settings(seed=0, time_limit=limit))
            s = run_solver(problem, "split", bound)
            row = {"graph": label, "nodes": problem.n, "spec": spec_name, "objective": obj, "milp": m, "split": s}
            if m.get("value_s") and s.get("value_s"):
                row["split_over_milp"] = s["value_s"] / m["value_s"]
                row["speed_ratio"] = m["time_s"] / max(s["time_s"], 1e-9)
            rows.append(row)
            log.info("milp: %s %s %s milp %s %.1f s, split/milp %.4f, speed x%.0f", label, spec_name, obj,
                     m.get("status"), m.get("time_s", 0), row.get("split_over_milp", math.nan),
                     row.get("speed_ratio", math.nan))
    return rows


_COMPILE = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
from heuristic import dnn_graph
from partitioner import api
from partitioner.ir.spec import load_spec
from partitioner.machine.problem import Problem, Settings
from partitioner.solvers.registry import solve
t0 = time.perf_counter()
p = Problem(dnn_graph({n}, 1), load_spec("server-cpu-2gpu"), {obj!r})
t1 = time.perf_counter()
plan = solve(p, "split", Settings(seed=0))
t2 = time.perf_counter()
res = api.grade(p, plan)
t3 = time.perf_counter()
print(json.dumps({{"build_s": t1 - t0, "split_s": t2 - t1, "grade_s": t3 - t2, "compile_s": t3 - t0,
                  "value_s": res.value, "value_over_bound": res.value / res.best_bound,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def scale_section(sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        graph = dnn_graph(n, 1)
        for obj in OBJECTIVES:
            problem = Problem(graph, load_spec("server-cpu-2gpu"), obj)
            row = {"nodes": n, "objective": obj, "times_s": {}, "values_s": {}}
            for name in ("heft", "peft", "greedy", "split"):
                t0 = time.perf_counter()
                plan = solve(problem, name, Settings(seed=0))
                row["times_s"][name] = time.perf_counter() - t0
                row["values_s"][name] = _value(problem, plan)
            code = _COMPILE.format(root=str(ROOT), bench=str(ROOT / "bench"), n=n, obj=obj)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
            if out.returncode == 0:
                row["compile"] = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                row["compile"] = {"error": out.stderr[-500:]}
            rows.append(row)
            log.info("scale: n=%d %s split %.2f s, compile %.2f s, peak RSS %.2f GB", n, obj, row["times_s"]["split"],
                     row["compile"].get("compile_s", math.nan), row["compile"].get("peak_rss_bytes", math.nan) / 1e9)
    return rows


def _value(problem: Problem, plan) -> float:
    from partitioner.machine.evaluate import evaluate

    return evaluate(problem, plan).value(problem.objective)


def speedup_section(zoo_rows: list[dict]) -> list[dict]:
    out = []
    for r in zoo_rows:
        if r.get("spec") != "server-cpu-2gpu" or "solvers" not in r:
            continue
        s, sp = r["solvers"].get("single", {}), r["solvers"].get("split", {})
        if s.get("value_s") and sp.get("value_s"):
            out.append({"graph": r["graph"], "objective": r["objective"], "single_s": s["value_s"],
                        "split_s": sp["value_s"], "speedup": s["value_s"] / sp["value_s"]})
    return out


# ---- summary, markdown, plot --------------------------------------------------------------------
def summarize(zoo: list[dict], milp: list[dict], scale: list[dict], speed: list[dict]) -> dict:
    S: dict = {"value_over_bound_geomean": {}, "split_vs_list": {}, "milp": {}, "scale": [], "speedup_vs_single": {}}
    for obj in OBJECTIVES:
        rows = [r for r in zoo if r.get("objective") == obj and "solvers" in r]
        S["value_over_bound_geomean"][obj] = {
            name: geomean([r["solvers"][name].get("value_over_bound") for r in rows if name in r["solvers"]])
            for name in HEURISTICS if any(name in r["solvers"] for r in rows)}
        m = [r["split_margin"] for r in rows if "split_margin" in r]
        rw = [r["split_margin"] for r in rows if "split_margin" in r and r["graph"].startswith("randwire")]
        S["split_vs_list"][obj] = {
            "problems": len(m), "worse_count": sum(x > 1 + 1e-9 for x in m), "geomean_margin": geomean(m),
            "worst_margin": max(m) if m else math.nan, "best_margin": min(m) if m else math.nan,
            "randwire_geomean_margin": geomean(rw), "randwire_problems": len(rw)}
        mr = [r for r in milp if r["objective"] == obj]
        opt = [r["split_over_milp"] for r in mr if r["milp"].get("status") == "optimal" and "split_over_milp" in r]
        slow = [r["speed_ratio"] for r in mr if r["milp"].get("time_s", 0) >= 60 and "speed_ratio" in r]
        S["milp"][obj] = {"instances": len(mr), "proven_optimal": len(opt), "split_over_opt_geomean": geomean(opt),
                          "split_over_opt_max": max(opt) if opt else math.nan,
                          "speed_ratio_geomean": geomean([r.get("speed_ratio") for r in mr]),
                          "milp_over_60s": len(slow), "speed_ratio_min_where_milp_over_60s": min(slow) if slow else None}
        sp = [r["speedup"] for r in speed if r["objective"] == obj]
        S["speedup_vs_single"][obj] = {"geomean": geomean(sp), "max": max(sp) if sp else math.nan}
    for r in scale:
        c = r.get("compile", {})
        S["scale"].append({"nodes": r["nodes"], "objective": r["objective"], "split_s": r["times_s"]["split"],
                           "compile_s": c.get("compile_s"), "peak_rss_gb": (c.get("peak_rss_bytes") or math.nan) / 1e9})
    return S


def targets(S: dict) -> list[tuple[str, str, bool | None]]:
    out = []
    opt = [S["milp"][o]["split_over_opt_geomean"] for o in OBJECTIVES]
    mx = [S["milp"][o]["split_over_opt_max"] for o in OBJECTIVES]
    ok = all(math.isfinite(x) for x in opt)
    out.append(("split within 2% of the MILP optimum (geomean), never worse than 5%",
                " / ".join(f"{o}: geomean {g:.4f}, max {m:.4f}" for o, g, m in zip(OBJECTIVES, opt, mx)),
                ok and all(g <= 1.02 for g in opt) and all(m <= 1.05 for m in mx)))
    vb = [S["value_over_bound_geomean"][o].get("split", math.nan) for o in OBJECTIVES]
    out.append(("split value/bound geomean <= 1.10", " / ".join(f"{o}: {v:.4f}" for o, v in zip(OBJECTIVES, vb)),
                all(v <= 1.10 for v in vb)))
    w = [S["split_vs_list"][o] for o in OBJECTIVES]
    out.append(("split never worse than the best of HEFT, PEFT, greedy; better on geomean",
                " / ".join(f"{o}: worse on {x['worse_count']}/{x['problems']}, geomean {x['geomean_margin']:.4f}"
                           for o, x in zip(OBJECTIVES, w)),
                all(x["worse_count"] == 0 and x["geomean_margin"] < 1 for x in w)))
    slow = [S["milp"][o]["speed_ratio_min_where_milp_over_60s"] for o in OBJECTIVES]
    slow = [x for x in slow if x is not None]
    out.append((">= 100x faster than the MILP where it needs > 60 s",
                f"min ratio {min(slow):.0f}x over {len(slow)} objective(s)" if slow else "no MILP run reached 60 s",
                (min(slow) >= 100) if slow else None))
    for n, lim in ((1000, 2.0), (10000, 30.0)):
        ts = [r["split_s"] for r in S["scale"] if r["nodes"] == n]
        out.append((f"split <= {lim:g} s at {n} nodes", ", ".join(f"{t:.2f} s" for t in ts) or "not run",
                    (max(ts) <= lim) if ts else None))
    rss = [r["peak_rss_gb"] for r in S["scale"] if r["nodes"] == 10000]
    out.append(("peak RSS of the whole compile < 2 GB at 10,000 nodes", ", ".join(f"{x:.2f} GB" for x in rss)
                or "not run", (max(rss) < 2) if rss else None))
    return out


def _f(x, fmt="{:.4f}") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def markdown(res: dict) -> str:
    S = res["summary"]
    L = ["# Heuristic benchmark (issue 4)", "",
         f"Machine: {res['machine']}. Mode: {res['mode']}. Total time {res['total_time_s'] / 60:.1f} min. "
         "Generated by `bench/heuristic.py`; every figure is measured by it"
         + (f" (measured {res['measured_at']}, load average {', '.join(f'{x:.2f}' for x in res['load_average'])})"
            if res.get("load_average") else "") + ".", ""]
    L += [f"Section `{k}` reused from {v} (`--reuse`): the code it measures is unchanged since." for k, v in
          res.get("reused", {}).items()]
    L += ["", "## Targets", "",
         "| target | measured | met |", "|---|---|---|"]
    for name, fig, ok in targets(S):
        L.append(f"| {name} | {fig} | {'n/a' if ok is None else ('yes' if ok else 'NO')} |")
    L += ["", "## Value / bound (geometric mean over the zoo table)", "",
          "| objective | " + " | ".join(HEURISTICS) + " |", "|---" * (len(HEURISTICS) + 1) + "|"]
    for obj in OBJECTIVES:
        g = S["value_over_bound_geomean"][obj]
        L.append(f"| {obj} | " + " | ".join(_f(g.get(h)) for h in HEURISTICS) + " |")
    L += ["", "## Split vs the best of HEFT, PEFT, greedy (value ratio; < 1: split better)", "",
          "| objective | problems | split worse | geomean | best | worst | RandWire geomean |", "|---|---|---|---|---|---|---|"]
    for obj in OBJECTIVES:
        x = S["split_vs_list"][obj]
        L.append(f"| {obj} | {x['problems']} | {x['worse_count']} | {_f(x['geomean_margin'])} | "
                 f"{_f(x['best_margin'])} | {_f(x['worst_margin'])} | {_f(x['randwire_geomean_margin'])} |")
    L += ["", "## Split vs MILP", "", "| objective | instances | MILP optimal | split/opt geomean | split/opt max | "
          "speed ratio geomean | MILP >= 60 s | min speed ratio there |", "|---|---|---|---|---|---|---|---|"]
    for obj in OBJECTIVES:
        x = S["milp"][obj]
        L.append(f"| {obj} | {x['instances']} | {x['proven_optimal']} | {_f(x['split_over_opt_geomean'])} | "
                 f"{_f(x['split_over_opt_max'])} | {_f(x['speed_ratio_geomean'], '{:.0f}x')} | {x['milp_over_60s']} | "
                 f"{_f(x['speed_ratio_min_where_milp_over_60s'], '{:.0f}x')} |")
    L += ["", "| graph | nodes | spec | objective | MILP status | MILP s | split s | split/MILP |", "|---|---|---|---|---|---|---|---|"]
    for r in res["milp"]:
        L.append(f"| {r['graph']} | {r['nodes']} | {r['spec']} | {r['objective']} | {r['milp'].get('status')} | "
                 f"{_f(r['milp'].get('time_s'), '{:.2f}')} | {_f(r['split'].get('time_s'), '{:.2f}')} | "
                 f"{_f(r.get('split_over_milp'))} |")
    L += ["", "## Scale (DNN-like cost graphs on server-cpu-2gpu)", "",
          "| nodes | objective | heft s | peft s | greedy s | split s | split / best list | whole compile s | peak RSS GB |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in res["scale"]:
        t, v, c = r["times_s"], r["values_s"], r.get("compile", {})
        best = min(v[n] for n in LIST_SCHEDULERS)
        L.append(f"| {r['nodes']} | {r['objective']} | {t['heft']:.2f} | {t['peft']:.2f} | {t['greedy']:.2f} | "
                 f"{t['split']:.2f} | {v['split'] / best:.4f} | {_f(c.get('compile_s'), '{:.2f}')} | "
                 f"{_f((c.get('peak_rss_bytes') or math.nan) / 1e9, '{:.2f}')} |")
    L += ["", "## Speedup of split over the best single device (server-cpu-2gpu)", "",
          "| graph | objective | single s | split s | speedup |", "|---|---|---|---|---|"]
    for r in res["speedup"]:
        L.append(f"| {r['graph']} | {r['objective']} | {r['single_s']:.4g} | {r['split_s']:.4g} | {r['speedup']:.2f}x |")
    for obj in OBJECTIVES:
        x = S["speedup_vs_single"][obj]
        L.append(f"\nGeomean speedup ({obj}): {_f(x['geomean'], '{:.2f}x')}, max {_f(x['max'], '{:.2f}x')}.")
    L += ["", "## Zoo table (value / bound; time in s)", "",
          "| graph | nodes | spec | objective | bound binding | " + " | ".join(HEURISTICS) + " | split s | split/best list |",
          "|---" * (len(HEURISTICS) + 7) + "|"]
    for r in res["zoo"]:
        if "solvers" not in r:
            L.append(f"| {r['graph']} | - | {r['spec']} | {r['objective']} | {r.get('status')} |" + " - |" * (len(HEURISTICS) + 2))
            continue
        cells = [_f(r["solvers"][h].get("value_over_bound")) if h in r["solvers"] else "-" for h in HEURISTICS]
        L.append(f"| {r['graph']} | {r['nodes']} | {r['spec']} | {r['objective']} | {r['bound_binding']} | "
                 + " | ".join(cells) + f" | {_f(r['solvers']['split'].get('time_s'), '{:.2f}')} | "
                 f"{_f(r.get('split_margin'))} |")
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, obj in zip(axes, OBJECTIVES):
        rows = [r for r in res["zoo"] if r.get("objective") == obj and "solvers" in r]
        names = [h for h in HEURISTICS if any(h in r["solvers"] for r in rows)]
        data = [[r["solvers"][h]["value_over_bound"] for r in rows
                 if h in r["solvers"] and math.isfinite(r["solvers"][h].get("value_over_bound", math.nan))]
                for h in names]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30)
        ax.scatter(range(1, len(names) + 1), [geomean(d) for d in data], marker="D", color="red", zorder=3,
                   label="geometric mean")
        ax.axhline(1.10, color="grey", ls="--", lw=0.8, label="1.10")
        ax.set_yscale("log")
        ax.set_title(f"{obj}: value / lower bound (zoo x specs)")
        ax.legend(loc="upper right")
    axes[0].set_ylabel("value / bound (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller matrix (under 3 minutes)")
    ap.add_argument("--milp-time-limit", type=float, default=None, help="seconds per MILP solve (60; quick 20)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--sections", default="zoo,milp,scale", help="comma-separated subset of zoo,milp,scale")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier heuristic.json: the sections not in --sections are taken from it "
                         "(and said so in the report), e.g. to re-measure timings on a quiet machine")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("partitioner", "pulp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    sections = set(args.sections.split(","))
    limit = args.milp_time_limit or (10.0 if args.quick else 60.0)
    old = json.loads(args.reuse.read_text()) if args.reuse else {}
    reused = [k for k in ("zoo", "milp", "scale") if k not in sections and old.get(k)]
    zoo = zoo_section(args.quick) if "zoo" in sections else old.get("zoo", [])
    milp = milp_section(args.quick, limit) if "milp" in sections else old.get("milp", [])
    scale = scale_section([100, 1000] if args.quick else [100, 1000, 10000]) if "scale" in sections else \
        old.get("scale", [])
    speed = speedup_section(zoo)
    res = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}), Python "
                      f"{platform.python_version()}", "mode": "quick" if args.quick else "full",
           "milp_time_limit_s": limit, "zoo": zoo, "milp": milp, "scale": scale, "speedup": speed,
           "reused": {k: f"{args.reuse} (measured {old.get('measured_at', 'earlier')})" for k in reused},
           "measured_at": time.strftime("%Y-%m-%d %H:%M"), "load_average": list(os.getloadavg())}
    res["summary"] = summarize(zoo, milp, scale, speed)
    res["targets"] = [{"target": a, "measured": b, "met": c} for a, b, c in targets(res["summary"])]
    res["total_time_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heuristic.json").write_text(json.dumps(res, indent=1, default=float))
    (args.out / "heuristic.md").write_text(markdown(res))
    if zoo:
        plot(res, args.out / "heuristic.png")
    log.info("wrote %s (%.1f min)", args.out / "heuristic.md", res["total_time_s"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
