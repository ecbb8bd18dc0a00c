"""The Schedule IR: what every device of an emitted plan does, in order.

An emitted plan (:mod:`partitioner.emit.build`) is a set of *segments* (contiguous pieces of
the model's fx graph, each run by one device) plus a :class:`Schedule`: for every
device, an ordered list of **actions**

``["compute", SEG]``
    run segment ``SEG`` (a callable taking its ``inputs`` values positionally and
    returning a tuple of its ``outputs`` values) on this device;
``["send", VALUE, PEER, TAG]``
    send the local copy of ``VALUE`` to device ``PEER``. Sends are asynchronous: the
    sender never waits for the receiver;
``["recv", VALUE, PEER, TAG]``
    wait until ``VALUE`` sent by device ``PEER`` has arrived, and keep it locally.

``TAG`` numbers the transfer (:class:`Transfer`) and pairs one send with one recv. A
value is transferred once per (value, destination device), as in the cost model.
Values are named after the fx nodes that produce them (model inputs after the
placeholders); they are tensors, or tuples/ints where an fx node produces one.

Semantics
---------
Model inputs start on the ``host`` device; the model's outputs are read from the host
once every device has finished. Each device runs its actions strictly in order. A
compute may only use values that are on its device: computed there by an earlier action
or received by an earlier recv. Executors may free a value after its last local use.

Invariants (checked by :meth:`Schedule.validate`, so by :meth:`Schedule.from_json` too)
-------------------------------------------------------------------------------------
* every segment is computed exactly once, on its own device; every value has exactly
  one producer (a segment output or a model input);
* every transfer has exactly one send (on its source, after the value is available
  there) and one recv (on its destination); no device sends to itself;
* per ordered pair of devices, recvs come in the same order as the sends (FIFO), so an
  executor may match them by order alone (NCCL) or by tag (gloo);
* the segment graph is acyclic, and executing the actions with asynchronous sends and
  blocking recvs terminates with every output on the host (checked by simulating it);
  a schedule that would deadlock is rejected with the devices and what they wait for.

JSON (``partitioner.schedule/1``)
---------------------------------
``{"format", "devices", "host", "inputs", "flatten_inputs", "outputs", "values",
"segments", "transfers", "actions", "meta"}``; ``outputs`` is an output tree:
``{"value": NAME}``, ``{"const": X}``, ``{"tuple": [...]}``, ``{"list": [...]}`` or
``{"dict": [[KEY, TREE], ...]}``. :meth:`Schedule.to_json` and :meth:`Schedule.from_json`
round-trip exactly. This module does not import torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ArtifactError
from .tree import HINT as _HINT
from .tree import tree_leaves

__all__ = ["FORMAT", "Value", "Segment", "Transfer", "Action", "Schedule", "bind_inputs", "sequential_order"]

FORMAT = "partitioner.schedule/1"
OPS = ("compute", "send", "recv")


def _err(msg: str, hint: str = _HINT) -> ArtifactError:
    return ArtifactError(f"invalid schedule: {msg}", hint=hint)


@dataclass(frozen=True)
class Value:
    """A value that flows between segments.

    Attributes
    ----------
    name : str
        The fx node (or placeholder) that produces it.
    producer : str or None
        Segment id; None for a model input.
    bytes : float
        Bytes of its tensors (0 for non-tensor values).
    shapes : tuple of tuple of int
        Shape of every tensor in it (one entry for a plain tensor).
    dtype : str
        Dtype of its first tensor (``"float32"``); ``""`` when unknown or none.
    """

    name: str
    producer: str | None = None
    bytes: float = 0.0
    shapes: tuple[tuple[int, ...], ...] = ()
    dtype: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "producer": self.producer, "bytes": self.bytes,
                "shapes": [list(s) for s in self.shapes], "dtype": self.dtype}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Value":
        return Value(str(d["name"]), d.get("producer"), float(d.get("bytes", 0.0)),
                     tuple(tuple(int(x) for x in s) for s in d.get("shapes", ())), str(d.get("dtype", "")))


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of the graph that one device runs as one call.

    Attributes
    ----------
    id : str
        ``"s0"``, ``"s1"``... numbered in the plan's global order.
    device : str
        Spec device id that runs it.
    inputs, outputs : tuple of str
        Value names: the positional arguments of the segment's module and the tuple it returns.
    nodes : tuple of str
        Cost-graph node ids it computes, in order (get_attr constants with their first user).
    code : str
        Directory of its code and weights, relative to the artifact root (``""`` in memory).
    format : str
        ``"fx"`` (the model's own fx graph as code) or ``"aten"`` (exported ATen graph as code).
    predicted_start_s, predicted_end_s : float
        Planned start of its first node and finish of its last (evaluator, seconds).
    predicted_compute_s : float
        Sum of its nodes' predicted times on its device.
    """

    id: str
    device: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[str, ...] = ()
    code: str = ""
    format: str = "fx"
    predicted_start_s: float = math.nan
    predicted_end_s: float = math.nan
    predicted_compute_s: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "device": self.device, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "nodes": list(self.nodes), "code": self.code, "format": self.format,
                "predicted_start_s": _num(self.predicted_start_s), "predicted_end_s": _num(self.predicted_end_s),
                "predicted_compute_s": _num(self.predicted_compute_s)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Segment":
        return Segment(str(d["id"]), str(d["device"]), tuple(map(str, d["inputs"])), tuple(map(str, d["outputs"])),
                       tuple(map(str, d.get("nodes", ()))), str(d.get("code", "")), str(d.get("format", "fx")),
                       _unnum(d.get("predicted_start_s")), _unnum(d.get("predicted_end_s")),
                       _unnum(d.get("predicted_compute_s")))


@dataclass(frozen=True)
class Transfer:
    """One value moved from ``src`` to ``dst`` (``tag`` pairs its send and recv).

    ``route`` lists the devices it passes through in the spec's link model (store and
    forward through hosts); executors may send directly. ``predicted_*`` come from the
    evaluator (NaN when unknown).
    """

    tag: int
    value: str
    src: str
    dst: str
    bytes: float = 0.0
    route: tuple[str, ...] = ()
    predicted_start_s: float = math.nan
    predicted_arrival_s: float = math.nan

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "value": self.value, "src": self.src, "dst": self.dst, "bytes": self.bytes,
                "route": list(self.route), "predicted_start_s": _num(self.predicted_start_s),
                "predicted_arrival_s": _num(self.predicted_arrival_s)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Transfer":
        return Transfer(int(d["tag"]), str(d["value"]), str(d["src"]), str(d["dst"]), float(d.get("bytes", 0.0)),
                        tuple(map(str, d.get("route", ()))), _unnum(d.get("predicted_start_s")),
                        _unnum(d.get("predicted_arrival_s")))


@dataclass(frozen=True)
class Action:
    """One step of a device's program: compute a segment, send or receive a value."""

    op: str
    segment: str | None = None
    value: str | None = None
    peer: str | None = None
    tag: int | None = None

    @staticmethod
    def compute(segment: str) -> "Action":
        return Action("compute", segment=segment)

    @staticmethod
    def send(value: str, to: str, tag: int) -> "Action":
        return Action("send", value=value, peer=to, tag=tag)

    @staticmethod
    def recv(value: str, src: str, tag: int) -> "Action":
        return Action("recv", value=value, peer=src, tag=tag)

    def describe(self) -> str:
        if self.op == "compute":
            return f"compute {self.segment}"
        return f"{self.op} {self.value!r} {'to' if self.op == 'send' else 'from'} {self.peer} (tag {self.tag})"

    def to_json(self) -> list:
        if self.op == "compute":
            return ["compute", self.segment]
        return [self.op, self.value, self.peer, self.tag]

    @staticmethod
    def from_json(a: Any) -> "Action":
        if not isinstance(a, (list, tuple)) or not a or a[0] not in OPS:
            raise _err(f"action {a!r} is not [\"compute\", SEG] or [\"send\"|\"recv\", VALUE, PEER, TAG]")
        if a[0] == "compute":
            if len(a) != 2 or not isinstance(a[1], str):
                raise _err(f"action {a!r}: expected [\"compute\", SEGMENT_ID]")
            return Action.compute(a[1])
        if len(a) != 4 or not isinstance(a[1], str) or not isinstance(a[2], str) or not isinstance(a[3], int):
            raise _err(f"action {a!r}: expected [{a[0]!r}, VALUE, PEER, TAG] with an integer tag")
        return Action(a[0], value=a[1], peer=a[2], tag=a[3])


@dataclass(frozen=True)
class Schedule:
    """Per-device programs of an emitted plan (see the module docstring).

    Attributes
    ----------
    devices : tuple of str
        Spec device ids (every device of the spec, in spec order).
    host : str
        Where model inputs start and outputs are read.
    inputs : tuple of str
        Value names of the model inputs, in call order.
    flatten_inputs : bool
        The call's arguments are flattened (torch pytree) into ``inputs`` (export frontend).
    outputs : dict
        Output tree (``{"value": NAME}`` leaves; see the module docstring).
    values : dict of str to Value
    segments : tuple of Segment
        In the plan's global order.
    transfers : tuple of Transfer
        In tag order.
    actions : dict of str to tuple of Action
        Per device, in execution order.
    meta : dict
        Free-form: model, spec, objective, solver, predicted figures, file checksums.
    """

    devices: tuple[str, ...]
    host: str
    inputs: tuple[str, ...]
    outputs: Any
    values: Mapping[str, Value]
    segments: tuple[Segment, ...]
    transfers: tuple[Transfer, ...]
    actions: Mapping[str, tuple[Action, ...]]
    flatten_inputs: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    # ---- access --------------------------------------------------------------------
    def segment(self, sid: str) -> Segment:
        for s in self.segments:
            if s.id == sid:
                return s
        raise _err(f"unknown segment {sid!r}")

    @property
    def output_values(self) -> list[str]:
        """Value names of the outputs, in tree order."""
        return [leaf["value"] for leaf in tree_leaves(self.outputs) if "value" in leaf]

    def segment_edges(self) -> list[tuple[str, str, str]]:
        """``(producer segment, consumer segment, value)`` for every segment input."""
        out = []
        for s in self.segments:
            for v in s.inputs:
                p = self.values[v].producer if v in self.values else None
                if p is not None:
                    out.append((p, s.id, v))
        return out

    def last_uses(self, device: str) -> dict[str, int]:
        """Per value, the index of the last action of ``device`` that reads it (compute
        input or send). Values that are outputs stay on the host to the end."""
        segs = {s.id: s for s in self.segments}
        last: dict[str, int] = {}
        for k, a in enumerate(self.actions.get(device, ())):
            if a.op == "compute":
                for v in segs[a.segment].inputs:
                    last[v] = k
            elif a.op == "send":
                last[a.value] = k
        if device == self.host:
            for v in self.output_values:
                last.pop(v, None)
        return last

    # ---- JSON ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "devices": list(self.devices), "host": self.host, "inputs": list(self.inputs),
                "flatten_inputs": self.flatten_inputs, "outputs": self.outputs,
                "values": [v.to_json() for v in self.values.values()],
                "segments": [s.to_json() for s in self.segments],
                "transfers": [t.to_json() for t in self.transfers],
                "actions": {d: [a.to_json() for a in self.actions.get(d, ())] for d in self.devices},
                "meta": dict(self.meta)}

    def dumps(self) -> str:
        """The JSON text of ``schedule.json``: one value, segment, transfer or action per line."""
        d = self.to_json()
        one = lambda x: json.dumps(x, separators=(", ", ": "))  # noqa: E731
        parts = []
        for k, v in d.items():
            if k in ("values", "segments", "transfers") and v:
                body = ",\n".join("  " + one(x) for x in v)
                parts.append(f" {one(k)}: [\n{body}\n ]")
            elif k == "actions":
                devs = ",\n".join(f"  {one(dev)}: [" + (",\n".join("   " + one(a) for a in acts).join(["\n", "\n  "])
                                                          if acts else "") + "]" for dev, acts in v.items())
                parts.append(f" {one(k)}: {{\n{devs}\n }}")
            else:
                parts.append(f" {one(k)}: {one(v)}")
        return "{\n" + ",\n".join(parts) + "\n}\n"

    @staticmethod
    def from_json(d: Any, validate: bool = True) -> "Schedule":
        """Parse (and by default :meth:`validate`) a ``partitioner.schedule/1`` document.

        Raises
        ------
        ArtifactError
            A wrong format, a missing or malformed field, or a failed invariant.
        """
        if not isinstance(d, Mapping):
            raise _err("the document is not a JSON object")
        if d.get("format") != FORMAT:
            raise _err(f"format is {d.get('format')!r}, expected {FORMAT!r}",
                       hint="this file was not written by partitioner.emit.build, or by an incompatible version")
        try:
            values = [Value.from_json(v) for v in d["values"]]
            sched = Schedule(
                devices=tuple(map(str, d["devices"])), host=str(d["host"]), inputs=tuple(map(str, d["inputs"])),
                outputs=d["outputs"], values={v.name: v for v in values},
                segments=tuple(Segment.from_json(s) for s in d["segments"]),
                transfers=tuple(Transfer.from_json(t) for t in d["transfers"]),
                actions={str(dev): tuple(Action.from_json(a) for a in acts) for dev, acts in d["actions"].items()},
                flatten_inputs=bool(d.get("flatten_inputs", False)), meta=dict(d.get("meta", {})))
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise _err(f"malformed field: {type(err).__name__}: {err}") from None
        if len(values) != len(sched.values):
            raise _err("duplicate value names")
        if validate:
            sched.validate()
        return sched

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        """Check every invariant of the module docstring; raise :class:`ArtifactError`
        naming the segment, value, action or devices at fault."""
        devs = set(self.devices)
        if len(devs) != len(self.devices):
            raise _err("duplicate device ids")
        if self.host not in devs:
            raise _err(f"host {self.host!r} is not one of the devices {list(self.devices)}")
        unknown = sorted(set(self.actions) - devs)
        if unknown:
            raise _err(f"actions for unknown device(s) {unknown}")
        segs: dict[str, Segment] = {}
        for s in self.segments:
            if s.id in segs:
                raise _err(f"duplicate segment id {s.id!r}")
            if s.device not in devs:
                raise _err(f"segment {s.id!r} runs on unknown device {s.device!r}")
            segs[s.id] = s
        for name, v in self.values.items():
            if v.producer is not None and (v.producer not in segs or name not in segs[v.producer].outputs):
                raise _err(f"value {name!r} names producer {v.producer!r}, which does not output it")
        for x in self.inputs:
            if x not in self.values or self.values[x].producer is not None:
                raise _err(f"model input {x!r} is not a value without producer")
        for s in self.segments:
            for v in s.inputs:
                if v not in self.values:
                    raise _err(f"segment {s.id!r} reads unknown value {v!r}")
            for v in s.outputs:
                if v not in self.values or self.values[v].producer != s.id:
                    raise _err(f"segment {s.id!r} outputs {v!r}, whose producer is not {s.id!r}")
        for leaf in tree_leaves(self.outputs):
            if "value" in leaf and leaf["value"] not in self.values:
                raise _err(f"model output names unknown value {leaf['value']!r}")
        self._check_transfers(segs)
        self._check_acyclic()
        self._simulate(segs)

    def _check_transfers(self, segs: dict[str, Segment]) -> None:
        tags: dict[int, Transfer] = {}
        for t in self.transfers:
            if t.tag in tags:
                raise _err(f"duplicate transfer tag {t.tag}")
            if t.src == t.dst:
                raise _err(f"transfer {t.tag} of {t.value!r} sends {t.src!r} to itself")
            if t.value not in self.values:
                raise _err(f"transfer {t.tag} moves unknown value {t.value!r}")
            tags[t.tag] = t
        sends: dict[int, int] = {}
        recvs: dict[int, int] = {}
        computed: dict[str, str] = {}
        pair_sends: dict[tuple[str, str], list[int]] = {}
        pair_recvs: dict[tuple[str, str], list[int]] = {}
        for dev in self.devices:
            for k, a in enumerate(self.actions.get(dev, ())):
                where = f"action #{k} of {dev} ({a.describe()})"
                if a.op == "compute":
                    if a.segment not in segs:
                        raise _err(f"{where}: unknown segment {a.segment!r}",
                                   hint="every computed segment must be listed in `segments`; " + _HINT)
                    if segs[a.segment].device != dev:
                        raise _err(f"{where}: segment {a.segment!r} belongs to {segs[a.segment].device!r}")
                    if a.segment in computed:
                        raise _err(f"segment {a.segment!r} is computed twice ({computed[a.segment]} and {dev})")
                    computed[a.segment] = dev
                    continue
                t = tags.get(a.tag)
                if t is None:
                    raise _err(f"{where}: no transfer has tag {a.tag}")
                src, dst = (dev, a.peer) if a.op == "send" else (a.peer, dev)
                if (t.value, t.src, t.dst) != (a.value, src, dst):
                    raise _err(f"{where} does not match transfer {t.tag} ({t.value!r} {t.src} -> {t.dst})")
                book, pairs = (sends, pair_sends) if a.op == "send" else (recvs, pair_recvs)
                if t.tag in book:
                    raise _err(f"transfer {t.tag} of {t.value!r} is {a.op}-ed twice")
                book[t.tag] = k
                pairs.setdefault((src, dst), []).append(t.tag)
        missing = [s.id for s in self.segments if s.id not in computed]
        if missing:
            raise _err(f"segment(s) {missing} are never computed")
        for t in self.transfers:
            if t.tag not in sends or t.tag not in recvs:
                what = "send" if t.tag not in sends else "recv"
                raise _err(f"transfer {t.tag} of {t.value!r} ({t.src} -> {t.dst}) has no {what}")
        for pair, order in pair_sends.items():
            if pair_recvs.get(pair) != order:
                raise _err(f"{pair[1]} receives from {pair[0]} in the order of tags {pair_recvs.get(pair)}, "
                           f"but {pair[0]} sends in the order {order} (must be FIFO per device pair)")

    def _check_acyclic(self) -> None:
        succ: dict[str, set[str]] = {s.id: set() for s in self.segments}
        for p, c, _ in self.segment_edges():
            succ[p].add(c)
        state: dict[str, int] = {}
        for root in succ:
            if root in state:
                continue
            stack = [(root, iter(sorted(succ[root])))]
            path = [root]
            state[root] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                    path.pop()
                elif state.get(nxt) == 1:
                    cyc = path[path.index(nxt):] + [nxt]
                    raise _err("the segments form a cycle: " + " -> ".join(cyc),
                               hint="a segment may only read values of segments before it; " + _HINT)
                elif nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(sorted(succ[nxt]))))
                    path.append(nxt)

    def _simulate(self, segs: dict[str, Segment]) -> None:
        """Run the programs abstractly (async sends, blocking recvs)."""
        have: dict[str, set[str]] = {d: set() for d in self.devices}
        have[self.host].update(self.inputs)
        pc = {d: 0 for d in self.devices}
        sent: set[int] = set()
        progress = True
        while progress:
            progress = False
            for dev in self.devices:
                acts = self.actions.get(dev, ())
                while pc[dev] < len(acts):
                    a = acts[pc[dev]]
                    where = f"action #{pc[dev]} of {dev} ({a.describe()})"
                    if a.op == "compute":
                        lack = [v for v in segs[a.segment].inputs if v not in have[dev]]
                        if lack:
                            raise _err(f"{where} needs value(s) {lack} that are neither computed on {dev} nor "
                                       "received by an earlier action there")
                        have[dev].update(segs[a.segment].outputs)
                    elif a.op == "send":
                        if a.value not in have[dev]:
                            raise _err(f"{where}: {a.value!r} is not on {dev} at that point")
                        sent.add(a.tag)
                    else:
                        if a.tag not in sent:
                            break
                        have[dev].add(a.value)
                    pc[dev] += 1
                    progress = True
        blocked = [f"{d} at action #{pc[d]} ({self.actions[d][pc[d]].describe()})"
                   for d in self.devices if pc[d] < len(self.actions.get(d, ()))]
        if blocked:
            raise _err("the schedule deadlocks (a cycle through the device programs): " + "; ".join(blocked),
                       hint="each recv must follow, through the programs, the send it waits for; " + _HINT)
        lack = [v for v in self.output_values if v not in have[self.host]]
        if lack:
            raise _err(f"model output(s) {lack} never reach the host {self.host!r}")


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _unnum(x: Any) -> float:
    return math.nan if x is None else float(x)


def sequential_order(s: "Schedule") -> list[tuple[str, int]]:
    """A valid sequential order of every action, as ``(device, index)`` pairs.

    Deterministic (the same on every process): in rounds over the devices in schedule
    order, each device advances by at most one action (sends are asynchronous, a recv
    waits for its send). Used by executors that run several devices on one thread.
    """
    pc = {d: 0 for d in s.devices}
    sent: set[int] = set()
    out: list[tuple[str, int]] = []
    progress = True
    while progress:
        progress = False
        for d in s.devices:
            acts = s.actions.get(d, ())
            if pc[d] < len(acts):
                a = acts[pc[d]]
                if a.op == "recv" and a.tag not in sent:
                    continue
                if a.op == "send":
                    sent.add(a.tag)
                out.append((d, pc[d]))
                pc[d] += 1
                progress = True
    if len(out) != sum(len(a) for a in s.actions.values()):
        raise ArtifactError("the schedule deadlocks", hint="emit the plan again")  # validate() rules this out
    return out


def bind_inputs(schedule: Schedule, args: tuple) -> dict[str, Any]:
    """Map call arguments to the schedule's input values (flattening them if required)."""
    if schedule.flatten_inputs:
        import torch.utils._pytree as pytree

        flat = pytree.tree_leaves(list(args))
    else:
        flat = list(args)
    names = schedule.inputs
    defaults = schedule.meta.get("input_defaults", {})
    if len(flat) > len(names) or any(n not in defaults for n in names[len(flat):]):
        raise ArtifactError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(flat)}",
                            hint="pass the same inputs as the example inputs the plan was compiled with")
    env = dict(zip(names, flat))
    for n in names[len(flat):]:
        env[n] = defaults[n]
    return env
