"""Pipelined streams on the local runtime (LocalRuntime.stream), data-parallel replicas
(emit_replicas + stream_replicas) and ``partitioner run --stream``."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from instances import Chain, two_gpu_spec
from torch import nn

from partitioner import api
from partitioner.emit.build import emit, emit_replicas
from partitioner.errors import RuntimeFailure, UsageError
from partitioner.ir.plan import Plan
from partitioner.ir.spec import parse_spec
from partitioner.machine.problem import Problem
from partitioner.runtime.local import LocalRuntime
from partitioner.runtime.stream import split_stream, stream_replicas


@pytest.fixture(scope="module")
def three():
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(3, 12)
    lm = api.load_model(model, (x,))
    p = Problem(lm.graph, two_gpu_spec(), "throughput")
    plan = Plan(tuple((i // 3) % 3 for i in range(p.n)), solver="alternating")
    art = emit((lm.gm, p, plan), example_inputs=(x,))
    return model, lm, p, art


def test_streamed_outputs_equal_per_sample_outputs(three):
    model, _, _, art = three
    xs = [torch.randn(3 + k % 2, 12) for k in range(7)]
    with torch.no_grad(), LocalRuntime(art, threads=1) as rt:
        one = [rt.run(x) for x in xs]
        outs, st = rt.stream(xs)
        again, _ = rt.stream([(x,) for x in xs[:2]])  # tuples of arguments work too, and the runtime is reusable
        for o, r, x in zip(outs, one, xs):
            torch.testing.assert_close(o, r)
            torch.testing.assert_close(o, model(x))
        torch.testing.assert_close(again, one[:2])
        assert rt.stream([]) [0] == []
    assert st.samples == 7 and len(st.ends_s) == 7 and all(0 <= a <= b <= st.wall_s + 1e-6
                                                          for a, b in zip(st.starts_s, st.ends_s))
    assert st.samples_per_s > 0 and st.steady_samples_per_s > 0
    assert math.isclose(st.predicted_samples_per_s, 1 / art.schedule.meta["predicted_period_s"])
    s = art.schedule
    assert all(len(acts) == sum(len(a) for a in s.actions.values()) for acts in st.actions)
    assert json.loads(json.dumps(st.to_json()))["samples"] == 7


def test_stages_overlap_across_samples():
    """Two balanced stages on two workers: stage 0 computes sample k+1 while stage 1
    computes sample k (checked on the measured intervals, robust on a loaded machine).
    The throughput gain itself is measured by bench/stream.py."""
    torch.manual_seed(0)
    w, b, n = 256, 32, 8
    model = nn.Sequential(*[nn.Sequential(nn.Linear(w, w), nn.ReLU()) for _ in range(n)]).eval()
    x = torch.randn(b, w)
    lm = api.load_model(model, (x,))
    p = Problem(lm.graph, two_gpu_spec(), "throughput")
    plan = Plan(tuple(0 if i < p.n // 2 else 1 for i in range(p.n)), solver="by-hand")
    art = emit((lm.gm, p, plan), example_inputs=(x,))
    stages = [s.id for s in art.schedule.segments]
    assert len(stages) == 2
    xs = [torch.randn(b, w) for _ in range(12)]
    with torch.no_grad(), LocalRuntime(art, threads=1) as rt:
        outs, st = rt.stream(xs)
    for o, xi in zip(outs, xs):
        with torch.no_grad():
            torch.testing.assert_close(o, model(xi))
    comp = [{a.name: a for a in acts if a.op == "compute"} for acts in st.actions]
    overlaps = sum(comp[k + 1][stages[0]].start_s < comp[k][stages[1]].end_s for k in range(len(xs) - 1))
    assert overlaps >= 1
    # per device, samples are processed in order
    for sid in stages:
        starts = [c[sid].start_s for c in comp]
        assert starts == sorted(starts)


def test_a_failing_sample_aborts_the_stream_and_names_it(three):
    _, _, _, art = three
    victim = art.schedule.segments[1]
    calls = {"n": 0}

    class Boom(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            calls["n"] += 1
            if calls["n"] == 3:
                raise ValueError("kaput")
            return self.inner(*a)

    mods = dict(art.modules, **{victim.id: Boom(art.modules[victim.id])})
    bad = type(art)(art.schedule, mods, art.example_inputs)
    xs = [torch.randn(3, 12) for _ in range(6)]
    with torch.no_grad(), LocalRuntime(bad, threads=1, timeout_s=30) as rt:
        with pytest.raises(RuntimeFailure, match=f"sample 2 of the stream: device {victim.device}.*kaput"):
            rt.stream(xs)
        outs, _ = rt.stream(xs[:2])  # still usable
        assert len(outs) == 2


def test_split_stream_follows_the_rates():
    a = split_stream(9, [2.0, 1.0])
    assert a.count(0) == 6 and a.count(1) == 3 and a[:3].count(0) == 2
    assert split_stream(4, [math.nan, 1.0]) == [0, 1, 0, 1]
    assert split_stream(0, [1.0]) == []


def test_data_parallel_replicas_share_the_stream(three, tmp_path):
    model, lm, p, _ = three
    r0 = Plan(tuple([1] * p.n), solver="by-hand")  # replica 0 on gpu0, replica 1 on gpu1
    r1 = Plan(tuple([2] * p.n), solver="by-hand")
    plan = Plan(r0.placement, solver="by-hand", replicas=(r0, r1))
    arts = emit_replicas((lm.gm, p, plan), example_inputs=lm.example_inputs)
    assert [a.schedule.meta["replica"] for a in arts] == [0, 1]
    assert {s.device for s in arts[1].schedule.segments} == {"gpu1"}
    per = arts[0].schedule.meta["predicted_period_s"]
    whole = arts[0].schedule.meta["plan_predicted_period_s"]
    assert math.isclose(whole, per / 2, rel_tol=1e-6)  # two identical replicas: twice the throughput
    xs = [torch.randn(3, 12) for _ in range(6)]
    rts = [LocalRuntime(a, threads=1) for a in arts]
    try:
        with torch.no_grad():
            outs, st = stream_replicas(rts, xs)
    finally:
        for rt in rts:
            rt.close()
    with torch.no_grad():
        for o, x in zip(outs, xs):
            torch.testing.assert_close(o, model(x))
    assert math.isclose(st.predicted_samples_per_s, 1 / whole, rel_tol=1e-6)
    assert len(emit_replicas((lm.gm, p, r0), example_inputs=lm.example_inputs)) == 1


def test_cli_run_stream(tmp_path):
    from typer.testing import CliRunner

    from partitioner.cli import main as cli
    from partitioner.cli import run as cli_run

    torch.manual_seed(0)
    model = Chain(n=4).eval()
    x = torch.randn(2, 12)
    res = api.compile_plan(model, two_gpu_spec(), "throughput", "greedy", example_inputs=(x,))
    lm = res.model
    r0, r1 = Plan(tuple([1] * res.problem.n), solver="h"), Plan(tuple([2] * res.problem.n), solver="h")
    res.plan = Plan(r0.placement, solver="h", replicas=(r0, r1))
    note = cli_run.write_artifact(res, tmp_path / "plan")
    assert "2 data-parallel replicas" in note and lm is res.model
    assert [d.name for d in cli_run.replica_dirs(tmp_path / "plan")] == ["plan", "r1"]
    r = CliRunner().invoke(cli.app, ["run", str(tmp_path / "plan"), "--stream", "5", "--threads", "1",
                                     "--check", "--json", "--stats", str(tmp_path / "st.json")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["samples"] == 5 and summary["replicas"] == 2 and summary["check"] is True
    assert summary["samples_per_s"] > 0 and summary["predicted_samples_per_s"] > 0
    assert json.loads((tmp_path / "st.json").read_text())["samples"] == 5
    r = CliRunner().invoke(cli.app, ["run", str(tmp_path / "plan"), "--stream", "3", "--threads", "1",
                                     "--segments", "traced", "--check"])
    assert r.exit_code == 0 and "samples/s" in r.output and "predicted" in r.output, r.output
    assert "traced segments" in r.output and "outputs match" in r.output, r.output
    r = CliRunner().invoke(cli.app, ["run", str(tmp_path / "plan"), "--stream", "-1"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli.app, ["run", str(tmp_path / "plan"), "--stream", "4", "--segments", "auto", "--check"])
    assert r.exit_code == 0 and "threads/traced" in r.output and "outputs match" in r.output, r.output
    for bad in (["--stream", "3", "--runtime", "fibers"], ["--runtime", "auto"], ["--segments", "jit"],
                ["--segments", "auto"]):
        r = CliRunner().invoke(cli.app, ["run", str(tmp_path / "plan"), *bad])
        assert r.exit_code == 2 and bad[-2] in r.output, r.output


# -- overlap: a streamed plan must beat the same plan run one sample at a time --------------------------------
#
# Every segment sleeps STAGE_S before computing (a sleep holds neither the GIL nor a core), so the ratio below
# measures the runtime's scheduling alone, whatever the load of the machine: n samples through s balanced stages
# take n * s stage times one at a time and about (n + s - 1) streamed.

STAGE_S = 0.01


def _sleepy(art, stage_s: float = STAGE_S):
    class Sleepy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            time.sleep(stage_s)
            return self.inner(*a)

    return type(art)(art.schedule, {k: Sleepy(m) for k, m in art.modules.items()}, art.example_inputs)


def _four_spec():
    dev = lambda i, k: {"id": i, "host": "h", "kind": k, "peak_flops": {"fp32": 1e12},  # noqa: E731
                        "memory": {"capacity_bytes": 1e10, "bandwidth_Bps": 1e11}}
    ids = ["cpu0", "gpu0", "gpu1", "gpu2"]
    return parse_spec({"name": "four", "devices": [dev(i, "cpu" if i == "cpu0" else "gpu") for i in ids],
                       "links": [{"a": a, "b": b, "bandwidth_Bps": 1e10, "latency_s": 1e-5}
                                 for k, a in enumerate(ids) for b in ids[k + 1:]]})


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    w, b = 32, 4
    model = nn.Sequential(*[nn.Sequential(nn.Linear(w, w), nn.ReLU()) for _ in range(6)]).eval()
    x = torch.randn(b, w)
    lm = api.load_model(model, (x,))
    return model, lm, Problem(lm.graph, _four_spec(), "throughput")


def _staged(p: Problem, stages: list[int]) -> Plan:
    """Consecutive equal runs of nodes on the given device indices (0 = the host cpu0)."""
    return Plan(tuple(stages[min(len(stages) - 1, i * len(stages) // p.n)] for i in range(p.n)), solver="by-hand")


def _ideal(arts: list, n: int) -> float:
    """One-at-a-time over perfectly streamed wall time for ``n`` samples shared evenly among the replicas
    ``arts``, every segment taking one stage time: the busiest device of a replica sets its period."""
    total = sum(len(a.schedule.segments) for a in arts) / len(arts) * n
    per = [max(sum(s.device == d for s in a.schedule.segments) for d in a.schedule.devices) for a in arts]
    k = n // len(arts)
    return total / max((k - 1) * b + len(a.schedule.segments) for a, b in zip(arts, per))


def _overlap_ratio(rts: list, xs: list, need: float, tries: int = 3) -> float:
    """Best of up to ``tries``: wall time one sample at a time / wall time streamed (same runtimes)."""
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        for k, x in enumerate(xs):
            rts[k % len(rts)].run(x)
        one = time.perf_counter() - t
        t = time.perf_counter()
        stream_replicas(rts, xs) if len(rts) > 1 else rts[0].stream(xs)
        best = max(best, one / (time.perf_counter() - t))
        if best >= need:
            break
    return best


@pytest.mark.parametrize("stages", [[0, 1], [1, 0], [0, 1, 2], [1, 2, 0], [1, 0, 2], [0, 1, 0]],
                         ids=["host-first", "host-second", "3-host-first", "3-host-last", "3-host-middle",
                              "host-both-ends"])
def test_streams_overlap_samples_in_every_stage_order(mlp, stages):
    model, lm, p = mlp
    art = emit((lm.gm, p, _staged(p, stages)), example_inputs=lm.example_inputs)
    assert len(art.schedule.segments) == len(stages)
    xs = [torch.randn(4, 32) for _ in range(8)]
    need = 0.8 * _ideal([art], len(xs))  # 1.42 for two stages, 1.13 with the host at both ends
    with torch.no_grad(), LocalRuntime(_sleepy(art), threads=1) as rt:
        ratio = _overlap_ratio([rt], xs, need)
        outs, _ = rt.stream(xs)
    with torch.no_grad():
        for o, x in zip(outs, xs):
            torch.testing.assert_close(o, model(x))
    assert ratio >= need, f"streamed {ratio:.2f}x the one-at-a-time rate, expected >= {need:.2f}: stages do not overlap"


def test_replicas_overlap_samples(mlp):
    """Two data-parallel replicas, each a 2-stage pipeline (one with the host second)."""
    model, lm, p = mlp
    r0, r1 = _staged(p, [1, 0]), _staged(p, [2, 3])
    plan = Plan(r0.placement, solver="by-hand", replicas=(r0, r1))
    arts = emit_replicas((lm.gm, p, plan), example_inputs=lm.example_inputs)
    xs = [torch.randn(4, 32) for _ in range(8)]
    need = 0.8 * _ideal(arts, len(xs))  # 2.56: each replica a pipeline, and both at once
    rts = [LocalRuntime(_sleepy(a), threads=1) for a in arts]
    try:
        with torch.no_grad():
            ratio = _overlap_ratio(rts, xs, need)
            outs, _ = stream_replicas(rts, xs)
            for o, x in zip(outs, xs):
                torch.testing.assert_close(o, model(x))
    finally:
        for rt in rts:
            rt.close()
    assert ratio >= need, f"replicas streamed {ratio:.2f}x the one-at-a-time rate, expected >= {need:.2f}"


# -- the process-per-device runtime -----------------------------------------------------------------------------

class Hook(nn.Module):
    """A segment that sleeps first, and raises when its first input's first element is FAIL
    (module level, so that it pickles into the device processes)."""

    FAIL = 12345.0

    def __init__(self, inner, sleep_s):
        super().__init__()
        self.inner, self.sleep_s = inner, sleep_s

    def forward(self, *a):
        time.sleep(self.sleep_s)
        if a[0].flatten()[0].item() == self.FAIL:
            raise ValueError("kaput")
        return self.inner(*a)


@pytest.mark.slow  # starts two processes (a few seconds)
def test_process_runtime_streams_overlap_and_fail_cleanly(mlp, tmp_path):
    model, lm, p = mlp
    art = emit((lm.gm, p, _staged(p, [1, 0])), example_inputs=lm.example_inputs)  # host second
    hooked = type(art)(art.schedule, {k: Hook(m, STAGE_S) for k, m in art.modules.items()}, art.example_inputs)
    xs = [torch.randn(4, 32) for _ in range(8)]
    need = 0.8 * _ideal([art], len(xs))
    with torch.no_grad(), LocalRuntime(hooked, mode="processes", threads=1) as rt:
        assert rt.mode == "processes"
        outs, st = rt.stream(xs)
        for o, x in zip(outs, xs):
            torch.testing.assert_close(o, model(x))
        assert st.samples == 8 and len(st.actions[0]) == sum(len(a) for a in art.schedule.actions.values())
        ratio = _overlap_ratio([rt], xs, need)
        assert ratio >= need, f"process runtime streamed {ratio:.2f}x the one-at-a-time rate, expected >= {need:.2f}"
        bad = [x.clone() for x in xs[:4]]
        bad[2][0, 0] = Hook.FAIL
        with pytest.raises(RuntimeFailure, match="sample 2 of the stream: device gpu0 .*kaput"):
            rt.stream(bad)
        torch.testing.assert_close(rt.run(xs[0]), model(xs[0]))  # still usable
        with torch.enable_grad(), pytest.raises(UsageError, match="inference only"):
            rt.run(xs[0])
    with pytest.raises(UsageError, match="mode must be"):
        LocalRuntime(art, mode="fibers")


@pytest.mark.slow  # starts device processes (a few seconds)
def test_choose_mode_measures_both_and_processes_load_saved_segments(mlp, tmp_path):
    """choose_mode streams a trial through each mode and keeps the faster one; segments loaded
    from an artifact directory (classes that cannot be imported) are loaded again from the
    directory by each device's process."""
    from partitioner.emit.artifact import load_artifact
    from partitioner.runtime.local import choose_mode

    model, lm, p = mlp
    emit((lm.gm, p, _staged(p, [0, 1, 2])), example_inputs=lm.example_inputs).save(tmp_path / "a")
    art = load_artifact(tmp_path / "a")
    rts, info = choose_mode([art], art.example_inputs, samples=6, segments=("eager", "traced"))
    try:
        assert info["mode"] in ("threads", "processes") and info["trial_samples"] == 6
        assert set(info["rates"]) == {f"{m}/{g}" for m in ("threads", "processes") for g in ("eager", "traced")}
        assert all(r > 0 for r in info["rates"].values())
        assert rts[0].mode == info["mode"] and rts[0].segments == info["segments"]
        xs = [torch.randn(4, 32) for _ in range(5)]
        with torch.inference_mode():
            outs, _ = stream_replicas(rts, xs)
    finally:
        rts[0].close()
    with torch.no_grad():
        for o, x in zip(outs, xs):
            torch.testing.assert_close(o, model(x))
    if info["mode"] == "threads":  # the process runtime must have loaded the saved segments too
        with torch.inference_mode(), LocalRuntime(art, mode="processes") as rt:
            torch.testing.assert_close(rt.run(xs[0]), model(xs[0]))
