"""Exact-solver benchmark (issue 3): time to optimality, or the gap at the time limit, of
the latency MILP on CBC and on HiGHS and of CP-SAT, and how tight our lower bound is.

Instances: zoo graphs (ResNet-50, the Inception-style CNN, the BERT-style encoder) and
RandWire graphs (WS, ER), each traced and then coarsened (``partitioner.transform.coarsen``: backend
fusion rules, then merges) to about 30 / 60 / 120 / 250 nodes, on the default spec
``server-cpu-2gpu`` and on ``edge-soc`` (where the NPU's unsupported ops force splits). Coarsening may stop above or below a target (it never makes an illegal
merge, and the fusion rules alone can go below it); the table lists the actual size.

Every figure is measured here, on this machine, by this script: ``time_s`` is the wall
time of the solve (model building included), ``status`` the solver's own proven status on
the coarse problem, ``gap`` = (value - best bound) / value with the best bound = the larger
of the solver's proven bound and ours (``partitioner.bounds.lower``) on the same coarse problem,
and ``bound/opt`` = our bound / the best proven optimum of that instance (when one solver
proved it).

Usage::

    python bench/exact.py                    # the default matrix, 60 s per solve
    python bench/exact.py --time-limit 600   # the long run of the issue (hours on 2 cores)
    python bench/exact.py --quick            # 30/60 nodes, 20 s, a few minutes
    python bench/exact.py --time-limit 600 --graphs inception,bert --sizes 60 \
        --specs server-cpu-2gpu --solvers milp-highs,cpsat --tag 600s   # a long-run subset

Writes ``bench/results/exact.json`` and ``bench/results/exact.md`` (``exact-TAG.*`` with ``--tag``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from partitioner import api  # noqa: E402
from partitioner.bounds.lower import lower_bound  # noqa: E402
from partitioner.errors import PartitionerError  # noqa: E402
from partitioner.ir.settings import Settings  # noqa: E402
from partitioner.ir.spec import load_spec  # noqa: E402
from partitioner.machine.problem import Problem
from partitioner.solvers.registry import solve  # noqa: E402

log = logging.getLogger("bench.exact")

GRAPHS = {  # name -> (zoo model, factory kwargs)
    "resnet50": ("resnet50", {}),
    "inception": ("inception", {}),
    "bert": ("bert", {}),
    "randwire-ws": ("randwire-ws", {"nodes": 16, "seed": 1}),
    "randwire-er": ("randwire-er", {"nodes": 16, "seed": 2}),
}
SOLVERS = ("milp-cbc", "milp-highs", "cpsat")
#: The disjunctive MILP has O(n^2 D) binaries; above this size PuLP's model build alone
#: takes minutes and GBs, so the bench records it as skipped instead of timing the build.
MILP_MAX_NODES = 130


def run_one(problem: Problem, solver: str, time_limit: float) -> dict:
    t0 = time.perf_counter()
    try:
        plan = solve(problem, solver, Settings(time_limit=time_limit, threads=1, seed=0))
    except PartitionerError as err:
        return {"status": "error", "error": err.message, "time_s": time.perf_counter() - t0}
    dt = time.perf_counter() - t0
    res = api.grade(problem, plan)
    return {"status": res.status, "value_s": res.value, "solver_bound_s": plan.solver_bound,
            "best_bound_s": res.best_bound, "gap": res.gap, "time_s": dt}


OUT = {"name": "exact", "solvers": SOLVERS}


def bench(sizes: list[int], graphs: list[str], time_limit: float, spec_names: list[str]) -> list[dict]:
    rows: list[dict] = []
    for spec_name in spec_names:
        _bench_spec(rows, sizes, graphs, time_limit, spec_name, spec_names)
    return rows


def _bench_spec(rows, sizes, graphs, time_limit, spec_name, spec_names) -> None:
    solvers = OUT["solvers"]
    spec = load_spec(spec_name)
    for gname in graphs:
        model, kw = GRAPHS[gname]
        loaded = api.load_model(model, model_kwargs=kw)
        fine = Problem(loaded.graph, spec, "latency")
        for target in sizes:
            _, cp = api.coarsen_problem(fine, target)
            if any(r["graph"] == gname and r["nodes"] == cp.n and r["spec"] == spec_name for r in rows):
                continue  # fusion alone reached this size already
            t0 = time.perf_counter()
            bound = lower_bound(cp)
            tb = time.perf_counter() - t0
            row = {"spec": spec_name, "graph": gname, "fine_nodes": fine.n, "target": target, "nodes": cp.n,
                   "edges": sum(len(s) for s in cp.succs), "bound_s": bound.value,
                   "bound_binding": bound.binding, "bound_time_s": tb, "solvers": {}}
            for s in solvers:
                if s.startswith("milp") and cp.n > MILP_MAX_NODES:
                    row["solvers"][s] = {"status": "skipped", "error": f"{cp.n} nodes > {MILP_MAX_NODES}"}
                    continue
                log.info("%s @%d nodes: %s", gname, cp.n, s)
                row["solvers"][s] = run_one(cp, s, time_limit)
                r = row["solvers"][s]
                log.info("  -> %s %.2fs gap %s", r["status"], r["time_s"], r.get("gap"))
            proven = [r["value_s"] for r in row["solvers"].values() if r["status"] == "optimal"]
            best = [r["value_s"] for r in row["solvers"].values() if "value_s" in r]
            row["optimum_s"] = min(proven) if proven else None
            row["best_value_s"] = min(best) if best else None
            row["bound_over_opt"] = bound.value / min(proven) if proven else None
            row["bound_over_best"] = bound.value / min(best) if best else None
            rows.append(row)
            _save(rows, time_limit, spec_names)  # keep what is measured if a long run is cut


def _save(rows, time_limit, spec_names) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"time_limit_s": time_limit, "specs": spec_names, "objective": "latency", "threads": 1,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / f"{OUT['name']}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{OUT['name']}.md").write_text(markdown(rows, meta))


def _cell(r: dict) -> str:
    st = r["status"]
    if st == "optimal":
        return f"opt {r['time_s']:.1f} s"
    if st == "skipped":
        return "skipped (size)"
    if "gap" in r and r["gap"] is not None and math.isfinite(r["gap"]):
        return f"{st} gap {100 * r['gap']:.1f}%"
    return st


def markdown(rows: list[dict], meta: dict) -> str:
    solvers = OUT["solvers"]
    lines = [f"Exact solvers, latency objective, {meta['time_limit_s']:g} s per solve, "
             f"1 thread, measured {meta['date']} by `bench/exact.py`.", "",
             "| spec | graph | nodes | " + " | ".join(solvers) + " | bound/opt | bound binding |",
             "|---|---|---:|" + "---|" * len(solvers) + "---:|---|"]
    for row in rows:
        bo = row["bound_over_opt"]
        bo_s = f"{bo:.3f}" if bo is not None else (
            f"≥{row['bound_over_best']:.3f}*" if row["bound_over_best"] is not None else "-")
        lines.append(f"| {row['spec']} | {row['graph']} | {row['nodes']} | "
                     + " | ".join(_cell(row["solvers"][s]) for s in solvers) + f" | {bo_s} | {row['bound_binding']} |")
    lines += ["", "`opt T s`: proven optimal (for the coarsened problem) in T seconds; `time_limit gap G`: the "
              "incumbent at the limit, G = (value - best bound) / value; `*`: no solver proved the optimum, so "
              "bound / best value found is shown (a lower estimate of bound/opt)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--sizes", default="30,60,120,250")
    ap.add_argument("--graphs", default=",".join(GRAPHS))
    ap.add_argument("--specs", default="server-cpu-2gpu,edge-soc")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--tag", default="", help="write bench/results/exact-TAG.{json,md}")
    ap.add_argument("--quick", action="store_true", help="30/60 nodes, 20 s per solve")
    a = ap.parse_args()
    OUT["solvers"] = tuple(a.solvers.split(","))
    OUT["name"] = f"exact-{a.tag}" if a.tag else "exact"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sizes = [int(x) for x in a.sizes.split(",")]
    tl = a.time_limit
    if a.quick:
        sizes, tl = [30, 60], 20.0
    rows = bench(sizes, a.graphs.split(","), tl, a.specs.split(","))
    print((ROOT / "bench" / "results" / f"{OUT['name']}.md").read_text())  # noqa: T201 (a script)
    del rows


if __name__ == "__main__":
    main()
