"""Reports of a graded plan: markdown, a Gantt chart with the critical path, a Chrome trace."""

from __future__ import annotations

import math

from ..grade import Result


def fmt_time(s: float) -> str:
    """Seconds in a readable unit."""
    if s != s or s in (float("inf"), float("-inf")):
        return str(s)
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_bytes(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.2f} {unit}"
    return f"{b:.0f} B"


def markdown(res: Result) -> str:
    """A human-readable report of a plan."""
    s = res.summary()
    obj = s["objective"]
    lines = [
        f"# Plan for `{s['model']}` on `{s['spec']}`",
        "",
        f"- objective: **{obj}**; solver: `{s['solver']}`; status: **{s['status']}**",
        f"- predicted latency: {fmt_time(s['latency_s'])}; throughput: {s['throughput_per_s']:.2f} samples/s "
        f"(period {fmt_time(s['period_s'])})",
        f"- lower bound on the {obj} figure: {fmt_time(s['bound_s'])} (binding: {s['bound_binding']}); "
        f"gap: {100 * s['gap']:.2f}% (value / bound = {s['value_s'] / s['bound_s']:.3f})"
        if s["bound_s"] > 0 else f"- lower bound: 0; gap: {100 * s['gap']:.2f}%",
        f"- latency if every link carried one transfer at a time: {fmt_time(s['latency_with_link_contention_s'])} "
        "(the canonical model lets transfers share a link freely)" if s["latency_with_link_contention_s"] is not None
        else "- latency with link contention: n/a (infeasible or replicated plan)",
        f"- nodes: {s['nodes']}; solve time: {s['solve_time_s']:.3f} s",
        "",
        "| device | nodes | busy (per sample) | params | memory peak | usable memory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for d, info in s["devices"].items():
        lines.append(f"| {d} | {info['nodes']} | {fmt_time(info['load_s'])} | {fmt_bytes(info['param_bytes'])} | "
                     f"{fmt_bytes(info['memory_peak_bytes'])} | {fmt_bytes(info['capacity_bytes'])} |")
    if s["violations"]:
        lines += ["", "## Violations", ""] + [f"- {v}" for v in s["violations"]]
    lines += _placement_sections(res)
    lines += ["", "Figures come from the evaluator (see docs/architecture.md, the machine model); the gap is "
              "(value - bound) / value against a proven lower bound.", ""]
    return "\n".join(lines)


#: the per-operator table of report.md lists at most this many nodes (the module table is always there)
MAX_NODE_ROWS = 2000


def _placement_sections(res: Result) -> list[str]:
    """Where each op went and why: modules by device, the critical path, and every operator
    with its time on its device next to its fastest device's."""
    import numpy as np

    p, plan = res.problem, res.plan
    devs = p.devices
    if plan.replicas:
        lines = ["", "## Data-parallel replicas", "", "| replica | devices | nodes per device |", "|---|---|---|"]
        for k, r in enumerate(plan.replicas):
            cnt = np.bincount(np.asarray(r.placement, dtype=np.int64), minlength=p.D)
            used = [devs[d] for d in range(p.D) if cnt[d]]
            lines.append(f"| {k} | {', '.join(used)} | "
                         f"{', '.join(f'{devs[d]} {cnt[d]}' for d in range(p.D) if cnt[d])} |")
        return lines
    ev, pl, T = res.evaluation, np.asarray(plan.placement), p.T
    nodes = p.graph.nodes
    mods = _modules(res)
    lines = ["", "## Placement by module", "",
             "| module | nodes | " + " | ".join(devs) + " | busy |", "|---|---:|" + "---:|" * p.D + "---:|"]
    seen: dict[str, list[int]] = {}
    for i, m in enumerate(mods):
        seen.setdefault(m, []).append(i)
    for m, idx in seen.items():
        cnt = np.bincount(pl[idx], minlength=p.D)
        busy = float(T[idx, pl[idx]].sum())
        lines.append(f"| `{m}` | {len(idx)} | " + " | ".join(str(c) if c else "" for c in cnt) +
                     f" | {fmt_time(busy)} |")
    best = np.where(np.isfinite(T), T, np.inf).argmin(axis=1)

    def why(i: int) -> str:
        d, f = int(pl[i]), int(best[i])
        if d == f:
            return "fastest device"
        return f"{devs[f]} would take {fmt_time(float(T[i, f]))}"

    path = critical_path(res) if ev.feasible and p.n else []
    if path:
        lines += ["", f"## Critical path ({len(path)} nodes)", "",
                  "| node | op | device | start | finish | note |", "|---|---|---|---:|---:|---|"]
        for i in path:
            lines.append(f"| `{p.node_name(i)}` | {nodes[i].op} | {devs[pl[i]]} | {fmt_time(float(ev.start[i]))} | "
                         f"{fmt_time(float(ev.finish[i]))} | {why(i)} |")
    rows = sorted(range(p.n), key=lambda i: (float(ev.start[i]), i))
    lines += ["", f"## Operators ({p.n}, by start time)" + (f"; the first {MAX_NODE_ROWS}" if p.n > MAX_NODE_ROWS
                                                             else ""), "",
              "| node | op | module | device | start | time | note |", "|---|---|---|---|---:|---:|---|"]
    for i in rows[:MAX_NODE_ROWS]:
        lines.append(f"| `{p.node_name(i)}` | {nodes[i].op} | `{nodes[i].module_path or '-'}` | {devs[pl[i]]} | "
                     f"{fmt_time(float(ev.start[i]))} | {fmt_time(float(T[i, pl[i]]))} | {why(i)} |")
    return lines


# ---- critical path, Gantt chart, Chrome trace ----------------------------------------------
def critical_path(res: Result) -> list[int]:
    """The chain of nodes that determines the latency, last node first reversed to first.

    Walks back from the node whose finish (plus its output transfer) is the latency: each
    step goes to whatever made the node start when it did, the previous node on its device
    or the input whose arrival came last.
    """
    p, ev, pl = res.problem, res.evaluation, res.plan.placement
    if p.n == 0:
        return []
    end = ev.finish.copy()
    for s, b in p.outputs:
        end[s] = max(end[s], ev.finish[s] + p.comm(pl[s], p.host, b))
    v = int(end.argmax())
    prev_on_dev = {}
    for seq in ev.order:
        for a, b in zip(seq, seq[1:]):
            prev_on_dev[b] = a
    # the evaluator's arrivals: one transfer per (producer, destination device)
    arrival = {(t.producer, t.dst): t.arrival for t in ev.transfers if t.kind == "edge"}
    path = [v]
    tol = 1e-12 + 1e-9 * float(ev.latency)
    while True:
        s = ev.start[v]
        cand = None
        for u, _ in p.pred_bytes[v]:
            arr = ev.finish[u] if pl[u] == pl[v] else arrival[(u, pl[v])]
            if arr >= s - tol and (cand is None or ev.finish[u] > ev.finish[cand]):
                cand = u
        if cand is None and v in prev_on_dev and ev.finish[prev_on_dev[v]] >= s - tol:
            cand = prev_on_dev[v]
        if cand is None:
            break
        v = int(cand)
        path.append(v)
    return path[::-1]


def _modules(res: Result) -> list[str]:
    """Each node's top-level module (its colour in the chart), by problem index."""
    return [n.module_path.split(".")[0] if n.module_path else "(top)" for n in res.problem.graph.nodes]


def gantt_png(res: Result, path, max_labels: int = 60) -> None:
    """Write :func:`gantt_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = gantt_figure(res, max_labels)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gantt_figure(res: Result, max_labels: int = 60):
    """One lane per device and one per busy directed link; ops coloured by top-level module;
    the critical path outlined in black. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, ev = res.problem, res.evaluation
    lanes = list(p.devices)
    link_lanes = sorted({(t.src, t.dst) for t in ev.transfers if t.src != t.dst})
    lanes += [f"{p.devices[a]}->{p.devices[b]}" for a, b in link_lanes]
    mod_of = _modules(res)
    mods = sorted(set(mod_of))
    cmap = plt.get_cmap("tab20")
    colour = {m: cmap(k % 20) for k, m in enumerate(mods)}
    crit = set(critical_path(res))
    scale, unit = (1e3, "ms") if ev.latency >= 1e-3 else (1e6, "us")
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.45 * len(lanes)))
    for i in range(p.n):
        d = res.plan.placement[i]
        ax.barh(d, (ev.finish[i] - ev.start[i]) * scale, left=ev.start[i] * scale, height=0.7,
                color=colour[mod_of[i]], edgecolor="black" if i in crit else "none",
                linewidth=1.2 if i in crit else 0)
    for t in ev.transfers:
        if t.src == t.dst or not math.isfinite(t.arrival):
            continue
        y = p.D + link_lanes.index((t.src, t.dst))
        ax.barh(y, (t.arrival - t.start) * scale, left=t.start * scale, height=0.5, color="#999999")
    ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    s = res.summary()
    ax.set_title(f"{s['model']} on {s['spec']} ({s['solver']}, {s['status']}): latency "
                 f"{fmt_time(s['latency_s'])}, bound {fmt_time(s['bound_s'])}; outlined: critical path",
                 fontsize=9)
    if len(mods) <= max_labels:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colour[m], label=m) for m in mods], fontsize=6, ncol=min(6, len(mods)),
                  loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(lanes) < 6 else -0.12), frameon=False)
    fig.tight_layout()
    return fig


def chrome_trace(res: Result) -> dict:
    """The predicted schedule in Chrome trace format (open in Perfetto or chrome://tracing):
    one thread per device and per link, times in microseconds."""
    p, ev = res.problem, res.evaluation
    events = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": f"{p.graph.name} plan"}}]
    for d, name in enumerate(p.devices):
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": d, "args": {"name": name}})
    crit = set(critical_path(res))
    mod_of, nodes = _modules(res), p.graph.nodes
    for i in range(p.n):
        d = res.plan.placement[i]
        events.append({"ph": "X", "pid": 0, "tid": d, "name": p.node_name(i), "cat": mod_of[i],
                       "ts": ev.start[i] * 1e6, "dur": (ev.finish[i] - ev.start[i]) * 1e6,
                       "args": {"op": nodes[i].op, "critical": i in crit}})
    link_tid = {}
    for t in ev.transfers:
        if t.src == t.dst or not math.isfinite(t.arrival):
            continue
        key = (t.src, t.dst)
        if key not in link_tid:
            link_tid[key] = p.D + len(link_tid)
            events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": link_tid[key],
                           "args": {"name": f"{p.devices[t.src]}->{p.devices[t.dst]}"}})
        src = p.node_name(t.producer) if t.producer >= 0 else "input"
        events.append({"ph": "X", "pid": 0, "tid": link_tid[key], "name": f"{src} ({fmt_bytes(t.bytes)})",
                       "cat": t.kind, "ts": t.start * 1e6, "dur": (t.arrival - t.start) * 1e6})
    return {"traceEvents": events, "displayTimeUnit": "ns"}
