"""Reports: the critical path is a real chain that explains the latency; Gantt and Chrome trace."""

from __future__ import annotations

import json

import pytest
from instances import random_graph, random_spec

from partitioner.grade import grade
from partitioner.ir.settings import Settings
from partitioner.machine.problem import Problem
from partitioner.report.render import (
    chrome_trace,
    critical_path,
    gantt_figure,
    gantt_png,
    markdown,
)
from partitioner.solvers.registry import solve


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_critical_path_is_a_tight_chain(seed):
    p = Problem(random_graph(seed, 40), random_spec(seed, 3), "latency")
    res = grade(p, solve(p, "heft", Settings()))
    ev, pl = res.evaluation, res.plan.placement
    path = critical_path(res)
    assert path
    # the first node starts when its inputs from the host arrive (or at 0): nothing before it
    first = path[0]
    ready = max([p.comm(p.host, pl[first], p.in_tensors[k][0]) for k in p.node_inputs[first]] + [0.0])
    assert ev.start[first] == pytest.approx(ready, rel=1e-9, abs=1e-15)
    prev_on_dev = {b: a for seq in ev.order for a, b in zip(seq, seq[1:])}
    sent = {(t.producer, t.dst): t for t in ev.transfers if t.kind == "edge"}
    for u, v in zip(path, path[1:]):
        assert u in p.preds[v] or prev_on_dev.get(v) == u
        if u in p.preds[v] and pl[u] != pl[v]:  # the transfer the evaluator charges for u -> v's device
            t = sent[(u, pl[v])]
            nbytes = max(b for w, b in p.succ_bytes[u] if pl[w] == pl[v])
            assert t.arrival == pytest.approx(ev.finish[u] + p.comm(pl[u], pl[v], nbytes), rel=1e-9)
            arrival = t.arrival
        else:
            arrival = ev.finish[u]
        # tight: v starts exactly when u's result is there (no slack anywhere on the chain)
        assert ev.start[v] == pytest.approx(arrival, rel=1e-9, abs=1e-15)
    last = path[-1]
    tail = max([p.comm(pl[last], p.host, b) for s, b in p.outputs if s == last] + [0.0])
    assert ev.finish[last] + tail == pytest.approx(ev.latency, rel=1e-9)


def test_gantt_and_chrome_trace(tmp_path):
    p = Problem(random_graph(5, 30), random_spec(5, 3), "latency")
    res = grade(p, solve(p, "peft", Settings()))
    gantt_png(res, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tr = json.loads(json.dumps(chrome_trace(res)))
    ops = [e for e in tr["traceEvents"] if e["ph"] == "X" and e["tid"] < p.D]
    assert len(ops) == p.n and all(e["dur"] >= 0 for e in ops)
    assert max(e["ts"] + e["dur"] for e in ops) <= res.evaluation.latency * 1e6 * (1 + 1e-9)
    md = markdown(res)
    assert "Plan for" in md and "## Placement by module" in md and "## Critical path" in md
    assert md.count("fastest device") + md.count("would take") >= p.n  # every operator says why


def test_gantt_lanes_bars_and_critical_path_outline():
    """The chart has one lane per device and per busy directed link, one bar per node and
    per transfer, and exactly the critical path's bars outlined."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    p = Problem(random_graph(7, 24), random_spec(7, 3), "latency")
    res = grade(p, solve(p, "heft", Settings()))
    ev = res.evaluation
    links = sorted({(t.src, t.dst) for t in ev.transfers if t.src != t.dst})
    assert links, "the instance should move tensors between devices"
    fig = gantt_figure(res)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == list(p.devices) + [f"{p.devices[a]}->{p.devices[b]}" for a, b in links]
    bars = [r for r in ax.patches if isinstance(r, Rectangle)]
    busy = [t for t in ev.transfers if t.src != t.dst]
    assert len(bars) == p.n + len(busy)
    outlined = [r for r in bars if r.get_linewidth() > 0 and tuple(r.get_edgecolor()) == (0.0, 0.0, 0.0, 1.0)]
    assert len(outlined) == len(critical_path(res))
    plt.close(fig)
