"""runtime/local.py: workers, devices, thread budgets, measurements and failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from instances import Chain, two_gpu_spec
from torch import nn

from partitioner import api
from partitioner.emit.build import emit
from partitioner.errors import ArtifactError, RuntimeFailure, UsageError
from partitioner.ir.plan import Plan
from partitioner.machine.problem import Problem
from partitioner.runtime.local import LocalRuntime, run_once


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(3, 12)
    lm = api.load_model(model, (x,))
    p = Problem(lm.graph, two_gpu_spec(), "latency")
    plan = Plan(tuple((i // 3) % 3 for i in range(p.n)), solver="alternating")  # cpu0 -> gpu0 -> gpu1 -> cpu0 ...
    art = emit((lm.gm, p, plan), example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
    assert len({s.device for s in art.schedule.segments}) == 3
    return model, x, art, ref


def test_outputs_equal_and_runtime_is_reusable(setup):
    model, x, art, ref = setup
    with torch.no_grad(), LocalRuntime(art) as rt:
        for _ in range(3):
            torch.testing.assert_close(rt.run(x), ref)
        for x2 in (torch.randn(3, 12), torch.randn(7, 12)):  # other values, another batch size
            torch.testing.assert_close(rt.run(x2), model(x2))


def test_stats_cover_every_action(setup):
    _, x, art, _ = setup
    with torch.no_grad(), LocalRuntime(art) as rt:
        out, st = rt.run_with_stats(x)
    s = art.schedule
    assert len(st.actions) == sum(len(a) for a in s.actions.values())
    assert {(a.device, a.index) for a in st.actions} == {(d, k) for d, acts in s.actions.items()
                                                         for k in range(len(acts))}
    assert all(0 <= a.start_s <= a.end_s <= st.wall_s for a in st.actions)
    computes = {a.name: a for a in st.actions if a.op == "compute"}
    assert set(computes) == {seg.id for seg in s.segments}
    for seg in s.segments:  # a segment starts after every recv it needs has completed on its device
        acts = [a for a in st.actions if a.device == seg.device]
        mine = computes[seg.id]
        for a in acts:
            if a.op == "recv" and a.index < mine.index:
                assert a.end_s <= mine.start_s
    rows = st.fidelity(s)
    assert len(rows) == len(s.segments) and all(r["measured_compute_s"] >= 0 for r in rows)
    assert set(st.busy_s()) == {seg.device for seg in s.segments}
    assert st.to_json()["wall_s"] == st.wall_s and rt.last_stats is st


def test_thread_budgets_are_per_worker(setup):
    """Each CPU worker runs with its own intra-op budget; the caller's count is untouched."""
    _, x, art, ref = setup
    seen: dict[str, int] = {}

    class Probe(nn.Module):
        def __init__(self, inner, dev):
            super().__init__()
            self.inner, self.dev = inner, dev

        def forward(self, *a):
            seen[self.dev] = torch.get_num_threads()
            return self.inner(*a)

    mods = {s.id: Probe(art.modules[s.id], s.device) for s in art.schedule.segments}
    probe = type(art)(art.schedule, mods, art.example_inputs)
    before = torch.get_num_threads()
    with torch.no_grad(), LocalRuntime(probe, threads={"cpu0": 1, "gpu0": 2, "gpu1": 1}) as rt:
        torch.testing.assert_close(rt.run(x), ref)
        assert torch.get_num_threads() == before
        assert seen == {"cpu0": 1, "gpu0": 2, "gpu1": 1}
        assert rt.thread_budgets == {"cpu0": 1, "gpu0": 2, "gpu1": 1}
    seen.clear()
    with torch.no_grad(), LocalRuntime(probe, threads=1) as rt:
        rt.run(x)
        assert set(seen.values()) == {1}
    with LocalRuntime(probe) as rt:  # default: the caller's threads split over the 3 computing workers
        assert set(rt.thread_budgets.values()) == {max(1, before // 3)}
    t = threading.Thread(target=lambda: seen.update(new=torch.get_num_threads()))
    t.start()
    t.join()
    assert seen["new"] == before  # threads started later inherit the caller's default again
    with pytest.raises(UsageError):
        LocalRuntime(art, threads=0)


def test_map_devices(setup):
    _, x, art, ref = setup
    with torch.no_grad():
        torch.testing.assert_close(run_once(art, x, map_devices={"gpu0": "cpu", "gpu1": "cpu:0"}), ref)
        torch.testing.assert_close(run_once(art, x, map_devices="cpu", copy_same_device=True), ref)
    with pytest.raises(UsageError, match="unknown spec device"):
        LocalRuntime(art, {"tpu9": "cpu"})
    with pytest.raises(UsageError, match="not a torch device"):
        LocalRuntime(art, {"gpu0": "warp-drive"})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeFailure, match="CUDA is not available"):
            LocalRuntime(art, {"gpu0": "cuda:0"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_and_events(setup):  # pragma: no cover - exercised on GPU machines
    _, x, art, ref = setup
    n = torch.cuda.device_count()
    mapping = {"gpu0": "cuda:0", "gpu1": f"cuda:{min(1, n - 1)}"}
    with torch.no_grad(), LocalRuntime(art, mapping, profile=True) as rt:
        for _ in range(3):
            torch.testing.assert_close(rt.run(x), ref)
    with torch.no_grad():
        torch.testing.assert_close(run_once(art, x.cuda(), map_devices={**mapping, "cpu0": "cuda:0"}),
                                   tuple(t.cuda() for t in ref))


def test_grad_mode_follows_the_caller(setup):
    model, x, art, _ = setup
    with torch.no_grad():
        assert not run_once(art, x)[0].requires_grad
    out = run_once(art, x)
    assert out[0].requires_grad
    (out[0].sum() + out[1]).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    (ref[0].sum() + ref[1]).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    model.zero_grad()


def _with(art, sid, fn):
    mods = dict(art.modules)
    inner = mods[sid]

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            fn()
            return self.inner(*a)

    mods[sid] = Wrap()
    return type(art)(art.schedule, mods, art.example_inputs)


def test_failing_segment_ends_the_run_with_a_clear_error(setup):
    _, x, art, ref = setup
    victim = art.schedule.segments[1]

    def boom():
        raise ValueError("kaput")

    t0 = time.perf_counter()
    with LocalRuntime(_with(art, victim.id, boom), timeout_s=30) as rt:
        with pytest.raises(RuntimeFailure, match=f"device {victim.device} .*compute {victim.id}.*kaput") as e:
            rt.run(x)
        assert isinstance(e.value.__cause__, ValueError)
    assert time.perf_counter() - t0 < 10  # the other workers are released, nobody waits for the timeout


def test_slow_peer_times_out(setup):
    _, x, art, _ = setup
    victim = art.schedule.segments[0]
    with LocalRuntime(_with(art, victim.id, lambda: time.sleep(1.5)), timeout_s=0.3) as rt:
        with pytest.raises(RuntimeFailure, match="never arrived"):
            rt.run(x)


def test_hung_worker_is_reported_and_the_runtime_refuses_more_runs(setup, monkeypatch):
    from partitioner.runtime import local

    monkeypatch.setattr(local, "_GRACE_S", 0.05)
    _, x, art, _ = setup
    last = art.schedule.segments[-1]
    t0 = time.perf_counter()
    rt = LocalRuntime(_with(art, last.id, lambda: time.sleep(1.0)), timeout_s=0.2)
    with pytest.raises(RuntimeFailure, match=f"did not finish.*{last.device} at action"):
        rt.run(x)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(RuntimeFailure, match="unusable"):
        rt.run(x)
    rt.close()


def test_bad_calls(setup):
    _, x, art, _ = setup
    rt = LocalRuntime(art)
    with pytest.raises(ArtifactError, match="takes 1 input"):
        rt.run(x, x)
    rt.close()
    with pytest.raises(RuntimeFailure, match="closed"):
        rt.run(x)
    with pytest.raises(UsageError):
        LocalRuntime(art, timeout_s=0)
