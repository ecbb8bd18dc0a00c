"""Memory-tight benchmark (issue 19): models that must be spread over many accelerators.

Instances: operator-level graphs of the zoo (BERT-base/large, GPT-2, Llama, ResNet-50,
Inception; traced without coarsening) and synthetic DNN-like graphs
(:func:`partitioner.zoo.synthetic.dnn_cost_graph`), inference and training
(:func:`partitioner.zoo.synthetic.training_graph`: forward/backward co-location groups), 200-5,000
nodes; specs generated here with a slow host CPU (several cores, plenty of memory) and 4,
8 or 16 accelerators whose usable memory totals 1.1-1.5x the model's memory footprint (its
weights and the activations it keeps live when it runs on one device; for training also the
gradients and the activations saved for the backward pass: :func:`footprint`), ``comm_blocks_device`` true and false, uniform and
mixed accelerator speeds, star (through the host), ring or full-mesh links. Both
objectives.

Per instance: ``split`` and every baseline a practitioner tries first (first-fit, balanced
contiguous stages, the pipeline DP, METIS, HEFT, PEFT, greedy, the best single device),
graded by the evaluator against :func:`partitioner.bounds.lower_bound` (value, value/bound,
feasibility, solve time), and a summary: split's losses against each baseline, geomean
value/bound, compile times (bound included).

Usage::

    python bench/memtight.py                 # the whole family
    python bench/memtight.py --quick         # a few-minute subset for development
    python bench/memtight.py --name memtight-before   # write under another name

Writes ``bench/results/<name>.json`` and ``<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioner.zoo.synthetic import dnn_cost_graph, training_graph  # noqa: E402

from partitioner import api  # noqa: E402
from partitioner.bounds.lower import lower_bound  # noqa: E402
from partitioner.errors import PartitionerError  # noqa: E402
from partitioner.ir.graph import CostGraph  # noqa: E402
from partitioner.ir.plan import Plan  # noqa: E402
from partitioner.ir.settings import Settings  # noqa: E402
from partitioner.ir.spec import Spec, parse_spec  # noqa: E402
from partitioner.machine.evaluate import evaluate, pieces  # noqa: E402
from partitioner.machine.problem import Problem  # noqa: E402
from partitioner.solvers.registry import SOLVERS, solve  # noqa: E402

log = logging.getLogger("bench.memtight")

BASELINES = ("first-fit", "balanced", "pipeline-dp", "metis", "heft", "peft", "greedy", "single")
OBJECTIVES = ("latency", "throughput")
REL = 1e-6  # split loses when its value exceeds a baseline's by more than this (relative)


def geomean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


# ---- graphs -------------------------------------------------------------------------------------
_ZOO = {
    "bert-base": ("bert-base", {}),
    "bert-large": ("bert", {"layers": 24, "hidden": 1024, "heads": 16}),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2-medium", {}),
    "llama-125m": ("llama-125m", {}),
    "llama-1b": ("llama-1b", {}),
    "resnet50": ("resnet50", {}),
    "inception": ("inception", {}),
}
_GRAPH_CACHE: dict[str, CostGraph] = {}


def build_graph(label: str) -> CostGraph:
    """``<zoo name>[-train]`` or ``synth<n>[-train]`` (the training graph of ``synth<n/2>``)."""
    if label in _GRAPH_CACHE:
        return _GRAPH_CACHE[label]
    base, train = (label[:-6], True) if label.endswith("-train") else (label, False)
    if base.startswith("synth"):
        n = int(base[5:])
        g = dnn_cost_graph(n, seed=n)
    else:
        model, kw = _ZOO[base]
        g = api.load_model(model, model_kwargs=kw).graph
    if train:
        g = training_graph(g)
    _GRAPH_CACHE[label] = g
    return g


@dataclass(frozen=True)
class Variant:
    """A generated spec: ``k`` accelerators whose usable memory totals ``mem`` x the weights."""

    k: int
    mem: float
    blocks: bool
    speeds: str  # uniform | mixed
    links: str   # star | ring | mesh

    @property
    def label(self) -> str:
        return f"{self.k}acc-m{self.mem:g}-{'blk' if self.blocks else 'dma'}-{self.speeds}-{self.links}"


VARIANTS = (
    Variant(4, 1.3, True, "uniform", "star"),
    Variant(8, 1.1, False, "mixed", "ring"),
    Variant(16, 1.5, True, "mixed", "ring"),
    Variant(4, 1.1, False, "mixed", "mesh"),
    Variant(8, 1.5, True, "uniform", "star"),
    Variant(16, 1.3, False, "uniform", "ring"),
    Variant(8, 1.3, True, "mixed", "mesh"),
    Variant(4, 1.5, False, "uniform", "ring"),
)
_MIXED = (1.0, 0.6, 0.35)


def footprint(graph: CostGraph) -> float:
    """The model's memory footprint: the evaluator's memory peak when the whole graph runs on
    one device (parameters and the live activations; for training also the gradients and the
    activations saved for the backward pass)."""
    one = parse_spec({"name": "one", "devices": [{"id": "cpu0", "host": "h0", "kind": "cpu",
                                                   "peak_flops": {"fp32": 1e12, "fp16": 1e12},
                                                   "memory": {"capacity_bytes": 1e15, "bandwidth_Bps": 1e11}}]})
    p = Problem(graph, one)
    return float(evaluate(p, Plan((0,) * p.n)).memory_peak[0])


def make_spec(graph: CostGraph, v: Variant) -> Spec:
    """The spec of variant ``v`` for ``graph`` (capacities from its :func:`footprint`)."""
    cap = max(v.mem * footprint(graph) / v.k, 1e6)
    devices = [{"id": "cpu0", "host": "h0", "kind": "cpu", "model": "host-8core",
                "peak_flops": {"fp32": 6.4e11, "fp16": 6.4e11},  # 8 cores x 2.5 GHz x 32 FLOP/cycle
                "memory": {"capacity_bytes": 512e9, "bandwidth_Bps": 1.0e11},
                "efficiency": {"compute": 0.5, "memory": 0.6}, "launch_overhead_s": 1e-5}]
    for i in range(v.k):
        s = 1.0 if v.speeds == "uniform" else _MIXED[i % len(_MIXED)]
        devices.append({"id": f"acc{i}", "host": "h0", "kind": "accelerator", "model": f"acc-x{s:g}",
                        "peak_flops": {"fp32": 2.0e13 * s, "fp16": 1.6e14 * s},
                        "memory": {"capacity_bytes": cap, "bandwidth_Bps": 1.5e12 * s},
                        "efficiency": {"compute": 0.6, "memory": 0.8}, "launch_overhead_s": 5e-6})
    links = [{"a": "cpu0", "b": f"acc{i}", "bandwidth_Bps": 2.5e10, "latency_s": 5e-6} for i in range(v.k)]
    if v.links == "ring":
        links += [{"a": f"acc{i}", "b": f"acc{(i + 1) % v.k}", "bandwidth_Bps": 5e10, "latency_s": 2e-6}
                  for i in range(v.k)]
    elif v.links == "mesh":
        links += [{"a": f"acc{i}", "b": f"acc{j}", "bandwidth_Bps": 5e10, "latency_s": 2e-6}
                  for i in range(v.k) for j in range(i + 1, v.k)]
    return parse_spec({"name": f"memtight-{v.label}", "host_device": "cpu0", "comm_blocks_device": v.blocks,
                       "memory_reserve": 0.0, "devices": devices, "links": links})


#: (graph label, variant indices); full family
FAMILY = (
    ("bert-base", (0, 1)), ("bert-base-train", (2, 3)), ("bert-large", (4, 5)), ("bert-large-train", (6, 0)),
    ("gpt2", (3, 6)), ("gpt2-train", (0, 5)), ("gpt2-medium", (1, 7)), ("gpt2-medium-train", (4, 2)),
    ("llama-125m", (5, 0)), ("llama-125m-train", (7, 1)), ("llama-1b", (2, 4)), ("llama-1b-train", (3, 6)),
    ("resnet50-train", (0, 2)), ("inception", (6, 4)), ("inception-train", (1, 5)),
    ("synth1000", (5, 3)), ("synth2000", (2, 7)), ("synth2500-train", (0, 4)), ("synth5000", (5, 1)),
)
QUICK = (("bert-base", (0,)), ("gpt2-train", (1,)), ("resnet50-train", (2,)), ("synth1000", (5,)))


def instances(quick: bool, only: str | None = None):
    for label, vs in (QUICK if quick else FAMILY):
        if only and only not in label:
            continue
        for vi in vs:
            yield label, VARIANTS[vi]


# ---- runs -----------------------------------------------------------------------------------------
def run_solver(problem: Problem, name: str, bound, settings: Settings) -> dict:
    t0 = time.perf_counter()
    try:
        plan = solve(problem, name, settings)
        dt = time.perf_counter() - t0
        res = api.grade(problem, plan, bound=bound)
    except PartitionerError as err:
        return {"status": "error", "error": err.message[:200], "time_s": time.perf_counter() - t0,
                "feasible": False}
    feas = res.evaluation.feasible
    ev = res.evaluation
    segs, xfers = plan_shape(problem, plan, ev)
    return {"status": res.status, "feasible": feas, "value_s": res.value if feas else None,
            "value_over_bound": res.value / bound.value if feas and bound.value > 0 else None,
            "time_s": dt, "latency_s": ev.latency, "period_s": ev.period, "segments": segs, "transfers": xfers,
            "devices_used": len(set(plan.placement)), "replicas": len(plan.replicas) if plan.replicas else 0,
            "violation": None if feas else ev.violations[0][:160]}


def plan_shape(problem: Problem, plan, ev) -> tuple[int, int]:
    """``(pieces, transfers)``: pieces are the connected components of the graph restricted to
    edges whose ends share a device (what emit cuts into segments, at least); transfers are
    the evaluator's (inputs, cross-device tensors, outputs)."""
    if plan.replicas:
        return -1, len(ev.transfers)
    return len(pieces(problem, plan.placement)), len(ev.transfers)


def run_instance(label: str, v: Variant, objective: str, solvers: list[str], settings: Settings) -> dict:
    graph = build_graph(label)
    spec = make_spec(graph, v)
    t0 = time.perf_counter()
    problem = Problem(graph, spec, objective)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    bound = lower_bound(problem)
    bound_s = time.perf_counter() - t1
    row = {"graph": label, "nodes": problem.n, "spec": v.label, "devices": problem.D, "objective": objective,
           "weights_gb": float(problem.param_bytes.sum()) / 1e9, "footprint_gb": footprint(graph) / 1e9, "bound_s": bound.value,
           "bound_binding": bound.binding, "bound_time_s": bound_s, "build_time_s": build_s, "solvers": {}}
    for name in solvers:
        if name not in SOLVERS:
            continue
        row["solvers"][name] = r = run_solver(problem, name, bound, settings)
        log.info("  %-12s %-8s %s  %.2f s", name, r["status"],
                 f"{r['value_over_bound']:.4f}" if r.get("value_over_bound") else r.get("error") or r.get("violation"),
                 r["time_s"])
    feas = [r["value_s"] for r in row["solvers"].values() if r.get("feasible")]
    row["best_s"] = min(feas) if feas else None
    row["best_over_bound"] = row["best_s"] / bound.value if feas and bound.value > 0 else None
    sp = row["solvers"].get("split")
    if sp is not None:
        row["compile_s"] = build_s + bound_s + sp["time_s"]
        row["split_losses"] = losses(row)
    return row


def losses(row: dict) -> list[str]:
    """Baselines that beat split on this instance (or are feasible where split is not)."""
    sp = row["solvers"]["split"]
    out = []
    for name, r in row["solvers"].items():
        if name == "split" or not r.get("feasible"):
            continue
        if not sp.get("feasible") or sp["value_s"] > r["value_s"] * (1 + REL):
            out.append(name)
    return out


# ---- summary and markdown -------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict:
    S: dict = {"instances": len(rows), "by_objective": {}}
    for obj in OBJECTIVES:
        rs = [r for r in rows if r["objective"] == obj]
        if not rs:
            continue
        names = sorted({n for r in rs for n in r["solvers"]})
        per = {}
        for n in names:
            got = [r["solvers"][n] for r in rs if n in r["solvers"]]
            per[n] = {"feasible": sum(bool(x.get("feasible")) for x in got), "runs": len(got),
                      "geomean_value_over_bound": geomean([x.get("value_over_bound") for x in got]),
                      "split_loses_to": sum(n in r.get("split_losses", []) for r in rs),
                      "max_time_s": max((x["time_s"] for x in got), default=math.nan)}
        comp = [(r["nodes"], r["devices"], r.get("compile_s")) for r in rs if r.get("compile_s") is not None]
        S["by_objective"][obj] = {
            "instances": len(rs), "solvers": per,
            "split_losses": sum(bool(r.get("split_losses")) for r in rs),
            "split_infeasible_where_some_feasible": sum(
                1 for r in rs if "split" in r["solvers"] and not r["solvers"]["split"].get("feasible")
                and r.get("best_s") is not None),
            "best_over_bound_geomean": geomean([r.get("best_over_bound") for r in rs]),
            "compile_max_s": max((c for _, _, c in comp), default=math.nan),
            "compile_1k16": max((c for n, D, c in comp if n <= 1500 and D >= 17), default=math.nan),
            "compile_5k": max((c for n, _, c in comp if n >= 4000), default=math.nan)}
    allsp = [r["solvers"]["split"].get("value_over_bound") for r in rows if "split" in r["solvers"]]
    S["split_geomean_value_over_bound"] = geomean(allsp)
    S["best_geomean_value_over_bound"] = geomean([r.get("best_over_bound") for r in rows])
    S["split_losses"] = sum(bool(r.get("split_losses")) for r in rows)
    return S


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def markdown(res: dict) -> str:
    S = res["summary"]
    rows = res["rows"]
    names = [n for n in ("split",) + BASELINES if any(n in r["solvers"] for r in rows)]
    L = [f"# Memory-tight benchmark (issue 19): {res['name']}", "",
         f"Machine: {res['machine']}. Mode: {res['mode']}. Total {res['total_time_s'] / 60:.1f} min, measured "
         f"{res['measured_at']}, load average before {', '.join(f'{x:.2f}' for x in res['load_before'])}, after "
         f"{', '.join(f'{x:.2f}' for x in res['load_after'])}. Generated by `bench/memtight.py`.", "",
         "## Summary", "",
         f"Instances: {S['instances']}. Split loses (to some baseline) on {S['split_losses']}. "
         f"Geomean value/bound: split {_f(S['split_geomean_value_over_bound'])}, best known "
         f"{_f(S['best_geomean_value_over_bound'])}.", ""]
    for obj, x in S["by_objective"].items():
        L += [f"### {obj}", "",
              f"{x['instances']} instances; split loses on {x['split_losses']}, infeasible where another plan is "
              f"feasible on {x['split_infeasible_where_some_feasible']}; best known / bound geomean "
              f"{_f(x['best_over_bound_geomean'])}; split compile (build + bound + solve) max {_f(x['compile_max_s'], '{:.1f}')} s,"
              f" at <= 1,500 nodes on 17 devices {_f(x['compile_1k16'], '{:.1f}')} s, at >= 4,000 nodes "
              f"{_f(x['compile_5k'], '{:.1f}')} s.", "",
              "| solver | feasible | geomean value/bound | split loses to it | max time s |", "|---|---|---|---|---|"]
        for n in names:
            p = x["solvers"].get(n)
            if p:
                L.append(f"| {n} | {p['feasible']}/{p['runs']} | {_f(p['geomean_value_over_bound'])} | "
                         f"{p['split_loses_to'] if n != 'split' else '-'} | {_f(p['max_time_s'], '{:.2f}')} |")
        L.append("")
    L += ["## Per instance (value / bound; `inf`: infeasible or no plan; time in s)", "",
          "| graph | nodes | spec | obj | bound s | binding | " + " | ".join(names)
          + " | split s | bound time s | split losses |", "|---" * (len(names) + 9) + "|"]
    for r in rows:
        cells = []
        for n in names:
            x = r["solvers"].get(n)
            cells.append("-" if x is None else (_f(x.get("value_over_bound")) if x.get("feasible") else "inf"))
        sp = r["solvers"].get("split", {})
        L.append(f"| {r['graph']} | {r['nodes']} | {r['spec']} | {r['objective'][:3]} | {r['bound_s']:.4g} | "
                 f"{r['bound_binding']} | " + " | ".join(cells)
                 + f" | {_f(sp.get('time_s'), '{:.1f}')} | {r['bound_time_s']:.1f} | {', '.join(r.get('split_losses', []))} |")
    L += ["", "Plan shape of split (segments / transfers) vs the best baseline:", "",
          "| graph | spec | obj | split segs | split transfers | best baseline | its segs | its transfers |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r["solvers"].get("split")
        base = [(x["value_s"], n) for n, x in r["solvers"].items() if n != "split" and x.get("feasible")]
        if not sp or not base:
            continue
        _, bn = min(base)
        b = r["solvers"][bn]
        L.append(f"| {r['graph']} | {r['spec']} | {r['objective'][:3]} | {sp.get('segments')} | {sp.get('transfers')} "
                 f"| {bn} | {b.get('segments')} | {b.get('transfers')} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few-minute subset")
    ap.add_argument("--name", default="memtight", help="output file stem under bench/results")
    ap.add_argument("--only", default=None, help="only graphs whose label contains this")
    ap.add_argument("--objectives", default="latency,throughput")
    ap.add_argument("--solvers", default=",".join(("split",) + BASELINES))
    ap.add_argument("--time-limit", type=float, default=300.0, help="safety cap per solve (s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("partitioner", "pulp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    settings = Settings(seed=0, time_limit=args.time_limit)
    solvers = args.solvers.split(",")
    rows = []
    for label, v in instances(args.quick, args.only):
        for obj in args.objectives.split(","):
            log.info("%s on %s, %s", label, v.label, obj)
            rows.append(run_instance(label, v, obj, solvers, settings))
    res = {"name": args.name, "machine": f"{platform.node()} ({platform.machine()}), Python {platform.python_version()}, "
                                         f"{os.cpu_count()} CPUs",
           "mode": "quick" if args.quick else ("subset " + args.only if args.only else "full"),
           "measured_at": time.strftime("%Y-%m-%d %H:%M"), "load_before": load_before, "rows": rows,
           "summary": summarize(rows)}
    res["load_after"] = list(os.getloadavg())
    res["total_time_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=float))
    (args.out / f"{args.name}.md").write_text(markdown(res))
    log.info("wrote %s (%.1f min)", args.out / f"{args.name}.md", res["total_time_s"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
