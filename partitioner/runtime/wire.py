"""The wire between distributed ranks: joining a run, and how one value crosses between two ranks.

Joining
-------
Rank 0 serves the rendezvous store (``TCPStore``) on ``MASTER_ADDR:MASTER_PORT`` only: its
listening socket is bound to that address (``MASTER_ADDR=127.0.0.1`` never listens on
other interfaces; torch's own ``env://`` store listens on all of them). Under torchrun
with ``TORCHELASTIC_USE_AGENT_STORE=True`` the agent serves the store and every rank is
a client. With gloo, each rank's connections to its peers listen on the local address
that routes to ``MASTER_ADDR`` (127.0.0.1 for a local run), and the process group is
made directly on that device (no default group, no other listener). With NCCL, the
process group is torch's default one (``NCCL_SOCKET_IFNAME`` chooses its interface).

Every rank then proves it holds the run's shared secret (``PARTITIONER_SECRET``, or the
file named by ``PARTITIONER_SECRET_FILE``; at least 16 characters; :func:`launch
<partitioner.runtime.launch.launch>` makes one for local runs): rank 0 sends every rank
a fresh 32-byte nonce with ``HMAC-SHA256(secret, "hello" | nonce | rank | world)``, and
each rank answers ``HMAC(secret, "ack" | nonce | rank)``. A rank without the secret, or
a stranger that joined the store, fails there with :class:`DistributedFailure`.

A value on the wire
-------------------
Three kinds of message per transfer, on tags ``tag * STRIDE + k``:

* ``int64[1]``: the length of the next message, at most :data:`MAX_HEADER_BYTES`;
* ``uint8[n]``: a JSON description of the value (its tree of tuples/lists/dicts, JSON
  constants, and the shape and dtype of every tensor leaf, plus the SHA-256 of the leaves'
  bytes when they travel through host memory, i.e. with gloo) followed by
  ``HMAC-SHA256(secret, nonce | src rank | dst rank | tag | description)``;
* every tensor leaf.

The receiver checks the HMAC before it reads the description, the description's
nesting (at most :data:`MAX_DEPTH`) and its tensors before it allocates them: known
dtypes, at most 16 dimensions, at most ``STRIDE - 2`` leaves, and in all at most
``max_scale`` (default :data:`DEFAULT_MAX_SCALE`) times the bytes the schedule declares
for the value (at least 1 MiB: a batch larger than the traced one is fine within that),
then the leaves' digest once they arrived. A message that fails any check ends the run
with :class:`DistributedFailure`. No pickle crosses the wire.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import math
import os
import secrets
import socket
import struct
import time
from typing import Any

import torch

from ..errors import RuntimeFailure
from ..ir import jsonio

__all__ = ["DistributedFailure", "STRIDE", "MAX_HEADER_BYTES", "MAX_DEPTH", "DEFAULT_MAX_SCALE", "SECRET_ENV",
           "SECRET_FILE_ENV", "read_secret", "new_secret", "describe", "rebuild", "tensor_specs", "Sealer",
           "check_leaves", "digest", "Group", "open_store", "local_address", "handshake", "HELLO_TAG"]

#: tag stride per transfer: header, description, then at most STRIDE - 2 tensor leaves
STRIDE = 256
#: tags of the handshake (above every transfer's tags)
HELLO_TAG = 2**31 - 2
MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_DIMS = 16
DEFAULT_MAX_SCALE = 64.0
MIN_BUDGET_BYTES = 1 << 20
SECRET_ENV = "PARTITIONER_SECRET"
SECRET_FILE_ENV = "PARTITIONER_SECRET_FILE"
MIN_SECRET_CHARS = 16
_MAC = 32
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class DistributedFailure(RuntimeFailure):
    """A distributed run failed: a rank died, a peer never answered or failed a check, or a value cannot be sent."""


# ---- the shared secret ----------------------------------------------------------------------
def new_secret() -> str:
    """A fresh random secret (64 hex characters)."""
    return secrets.token_hex(32)


def read_secret() -> bytes:
    """The run's shared secret from ``PARTITIONER_SECRET`` or the file ``PARTITIONER_SECRET_FILE``.

    Raises
    ------
    DistributedFailure
        Neither is set, the file cannot be read, or the secret is shorter than 16 characters.
    """
    hint = (f"set the same {SECRET_ENV} on every server, e.g. export {SECRET_ENV}=$(python -c "
            f"'import secrets; print(secrets.token_hex(32))'), or {SECRET_FILE_ENV}=PATH to a file holding it")
    text = os.environ.get(SECRET_ENV)
    where = SECRET_ENV
    if not text and os.environ.get(SECRET_FILE_ENV):
        where = os.environ[SECRET_FILE_ENV]
        try:
            with open(where, encoding="utf-8") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise DistributedFailure(f"cannot read the shared secret from {where}: {err}", hint=hint) from None
    if not text:
        raise DistributedFailure("no shared secret for the run: every rank must prove it belongs to it", hint=hint)
    if len(text) < MIN_SECRET_CHARS:
        raise DistributedFailure(f"the shared secret in {where} has {len(text)} characters, fewer than "
                                 f"{MIN_SECRET_CHARS}", hint=hint)
    return text.encode()


# ---- value descriptions (JSON, no pickle) ---------------------------------------------------
def describe(value: Any, leaves: list[torch.Tensor]) -> Any:
    """The JSON description of ``value``; its tensors are appended to ``leaves``."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return {"t": [list(value.shape), str(value.dtype).removeprefix("torch.")]}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [describe(x, leaves) for x in value]}
    if isinstance(value, list):
        return {"list": [describe(x, leaves) for x in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": [[k, describe(x, leaves)] for k, x in value.items()]}
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return {"c": value}
    raise DistributedFailure(f"cannot send a value of type {type(value).__name__} between ranks",
                             hint="only tensors, finite numbers, strings and tuples/lists/dicts of them cross "
                                  "servers; place its producer and consumers on one server")


def rebuild(desc: Any, leaves: list[torch.Tensor]) -> Any:
    """The value a checked description stands for, taking its tensors from ``leaves`` in order."""
    (k, v), = desc.items()
    if k == "t":
        return leaves.pop(0)
    if k == "size":
        return torch.Size(v)
    if k == "tuple":
        return tuple(rebuild(x, leaves) for x in v)
    if k == "list":
        return [rebuild(x, leaves) for x in v]
    if k == "dict":
        return {key: rebuild(x, leaves) for key, x in v}
    return v


def tensor_specs(desc: Any, out: list) -> list:
    """``(shape, dtype)`` of every tensor leaf of a description; DistributedFailure for a malformed one."""
    if not isinstance(desc, dict) or len(desc) != 1:
        raise DistributedFailure(f"malformed value description {str(desc)[:80]!r}", hint=_PEER_HINT)
    (k, v), = desc.items()
    if k == "t":
        ok = (isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) and len(v[0]) <= MAX_DIMS
              and all(type(x) is int and x >= 0 for x in v[0]) and v[1] in _DTYPES)
        if not ok:
            raise DistributedFailure(f"malformed tensor description {str(v)[:80]!r}", hint=_PEER_HINT)
        out.append((tuple(v[0]), _DTYPES[v[1]]))
    elif k in ("tuple", "list") and isinstance(v, list):
        for x in v:
            tensor_specs(x, out)
    elif k == "dict" and isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
        for _, x in v:
            tensor_specs(x, out)
    elif k == "size" and isinstance(v, list) and all(type(x) is int for x in v):
        pass
    elif k != "c" or isinstance(v, (list, dict)):
        raise DistributedFailure(f"malformed value description {str(desc)[:80]!r}", hint=_PEER_HINT)
    return out


_PEER_HINT = "a peer sent what the schedule does not allow: check that every rank runs the same artifact"


def check_leaves(specs: list, declared_bytes: float, max_scale: float, what: str) -> None:
    """Refuse (before allocating them) tensors that are too many or too large for the value."""
    if len(specs) > STRIDE - 2:
        raise DistributedFailure(f"{what}: {len(specs)} tensors announced, at most {STRIDE - 2}", hint=_PEER_HINT)
    total = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in specs)
    budget = max_scale * max(float(declared_bytes), MIN_BUDGET_BYTES)
    if total > budget:
        raise DistributedFailure(f"{what}: {total} bytes announced, more than {max_scale:g} x the {declared_bytes:.0f} "
                                 f"bytes the schedule declares ({budget:.0f} allowed)",
                                 hint="raise --max-scale if the inputs are that much larger than the traced "
                                      f"ones; else {_PEER_HINT}")


def digest(leaves: list[torch.Tensor]) -> str | None:
    """SHA-256 over the bytes of every leaf, for leaves in host memory (None if any is not)."""
    if any(t.device.type != "cpu" for t in leaves):
        return None
    h = hashlib.sha256()
    for t in leaves:
        t = t.detach().contiguous()
        h.update(struct.pack("<q", t.numel()))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class Sealer:
    """HMAC-SHA256 over every description, keyed by the run's secret and bound to its nonce."""

    def __init__(self, secret: bytes, nonce: bytes):
        self.secret, self.nonce = secret, nonce

    def _mac(self, src: int, dst: int, tag: int, body: bytes) -> bytes:
        msg = self.nonce + struct.pack("<qqq", src, dst, tag) + body
        return hmac.new(self.secret, msg, hashlib.sha256).digest()

    def seal(self, desc: dict, src: int, dst: int, tag: int) -> bytes:
        body = jsonio.dumps(desc).encode()
        return body + self._mac(src, dst, tag, body)

    def open(self, blob: bytes, src: int, dst: int, tag: int, what: str) -> dict:
        body, mac = blob[:-_MAC], blob[-_MAC:]
        if len(blob) <= _MAC or not hmac.compare_digest(mac, self._mac(src, dst, tag, body)):
            raise DistributedFailure(f"{what}: the message does not carry the run's HMAC (a stranger, a rank "
                                     "with another secret, or a changed message)",
                                     hint=f"start every rank with the same {SECRET_ENV}")
        desc = jsonio.loads(body, source=what, error=DistributedFailure, hint=_PEER_HINT)
        jsonio.check_depth(desc, what=f"{what}: the value description", error=DistributedFailure, hint=_PEER_HINT,
                           limit=MAX_DEPTH)
        if not isinstance(desc, dict) or "v" not in desc:
            raise DistributedFailure(f"{what}: malformed message", hint=_PEER_HINT)
        return desc


# ---- joining ----------------------------------------------------------------------------------
def local_address(master: str, port: int) -> str:
    """This machine's address on the route to ``master`` (127.0.0.1 for a loopback master)."""
    fam = socket.getaddrinfo(master, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(fam[0], socket.SOCK_DGRAM) as s:
        s.connect(fam[4])  # UDP: no packet is sent
        return s.getsockname()[0]


def open_store(rank: int, world: int, timeout_s: float):
    """The rendezvous store of ``MASTER_ADDR:MASTER_PORT``: served by rank 0 on that address only."""
    from torch.distributed import TCPStore

    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    td = datetime.timedelta(seconds=timeout_s)
    if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return TCPStore(addr, port, world, False, timeout=td)
    fam = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(fam[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(fam[4])
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise DistributedFailure(f"rank 0 cannot listen on MASTER_ADDR:MASTER_PORT = {addr}:{port}: {err.strerror}",
                                 hint="MASTER_ADDR must be an address of rank 0's server, MASTER_PORT a free "
                                      "port") from None
    return TCPStore(addr, port, world, True, timeout=td, master_listen_fd=sock.detach())


class Group:
    """Point-to-point messages and a barrier among the run's ranks (see the module docstring)."""

    def __init__(self, backend: str, rank: int, world: int, timeout_s: float, init: bool = True):
        import torch.distributed as dist

        self.dist, self.pg, self.made = dist, None, init
        if not init:  # the caller made the default process group
            return
        from torch.distributed import PrefixStore

        store = PrefixStore("partitioner", open_store(rank, world, timeout_s))
        td = datetime.timedelta(seconds=timeout_s)
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            opts = ProcessGroupGloo._Options()
            master = os.environ.get("MASTER_ADDR", "127.0.0.1")
            opts._devices = [ProcessGroupGloo.create_device(
                hostname=local_address(master, int(os.environ.get("MASTER_PORT", "29500"))))]
            opts._timeout = td
            self.pg = ProcessGroupGloo(store, rank, world, opts)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=td)

    def isend(self, t: torch.Tensor, peer: int, tag: int):
        return self.pg.send([t], peer, tag) if self.pg is not None else self.dist.isend(t, peer, tag=tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int):
        return self.pg.recv([t], src, tag) if self.pg is not None else self.dist.irecv(t, src, tag=tag)

    def barrier(self) -> None:
        if self.pg is not None:
            self.pg.barrier().wait()
        else:
            self.dist.barrier()

    def close(self) -> None:
        """Leave the default process group if we made it (a direct gloo group ends with its last reference)."""
        if self.pg is None and self.made and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _wait(work, deadline: float, what: str) -> None:
    left = deadline - time.perf_counter()
    try:
        if left <= 0 or not work.wait(datetime.timedelta(seconds=left)):
            raise RuntimeError("timed out")
    except RuntimeError as err:
        raise DistributedFailure(f"{what}: {str(err).strip().splitlines()[0] if str(err).strip() else 'failed'}",
                                 hint="start every rank of the run (one per server) with the same "
                                      "MASTER_ADDR/PORT and secret") from None


def handshake(group: Group, rank: int, world: int, secret: bytes, comm: torch.device, timeout_s: float) -> bytes:
    """Every rank proves to rank 0 that it holds ``secret`` and rank 0 proves it to each; returns the run's nonce."""
    deadline = time.perf_counter() + timeout_s

    def mac(*parts: bytes) -> bytes:
        return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()

    def buf(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(comm)

    if rank == 0:
        nonce = secrets.token_bytes(32)
        sends = [group.isend(buf(nonce + mac(b"hello", nonce, b"%d" % r, b"%d" % world)), r, HELLO_TAG)
                 for r in range(1, world)]
        for r in range(1, world):
            ack = torch.empty(_MAC, dtype=torch.uint8, device=comm)
            _wait(group.irecv(ack, r, HELLO_TAG + 1), deadline, f"rank 0 waiting for rank {r} to join")
            if not hmac.compare_digest(bytes(ack.cpu().numpy()), mac(b"ack", nonce, b"%d" % r)):
                raise DistributedFailure(f"rank {r} answered with another shared secret: it does not belong to "
                                         "this run", hint=f"start every rank with the same {SECRET_ENV}")
        for w in sends:
            _wait(w, deadline, "rank 0 greeting the other ranks")
        return nonce
    hello = torch.empty(32 + _MAC, dtype=torch.uint8, device=comm)
    _wait(group.irecv(hello, 0, HELLO_TAG), deadline, f"rank {rank} waiting for rank 0's greeting")
    raw = bytes(hello.cpu().numpy())
    nonce = raw[:32]
    if not hmac.compare_digest(raw[32:], mac(b"hello", nonce, b"%d" % rank, b"%d" % world)):
        raise DistributedFailure("rank 0 greeted with another shared secret (or another world size): the ranks "
                                 "were started for different runs",
                                 hint=f"start every rank with the same {SECRET_ENV} and WORLD_SIZE")
    _wait(group.isend(buf(mac(b"ack", nonce, b"%d" % rank)), 0, HELLO_TAG + 1), deadline,
          f"rank {rank} answering rank 0")
    return nonce
