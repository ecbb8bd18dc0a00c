"""LLM benchmark (issue 6): symmetry-reduced placement of decoder LLMs on heterogeneous servers.

Measured here, on this machine, by this script (every figure comes from the evaluator;
bounds from :func:`partitioner.bounds.lower.lower_bound`):

1. **70B target**: ``llama-70b`` (80 layers, d=8192, 64 heads, 8 KV heads, ffn 28672, fp16,
   batch 1, 128 tokens) traced at operator level on the meta device and placed on
   ``hetero-2server`` by the ``symmetry`` solver, for latency and for throughput: the
   time of each step (trace, problem, solve; the bound separately), whether the plan is
   valid and memory-feasible, the per-device memory, and the gap to the bound.
2. **Reduced vs full**: the ``symmetry`` solve against full operator-level solves
   (``split`` and ``heft``) on smaller configurations on ``hetero-2server`` and
   ``h100-server``: value ratio (symmetry / best full) and speedup (full time / symmetry
   time). Infeasible full plans are reported as such. Each solver's time is the median of
   ``--repeats`` solves (default 3), each on a fresh Problem (solvers are deterministic:
   the plans are the same).
3. **Memory**: the 70B model fits on no single device of ``hetero-2server`` (``single``'s
   error); with a KV cache of 8 x 4096 tokens the plan still fits; with 256 x 4096 tokens
   nothing does, and the errors of ``symmetry``, ``single`` and ``lower_bound`` say how
   much memory is missing.
4. **Data + model parallelism**: throughput of the symmetry solver with replicas against
   its best single pipeline and against ``pipeline-dp`` (the best contiguous pipeline
   baseline) and ``split``.

Usage::

    python bench/llm.py                   # everything (about 5-10 minutes on 2 shared cores)
    python bench/llm.py --quick           # the 70B target and two small configurations
    python bench/llm.py --steps reduced   # re-run one step, keep the others' figures

Every timed solve starts after a full garbage collection: otherwise a collection of the
benchmark's own heap (the traced models, about 0.3 s here once the 70B graph has been built)
lands in whichever solve happens to cross Python's threshold, which swamps solves of 0.05 s.

Writes ``bench/results/llm.json`` and ``bench/results/llm.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioner.zoo.gpt2 import gpt2  # noqa: E402
from partitioner.zoo.llama import cost_graph, llama  # noqa: E402

import partitioner.solvers.symmetry.solver  # noqa: E402,F401  (registers the solver)
from partitioner.bounds.lower import lower_bound  # noqa: E402
from partitioner.errors import InfeasibleError, PartitionerError  # noqa: E402
from partitioner.ir.settings import Settings  # noqa: E402
from partitioner.ir.spec import load_spec  # noqa: E402
from partitioner.machine.evaluate import evaluate  # noqa: E402
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import solve  # noqa: E402

log = logging.getLogger("bench.llm")

SMALL = {  # name -> factory
    "llama-125m": lambda: llama("llama-125m", device="meta"),
    "gpt2": lambda: gpt2("gpt2", device="meta"),
    "gpt2-medium": lambda: gpt2("gpt2-medium", device="meta"),
    "llama-1b": lambda: llama("llama-1b"),
    "llama-7b": lambda: llama("llama-7b"),
}
QUICK = ("llama-125m", "llama-7b")
SPECS = ("hetero-2server", "h100-server")
OBJECTIVES = ("latency", "throughput")


def _trace(name: str, factory) -> tuple:
    t0 = time.perf_counter()
    model, inputs = factory()
    g = cost_graph(model, inputs, name)
    return g, time.perf_counter() - t0


def _run(problem: Problem, solver: str, **extra) -> dict:
    gc.collect()  # the benchmark's own heap (traced models) is not collected inside a timed solve
    t0 = time.perf_counter()
    try:
        plan = solve(problem, solver, Settings(time_limit=120, seed=0, extra=extra))
    except PartitionerError as err:
        return {"solver": solver, "status": "error", "error": err.message, "time_s": time.perf_counter() - t0}
    dt = time.perf_counter() - t0
    ev = evaluate(problem, plan)
    return {"solver": solver, "status": "feasible" if ev.feasible else "infeasible", "time_s": dt,
            "value_s": ev.value(problem.objective), "latency_s": ev.latency, "period_s": ev.period,
            "throughput_per_s": ev.throughput, "violations": list(ev.violations[:2]),
            "replicas": len(plan.replicas) if plan.replicas else 1, "_plan": plan, "_ev": ev}


def _clean(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def target_70b(out: dict) -> None:
    g, t_trace = _trace("llama-70b", lambda: llama("llama-70b", batch=1, seq=128))
    spec = load_spec("hetero-2server")
    rows = []
    for objective in OBJECTIVES:
        t0 = time.perf_counter()
        p = Problem(g, spec, objective)
        t_prob = time.perf_counter() - t0
        r = _run(p, "symmetry")
        t0 = time.perf_counter()
        b = lower_bound(p)
        t_bound = time.perf_counter() - t0
        ev, plan = r["_ev"], r["_plan"]
        info = plan.info
        row = {"objective": objective, "nodes": p.n, "devices": p.D, "trace_s": t_trace, "problem_s": t_prob,
               "solve_s": r["time_s"], "placed_in_s": t_trace + t_prob + r["time_s"], "bound_s": b.value,
               "bound_binding": b.binding, "bound_time_s": t_bound, "value_s": r["value_s"],
               "gap": (r["value_s"] - b.value) / r["value_s"], "feasible": ev.feasible,
               "violations": list(ev.violations), "replicas": r["replicas"], "pipelines": info.get("pipelines"),
               "memory_peak_GB": {d: round(float(ev.memory_peak[i]) / 1e9, 2) for i, d in enumerate(p.devices)},
               "capacity_GB": {d: round(float(p.capacity[i]) / 1e9, 2) for i, d in enumerate(p.devices)},
               "reduction": {k: info.get(k) for k in ("nodes_full", "nodes_reduced", "blocks", "block_nodes",
                                                     "devices_full", "devices_reduced", "device_classes",
                                                     "server_types", "lattice", "dp_states", "stage_kinds",
                                                     "reduce_total_s")}}
        rows.append(row)
        log.info("70B %s: %s in %.2f s (placed in %.1f s), value %.4g, bound %.4g, gap %.1f%%", objective,
                 "feasible" if ev.feasible else "INFEASIBLE", r["time_s"], row["placed_in_s"], r["value_s"], b.value,
                 100 * row["gap"])
    out["target_70b"] = rows


def _timed(g, spec, objective: str, solver: str, repeats: int) -> dict:
    """The run of median time among ``repeats`` solves, each on a fresh Problem (so that no solver
    reuses what another one's solve cached on the problem, e.g. link times)."""
    runs = [_run(Problem(g, spec, objective), solver) for _ in range(max(1, repeats))]
    runs.sort(key=lambda r: r["time_s"])
    r = dict(runs[len(runs) // 2])
    r["times_s"] = [x["time_s"] for x in runs]
    return r


def reduced_vs_full(out: dict, names, repeats: int = 3) -> None:
    rows = []
    for name in names:
        g, t_trace = _trace(name, SMALL[name])
        for spec_name in SPECS:
            spec = load_spec(spec_name)
            for objective in OBJECTIVES:
                p = Problem(g, spec, objective)
                sym = _timed(g, spec, objective, "symmetry", repeats)
                full = [_timed(g, spec, objective, s, repeats) for s in ("split", "heft")]
                ok = [f for f in full if f["status"] == "feasible"]
                best = min(ok, key=lambda f: f["value_s"]) if ok else None
                row = {"model": name, "spec": spec_name, "objective": objective, "nodes": p.n,
                       "trace_s": t_trace, "symmetry": _clean(sym), "full": [_clean(f) for f in full],
                       "best_full": best["solver"] if best else None,
                       "value_ratio": sym["value_s"] / best["value_s"] if best and "value_s" in sym else None,
                       "speedup_vs_split": full[0]["time_s"] / sym["time_s"],
                       "speedup_vs_best": best["time_s"] / sym["time_s"] if best else None,
                       "nodes_reduced": sym["_plan"].info.get("nodes_reduced") if "_plan" in sym else None,
                       "devices_reduced": sym["_plan"].info.get("devices_reduced") if "_plan" in sym else None}
                info = sym["_plan"].info if "_plan" in sym else {}
                unpol = info.get("unpolished_value_s")
                row.update(unpolished_ratio=unpol / best["value_s"] if best and unpol else None,
                           polish_work=info.get("polish_work"), polish_s=info.get("polish_s"),
                           chosen=info.get("chosen"))
                rows.append(row)
                log.info("%s %s %s: ratio %s, speedup vs split %.1fx", name, spec_name, objective,
                         f"{row['value_ratio']:.4f}" if row["value_ratio"] else "-", row["speedup_vs_split"])
    out["reduced_vs_full"] = rows


def memory(out: dict) -> None:
    spec = load_spec("hetero-2server")
    rows = []
    for label, kw in (("no KV cache, batch 1 x 128 tokens", dict(batch=1, seq=128)),
                      ("decode, batch 8, 4096 cached tokens", dict(batch=8, seq=1, kv_cache_tokens=4096)),
                      ("decode, batch 256, 4096 cached tokens", dict(batch=256, seq=1, kv_cache_tokens=4096))):
        g, t_trace = _trace("llama-70b", lambda kw=kw: llama("llama-70b", **kw))
        p = Problem(g, spec, "latency")
        need = float(p.param_bytes.sum())
        row = {"case": label, "resident_GB": need / 1e9, "max_device_GB": float(p.capacity.max()) / 1e9,
               "total_usable_GB": float(p.capacity.sum()) / 1e9, "fits_one_device": bool(need <= p.capacity.max())}
        for solver in ("single", "symmetry"):
            r = _run(p, solver)
            row[solver] = _clean(r) if "error" not in r else {"status": "error", "error": r["error"]}
        try:
            lower_bound(p)
            row["lower_bound"] = "ok"
        except InfeasibleError as err:
            row["lower_bound"] = err.message
        rows.append(row)
        log.info("memory %s: single %s, symmetry %s", label, row["single"]["status"], row["symmetry"]["status"])
    out["memory"] = rows


def data_parallel(out: dict) -> None:
    rows = []
    for name, factory, spec_name in (("llama-70b", lambda: llama("llama-70b"), "hetero-2server"),
                                     ("llama-7b", lambda: llama("llama-7b"), "hetero-2server"),
                                     ("llama-7b", lambda: llama("llama-7b"), "h100-server"),
                                     ("llama-13b", lambda: llama("llama-13b"), "h100-server")):
        g, _ = _trace(name, factory)
        p = Problem(g, load_spec(spec_name), "throughput")
        runs = {"symmetry (replicas)": _run(p, "symmetry"),
                "symmetry (one pipeline)": _run(p, "symmetry", replicate=False),
                "pipeline-dp": _run(p, "pipeline-dp"), "split": _run(p, "split")}
        pdp = runs["pipeline-dp"]
        row = {"model": name, "spec": spec_name, "nodes": p.n,
               "runs": {k: _clean(v) for k, v in runs.items()},
               "pipelines": runs["symmetry (replicas)"]["_plan"].info.get("pipelines"),
               "gain_over_pipeline_dp": runs["symmetry (replicas)"]["throughput_per_s"] / pdp["throughput_per_s"]
               if pdp.get("status") == "feasible" else None,
               "gain_over_own_pipeline": runs["symmetry (replicas)"]["throughput_per_s"]
               / runs["symmetry (one pipeline)"]["throughput_per_s"]}
        rows.append(row)
        log.info("%s on %s: replicas %d, gain over pipeline-dp %s", name, spec_name,
                 runs["symmetry (replicas)"]["replicas"], row["gain_over_pipeline_dp"])
    out["data_parallel"] = rows


# ---- report ------------------------------------------------------------------------------------
def _f(x, fmt=".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def markdown(out: dict) -> str:
    m = out["meta"]
    L = [f"LLM placement (issue 6), measured {m['date']} by `bench/llm.py` on {m['machine']} "
         f"(load average {m['load_avg']}; the machine is shared, so times are noisy).", ""]
    kept = {k: d for k, d in m.get("section_dates", {}).items() if d != m["date"]}
    if kept:
        L += ["Sections kept from earlier runs: " + ", ".join(f"{k} ({d})" for k, d in sorted(kept.items())) + ".", ""]
    if "target_70b" in out:
        L += ["## llama-70b (80 layers, fp16, 128 tokens) on hetero-2server, `symmetry` solver", "",
              "| objective | nodes | trace s | solve s | placed in s | value s | bound s | gap | feasible | plan |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in out["target_70b"]:
            L.append(f"| {r['objective']} | {r['nodes']} | {r['trace_s']:.1f} | {r['solve_s']:.2f} | "
                     f"{r['placed_in_s']:.1f} | {_f(r['value_s'])} | {_f(r['bound_s'])} ({r['bound_binding']}) | "
                     f"{100 * r['gap']:.1f}% | {r['feasible']} | {r['pipelines']} |")
        r0 = out["target_70b"][0]
        L += ["", f"Reduction: {r0['reduction']['nodes_full']} nodes -> {r0['reduction']['blocks']} blocks of "
                  f"{r0['reduction']['block_nodes']} nodes ({r0['reduction']['nodes_reduced']} nodes with prologue "
                  f"and epilogue); {r0['reduction']['devices_full']} devices -> {r0['reduction']['devices_reduced']} "
                  f"classes {r0['reduction']['device_classes']}.",
              "Memory peak / usable (GB), latency plan: "
              + ", ".join(f"{d} {r0['memory_peak_GB'][d]}/{r0['capacity_GB'][d]}" for d in r0["memory_peak_GB"]), ""]
    if "reduced_vs_full" in out:
        L += ["## Symmetry-reduced solve vs full operator-level solves", "",
              "value ratio = symmetry / best feasible full plan (below 1: symmetry better); unpolished = the "
              "expanded reduced plan before the polish; speedup = full solve time / symmetry time, each the median of "
              f"{out['meta'].get('repeats', 1)} solve(s) on a fresh Problem.", "",
              "| model | spec | objective | nodes | symmetry s | split s | heft s | value ratio | unpolished | "
              "best full | speedup vs split |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        rows = out["reduced_vs_full"]
        for r in rows:
            s, (sp, hf) = r["symmetry"], r["full"]
            cell = lambda f: (f"{f['time_s']:.2f}"  # noqa: E731
                              + ("" if f["status"] == "feasible" else f" ({f['status']})"))
            L.append(f"| {r['model']} | {r['spec']} | {r['objective']} | {r['nodes']} | {s['time_s']:.3f} | "
                     f"{cell(sp)} | {cell(hf)} | {_f(r['value_ratio'], '.4f')} | "
                     f"{_f(r.get('unpolished_ratio'), '.4f')} | {r['best_full']} | {r['speedup_vs_split']:.1f}x |")
        ratios = [r["value_ratio"] for r in rows if r["value_ratio"] is not None]
        speed = [r["speedup_vs_split"] for r in rows]
        L += ["", f"Within 2% of the best full plan: {sum(x <= 1.02 for x in ratios)} of {len(ratios)} "
                  f"(worst {max(ratios):.4f}); at least 10x faster than split: {sum(x >= 10 for x in speed)} of "
                  f"{len(speed)} ({min(speed):.1f}-{max(speed):.1f}x).", ""]
    if "memory" in out:
        L += ["## Memory (llama-70b on hetero-2server, latency)", "",
              "| case | resident GB | largest device GB | usable in all GB | single | symmetry | lower_bound |",
              "|---|---:|---:|---:|---|---|---|"]
        for r in out["memory"]:
            cell = lambda x: x["status"] if x["status"] != "error" else "error: " + x["error"]  # noqa: E731
            L.append(f"| {r['case']} | {r['resident_GB']:.1f} | {r['max_device_GB']:.1f} | "
                     f"{r['total_usable_GB']:.1f} | {cell(r['single'])} | {cell(r['symmetry'])} | {r['lower_bound']} |")
        L.append("")
    if "data_parallel" in out:
        L += ["## Data + model parallelism (throughput, samples/s)", "",
              "| model | spec | symmetry (replicas) | symmetry (one pipeline) | pipeline-dp | split | "
              "gain over pipeline-dp | replicas |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in out["data_parallel"]:
            ru = r["runs"]
            tp = lambda k: _f(ru[k].get("throughput_per_s"), ".2f") + (  # noqa: E731
                "" if ru[k].get("status") == "feasible" else f" ({ru[k].get('status')})")
            L.append(f"| {r['model']} | {r['spec']} | {tp('symmetry (replicas)')} | {tp('symmetry (one pipeline)')} | "
                     f"{tp('pipeline-dp')} | {tp('split')} | {_f(r['gain_over_pipeline_dp'], '.3f')} | "
                     f"{r['pipelines']} |")
        L.append("")
    return "\n".join(L)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 70B target and two small configurations only")
    ap.add_argument("--steps", default="target,reduced,memory,dp",
                    help="comma-separated steps to run (target, reduced, memory, dp); the sections of the "
                         "others are kept from the existing llm.json (re-run a noisy step alone)")
    ap.add_argument("--repeats", type=int, default=3, help="reduced vs full: solves per solver and row, each on a "
                    "fresh Problem; the median time is reported")
    args = ap.parse_args(argv)
    wanted = {x.strip() for x in args.steps.split(",") if x.strip()}
    unknown = wanted - {"target", "reduced", "memory", "dp"}
    if unknown:
        ap.error(f"unknown steps: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("partitioner", "partitioner.solvers.symmetry.solver"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out: dict = {"meta": {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                          "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "quick": args.quick, "repeats": args.repeats}}
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    named = {"target": target_70b,
             "reduced": lambda o: reduced_vs_full(o, QUICK if args.quick else tuple(SMALL), args.repeats),
             "memory": memory, "dp": data_parallel}
    order = ["target", "reduced"] + ([] if args.quick else ["memory", "dp"])
    steps = [named[k] for k in order if k in wanted]
    keys = {"target": "target_70b", "reduced": "reduced_vs_full", "memory": "memory", "dp": "data_parallel"}
    dates = {keys[k]: out["meta"]["date"] for k in order if k in wanted}
    if wanted != set(named) and (res / "llm.json").exists():  # keep the other steps' figures
        old = json.loads((res / "llm.json").read_text())
        for k in named:
            if k not in wanted and keys[k] in old:
                out[keys[k]] = old[keys[k]]
                meta = old.get("meta", {})
                dates[keys[k]] = meta.get("section_dates", {}).get(keys[k], meta.get("date"))
    out["meta"]["section_dates"] = dates
    t0 = time.perf_counter()
    for step in steps:
        step(out)
        out["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
        (res / "llm.json").write_text(json.dumps(out, indent=1, default=float))
        (res / "llm.md").write_text(markdown(out))
    log.info("wrote %s and %s in %.0f s", res / "llm.json", res / "llm.md", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
