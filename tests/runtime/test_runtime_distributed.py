"""runtime/distributed.py: one torch.distributed rank (gloo, localhost) per server of the spec."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from partitioner import api
from partitioner.emit.build import emit
from partitioner.errors import ArtifactError
from partitioner.ir.plan import Plan
from partitioner.ir.spec import load_spec, parse_spec
from partitioner.machine.problem import Problem
from partitioner.runtime import distributed as D
from partitioner.runtime import wire as W
from partitioner.runtime.launch import launch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def three_host_spec():
    """Four devices on three servers: h0 holds cpu0 (host device) and acc0, h1 cpu1, h2 cpu2."""
    dev = lambda i, h: {"id": i, "host": h, "kind": "cpu", "peak_flops": {"fp32": 1e11},  # noqa: E731
                        "memory": {"capacity_bytes": 1e10, "bandwidth_Bps": 1e11}}
    return parse_spec({"name": "three-hosts", "host_device": "cpu0",
                       "devices": [dev("cpu0", "h0"), dev("acc0", "h0"), dev("cpu1", "h1"), dev("cpu2", "h2")],
                       "links": [{"a": "cpu0", "b": "acc0", "bandwidth_Bps": 3e10},
                                 {"a": "cpu0", "b": "cpu1", "bandwidth_Bps": 1e10, "latency_s": 1e-5},
                                 {"a": "cpu1", "b": "cpu2", "bandwidth_Bps": 1e10, "latency_s": 1e-5},
                                 {"a": "cpu0", "b": "cpu2", "bandwidth_Bps": 1e10, "latency_s": 1e-5}]})


class Net(nn.Module):
    """Linear chain with a skip, an int (the batch size) crossing servers and a tuple output."""

    def __init__(self, n=8, w=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(n))

    def forward(self, x):
        b = x.size(0)
        skip = x
        for i, layer in enumerate(self.layers):
            x = torch.relu(layer(x))
            if i % 2:
                x, skip = x + skip, x
        return x.reshape(b, -1), skip.sum()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(5, 16)
    lm = api.load_model(model, (x,))
    p = Problem(lm.graph, three_host_spec(), "latency")
    plan = Plan(tuple((i // 3) % 4 for i in range(p.n)), solver="by-hand")  # cpu0, acc0, cpu1, cpu2, cpu0...
    art = emit((lm.gm, p, plan), example_inputs=(x,))
    root = art.save(tmp_path_factory.mktemp("dist") / "art")
    with torch.no_grad():
        ref = model(x)
    return model, x, art, root, ref


def test_layout_groups_devices_by_server(saved):
    _, _, art, _, _ = saved
    s = art.schedule
    lay = D.layout(s)
    assert lay.hosts == ("h0", "h1", "h2")
    assert lay.rank_of == {"cpu0": 0, "acc0": 0, "cpu1": 1, "cpu2": 2}
    used = {seg.device for seg in s.segments}
    assert used == {"cpu0", "acc0", "cpu1", "cpu2"}
    ranks = {lay.rank_of[t.src] != lay.rank_of[t.dst] for t in s.transfers}
    assert ranks == {True, False}  # transfers between servers and inside h0
    ints = [t for t in s.transfers if lay.rank_of[t.src] != lay.rank_of[t.dst] and not s.values[t.value].shapes]
    assert ints, "the batch size (an int) should cross servers"
    assert sorted(lay.order) == sorted((d, k) for d, a in s.actions.items() for k in range(len(a)))


def test_three_ranks_equal_the_model(saved, tmp_path):
    model, x, _, root, ref = saved
    t0 = time.perf_counter()
    x2 = torch.randn(7, 16)  # other values and batch size: shapes come from the header, not the trace
    torch.save((x2,), tmp_path / "x2.pt")
    with torch.no_grad():
        torch.testing.assert_close(launch(root, tmp_path / "x2.pt", timeout_s=60), model(x2))
    assert time.perf_counter() - t0 < 50


@pytest.mark.slow  # a rank killed mid-run (below) covers the failure path by default
def test_a_dead_rank_ends_the_run_with_a_clear_error(saved):
    _, _, _, root, _ = saved
    t0 = time.perf_counter()
    with pytest.raises(W.DistributedFailure) as e:
        launch(root, timeout_s=20, env={D.DIE_ENV: "2"})
    msg = str(e.value)
    assert "rank 2 (host h2) exited with code 17" in msg
    assert "transfer" in msg and "rank 2 (host h2)" in msg  # a survivor names what it waited for
    assert time.perf_counter() - t0 < 20


def test_a_rank_killed_mid_run_ends_the_run_with_a_clear_error(saved):
    """SIGKILL in the middle of the run, after its first actions (transfers already went
    through): the survivors fail their pending transfer at once and name it; no hang."""
    _, _, art, root, _ = saved
    lay = D.layout(art.schedule)
    mine = [(d, k) for d, k in lay.order if lay.rank_of[d] == 1]
    assert len(mine) >= 3
    t0 = time.perf_counter()
    with pytest.raises(W.DistributedFailure) as e:
        launch(root, timeout_s=20, env={D.KILL_ENV: f"1:{len(mine) // 2}"})
    msg = str(e.value)
    assert "rank 1 (host h1) was killed by signal SIGKILL" in msg
    assert "transfer" in msg
    assert time.perf_counter() - t0 < 20


def failed_launch(root, **kw) -> tuple[str, float]:
    """The message of a launch that must fail, and how long it took."""
    t0 = time.perf_counter()
    with pytest.raises(W.DistributedFailure) as e:
        launch(root, **kw)
    return str(e.value), time.perf_counter() - t0


@pytest.mark.slow  # waits for a timeout; the stuck-rank watchdog test covers the deadline by default
def test_a_silent_rank_times_out_and_is_killed(saved):
    msg, seconds = failed_launch(saved[3], timeout_s=3, grace_s=1.5, env={D.HANG_ENV: "1"})
    assert "rank 1 (host h1) killed by the watchdog" in msg
    assert "timed out after 6.0 s waiting for transfer" in msg or "failed waiting for transfer" in msg
    assert seconds < 25


def test_wrong_world_size_is_refused(saved):
    _, x, art, _, _ = saved
    with pytest.raises(W.DistributedFailure, match="spans 3 server.*world size is 2"):
        D.run_rank(art, rank=0, world_size=2, inputs=(x,), init=False)


def test_values_that_cannot_cross_servers_are_refused():
    with pytest.raises(W.DistributedFailure, match="cannot send a value of type object"):
        W.describe((torch.zeros(2), object()), [])
    leaves = []
    v = (torch.arange(3), [1, 2.5, None, "a"], torch.Size([2, 3]), {"k": torch.ones(1, 2)})
    desc = json.loads(json.dumps(W.describe(v, leaves)))
    assert [s for s, _ in W.tensor_specs(desc, [])] == [(3,), (1, 2)]
    back = W.rebuild(desc, list(leaves))
    assert back[1] == [1, 2.5, None, "a"] and back[2] == torch.Size([2, 3])
    torch.testing.assert_close(back[3]["k"], v[3]["k"])


def test_tampered_schedule_is_refused_before_running(saved, tmp_path):
    import shutil

    _, _, _, root, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    d = json.loads((bad / "schedule.json").read_text())
    dev = next(k for k, acts in d["actions"].items() if any(a[0] == "recv" for a in acts))
    d["actions"][dev] = [a for a in d["actions"][dev] if a[0] != "recv"]  # drop its recvs
    (bad / "schedule.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="schedule.json was modified"):
        launch(bad, timeout_s=20)  # refused before any process starts
    from partitioner.emit.manifest import seal

    seal(bad)  # a consistent edit: the schedule's own validation refuses it
    with pytest.raises(ArtifactError, match="invalid schedule"):
        launch(bad, timeout_s=20)
    with pytest.raises(ArtifactError, match="content hash"):
        launch(root, timeout_s=20, expect="0" * 64)


def test_two_server_cluster_spec(tmp_path):
    torch.manual_seed(1)
    model = Net(n=4).eval()
    x = torch.randn(3, 16)
    lm = api.load_model(model, (x,))
    spec = load_spec("cluster-2x-a100-pcie")
    p = Problem(lm.graph, spec, "latency")
    plan = Plan(tuple([0, 1, 3, 4] * p.n)[:p.n], solver="by-hand")  # cpu0, gpu0, cpu1, gpu2, ...
    art = emit((lm.gm, p, plan), example_inputs=(x,))
    root = art.save(tmp_path / "art")
    assert D.layout(art.schedule).hosts == ("node0", "node1")
    with torch.no_grad():
        torch.testing.assert_close(launch(root, timeout_s=60), model(x))


def test_a_rank_stuck_inside_a_compute_ends_with_its_own_timeout(saved):
    """The deadline used to be checked only while waiting for transfers: a rank stuck in a
    segment's compute ran until the launcher killed it. Its watchdog ends it now, naming the action."""
    msg, seconds = failed_launch(saved[3], timeout_s=2, grace_s=2, env={D.STUCK_ENV: "1"})
    assert "rank 1 (host h1) exited with code 2: rank 1 (host h1) timed out (2.0 s) at cpu1 action #" in msg
    assert "(compute s" in msg and "the watchdog ended it" in msg
    assert "rank 1 (host h1) killed by the watchdog" not in msg  # not the launcher's: its own
    assert seconds < 25


def test_a_rank_without_the_secret_cannot_join(saved):
    msg, _ = failed_launch(saved[3], timeout_s=10, startup_s=10, grace_s=1,
                           rank_env={2: {W.SECRET_ENV: "another secret, 32 characters.."}})
    assert "rank 2 (host h2): rank 0 greeted with another shared secret" in msg, msg


def test_no_secret_is_refused_before_joining(saved, monkeypatch):
    _, x, art, _, _ = saved
    monkeypatch.delenv(W.SECRET_ENV, raising=False)
    monkeypatch.delenv(W.SECRET_FILE_ENV, raising=False)
    with pytest.raises(W.DistributedFailure, match="no shared secret"):
        D.run_rank(art, rank=0, world_size=3, inputs=(x,))


def test_an_unwritable_out_is_refused_before_the_run(saved, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, _, _, root, _ = saved
    (tmp_path / "file").write_text("x")
    env = dict(os.environ, RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run([sys.executable, "-m", "partitioner.runtime.distributed", str(root), "--out",
                        str(tmp_path / "file" / "o.pt")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "cannot create --out" in p.stderr and "is not a directory" in p.stderr, p.stderr
