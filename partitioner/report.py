"""Reports of a graded plan: a markdown report (and, later, Gantt charts and traces)."""

from __future__ import annotations

from .api import Result


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
    lines += ["", "Figures come from the evaluator (see DESIGN.md, the machine model); the gap is "
              "(value - bound) / value against a proven lower bound.", ""]
    return "\n".join(lines)
