"""One-way channels between the processes of the process runtime: a message through a
pipe, its tensors through a few reused shared-memory slots.

:func:`channel` makes the two ends (a pipe and a semaphore that counts the free slots);
each end goes to its process when the process is spawned, and is wrapped there in an
:class:`Outbox` (sending) or an :class:`Inbox` (receiving). To send a value (a tensor or
a pytree holding tensors), the outbox copies all its tensors into the next free slot
and sends the value with every tensor replaced by its place in the slot; the inbox
copies the tensors out at once and frees the slot. Slots are used and freed in the
pipe's order, so a sender only waits when the receiver is ``slots`` messages behind. A
slot's buffer crosses the pipe (as a file descriptor) only when it is created or grown,
so a transfer costs two copies and one small message, not a new shared-memory segment
per tensor (docs/runtime.md has the measured costs).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import RuntimeFailure

__all__ = ["channel", "Outbox", "Inbox", "SLOTS", "STALL_S"]

#: slots per channel (one message uses one slot, whatever the number of its tensors)
SLOTS = 4
#: seconds a sender waits for a free slot before it gives up (the receiver is dead or stuck)
STALL_S = 120.0
_ALIGN = 64


class _Ref:
    """A tensor's place in a slot: offset, dtype and shape (or the tensor itself, pickled
    the ordinary way, when it is not a dense strided tensor)."""

    __slots__ = ("offset", "dtype", "shape", "tensor")

    def __init__(self, offset: int, dtype: torch.dtype, shape: tuple, tensor: torch.Tensor | None = None):
        self.offset, self.dtype, self.shape, self.tensor = offset, dtype, shape, tensor

    def __reduce__(self):
        return _Ref, (self.offset, self.dtype, self.shape, self.tensor)


def channel(ctx, slots: int = SLOTS) -> tuple[tuple, tuple]:
    """The two ends of a new channel, made with multiprocessing context ``ctx``:
    ``(send_end, recv_end)``; hand each to its process at spawn, then ``Outbox(*send_end)``
    and ``Inbox(*recv_end)`` there."""
    r, w = ctx.Pipe(duplex=False)
    free = ctx.Semaphore(slots)
    return (w, free, slots), (r, free)


def _dense(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized and t.device.type == "cpu"


class Outbox:
    """The sending end of a channel (several threads of a process may send on it)."""

    def __init__(self, conn, free, slots: int = SLOTS, stall_s: float = STALL_S):
        self.conn, self.free, self.stall_s = conn, free, stall_s
        self.lock = threading.Lock()
        self.bufs: list[torch.Tensor | None] = [None] * slots
        self.next = 0

    def send(self, msg: tuple, value: Any = None, *, has_value: bool = False) -> None:
        """Send ``msg`` (a tuple of small picklable things), followed by ``value`` when
        ``has_value`` (its tensors through a slot)."""
        with self.lock:
            if not has_value:
                self.conn.send((msg, None))
                return
            tensors: list[torch.Tensor] = []

            def ref(x):
                if not isinstance(x, torch.Tensor):
                    return x
                x = x.detach()
                if not _dense(x):
                    return _Ref(-1, x.dtype, tuple(x.shape), x.clone())  # pickled by torch (shared memory)
                tensors.append(x)
                return x  # replaced below, once the offsets are known

            skeleton = pytree.tree_map(ref, value)
            if not tensors:
                self.conn.send((msg, (skeleton, None, None)))
                return
            offsets, size = [], 0
            for t in tensors:
                offsets.append(size)
                size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
            self._acquire()
            k = self.next
            self.next = (k + 1) % len(self.bufs)
            buf, new = self.bufs[k], None
            if buf is None or buf.numel() < size:
                grown = max(size, 2 * (0 if buf is None else buf.numel()))
                buf = new = self.bufs[k] = torch.empty(grown, dtype=torch.uint8).share_memory_()
            where = {id(t): o for t, o in zip(tensors, offsets)}
            for t, o in zip(tensors, offsets):
                n = t.numel() * t.element_size()
                if n:
                    buf[o:o + n].view(t.dtype).view(t.shape).copy_(t)
            skeleton = pytree.tree_map(
                lambda x: _Ref(where[id(x)], x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else x, skeleton)
            self.conn.send((msg, (skeleton, k, new)))

    def _acquire(self) -> None:
        t0 = time.perf_counter()
        while not self.free.acquire(timeout=1.0):
            if time.perf_counter() - t0 > self.stall_s:
                raise RuntimeFailure(f"the receiving process has not read a value for {self.stall_s:.0f} s",
                                     hint="a device process died or hangs; create a new LocalRuntime")

    def close(self) -> None:
        self.conn.close()


class Inbox:
    """The receiving end of a channel."""

    def __init__(self, conn, free):
        self.conn, self.free = conn, free
        self.bufs: dict[int, torch.Tensor] = {}

    def recv(self) -> tuple[tuple, Any]:
        """The next ``(msg, value)`` (value None when none was sent); blocks until one comes."""
        msg, payload = self.conn.recv()
        if payload is None:
            return msg, None
        skeleton, k, new = payload
        if k is None:
            return msg, pytree.tree_map(lambda x: x.tensor if isinstance(x, _Ref) else x, skeleton)
        if new is not None:
            self.bufs[k] = new
        buf = self.bufs[k]

        def out(x):
            if not isinstance(x, _Ref):
                return x
            if x.tensor is not None:
                return x.tensor
            n = x.dtype.itemsize * _numel(x.shape)
            if n == 0:
                return torch.empty(x.shape, dtype=x.dtype)
            return buf[x.offset:x.offset + n].view(x.dtype).view(x.shape).clone()

        try:
            return msg, pytree.tree_map(out, skeleton)
        finally:
            self.free.release()

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self) -> None:
        self.conn.close()


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
