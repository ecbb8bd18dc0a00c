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

* the sender posts a header with the length of a JSON description of the value, the
  description sealed with an HMAC of the run's shared secret, then every tensor leaf
  (:mod:`partitioner.runtime.wire`: the format, and how joining is bound to
  ``MASTER_ADDR`` and authenticated); it waits for all its sends at the end;
* the receiver, when it needs a value from a peer rank, receives (blocking, bounded by
  the deadline) every message that peer sends it, in the peer's issue order, up to that
  value, keeping the earlier ones. Messages therefore match in issue order per rank pair
  (as NCCL requires) and by tag (gloo checks it). It checks each description's HMAC and
  sizes (bounded by what the schedule declares for the value) before it allocates anything.

No pickle crosses the wire: non-tensor values are limited to JSON constants (ints,
finite floats, bools, strings, None) and ``torch.Size``/tuples/lists/dicts of them and
tensors; anything else is refused with :class:`~partitioner.runtime.wire.DistributedFailure`.

Backends
--------
``gloo`` (default, CPU tensors) or ``nccl`` (tensors staged on ``cuda:LOCAL_RANK``).
Limitation with NCCL: a send and a recv between the same pair of ranks share one NCCL
stream, so two ranks that both send before receiving from each other may block; gloo
has no such restriction.

Failures
--------
The rendezvous is bounded by ``--init-timeout``; every recv and the final send completion
wait at most until the run's deadline (``--timeout``, from the rank's start after the
rendezvous), and a watchdog thread ends a rank still busy at its deadline (say, stuck
inside a segment's compute) within :data:`WATCHDOG_GRACE_S` after it, with its own
error line and exit code 2. A peer that dies makes
gloo fail the pending recv at once ("connection closed"); either way the rank exits with
code 2 after printing one line ``partitioner-dist-error: MESSAGE`` that names the rank,
its server and the transfer it waited for. :func:`launch` (K local processes, used by
the tests) adds a watchdog: when a process exits non-zero or the deadline passes, the
others get a short grace period to report their own error and are then killed, and
:class:`DistributedFailure` is raised with every rank's message.

Command line (one process per server; the host's server is node rank 0; the same
``PARTITIONER_SECRET`` on every server)::

    torchrun --nnodes=K --nproc-per-node=1 --node-rank=R --master-addr=HOST0 --master-port=29500 \\
        -m partitioner.runtime.distributed DIR --inputs inputs.pt --out outputs.pt

Test hooks: environment ``PARTITIONER_DIST_DIE_RANK=R`` makes rank ``R`` exit with code 17
right after joining the process group (before its first transfer);
``PARTITIONER_DIST_HANG_RANK=R`` makes it sleep instead (a peer that never answers);
``PARTITIONER_DIST_KILL=R:K`` makes rank ``R`` send itself SIGKILL before its ``K``-th
action (a rank killed in the middle of the run, after earlier transfers went through);
``PARTITIONER_DIST_STUCK_RANK=R`` makes rank ``R``'s first compute never return.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..emit.artifact import outputs_mismatch
from ..errors import ArtifactError, PartitionerError, UsageError
from ..ir.schedule import Schedule, sequential_order
from ..ir.tree import tree_unflatten
from . import wire
from .wire import STRIDE, DistributedFailure
from .worker import run_segment

log = logging.getLogger(__name__)

__all__ = ["HostLayout", "layout", "run_rank", "main", "ERROR_PREFIX", "WATCHDOG_GRACE_S"]

ERROR_PREFIX = "partitioner-dist-error: "
DIE_ENV = "PARTITIONER_DIST_DIE_RANK"
HANG_ENV = "PARTITIONER_DIST_HANG_RANK"
KILL_ENV = "PARTITIONER_DIST_KILL"
STUCK_ENV = "PARTITIONER_DIST_STUCK_RANK"
#: how long after its deadline the watchdog ends a rank that is still busy (a rank waiting
#: for a transfer reports its own timeout first, naming the transfer)
WATCHDOG_GRACE_S = 0.5


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


# ---- one rank -------------------------------------------------------------------------------
class _Rank:
    def __init__(self, art, lay: HostLayout, rank: int, devices: dict[str, torch.device],
                 comm_device: torch.device, timeout_s: float, deadline: float | None, group: wire.Group,
                 sealer: wire.Sealer, max_scale: float):
        self.group, self.sealer, self.max_scale = group, sealer, max_scale
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
        tree = wire.describe(value, leaves)
        if len(leaves) > STRIDE - 2:
            raise DistributedFailure(f"value {self.transfers[tag].value!r} has {len(leaves)} tensors; at most "
                                     f"{STRIDE - 2} can be sent as one transfer", hint="please report this")
        leaves = [t.detach().contiguous().to(self.comm) for t in leaves]
        sealed = self.sealer.seal({"v": tree, "digest": wire.digest(leaves)}, self.rank, peer, tag)
        blob = torch.frombuffer(bytearray(sealed), dtype=torch.uint8).to(self.comm)
        msgs = [torch.tensor([blob.numel()], dtype=torch.int64, device=self.comm), blob, *leaves]
        what = f"sending {self._describe_transfer(tag)} to {self.where(peer)}"
        for k, m in enumerate(msgs):
            self.pending.append((self.group.isend(m, peer, tag * STRIDE + k), what, [m]))

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
        bad = f"{self.where(self.rank)} received {self._describe_transfer(tag)}"
        hdr = torch.empty(1, dtype=torch.int64, device=self.comm)
        self._wait(self.group.irecv(hdr, src, tag * STRIDE), what)
        n = int(hdr.item())
        if not 0 < n <= wire.MAX_HEADER_BYTES:
            raise DistributedFailure(f"{bad} with a header of {n} bytes (at most {wire.MAX_HEADER_BYTES})",
                                     hint="check that every rank runs the same artifact")
        blob = torch.empty(n, dtype=torch.uint8, device=self.comm)
        self._wait(self.group.irecv(blob, src, tag * STRIDE + 1), what)
        desc = self.sealer.open(bytes(blob.cpu().numpy().tobytes()), src, self.rank, tag, bad)
        specs = wire.tensor_specs(desc["v"], [])
        wire.check_leaves(specs, self.s.values[self.transfers[tag].value].bytes, self.max_scale, bad)
        leaves = []
        for k, (shape, dtype) in enumerate(specs):
            buf = torch.empty(shape, dtype=dtype, device=self.comm)
            self._wait(self.group.irecv(buf, src, tag * STRIDE + 2 + k), what)
            leaves.append(buf)
        if desc.get("digest") is not None and wire.digest(leaves) != desc["digest"]:
            raise DistributedFailure(f"{bad}: its tensors differ from the ones it was sent with (digest)",
                                     hint="the connection between the servers changed the data; check the network")
        return wire.rebuild(desc["v"], leaves)

    # -- the program
    def run(self, inputs: tuple | None) -> Any:
        from ..ir.inputs import bind_inputs

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
                if os.environ.get(STUCK_ENV, "") == str(self.rank):
                    log.warning("rank %d is stuck in its compute on purpose (%s)", self.rank, STUCK_ENV)
                    while True:
                        time.sleep(3600)
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
             init: bool = True, deadline_epoch: float | None = None, init_timeout_s: float = 60.0,
             max_scale: float = wire.DEFAULT_MAX_SCALE, watchdog: bool = False) -> Any:
    """Run this process's share of ``art`` (an :class:`~partitioner.emit.artifact.Artifact`).

    Joins the run (MASTER_ADDR, MASTER_PORT; the store bound to that address, every rank
    checked against the shared secret: :mod:`partitioner.runtime.wire`) unless ``init``
    is False (the caller made the default process group; the secret is checked all the
    same), runs the devices of server ``layout(...).hosts[rank]`` and returns the outputs
    on rank 0 (None elsewhere). ``deadline_epoch`` (``time.time()`` seconds) caps the
    run's deadline. ``init_timeout_s`` bounds the rendezvous (ranks start at different
    times), ``timeout_s`` the run from this rank's start (every recv and send);
    ``max_scale`` bounds a received value at that many times its declared bytes. With
    ``watchdog`` (the command line), a rank still busy :data:`WATCHDOG_GRACE_S` after its
    deadline, e.g. inside a segment's compute, prints its error line and exits the
    process with code 2.

    Raises
    ------
    DistributedFailure
        Wrong world size, no shared secret, a peer that died, timed out or failed a check
        (naming rank, server and transfer), or a value that cannot cross servers.
    """
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
    top = max((t.tag for t in art.schedule.transfers), default=0)
    if (top + 1) * STRIDE > wire.HELLO_TAG:
        raise DistributedFailure(f"transfer tag {top} is too large for the wire", hint="emit the plan again")
    secret = wire.read_secret() if world_size > 1 else b""
    join_s = max(init_timeout_s, timeout_s)
    try:
        group = wire.Group(backend, rank, world_size, join_s, init=init)
        nonce = wire.handshake(group, rank, world_size, secret, comm, join_s) if world_size > 1 else b""
    except DistributedFailure as err:
        raise DistributedFailure(f"{me}: {err.message}", hint=err.hint) from None
    except Exception as err:  # noqa: BLE001 - DistStoreError, DistNetworkError...
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedFailure(f"{me} could not join the process group at {where} within {join_s:.0f} s: "
                                 f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}",
                                 hint="start every rank (one per server) with the same MASTER_ADDR/PORT; "
                                      "a rank that died before joining is named in its own log") from None
    if os.environ.get(DIE_ENV, "") == str(rank):
        log.warning("rank %d exits on purpose (%s)", rank, DIE_ENV)
        os._exit(17)
    if os.environ.get(HANG_ENV, "") == str(rank):
        log.warning("rank %d hangs on purpose (%s)", rank, HANG_ENV)
        time.sleep(10 * timeout_s)
    r = _Rank(art, lay, rank, devices, comm, timeout_s, deadline, group, wire.Sealer(secret, nonce), max_scale)
    timer = None
    if watchdog:
        timer = threading.Timer(max(0.0, r.deadline - time.perf_counter()) + WATCHDOG_GRACE_S, _stuck, (me, r))
        timer.daemon = True
        timer.start()
    try:
        out = r.run(inputs)
        # On failure there is no destroy_process_group (it may wait for the failed peer): the caller exits.
        r.current = "the final barrier"
        try:
            group.barrier()
        except RuntimeError as err:
            raise DistributedFailure(f"{me} failed at the final barrier: {str(err).strip().splitlines()[0]}",
                                     hint="a peer rank died after its last transfer") from None
    except DistributedFailure:
        raise
    except PartitionerError as err:
        raise DistributedFailure(f"{me} failed at {r.current}: {err.message}", hint=err.hint) from err
    except Exception as err:  # noqa: BLE001 - a segment raised
        raise DistributedFailure(f"{me} failed at {r.current}: {type(err).__name__}: {err}",
                                 hint="the segment's code raised: check the inputs") from err
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
    group.close()
    return out


def _stuck(me: str, r: "_Rank") -> None:
    """The watchdog's end of a rank still busy after its deadline: one error line, exit code 2."""
    _report(f"{me} timed out ({r.timeout_s:.1f} s) at {r.current}: the watchdog ended it",
            "a segment computes far longer than planned, or hangs; raise --timeout if it is only slow")
    _exit_now(2)


def _report(message: str, hint: str | None) -> None:
    sys.stderr.write(ERROR_PREFIX + json.dumps(message) + "\n")
    if hint:
        sys.stderr.write(f"Hint: {hint}\n")


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
    ap.add_argument("--expect", default=None, help="refuse the artifact unless its content hash is HASH")
    ap.add_argument("--deadline", type=float, default=None, help="absolute deadline (time.time() seconds; "
                    "set by the launcher)")
    ap.add_argument("--max-scale", type=float, default=wire.DEFAULT_MAX_SCALE,
                    help="a received value may be at most this many times the bytes the schedule declares for it")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from ..emit.artifact import load_artifact
        from ..emit.outdir import check_out_file
        from .io import parse_device_map, read_inputs

        if ns.max_scale <= 0 or not ns.max_scale < float("inf"):
            raise UsageError(f"--max-scale must be a finite number > 0, got {ns.max_scale}", hint="e.g. --max-scale 64")
        if ns.threads:
            torch.set_num_threads(ns.threads)
        art = load_artifact(ns.artifact, expect=ns.expect)
        args = None
        if layout(art.schedule).rank_of[art.schedule.host] == rank:
            check_out_file(ns.out, "--out")  # before the run, which would be lost
            if ns.inputs is not None:
                args = read_inputs(ns.inputs, art.schedule.inputs)
            elif art.example_inputs is not None:
                args = art.example_inputs
            else:
                raise UsageError(f"{ns.artifact} holds no example_inputs.pt", hint="pass --inputs FILE")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run_rank(art, rank=rank, world_size=world, inputs=args, backend=ns.backend,
                           map_devices=parse_device_map(ns.map) or None, timeout_s=ns.timeout,
                           deadline_epoch=ns.deadline, init_timeout_s=ns.init_timeout, max_scale=ns.max_scale,
                           watchdog=True)
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
        _report(str(err.message), err.hint)
        _exit_now(2)
    except AssertionError as err:
        _report("outputs differ: " + str(err).splitlines()[0], None)
        _exit_now(1)
    except Exception as err:  # noqa: BLE001 - e.g. the rendezvous timed out
        _report(f"rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                None)
        _exit_now(2)
    return 0


def _exit_now(code: int) -> None:
    """Exit without waiting for gloo/NCCL threads that may block on a failed peer."""
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover - exercised through launch() in subprocesses
    sys.exit(main())
