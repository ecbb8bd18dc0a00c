"""Distributed runtime: run an emitted plan on ``torch.distributed``, one rank per host.

The spec's devices are grouped by ``host`` (the server they sit in; emit records the
mapping in ``schedule.meta["device_hosts"]``). Rank 0 runs the server of the spec's host
device (it holds the model inputs and returns the outputs); the other servers follow in
the order they first appear in the spec. ``WORLD_SIZE`` must equal the number of servers.

Execution inside a rank
-----------------------
All devices of a rank are run by one thread, sequentially, in a fixed *global order* of
the schedule's actions: a valid interleaving of all device programs (async sends,
blocking recvs), computed identically on every rank by simulating the schedule with
every device advancing one action per round. Each rank executes its own actions in that
order, so the run is the projection of one sequential execution and cannot deadlock.
Transfers between devices of the same server stay in-process (a ``.to(device)``);
transfers between servers are point-to-point messages:

* the sender posts ``dist.isend`` of a header (``int64[1]``: the length of a JSON
  description of the value: its tree of tuples/lists/dicts, constants such as ints, and
  the shape and dtype of every tensor leaf), the description (``uint8``), then every
  tensor leaf, on tags ``tag * STRIDE + k``; it waits for all its sends at the end;
* the receiver, when it needs a value from a peer rank, receives (blocking, bounded by
  the deadline) every message that peer sends it, in the peer's issue order, up to that
  value, keeping the earlier ones. Messages therefore match in issue order per rank pair
  (as NCCL requires) and by tag (gloo checks it).

No pickle crosses the wire: non-tensor values are limited to JSON constants (ints,
floats, bools, strings, None) and ``torch.Size``/tuples/lists/dicts of them and tensors;
anything else is refused with :class:`DistributedFailure`.

Backends
--------
``gloo`` (default, CPU tensors) or ``nccl`` (tensors staged on ``cuda:LOCAL_RANK``).
Limitation with NCCL: a send and a recv between the same pair of ranks share one NCCL
stream, so two ranks that both send before receiving from each other may block; gloo
has no such restriction.

Failures
--------
``init_process_group(timeout=...)`` bounds the rendezvous (``--init-timeout``); every
recv and the final send completion wait at most until the run's deadline (``--timeout``,
from the rank's start after the rendezvous). A peer that dies makes
gloo fail the pending recv at once ("connection closed"); either way the rank exits with
code 2 after printing one line ``partitioner-dist-error: MESSAGE`` that names the rank,
its server and the transfer it waited for. :func:`launch` (K local processes, used by
the tests) adds a watchdog: when a process exits non-zero or the deadline passes, the
others get a short grace period to report their own error and are then killed, and
:class:`DistributedFailure` is raised with every rank's message.

Command line (one process per server; the host's server is node rank 0)::

    torchrun --nnodes=K --nproc-per-node=1 --node-rank=R --master-addr=HOST0 --master-port=29500 \\
        -m partitioner.runtime.distributed DIR --inputs inputs.pt --out outputs.pt

Test hooks: environment ``PARTITIONER_DIST_DIE_RANK=R`` makes rank ``R`` exit with code 17
right after joining the process group (before its first transfer);
``PARTITIONER_DIST_HANG_RANK=R`` makes it sleep instead (a peer that never answers);
``PARTITIONER_DIST_KILL=R:K`` makes rank ``R`` send itself SIGKILL before its ``K``-th
action (a rank killed in the middle of the run, after earlier transfers went through).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..emit.artifact import outputs_mismatch
from ..errors import ArtifactError, PartitionerError, RuntimeFailure, UsageError
from ..ir.schedule import Schedule, sequential_order
from ..ir.tree import tree_unflatten
from .worker import run_segment

log = logging.getLogger(__name__)

__all__ = ["DistributedFailure", "HostLayout", "layout", "run_rank", "main", "STRIDE", "ERROR_PREFIX"]

#: tag stride per transfer: header, description, then at most STRIDE - 2 tensor leaves
STRIDE = 256
ERROR_PREFIX = "partitioner-dist-error: "
DIE_ENV = "PARTITIONER_DIST_DIE_RANK"
HANG_ENV = "PARTITIONER_DIST_HANG_RANK"
KILL_ENV = "PARTITIONER_DIST_KILL"


class DistributedFailure(RuntimeFailure):
    """A distributed run failed: a rank died, a peer never answered, or a value cannot be sent."""


# ---- hosts, ranks and the global order -----------------------------------------------------
@dataclass(frozen=True)
class HostLayout:
    """Which rank runs which devices, and the order every rank follows.

    Attributes
    ----------
    hosts : tuple of str
        Server per rank (rank 0: the server of the schedule's host device).
    rank_of : dict of str to int
        Spec device -> rank.
    order : tuple of (str, int)
        The global order: ``(device, action index)`` for every action of the schedule.
    """

    hosts: tuple[str, ...]
    rank_of: dict[str, int]
    order: tuple[tuple[str, int], ...]

    def devices_of(self, rank: int) -> list[str]:
        return [d for d, r in self.rank_of.items() if r == rank]


def layout(schedule: Schedule, device_hosts: dict[str, str] | None = None) -> HostLayout:
    """Group the schedule's devices by server and compute the global action order.

    ``device_hosts`` defaults to ``schedule.meta["device_hosts"]`` (written by emit),
    else to the shipped spec named in ``schedule.meta["spec"]``.

    Raises
    ------
    ArtifactError
        No device-to-server mapping can be found, or it misses a device.
    """
    hosts_map = device_hosts or schedule.meta.get("device_hosts")
    if not hosts_map:
        try:
            from ..ir.spec import load_spec

            spec = load_spec(schedule.meta.get("spec", ""))
            hosts_map = {d.id: d.host for d in spec.devices}
        except PartitionerError:
            raise ArtifactError("the schedule does not say which server each device is on",
                                hint="emit the plan again (meta.device_hosts), or pass device_hosts / --spec")
    missing = [d for d in schedule.devices if d not in hosts_map]
    if missing:
        raise ArtifactError(f"no server known for device(s) {missing}", hint="pass the spec the plan was made for")
    hosts = [hosts_map[schedule.host]]
    for d in schedule.devices:
        if hosts_map[d] not in hosts:
            hosts.append(hosts_map[d])
    rank_of = {d: hosts.index(hosts_map[d]) for d in schedule.devices}
    return HostLayout(tuple(hosts), rank_of, tuple(sequential_order(schedule)))


# ---- value descriptions (JSON, no pickle) ---------------------------------------------------
def _describe(value: Any, leaves: list[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return {"t": [list(value.shape), str(value.dtype).removeprefix("torch.")]}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [_describe(x, leaves) for x in value]}
    if isinstance(value, list):
        return {"list": [_describe(x, leaves) for x in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": [[k, _describe(x, leaves)] for k, x in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"c": value}
    raise DistributedFailure(f"cannot send a value of type {type(value).__name__} between ranks",
                             hint="only tensors, numbers, strings and tuples/lists/dicts of them cross servers; "
                                  "place its producer and consumers on one server")


def _rebuild(desc: Any, leaves: list[torch.Tensor]) -> Any:
    (k, v), = desc.items()
    if k == "t":
        return leaves.pop(0)
    if k == "size":
        return torch.Size(v)
    if k == "tuple":
        return tuple(_rebuild(x, leaves) for x in v)
    if k == "list":
        return [_rebuild(x, leaves) for x in v]
    if k == "dict":
        return {key: _rebuild(x, leaves) for key, x in v}
    return v


def _tensor_specs(desc: Any, out: list) -> list:
    (k, v), = desc.items()
    if k == "t":
        out.append((tuple(v[0]), getattr(torch, v[1])))
    elif k in ("tuple", "list"):
        for x in v:
            _tensor_specs(x, out)
    elif k == "dict":
        for _, x in v:
            _tensor_specs(x, out)
    return out


# ---- one rank -------------------------------------------------------------------------------
class _Rank:
    def __init__(self, art, lay: HostLayout, rank: int, devices: dict[str, torch.device],
                 comm_device: torch.device, timeout_s: float, deadline: float | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.s: Schedule = art.schedule
        self.lay = lay
        self.rank = rank
        self.devices = devices
        self.comm = comm_device
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + timeout_s if deadline is None else min(self.t0 + timeout_s, deadline)
        self.timeout_s = self.deadline - self.t0
        self.transfers = {t.tag: t for t in self.s.transfers}
        self.segs = {x.id: x for x in self.s.segments}
        mine = set(lay.devices_of(rank))
        self.modules = {}
        from .local import _place

        for seg in self.s.segments:
            if seg.device in mine:
                self.modules[seg.id] = _place(art.modules[seg.id], devices[seg.device])
        # the issue order of remote sends per (src rank, dst rank): the global order's sends
        self.issue: dict[tuple[int, int], list[int]] = {}
        for d, k in lay.order:
            a = self.s.actions[d][k]
            if a.op == "send" and lay.rank_of[a.peer] != lay.rank_of[d]:
                self.issue.setdefault((lay.rank_of[d], lay.rank_of[a.peer]), []).append(a.tag)
        self.next_in: dict[int, int] = {}          # peer rank -> index in issue[(peer, me)]
        self.inbox: dict[int, Any] = {}            # tag -> value received from another rank
        self.local: dict[int, Any] = {}            # tag -> value sent between this rank's devices
        self.pending: list[tuple[Any, str, list]] = []  # (work, what, keep-alive tensors)
        self.current = "start"

    def where(self, rank: int) -> str:
        return f"rank {rank} (host {self.lay.hosts[rank]})"

    def _wait(self, work, what: str) -> None:
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise DistributedFailure(f"{self.where(self.rank)} timed out ({self.timeout_s:.1f} s) {what}",
                                     hint="a peer is stuck or much slower than planned; raise --timeout")
        try:
            work.wait(datetime.timedelta(seconds=left))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            first = first.split(". This is typically")[0]
            raise DistributedFailure(f"{self.where(self.rank)} failed {what}: {first}",
                                     hint="the peer rank died or stopped answering; see its own error") from None

    def _describe_transfer(self, tag: int) -> str:
        t = self.transfers[tag]
        return f"transfer {tag} of {t.value!r} ({t.src} on {self.where(self.lay.rank_of[t.src])} -> {t.dst})"

    # -- remote transfers
    def isend(self, tag: int, value: Any, peer: int) -> None:
        leaves: list[torch.Tensor] = []
        desc = json.dumps(_describe(value, leaves)).encode()
        if len(leaves) > STRIDE - 2:
            raise DistributedFailure(f"value {self.transfers[tag].value!r} has {len(leaves)} tensors; at most "
                                     f"{STRIDE - 2} can be sent as one transfer", hint="please report this")
        blob = torch.frombuffer(bytearray(desc), dtype=torch.uint8).to(self.comm)
        msgs = [torch.tensor([blob.numel()], dtype=torch.int64, device=self.comm), blob]
        msgs += [t.detach().contiguous().to(self.comm) for t in leaves]
        what = f"sending {self._describe_transfer(tag)} to {self.where(peer)}"
        for k, m in enumerate(msgs):
            self.pending.append((self.dist.isend(m, peer, tag=tag * STRIDE + k), what, [m]))

    def recv(self, tag: int, src: int, dev: torch.device) -> Any:
        order = self.issue.get((src, self.rank), [])
        while tag not in self.inbox:
            k = self.next_in.get(src, 0)
            if k >= len(order):
                raise DistributedFailure(f"internal error: transfer {tag} is not in the issue order of "
                                         f"{self.where(src)}", hint="please report this bug")
            t = order[k]
            self.inbox[t] = self._recv_one(t, src)
            self.next_in[src] = k + 1
        return _to(self.inbox.pop(tag), dev)

    def _recv_one(self, tag: int, src: int) -> Any:
        what = f"waiting for {self._describe_transfer(tag)} from {self.where(src)}"
        hdr = torch.empty(1, dtype=torch.int64, device=self.comm)
        self._wait(self.dist.irecv(hdr, src, tag=tag * STRIDE), what)
        blob = torch.empty(int(hdr.item()), dtype=torch.uint8, device=self.comm)
        self._wait(self.dist.irecv(blob, src, tag=tag * STRIDE + 1), what)
        desc = json.loads(bytes(blob.cpu().numpy().tobytes()).decode())
        leaves = []
        for k, (shape, dtype) in enumerate(_tensor_specs(desc, [])):
            buf = torch.empty(shape, dtype=dtype, device=self.comm)
            self._wait(self.dist.irecv(buf, src, tag=tag * STRIDE + 2 + k), what)
            leaves.append(buf)
        return _rebuild(desc, leaves)

    # -- the program
    def run(self, inputs: tuple | None) -> Any:
        from ..ir.schedule import bind_inputs

        s, lay = self.s, self.lay
        mine = lay.devices_of(self.rank)
        store: dict[str, dict[str, Any]] = {d: {} for d in mine}
        if s.host in mine:
            env = bind_inputs(s, inputs or ())
            store[s.host].update({v: _to(env[v], self.devices[s.host]) for v in s.inputs})
        free = {d: {} for d in mine}
        for d in mine:
            for v, k in s.last_uses(d).items():
                free[d].setdefault(k, []).append(v)
        kill_at = _kill_hook(self.rank)
        done = 0
        for d, k in lay.order:
            if lay.rank_of[d] != self.rank:
                continue
            if done == kill_at:
                log.warning("rank %d kills itself (SIGKILL) before its action %d (%s)", self.rank, done, KILL_ENV)
                os.kill(os.getpid(), signal.SIGKILL)
            done += 1
            a = s.actions[d][k]
            self.current = f"{d} action #{k} ({a.describe()})"
            st = store[d]
            if a.op == "compute":
                run_segment(self.segs[a.segment], self.modules[a.segment], st)
            elif a.op == "send":
                peer = lay.rank_of[a.peer]
                if peer == self.rank:
                    self.local[a.tag] = _to(st[a.value], self.devices[a.peer])
                else:
                    self.isend(a.tag, st[a.value], peer)
            else:
                src = lay.rank_of[a.peer]
                st[a.value] = self.local.pop(a.tag) if src == self.rank else self.recv(a.tag, src, self.devices[d])
            for v in free[d].get(k, ()):
                st.pop(v, None)
        self.current = "completing its sends"
        for work, what, _ in self.pending:
            self._wait(work, what)
        self.pending.clear()
        if s.host in mine:
            return tree_unflatten(s.outputs, store[s.host].__getitem__)
        return None


def _kill_hook(rank: int) -> int | None:
    """``PARTITIONER_DIST_KILL=R:K``: rank R sends itself SIGKILL before its K-th action."""
    spec = os.environ.get(KILL_ENV, "")
    r, _, k = spec.partition(":")
    if r.strip() == str(rank) and k.strip().isdigit():
        return int(k)
    return None


def _to(value: Any, dev: torch.device) -> Any:
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, value)


def run_rank(art, *, rank: int, world_size: int, inputs: tuple | None = None, backend: str = "gloo",
             map_devices: Any = None, timeout_s: float = 120.0, device_hosts: dict | None = None,
             init: bool = True, deadline_epoch: float | None = None, init_timeout_s: float = 60.0) -> Any:
    """Run this process's share of ``art`` (an :class:`~partitioner.emit.artifact.Artifact`).

    Joins the process group (``env://``: MASTER_ADDR, MASTER_PORT) unless ``init`` is
    False, runs the devices of server ``layout(...).hosts[rank]`` and returns the outputs
    on rank 0 (None elsewhere). ``deadline_epoch`` (``time.time()`` seconds) caps the
    run's deadline. ``init_timeout_s`` bounds the rendezvous (ranks start at different
    times), ``timeout_s`` the run from this rank's start (every recv and send).

    Raises
    ------
    DistributedFailure
        Wrong world size, a peer that died or timed out (naming rank, server and
        transfer), or a value that cannot cross servers.
    """
    import torch.distributed as dist

    from .local import resolve_devices

    if backend not in ("gloo", "nccl"):
        raise UsageError(f"unknown backend {backend!r}", hint="use gloo (CPU) or nccl (CUDA)")
    lay = layout(art.schedule, device_hosts)
    if world_size != len(lay.hosts):
        raise DistributedFailure(f"the plan spans {len(lay.hosts)} server(s) ({', '.join(lay.hosts)}), "
                                 f"but the world size is {world_size}",
                                 hint=f"start one process per server: --nnodes={len(lay.hosts)} --nproc-per-node=1")
    devices = resolve_devices(art.schedule, map_devices)
    comm = torch.device("cpu")
    if backend == "nccl":
        comm = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(comm)
    deadline = None
    if deadline_epoch is not None:
        deadline = time.perf_counter() + (deadline_epoch - time.time())
        timeout_s = max(0.5, min(timeout_s, deadline_epoch - time.time()))
    me = f"rank {rank} (host {lay.hosts[rank] if 0 <= rank < len(lay.hosts) else '?'})"
    if init:
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=max(init_timeout_s, timeout_s)))
        except Exception as err:  # noqa: BLE001 - DistStoreError, DistNetworkError...
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise DistributedFailure(f"{me} could not join the process group at {where} within "
                                     f"{max(init_timeout_s, timeout_s):.0f} s: "
                                     f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}",
                                     hint="start every rank (one per server) with the same MASTER_ADDR/PORT; "
                                          "a rank that died before joining is named in its own log") from None
    if os.environ.get(DIE_ENV, "") == str(rank):
        log.warning("rank %d exits on purpose (%s)", rank, DIE_ENV)
        os._exit(17)
    if os.environ.get(HANG_ENV, "") == str(rank):
        log.warning("rank %d hangs on purpose (%s)", rank, HANG_ENV)
        time.sleep(10 * timeout_s)
    r = _Rank(art, lay, rank, devices, comm, timeout_s, deadline)
    try:
        out = r.run(inputs)
    except DistributedFailure:
        raise
    except PartitionerError as err:
        raise DistributedFailure(f"{me} failed at {r.current}: {err.message}", hint=err.hint) from err
    except Exception as err:  # noqa: BLE001 - a segment raised
        raise DistributedFailure(f"{me} failed at {r.current}: {type(err).__name__}: {err}",
                                 hint="the segment's code raised: check the inputs") from err
    # On failure there is no destroy_process_group (it may wait for the failed peer): the caller exits.
    r.current = "the final barrier"
    try:
        dist.barrier()
    except RuntimeError as err:
        raise DistributedFailure(f"{me} failed at the final barrier: {str(err).strip().splitlines()[0]}",
                                 hint="a peer rank died after its last transfer") from None
    if init and dist.is_initialized():
        dist.destroy_process_group()
    return out


# ---- command line (one rank) ----------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m partitioner.runtime.distributed`` (run by torchrun)."""
    ap = argparse.ArgumentParser(prog="python -m partitioner.runtime.distributed",
                                 description="Run an emitted plan with one torch.distributed rank per server.")
    ap.add_argument("artifact", type=Path, help="artifact directory (schedule.json + segments/)")
    ap.add_argument("--inputs", type=Path, default=None, help="inputs (.pt/.safetensors; default DIR/example_inputs.pt)")
    ap.add_argument("--out", type=Path, default=None, help="where rank 0 writes the outputs (torch.save)")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the run (every transfer)")
    ap.add_argument("--init-timeout", type=float, default=60.0, help="seconds for the rendezvous")
    ap.add_argument("--map", action="append", default=None, help="SPEC_DEVICE=TORCH_DEVICE (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of this rank")
    ap.add_argument("--check", action="store_true", help="rank 0: compare with DIR/expected_outputs.pt")
    ap.add_argument("--deadline", type=float, default=None, help="absolute deadline (time.time() seconds; "
                    "set by the launcher)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from ..emit.artifact import load_artifact
        from .io import parse_device_map, read_inputs

        if ns.threads:
            torch.set_num_threads(ns.threads)
        art = load_artifact(ns.artifact)
        args = None
        if layout(art.schedule).rank_of[art.schedule.host] == rank:
            if ns.inputs is not None:
                args = read_inputs(ns.inputs, art.schedule.inputs)
            elif art.example_inputs is not None:
                args = art.example_inputs
            else:
                raise UsageError(f"{ns.artifact} holds no example_inputs.pt", hint="pass --inputs FILE")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run_rank(art, rank=rank, world_size=world, inputs=args, backend=ns.backend,
                           map_devices=parse_device_map(ns.map) or None, timeout_s=ns.timeout, deadline_epoch=ns.deadline,
                           init_timeout_s=ns.init_timeout)
        wall = time.perf_counter() - t0
        if out is not None:
            if ns.out is not None:
                ns.out.parent.mkdir(parents=True, exist_ok=True)
                torch.save(_to(out, torch.device("cpu")), ns.out)
            log.warning("rank %d: ran in %.3f s (includes rendezvous)", rank, wall)
            if ns.check and art.expected_outputs is not None:
                bad = outputs_mismatch(_to(out, torch.device("cpu")), art.expected_outputs)
                if bad is not None:
                    raise AssertionError(bad)
    except PartitionerError as err:
        sys.stderr.write(ERROR_PREFIX + json.dumps(str(err.message)) + "\n")
        if err.hint:
            sys.stderr.write(f"Hint: {err.hint}\n")
        _exit_now(2)
    except AssertionError as err:
        sys.stderr.write(ERROR_PREFIX + json.dumps("outputs differ: " + str(err).splitlines()[0]) + "\n")
        _exit_now(1)
    except Exception as err:  # noqa: BLE001 - e.g. the rendezvous timed out
        sys.stderr.write(ERROR_PREFIX + json.dumps(f"rank {rank}: {type(err).__name__}: "
                                                   f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}")
                         + "\n")
        _exit_now(2)
    return 0


def _exit_now(code: int) -> None:
    """Exit without waiting for gloo/NCCL threads that may block on a failed peer."""
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover - exercised through launch() in subprocesses
    sys.exit(main())
