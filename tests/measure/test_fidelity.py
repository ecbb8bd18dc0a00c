"""Measured costs in planning (api.compile_plan(profile=...), compile --profile) and the
predicted-vs-measured report of a run (partitioner.measure.fidelity)."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from partitioner.api import compare, compile_plan
from partitioner.cli.main import app
from partitioner.emit.build import emit
from partitioner.errors import UsageError
from partitioner.frontend.load import load_model
from partitioner.machine.replay import predict_schedule
from partitioner.measure.fidelity import (
    as_runs,
    fidelity_summary,
    fidelity_table,
    from_profile,
)
from partitioner.measure.profile import profile_graph
from partitioner.runtime.local import LocalRuntime

FAST = {"warmup": 1, "repeats": 3}


class Convs(nn.Module):
    """Two branches of convolutions joined by an add: something to split over two devices."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.b = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.a(x) + self.b(x))
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_model(Convs().eval(), (torch.randn(1, 3, 32, 32),))


@pytest.fixture(scope="module")
def prof_path(lm, tmp_path_factory):
    prof = profile_graph(lm.gm, lm.example_inputs, "cpu:1t,cpu:2t", name=lm.graph.name, **FAST)
    from partitioner.measure.links import add_transfers

    add_transfers(prof, "cpu:1t,cpu:2t", repeats=3)
    return prof.save(tmp_path_factory.mktemp("prof") / "p.json")


def test_compile_plan_uses_measured_times_and_links(lm, prof_path):
    from partitioner.measure.profile import (
        MIN_CORRECTED_FRACTION,
        _key,
        load_profile,
        node_overhead,
        node_signature,
    )

    prof = load_profile(prof_path)
    over = {m: node_overhead(prof, lm.graph.name, m) for m in ("cpu-1t", "cpu-2t")}
    assert all(o is not None for o in over.values())  # the profile's whole passes

    def expect(k, m):  # measured time + the device's per-node overhead (never below a floor)
        t = prof.time(k, m)
        return max(t + over[m], MIN_CORRECTED_FRACTION * t)

    res = compile_plan(lm, "cpu-threads-2", solver="greedy", profile=prof_path,
                       device_map={"cpu0": "cpu:1t", "cpu1": "cpu:2t"})
    p = res.problem
    assert p.spec.name == "cpu-threads-2-calibrated"
    info = res.extra["measured_costs"]
    assert info["device_map"] == {"cpu0": "cpu:1t", "cpu1": "cpu:2t"} and info["profile"] == str(prof_path)
    fx = {n.name: n for n in lm.gm.graph.nodes}
    checked = 0
    for i in range(p.n):
        sig = node_signature(lm.gm, fx[p.node_name(i)]) if p.node_name(i) in fx else None
        if sig is None:
            continue
        k = _key(sig)
        assert p.T[i, 0] == pytest.approx(expect(k, "cpu-1t"))
        assert p.T[i, 1] == pytest.approx(expect(k, "cpu-2t"))
        checked += 1
    assert checked >= 6
    # the link is the measured thread hand-off
    assert p.links.hop[(0, 1)][0] == pytest.approx(prof.transfer("cpu:1t", "cpu:2t")["latency_s"])
    # without the map, cpu0/cpu1 (threads: 1) both match cpu:1t
    res1 = compile_plan(lm, "cpu-threads-2", solver="greedy", profile=prof_path)
    assert res1.extra["measured_costs"]["device_map"] == {"cpu0": "cpu:1t", "cpu1": "cpu:1t"}
    # no profile: the roofline, and a map alone is refused
    plain = compile_plan(lm, "cpu-threads-2", solver="greedy")
    assert "measured_costs" not in plain.extra and not np.allclose(plain.problem.T, res.problem.T)
    with pytest.raises(UsageError, match="needs a profile"):
        compile_plan(lm, "cpu-threads-2", device_map={"cpu0": "cpu:1t"})
    with pytest.raises(UsageError, match="not a device of spec"):
        compile_plan(lm, "cpu-threads-2", profile=prof_path, device_map={"gpu7": "cpu:1t"})
    rows = compare(lm, "cpu-threads-2", "latency", ["greedy", "heft"], profile=prof_path)["rows"]
    assert {r["solver"] for r in rows} == {"greedy", "heft"}
    assert next(r for r in rows if r["solver"] == "greedy")["value_s"] == pytest.approx(res1.value)


def test_nodes_missing_from_the_profile_fall_back_to_the_calibrated_roofline(lm, prof_path, caplog):
    torch.manual_seed(1)
    other = load_model(Convs().eval(), (torch.randn(2, 3, 32, 32),))  # batch 2: no signature in the profile
    with caplog.at_level(logging.WARNING, logger="partitioner.measure.profile"):
        res = compile_plan(other, "cpu-threads-2", solver="greedy", profile=prof_path)
    assert "keep the roofline" in caplog.text
    T = res.problem.T
    assert np.all(np.isfinite(T)) and T.max() > 0
    # calibrated: the roofline differs from the uncalibrated spec's
    plain = compile_plan(other, "cpu-threads-2", solver="greedy")
    assert not np.allclose(T, plain.problem.T)


def test_fidelity_summary_and_table_of_a_run(lm, prof_path):
    res = compile_plan(lm, "cpu-threads-2", solver="greedy", profile=prof_path,
                       device_map={"cpu0": "cpu:1t", "cpu1": "cpu:1t"})
    art = emit(res)
    s = art.schedule
    assert from_profile(s)
    with torch.no_grad(), LocalRuntime(art, threads={"cpu0": 1, "cpu1": 1}) as rt:
        runs = [rt.run_with_stats(*lm.example_inputs)[1] for _ in range(3)]
    rep = fidelity_summary(s, runs, problem=res.problem)
    lat = rep["latency"]
    # the schedule is predicted with what the profile measured of the runtime (stored with the plan)
    rt_costs = s.meta["measured_costs"]["runtime"]
    assert rt_costs["run_overhead_s"] > 0
    assert lat["predicted_schedule_s"] == pytest.approx(predict_schedule(
        s, res.problem, run_overhead_s=rt_costs["run_overhead_s"], contention=rt_costs.get("contention"))["latency_s"])
    assert fidelity_summary(s, runs, problem=res.problem, run_overhead_s=0.0)["latency"]["predicted_schedule_s"] \
        == pytest.approx(lat["predicted_schedule_s"] - rt_costs["run_overhead_s"])
    med = float(np.median([r.wall_s for r in runs]))
    assert lat["measured_median_s"] == pytest.approx(med)
    assert lat["rel_error"] == pytest.approx((res.evaluation.latency - med) / med)
    assert rep["from_profile"] and rep["runs"] == 3
    # the same figures from --stats JSON dicts
    rep2 = fidelity_summary(s, [r.to_json() for r in runs], problem=res.problem)
    assert rep2["latency"] == rep["latency"]
    for d, v in rep["devices"].items():
        assert rep2["devices"][d]["measured_busy_s"] == pytest.approx(v["measured_busy_s"])
        assert v["rel_error"] == pytest.approx((v["predicted_busy_s"] - v["measured_busy_s"]) / v["measured_busy_s"])
    assert len(as_runs(runs[0])) == 1
    con = Console(record=True, width=120)
    con.print(fidelity_table(s, runs))
    text = con.export_text()
    assert "latency (plan)" in text and "measured costs" in text
    for d in rep["devices"]:
        assert f"{d} busy" in text
    # the per-run overhead is charged once
    base = predict_schedule(s, res.problem)["latency_s"]
    assert predict_schedule(s, res.problem, run_overhead_s=1e-3)["latency_s"] == pytest.approx(base + 1e-3)
    # a roofline plan is not one made from a profile
    assert not from_profile(emit(compile_plan(lm, "cpu-threads-2", solver="greedy")).schedule)


def test_cli_compile_with_profile_then_run(tmp_path, prof_path):
    factory = tmp_path / "m.py"
    factory.write_text("import torch\nfrom torch import nn\n"
                       "def make():\n    torch.manual_seed(0)\n"
                       "    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Tanh(),"
                       " nn.Linear(64, 16))\n    return m.eval(), (torch.randn(8, 64),)\n")
    runner = CliRunner()
    prof = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", f"{factory}:make", "--devices", "cpu:1t,cpu:2t", "--out", str(prof),
                            "--repeats", "3", "--warmup", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["timed"] == 10
    out = tmp_path / "plan"
    r = runner.invoke(app, ["compile", f"{factory}:make", "--hw", "cpu-threads-2", "--solver", "greedy", "--out",
                            str(out), "--profile", str(prof), "--profile-map", "cpu1=cpu:2t", "--json", "--no-gantt"])
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["spec"] == "cpu-threads-2-calibrated"
    stats = tmp_path / "stats.json"
    r = runner.invoke(app, ["run", str(out), "--repeat", "2", "--stats", str(stats), "--json"])
    assert r.exit_code == 0, r.output
    from partitioner.emit.artifact import load_artifact

    s = load_artifact(out).schedule
    rep = fidelity_summary(s, json.loads(stats.read_text()))
    assert rep["from_profile"] and math.isfinite(rep["latency"]["rel_error"]) and rep["runs"] == 1
    r = runner.invoke(app, ["compile", f"{factory}:make", "--hw", "cpu-threads-2", "--out", str(tmp_path / "x"),
                            "--profile-map", "cpu1=cpu:2t"])
    assert r.exit_code == 2 and "--profile-map needs --profile" in r.output
    r = runner.invoke(app, ["compile", f"{factory}:make", "--hw", "cpu-threads-2", "--out", str(tmp_path / "y"),
                            "--profile", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["compare", f"{factory}:make", "--hw", "cpu-threads-2", "--solvers", "greedy,heft",
                            "--profile", str(prof), "-q", "--json", str(tmp_path / "cmp.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cmp.json").read_text())["spec"] == "cpu-threads-2-calibrated"
