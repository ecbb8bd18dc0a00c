"""Time limits at any size (issue 21): compile time against node count, up to 100,000 nodes.

For each size, a chain and a DNN-like cost graph (``partitioner.zoo.synthetic``, built
directly: no tracing) are compiled for ``server-cpu-2gpu`` with ``split`` under a time limit,
both objectives, each in a fresh subprocess (``partitioner.api.compile_plan`` on the graph,
as ``partitioner compile graph.json --time-limit L`` does after loading it). Measured per
run: the time to build the problem, the lower bound's time and the parts it skipped, the
solver's time, the whole wall time of the subprocess, the peak RSS, the plan's status and
value / bound. The time limit covers bound + solve (the bound may start parts during the
first quarter of it); the table shows by how much bound + solve overran it.

Usage::

    python bench/scale.py                  # sizes up to 100,000, limit 20 s (about 15 minutes)
    python bench/scale.py --quick          # sizes up to 20,000, limit 5 s

Writes ``bench/results/scale.json`` and ``scale.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from partitioner import api
from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.settings import Settings
from partitioner.zoo.synthetic import dnn_cost_graph
kind, n, objective, limit = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
if kind == "chain":
    nodes = [Node(id=f"n{i}", op="matmul", flops=1e6 * (1 + i % 7), param_bytes=1000 * (i % 5), output_bytes=4096)
             for i in range(n)]
    edges = [(f"n{i}", f"n{i + 1}", 4096) for i in range(n - 1)]
    graph = CostGraph(f"chain{n}", nodes, edges, [InputTensor("x", 4096, ("n0",))], [(f"n{n - 1}", 4096)])
else:
    graph = dnn_cost_graph(n, seed=0)
t1 = time.perf_counter()
res = api.compile_plan(graph, "server-cpu-2gpu", objective, "split", Settings(time_limit=limit))
t2 = time.perf_counter()
print(json.dumps({"build_s": t1 - t0, "compile_s": res.extra["compile_time_s"], "bound_s": res.bound.info["seconds"],
                  "skipped": res.bound.info.get("skipped", []), "solve_s": res.plan.solve_time_s,
                  "status": res.status, "value_over_bound": res.value / res.best_bound if res.best_bound > 0 else None,
                  "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def run(kind: str, n: int, objective: str, limit: float) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(n), objective, str(limit)], capture_output=True,
                       text=True, timeout=max(600.0, 20 * limit))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"kind": kind, "n": n, "objective": objective, "limit_s": limit, "error": r.stderr.strip()[-400:],
                "wall_s": wall}
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    rec.update(kind=kind, n=n, objective=objective, limit_s=limit, wall_s=wall,
               overrun_s=rec["bound_s"] + rec["solve_s"] - limit)
    return rec


def markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Time limits at any size: compile time against node count", "",
           f"`bench/scale.py` on {meta['machine']}, {meta['date']}, load {meta['load_before']:.2f} -> "
           f"{meta['load_after']:.2f}. `split` on `server-cpu-2gpu`, each run in a fresh process; the time limit "
           "covers the lower bound and the solve (`bound + solve - limit` is the overrun; negative: "
           "finished early). Build: the cost graph and the problem (no tracing). Wall: the whole "
           "subprocess, Python start-up and imports included.", "",
           "| graph | nodes | objective | limit s | build s | bound s | bound parts skipped | solve s | "
           "bound + solve - limit s | wall s | peak RSS GB | status | value / bound |",
           "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['kind']} | {r['n']} | {r['objective']} | {r['limit_s']:g} | error: "
                       f"{r['error'].splitlines()[-1] if r['error'] else '?'} |||||||||")
            continue
        vb = f"{r['value_over_bound']:.3f}" if r["value_over_bound"] is not None else "n/a"
        out.append(f"| {r['kind']} | {r['n']:,} | {r['objective']} | {r['limit_s']:g} | {r['build_s']:.1f} | "
                   f"{r['bound_s']:.1f} | {', '.join(r['skipped']) or '-'} | {r['solve_s']:.1f} | "
                   f"{r['overrun_s']:+.1f} | {r['wall_s']:.1f} | {r['rss_gb']:.2f} | {r['status']} | {vb} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        worst = max(ok, key=lambda r: r["overrun_s"])
        out += ["", f"Largest overrun of the limit by bound + solve: {worst['overrun_s']:+.1f} s "
                f"({worst['kind']}, {worst['n']:,} nodes, {worst['objective']}). Errors: "
                f"{sum('error' in r for r in rows)}."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit", type=float, default=None, help="time limit of each compile (default 20 s, quick 5 s)")
    a = ap.parse_args()
    sizes = (1_000, 5_000, 20_000) if a.quick else (1_000, 5_000, 10_000, 20_000, 50_000, 100_000)
    limit = a.limit or (5.0 if a.quick else 20.0)
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "limit_s": limit}
    rows = []
    for n in sizes:
        for kind in ("chain", "dnn"):
            for objective in ("latency", "throughput"):
                rows.append(run(kind, n, objective, limit))
                print(json.dumps(rows[-1]), flush=True)
    meta["load_after"] = os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    name = "scale-quick" if a.quick else "scale"
    (OUT / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (OUT / f"{name}.md").write_text(markdown(rows, meta))
    print(f"wrote {OUT / name}.md")


if __name__ == "__main__":
    main()
