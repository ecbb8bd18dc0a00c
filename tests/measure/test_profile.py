"""Profiling (partitioner.measure.profile): logical CPU devices, per-op timing with a shape-keyed cache,
transfers, applying a profile to a cost graph, bad inputs, and the CLI functions."""

import json

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

import partitioner.measure.profile as profmod
import partitioner.measure.timing as timing  # the timing primitives profile.py calls
from partitioner.api import compile_plan
from partitioner.errors import CostModelError, UsageError
from partitioner.frontend.load import load_model
from partitioner.ir.spec import load_spec, parse_spec
from partitioner.measure.apply import apply_profile, match_devices, with_profile
from partitioner.measure.devices import LocalDevice, parse_devices
from partitioner.measure.links import measure_transfers
from partitioner.measure.profile import (
    Profile,
    load_profile,
    profile_graph,
    profile_model,
)

FAST = {"warmup": 1, "repeats": 3, "min_sample_s": 5e-5}


class Tiny(nn.Module):
    """Three Linear(32, 32) of the same shape (one op signature), an in-place ReLU module
    used twice, a residual add and a differently shaped head."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        y = self.act(self.l1(x))
        y = self.act(self.l2(y))
        return self.head(self.l3(y) + x)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(Tiny().eval(), (torch.randn(4, 32),))


def _spec(threads=(1, 2), model="x86"):
    devs = [{"id": f"cpu{i}", "host": "h", "kind": "cpu", "model": model, "threads": t,
             "peak_flops": {"fp32": 5e10}, "memory": {"capacity_bytes": 1e9, "bandwidth_Bps": 1e10}}
            for i, t in enumerate(threads)]
    links = [{"a": "cpu0", "b": f"cpu{i}", "bandwidth_Bps": 1e10, "latency_s": 1e-5} for i in range(1, len(threads))]
    return parse_spec({"name": "logical", "devices": devs, "links": links})


# ---- devices ---------------------------------------------------------------------------------
def test_parse_devices_logical_cpus():
    a, b = parse_devices("cpu:1t, cpu:2t")
    assert (a.id, a.model, a.threads, a.kind, a.torch_device) == ("cpu:1t", "cpu-1t", 1, "cpu", "cpu")
    assert (b.id, b.model, b.threads) == ("cpu:2t", "cpu-2t", 2)
    (c,) = parse_devices(["cpu"])
    assert c.threads == torch.get_num_threads() and c.model == f"cpu-{c.threads}t"


@pytest.mark.parametrize("text, needle", [("tpu", "unknown device"), ("cpu:0t", "at least 1 thread"),
                                          ("cpu:1t,cpu:1", "listed twice"), ("", "no device"),
                                          ("cpu:x", "unknown device")])
def test_parse_devices_rejects_bad_strings(text, needle):
    with pytest.raises(UsageError) as e:
        parse_devices(text)
    assert needle in str(e.value) and e.value.hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_usage_error():
    with pytest.raises(UsageError, match="CUDA is not available"):
        parse_devices("cpu:1t,cuda:0")


# ---- timing and the cache --------------------------------------------------------------------
def test_repeated_shapes_are_timed_once_and_cache_is_reused(tiny, monkeypatch, tmp_path):
    calls = []
    real = timing._time_call
    monkeypatch.setattr(timing, "_time_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    prof = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", name=tiny.graph.name, mode="isolated", **FAST)
    keys = prof.graphs[tiny.graph.name]["nodes"]
    # l1, l2, l3 share one signature; act is called twice on the same shape
    assert keys["l1"] == keys["l2"] == keys["l3"] != keys["head"]
    assert keys["act"] == keys["act_1"]
    n_unique = len(set(keys.values()))
    assert n_unique < len(keys)
    assert len(calls) == n_unique == prof.runs[-1]["timed"]
    for k in set(keys.values()):
        assert prof.time(k, "cpu-1t") > 0
    path = prof.save(tmp_path / "p.json")
    # same graph again, from the file: nothing is timed
    calls.clear()
    again = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", name=tiny.graph.name, cache=path, mode="isolated", **FAST)
    assert calls == [] and again.runs[-1]["cached"] == n_unique and again.runs[-1]["timed"] == 0
    assert again.ops == load_profile(path).ops
    # a second device model is timed, the first is still cached
    calls.clear()
    both = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t,cpu:2t", name=tiny.graph.name, cache=again, mode="isolated",
                        **FAST)
    assert len(calls) == n_unique and both.runs[-1]["cached"] == n_unique
    assert all(set(op["times"]) == {"cpu-1t", "cpu-2t"} for op in both.ops.values())


def test_context_mode_times_nodes_inside_whole_passes(tiny, monkeypatch):
    """Default mode: whole-graph passes per device; repeated signatures pooled and stored once."""
    calls = []
    real = profmod._profile_in_context
    monkeypatch.setattr(profmod, "_profile_in_context", lambda gm, flat, keys, dev, *a: calls.append(dev.id)
                        or real(gm, flat, keys, dev, *a))
    prof = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t,cpu:2t", name=tiny.graph.name, **FAST)
    assert calls == ["cpu:1t", "cpu:2t"]
    keys = prof.graphs[tiny.graph.name]["nodes"]
    lin = prof.ops[keys["l1"]]["times"]["cpu-1t"]
    # three Linear nodes share the signature: every pass times each of them
    assert lin["method"] == "context" and lin["occurrences"] == 3 * lin["repeats"] and lin["repeats"] >= 2
    assert prof.ops[keys["head"]]["times"]["cpu-1t"]["occurrences"] == lin["repeats"]
    run = prof.runs[-1]
    assert run["mode"] == "context" and set(run["passes"]) == {"cpu:1t", "cpu:2t"}
    # the nodes' times add up to less than a whole pass (which also runs the interpreter)
    total = sum(prof.time(k, "cpu-1t") for k in keys.values())
    assert 0 < total <= 2 * run["passes"]["cpu:1t"]["pass_median_s"]
    # cached: no pass at all
    calls.clear()
    again = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", name=tiny.graph.name, cache=prof, **FAST)
    assert calls == [] and again.runs[-1]["timed"] == 0
    with pytest.raises(UsageError, match="mode"):
        profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", mode="hot")


def test_context_mode_matches_the_forward_pass_better_than_isolated():
    """The sum of in-context node times tracks the real forward pass on one thread; the
    isolated times (hot caches) never exceed it by much. Both within loose bounds (shared machine)."""
    import time as _time

    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()) for _ in range(4)]).eval()
    lm = load_model(m, (torch.randn(1, 32, 32, 32),))
    prof = profile_graph(lm.gm, lm.example_inputs, "cpu:1t", name="convs", warmup=2, repeats=5)
    keys = prof.graphs["convs"]["nodes"]
    ctx = sum(prof.time(k, "cpu-1t") for k in keys.values())
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(2):
                lm.gm(*lm.example_inputs)
            ts = []
            for _ in range(7):
                t0 = _time.perf_counter()
                lm.gm(*lm.example_inputs)
                ts.append(_time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    assert 0.4 < ctx / float(np.median(ts)) < 2.5


def test_profiling_leaves_the_model_unchanged(tiny):
    x = tiny.example_inputs[0]
    before = tiny.gm(x.clone())
    threads = torch.get_num_threads()
    profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", **FAST)
    assert torch.equal(tiny.gm(x.clone()), before)
    assert torch.get_num_threads() == threads


def test_bad_timing_settings(tiny):
    with pytest.raises(UsageError, match="repeats"):
        profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", repeats=0)


def test_transfers_between_logical_cpus():
    recs = measure_transfers(parse_devices("cpu:1t,cpu:2t"), sizes=(4096, 65536, 1 << 18), repeats=3)
    pairs = {(r["src"], r["dst"]) for r in recs}
    assert pairs == {("cpu:1t", "cpu:1t"), ("cpu:1t", "cpu:2t"), ("cpu:2t", "cpu:2t")}
    for r in recs:
        assert r["mode"] == "reference" and 0 < r["latency_s"] < 0.1
        assert r["copy_bandwidth_Bps"] > 0 and len(r["samples"]) == 3 and "load1" in r


# ---- applying a profile ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_prof(tiny):
    return profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t,cpu:2t", name=tiny.graph.name, **FAST)


def test_apply_profile_to_logical_cpus_by_thread_budget(tiny, tiny_prof):
    spec = _spec((1, 2))
    assert match_devices(spec, tiny_prof) == {"cpu0": "cpu:1t", "cpu1": "cpu:2t"}
    g = apply_profile(tiny.graph, tiny_prof, spec, gm=tiny.gm, strict=True, overhead=False)
    keys = tiny_prof.graphs[tiny.graph.name]["nodes"]
    for n in g.nodes:
        assert n.time_s["cpu0"] == tiny_prof.time(keys[n.id], "cpu-1t")
        assert n.time_s["cpu1"] == tiny_prof.time(keys[n.id], "cpu-2t")
    # without the fx graph, the profile's node map of the same graph name is used
    g2 = apply_profile(tiny.graph, tiny_prof, spec, overhead=False)
    assert [dict(n.time_s) for n in g2.nodes] == [dict(n.time_s) for n in g.nodes]
    # and the problem's times are the measured ones plus the device's per-node overhead
    res = compile_plan(with_profile(tiny, spec, tiny_prof), spec, solver="heft")
    i = res.problem.graph.index["head"]
    t, o = tiny_prof.time(keys["head"], "cpu-2t"), profmod.node_overhead(tiny_prof, tiny.graph.name, "cpu-2t")
    assert res.problem.T[i, 1] == pytest.approx(max(t + o, profmod.MIN_CORRECTED_FRACTION * t))


def test_shipped_cpu_threads_spec_matches_one_thread_profile(tiny, tiny_prof):
    spec = load_spec("cpu-threads-2")
    assert match_devices(spec, tiny_prof) == {"cpu0": "cpu:1t", "cpu1": "cpu:1t"}
    g = apply_profile(tiny.graph, tiny_prof, spec, gm=tiny.gm, strict=True)
    assert all(n.time_s["cpu0"] == n.time_s["cpu1"] > 0 for n in g.nodes)


def test_explicit_map_and_unmatched_devices(tiny, tiny_prof):
    spec = _spec((4, 8))  # no profiled budget matches
    with pytest.raises(CostModelError) as e:
        apply_profile(tiny.graph, tiny_prof, spec, gm=tiny.gm)
    assert "--map" in e.value.hint
    g = apply_profile(tiny.graph, tiny_prof, spec, gm=tiny.gm, device_map={"cpu1": "cpu:2t"})
    assert all(set(n.time_s) == {"cpu1"} for n in g.nodes)
    # a CPU without a thread budget takes the only profiled CPU model, if there is one
    one = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", name=tiny.graph.name, cache=Profile(), **FAST)
    assert match_devices(load_spec("server-cpu-2gpu"), one) == {"cpu0": "cpu:1t"}
    assert match_devices(load_spec("server-cpu-2gpu"), tiny_prof) == {}
    with pytest.raises(UsageError, match="not a device of spec"):
        match_devices(spec, tiny_prof, {"gpu7": "cpu:1t"})
    with pytest.raises(UsageError, match="does not hold"):
        match_devices(spec, tiny_prof, {"cpu0": "cpu:9t"})


def test_other_shapes_are_not_covered(tiny_prof):
    torch.manual_seed(0)
    other = load_model(Tiny().eval(), (torch.randn(16, 32),))  # another batch: other signatures
    with pytest.raises(CostModelError, match="no time for"):
        apply_profile(other.graph, tiny_prof, _spec((1, 2)), gm=other.gm, strict=True)
    g = apply_profile(other.graph, tiny_prof, _spec((1, 2)), gm=other.gm)  # roofline kept, warned
    assert all(not n.time_s for n in g.nodes)


# ---- bad files -------------------------------------------------------------------------------
def _write(tmp_path, data):
    p = tmp_path / "prof.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_missing_and_corrupted_profiles(tmp_path, tiny_prof):
    with pytest.raises(CostModelError) as e:
        load_profile(tmp_path / "nope.json")
    assert "does not exist" in str(e.value) and "partitioner profile" in e.value.hint
    with pytest.raises(CostModelError, match="not valid JSON"):
        load_profile(_write(tmp_path, '{"format": "partitioner.profile/1", "ops": {'))
    with pytest.raises(CostModelError, match="is not a profile"):
        load_profile(_write(tmp_path, {"format": "partitioner.costgraph/1", "nodes": []}))
    good = tiny_prof.to_json()
    bad = json.loads(json.dumps(good))
    k = next(iter(bad["ops"]))
    bad["ops"][k]["times"]["cpu-1t"]["median_s"] = -1.0
    with pytest.raises(CostModelError, match="finite number > 0"):
        load_profile(_write(tmp_path, bad))
    bad = json.loads(json.dumps(good))
    del bad["ops"][k]
    with pytest.raises(CostModelError, match="unknown op keys"):
        load_profile(_write(tmp_path, bad))
    bad = json.loads(json.dumps(good))
    bad["devices"]["cpu:1t"]["kind"] = "fpga"
    with pytest.raises(CostModelError, match="kind"):
        load_profile(_write(tmp_path, bad))
    assert load_profile(_write(tmp_path, good)).ops == tiny_prof.ops


def test_profile_model_refuses_a_cost_graph(tmp_path, tiny):
    p = tmp_path / "g.json"
    tiny.graph.save(p)
    with pytest.raises(UsageError, match="nothing to run"):
        profile_model(str(p), "cpu:1t")


# ---- CLI functions ---------------------------------------------------------------------------
def _app():
    from partitioner.cli import profile as cli_profile
    from partitioner.cli.common import guard

    app = typer.Typer()
    app.command("profile")(guard(cli_profile.profile))
    app.command("calibrate")(guard(cli_profile.calibrate))
    return app


def test_cli_profile_and_calibrate(tmp_path):
    factory = tmp_path / "m.py"
    factory.write_text("import torch\nfrom torch import nn\n"
                       "def make():\n    torch.manual_seed(0)\n"
                       "    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.Tanh(),"
                       " nn.Linear(64, 16))\n    return m.eval(), (torch.randn(8, 64),)\n")
    app, runner = _app(), CliRunner()
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", f"{factory}:make", "--devices", "cpu:1t", "--out", str(out),
                            "--repeats", "3", "--warmup", "1", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["nodes"] == 5 and s["timed"] == 5 and s["sum_of_node_times_s"]["cpu:1t"] > 0
    assert s["transfers"][0]["src"] == "cpu:1t"
    # whole passes (the per-node overhead) and the co-run slowdown of two cpu:1t devices
    assert s["whole_pass_s"]["cpu:1t"] > 0 and "cpu:1t" in s["node_overhead_s"]
    assert [(c["a"], c["b"]) for c in s["corun_slowdown"]] == [("cpu:1t", "cpu:1t")]
    assert s["handoff_excess_per_transfer_s"]["cpu:1t"] >= 0  # the hand-off probe on the model's segments
    r = runner.invoke(app, ["profile", f"{factory}:make", "--devices", "cpu:1t", "--out", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "overhead" in text and "slower than alone" in text
    assert "a hand-off between two cpu:1t devices costs" in text
    r = runner.invoke(app, ["profile", f"{factory}:make", "--devices", "cpu:1t", "--out", str(out), "--json",
                            "--no-transfers"])
    assert r.exit_code == 0 and json.loads(r.output)["cached"] == 5
    spec_out = tmp_path / "cal.yaml"
    r = runner.invoke(app, ["calibrate", str(out), "--hw", "cpu-threads-2", "--out", str(spec_out)])
    assert r.exit_code == 0, r.output
    cal = load_spec(spec_out)
    assert cal.name == "cpu-threads-2-calibrated" and "cpu0" in r.output
    r = runner.invoke(app, ["calibrate", str(out), "--hw", "cpu-threads-2", "--out", str(spec_out)])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["profile", f"{factory}:make", "--devices", "cpu:1t,tpu:0", "--out", str(out)])
    assert r.exit_code == 2 and "unknown device 'tpu:0'" in r.output and "Hint" in r.output
    r = runner.invoke(app, ["calibrate", str(tmp_path / "missing.json"), "--hw", "cpu-threads-2",
                            "--out", str(tmp_path / "x.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["calibrate", str(out), "--hw", "cpu-threads-2", "--out", str(tmp_path / "y.yaml"),
                            "--map", "cpu0"])
    assert r.exit_code == 2 and "SPEC_DEVICE=PROFILED_DEVICE" in r.output


def test_local_device_json_roundtrip():
    d = LocalDevice("cpu:2t", "cpu", "cpu-2t", "cpu", 2)
    p = Profile({"devices": {d.id: d.to_json()}})
    assert p.model_of("cpu:2t") == "cpu-2t" and np.isclose(len(p.to_json()["devices"]), 1)


def test_contended_samples_are_discarded(monkeypatch):
    """Samples during which the process waited for a CPU are dropped (run-queue wait)."""
    import time as _time

    state = {"calls": 0, "wait": 0.0, "slow": False}

    def fake_wait():
        k = state["calls"]
        state["calls"] += 1
        if k % 2 == 0:  # start of a sample: every other sample is contended
            state["slow"] = (k // 2) % 2 == 1
        elif state["slow"]:
            state["wait"] += 1.0  # waited far longer than the sample itself
        return state["wait"]

    monkeypatch.setattr(timing, "runqueue_wait_s", fake_wait)
    def fn():  # busy-wait: 6 ms in a contended sample, 0.3 ms in a clean one
        end = _time.perf_counter() + (0.006 if state["slow"] else 0.0003)
        while _time.perf_counter() < end:
            pass

    kept, number, info = timing._time_call(fn, lambda: None, 0, 4, 1e-4)
    assert number == 1 and info["clean"] == 4 and info["samples"] == 7 and len(kept) == 4
    assert float(np.median(kept)) < 0.003  # only the fast, uncontended samples are kept
    # all contended: fall back to every sample, and say so
    monkeypatch.setattr(timing, "runqueue_wait_s", lambda: state.__setitem__("wait", state["wait"] + 1) or state["wait"])
    kept, _, info = timing._time_call(lambda: None, lambda: None, 0, 3, 1e-5)
    assert info["clean"] == 0 and info["samples"] == 9 and len(kept) == 9


def test_runqueue_wait_is_monotone():
    a = timing.runqueue_wait_s()
    if a is None:
        pytest.skip("no /proc/self/task/*/schedstat here")
    sum(i * i for i in range(100000))
    assert timing.runqueue_wait_s() >= a >= 0


# ---- whole passes and the per-node overhead ----------------------------------------------------
def test_whole_passes_give_a_per_node_overhead(tiny, tiny_prof):
    """Context mode also times the graph's own code as one call (as the runtime runs it); the
    gap to the sum of per-node medians, per timed node, is added to every measured node."""
    name = tiny.graph.name
    keys = tiny_prof.graphs[name]["nodes"]
    for model in ("cpu-1t", "cpu-2t"):
        rec = tiny_prof.graphs[name]["whole"][model]
        node_sum = sum(tiny_prof.time(k, model) for k in keys.values())
        assert rec["whole_s"] > 0 and rec["timed_nodes"] == len(keys) and rec["samples"] >= FAST["repeats"]
        assert rec["node_sum_s"] == pytest.approx(node_sum)
        assert rec["node_overhead_s"] == pytest.approx((rec["whole_s"] - node_sum) / len(keys))
        assert profmod.node_overhead(tiny_prof, name, model) == rec["node_overhead_s"]
        assert 0.2 < rec["whole_s"] / rec["node_sum_s"] < 5  # loose: a shared machine
    # applied: a device's corrected node times add up to its whole pass (unless a node hit the floor)
    prof = Profile(json.loads(json.dumps(tiny_prof.to_json())))
    prof.graphs[name]["whole"]["cpu-1t"]["node_overhead_s"] = 1e-3
    prof.graphs[name]["whole"]["cpu-2t"]["node_overhead_s"] = -1.0  # absurd: clamped at the floor
    g = apply_profile(tiny.graph, prof, _spec((1, 2)), gm=tiny.gm)
    for n in g.nodes:
        t1, t2 = prof.time(keys[n.id], "cpu-1t"), prof.time(keys[n.id], "cpu-2t")
        assert n.time_s["cpu0"] == pytest.approx(t1 + 1e-3)
        assert n.time_s["cpu1"] == pytest.approx(profmod.MIN_CORRECTED_FRACTION * t2)
    # another graph of the profile falls back to the median over graphs; no record at all: None
    assert profmod.node_overhead(prof, "other", "cpu-1t") == pytest.approx(1e-3)
    assert profmod.node_overhead(prof, name, "cpu-9t") is None
    # a cached re-profile keeps the record; a corrupted record is refused when loading
    again = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", name=name, cache=prof, **FAST)
    assert again.graphs[name]["whole"]["cpu-1t"]["node_overhead_s"] == 1e-3


def test_corrupted_whole_pass_record(tmp_path, tiny_prof):
    data = json.loads(json.dumps(tiny_prof.to_json()))
    g = next(iter(data["graphs"].values()))
    g["whole"]["cpu-1t"]["node_overhead_s"] = "fast"
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(CostModelError, match="node_overhead_s"):
        load_profile(p)


def test_runtime_handoff_and_corun_probes(tiny, tmp_path):
    """The hand-off the runtime meets (a sleeping receiver, a sender that goes on computing) and
    the slowdown of two logical CPUs computing at once are measured and stored."""
    from partitioner.measure.links import (
        add_corun,
        corun_slowdown,
        runtime_handoff_latency,
    )

    h = runtime_handoff_latency(rounds=8, busy_s=2e-4)
    assert h["rounds"] == 8 and 0 < h["p25_s"] <= h["latency_s"] <= h["p75_s"] < 1.0
    prof = profile_graph(tiny.gm, tiny.example_inputs, "cpu:1t", name=tiny.graph.name, **FAST)
    add_corun(prof, tiny.gm, tiny.example_inputs, "cpu:1t", name=tiny.graph.name, rounds=3, warmup=0)
    (rec,) = prof.graphs[tiny.graph.name]["corun"]
    assert rec["models"] == ["cpu-1t", "cpu-1t"] and rec["rounds"] == 3
    assert all(v > 0 for v in [*rec["alone_s"].values(), *rec["together_s"].values()])
    sa, sb = corun_slowdown(prof, tiny.graph.name, "cpu-1t", "cpu-1t")
    assert sa == pytest.approx(rec["together_s"]["a"] / rec["alone_s"]["a"])
    assert corun_slowdown(prof, "other", "cpu-1t", "cpu-1t") == (sa, sb)  # median over graphs
    assert corun_slowdown(prof, None, "cpu-1t", "cpu-2t") is None
    p = prof.save(tmp_path / "p.json")
    assert load_profile(p).graphs[tiny.graph.name]["corun"] == prof.graphs[tiny.graph.name]["corun"]
    with pytest.raises(CostModelError, match="no graph"):
        add_corun(prof, tiny.gm, tiny.example_inputs, "cpu:1t", name="nothere")


def test_alternation_probe_is_measured_and_charged_on_the_link(tmp_path):
    """The hand-off probe on the model's own segments (partitioner.measure.handoff): a record
    per device model, its excess added to the same-model link when a spec is calibrated for
    that graph (else the median over graphs), and the runtime's own costs for predictions."""
    from partitioner.api import apply_measured
    from partitioner.measure.calibrate import calibrate
    from partitioner.measure.handoff import (
        add_alternation,
        alternation_excess,
        measure_alternation,
    )
    from partitioner.measure.links import add_corun, add_transfers

    torch.manual_seed(0)
    lm = load_model(nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(32, 32), nn.ReLU())]).eval(),
                    (torch.randn(4, 32),))
    name = lm.graph.name
    prof = profile_graph(lm.gm, lm.example_inputs, "cpu:1t", name=name, **FAST)
    add_transfers(prof, "cpu:1t", repeats=3)
    add_alternation(prof, lm, "cpu:1t", chunks=4, rounds=2, per_block=1)
    (rec,) = prof.graphs[name]["alternation"]
    assert rec["device"] == "cpu:1t" and rec["model"] == "cpu-1t" and rec["chunks"] == 4
    assert rec["transfers"] >= 3 and rec["runs"] == 2
    assert rec["excess_per_transfer_s"] >= 0 and all(rec[k] > 0 for k in ("single_s", "alternating_s",
                                                                          "predicted_single_s", "predicted_alternating_s"))
    h = prof.transfer("cpu:1t", "cpu:1t")["latency_s"]
    assert rec["link_latency_s"] == pytest.approx(h)  # predicted with the wake-up alone
    # measuring again replaces the record and still predicts with the wake-up alone
    rec["excess_per_transfer_s"] = 5e-4
    add_alternation(prof, lm, "cpu:1t", chunks=4, rounds=1, per_block=1)
    (rec,) = prof.graphs[name]["alternation"]
    assert rec["link_latency_s"] == pytest.approx(h)
    rec["excess_per_transfer_s"] = 2e-4  # a known figure, to check how it is charged
    spec = load_spec("cpu-threads-2")
    assert calibrate(spec, prof, graph=name, strict=False).spec.links[0].latency_s == pytest.approx(h + 2e-4)
    prof.graphs["other"] = {"nodes": {}}
    assert alternation_excess(prof, "other", "cpu-1t") == pytest.approx(2e-4)  # the median over graphs
    assert alternation_excess(prof, name, "cpu-2t") == 0.0
    # the runtime's own costs travel with a compile made from the profile
    add_corun(prof, lm.gm, lm.example_inputs, "cpu:1t", name=name, rounds=2, warmup=0)
    _, cal, info = apply_measured(lm, spec, prof)
    assert cal.links[0].latency_s == pytest.approx(h + 2e-4)
    assert info["runtime"]["run_overhead_s"] == pytest.approx(2 * h)
    assert set(info["runtime"]["contention"]) == {"cpu0", "cpu1"}
    p = prof.save(tmp_path / "p.json")
    assert load_profile(p).graphs[name]["alternation"] == prof.graphs[name]["alternation"]
    with pytest.raises(CostModelError, match="no graph"):
        add_alternation(Profile(), lm, "cpu:1t")
    assert measure_alternation(prof, load_model(nn.Linear(4, 4), (torch.randn(1, 4),)), "cpu:1t") is None


def test_a_failing_handoff_probe_is_skipped_with_a_warning(monkeypatch, caplog):
    import partitioner.measure.handoff as ph
    from partitioner.errors import ArtifactError

    torch.manual_seed(0)
    lm = load_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(2, 8),))
    prof = profile_graph(lm.gm, lm.example_inputs, "cpu:1t", name=lm.graph.name, **FAST)

    def boom(*a, **k):
        raise ArtifactError("cannot emit this model", hint="-")

    monkeypatch.setattr(ph, "measure_alternation", boom)
    with caplog.at_level("WARNING", logger="partitioner.measure.handoff"):
        ph.add_alternation(prof, lm, "cpu:1t")
    assert prof.graphs[lm.graph.name]["alternation"] == [] and "hand-off probe on cpu:1t skipped" in caplog.text
