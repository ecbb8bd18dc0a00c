"""Emit: a Plan and the traced fx graph -> an :class:`Artifact` that runs.

Segmentation
------------
The plan's nodes are walked in one global order that respects both the graph and every
device's planned order (a merge of the device queues by planned start time). Each
device keeps one *open* segment; a node joins its device's open segment unless that
would

* create a cycle: the node reads a value of a segment on another device that itself
  depends on the open segment, transitively through values or through a device's order
  (a segment runs after the earlier segments of its device): placements like
  A -> B -> A; or
* (``segmentation="faithful"``, the default) delay the segment: the node reads a value,
  not read by the segment so far, that arrives (per the evaluator) after the segment's
  planned start. A segment waits for all its inputs before it starts, so this keeps the
  executed schedule close to the planned one. ``"minimal"`` only avoids cycles.

in which case the open segment is closed and a new one started. Segments are therefore
keyed by (device, contiguous run in the device's order); their dependency graph (values
plus device order) is acyclic by construction, and they are numbered ``s0, s1, ...`` in
a topological order of it, earliest planned start first: the order in which the device
programs are written. The fx graph is then cut with
:func:`torch.fx.passes.split_module.split_module` (one partition per segment, tuple
returns). Nodes outside the cost graph: placeholders are model inputs and start on the
host; ``get_attr`` tensors (weights) are constants copied into every segment that reads
them (listed with the first). In-place operations are checked: a mutated value must be
produced and read only inside the mutating segment, else emit refuses (trace with
``frontend="export"`` for a functional graph).

The :class:`~partitioner.ir.schedule.Schedule` then lists per device: the recvs a segment
needs (just before it, FIFO per device pair), the compute, and the sends of its outputs
to every other device that reads them (once per value and destination, ordered by when
the destination first needs them). The host sends model inputs first and receives the
model outputs last.

Data-parallel plans: :func:`emit` emits one replica (``replica=``);
:func:`emit_replicas` emits all of them (one Artifact each, on disjoint devices; their
``meta`` carries ``replica``, ``replicas``, the replica's own ``predicted_period_s`` and
the whole plan's ``plan_predicted_period_s``). ``meta["device_hosts"]`` maps every spec
device to its server (used by :mod:`partitioner.runtime.distributed`).

The artifact's files and loading: :mod:`partitioner.emit.artifact`.
"""

from __future__ import annotations

import heapq
import logging
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from ..errors import ArtifactError, PlanError
from ..ir.schedule import Action, Schedule, Segment, Transfer, Value
from ..ir.tree import json_scalar, tree_encode
from . import segcode
from .artifact import Artifact

log = logging.getLogger(__name__)

__all__ = ["emit", "emit_replicas", "SEGMENTATIONS"]

SEGMENTATIONS = ("faithful", "minimal")
_TRACE_HINT = "emit needs the fx GraphModule the cost graph was lowered from (LoadedModel.gm of the same compile)"
_INPLACE_NAMES = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
                  "matmul", "concat")
_INPLACE_FUNCS = {getattr(operator, f"i{n}") for n in _INPLACE_NAMES if hasattr(operator, f"i{n}")}


# ---- emit --------------------------------------------------------------------------------
def emit(source: Any, problem=None, plan=None, *, example_inputs: tuple | None = None,
         segmentation: str = "faithful", replica: int = 0) -> Artifact:
    """Turn a plan into per-device segments and a Schedule.

    Parameters
    ----------
    source : api.Result or (GraphModule, Problem, Plan) or GraphModule
        A compile result (its ``model.gm``, ``problem`` and ``plan`` are used), a
        3-tuple, or the GraphModule with ``problem`` and ``plan`` given separately. The
        GraphModule must be the one the problem's cost graph was lowered from
        (:func:`partitioner.ir.graph.from_fx`: cost-graph ids are fx node names).
    example_inputs : tuple, optional
        Default: the Result's ``model.example_inputs``.
    segmentation : {"faithful", "minimal"}
        See the module docstring.
    replica : int
        For a data-parallel plan, which replica to emit.

    Returns
    -------
    Artifact
        In memory; its modules share parameters with the traced model.

    Raises
    ------
    ArtifactError
        The graph does not match the plan, an in-place op crosses segments, or an output
        type is not supported.
    PlanError
        The plan is malformed or its order contradicts the graph.
    """
    gm, problem, plan, example_inputs, meta, ev = _resolve(source, problem, plan, example_inputs)
    if segmentation not in SEGMENTATIONS:
        raise ArtifactError(f"unknown segmentation {segmentation!r}", hint=f"use one of {', '.join(SEGMENTATIONS)}")
    if plan.replicas:
        if not 0 <= replica < len(plan.replicas):
            raise PlanError(f"replica {replica} does not exist (the plan has {len(plan.replicas)})")
        log.info("data-parallel plan: emitting replica %d of %d", replica, len(plan.replicas))
        if ev is None:
            from ..machine.evaluate import evaluate

            ev = evaluate(problem, plan)
        meta.update(replica=replica, replicas=len(plan.replicas), plan_predicted_period_s=float(ev.period))
        plan, ev = plan.replicas[replica], None
    problem.validate_plan(plan)
    if ev is None:
        from ..machine.evaluate import evaluate

        ev = evaluate(problem, plan)
    if not all(math.isfinite(x) for x in ev.start):
        raise PlanError("the plan's device order contradicts the graph's precedence", hint="re-solve the plan")
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    idx = _node_index(gm, problem, fx_nodes)
    seg_of, segs = _segment(gm, problem, plan, ev, idx, segmentation)
    _check_inplace(gm, seg_of)
    return _build(gm, problem, plan, ev, idx, seg_of, segs, example_inputs, meta)


def emit_replicas(source: Any, problem=None, plan=None, **kw) -> list[Artifact]:
    """Emit every replica of a data-parallel plan (one Artifact each, on disjoint
    devices; a plan without replicas gives one). Each replica's
    ``meta["predicted_period_s"]`` is its own period, so a stream can be split among
    them in proportion to ``1 / period`` (:func:`partitioner.runtime.local.stream_replicas`);
    ``meta["plan_predicted_period_s"]`` is the whole plan's."""
    p = plan if plan is not None else (source.plan if hasattr(source, "plan") else
                                       source[2] if isinstance(source, tuple) and len(source) == 3 else None)
    n = len(p.replicas) if p is not None and p.replicas else 0
    if n == 0:
        return [emit(source, problem, plan, **kw)]
    return [emit(source, problem, plan, replica=r, **kw) for r in range(n)]


def _resolve(source, problem, plan, example_inputs):
    meta: dict[str, Any] = {}
    ev = None
    if hasattr(source, "problem") and hasattr(source, "plan"):
        res = source
        model = getattr(res, "model", None)
        if model is None or getattr(model, "gm", None) is None:
            raise ArtifactError("the compile result carries no traced model (it was compiled from a cost graph)",
                                hint="emit needs a torch model: compile an nn.Module, a zoo name or file.py:factory")
        gm, problem, plan = model.gm, res.problem, res.plan
        if example_inputs is None:
            example_inputs = model.example_inputs
        ev = res.evaluation
        meta.update(status=res.status, predicted_value_s=res.value, bound_s=res.best_bound, gap=res.gap)
        measured = (getattr(res, "extra", None) or {}).get("measured_costs")
        if measured:
            meta.update(measured_costs=measured)
    elif isinstance(source, tuple) and len(source) == 3:
        gm, problem, plan = source
    else:
        gm = source
    if not isinstance(gm, torch.fx.GraphModule):
        raise ArtifactError(f"emit needs a torch.fx.GraphModule, got {type(gm).__name__}", hint=_TRACE_HINT)
    if problem is None or plan is None:
        raise ArtifactError("emit needs the problem and the plan", hint="emit(result) or emit(gm, problem, plan)")
    meta.update(model=problem.graph.name, spec=problem.spec.name, objective=problem.objective.value,
                solver=plan.solver, plan_status=plan.status,
                device_hosts={d.id: d.host for d in problem.spec.devices})
    return gm, problem, plan, (tuple(example_inputs) if example_inputs is not None else None), meta, ev


def _node_index(gm, problem, fx_nodes) -> dict[str, int]:
    """fx node name -> problem index, checking that graph and plan match."""
    idx: dict[str, int] = {}
    for i in range(problem.n):
        nid = problem.node_name(i)
        fxn = problem.graph.node(nid).fx_name or nid
        if fxn not in fx_nodes:
            raise ArtifactError(f"cost-graph node {nid!r} is not in the fx graph {type(gm).__name__}",
                                hint=_TRACE_HINT)
        idx[fxn] = i
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output", "get_attr") and n.name not in idx:
            raise ArtifactError(f"fx node {n.name!r} ({n.op} {n.target}) is not in the plan's cost graph",
                                hint=_TRACE_HINT)
    return idx


def _global_order(problem, ev) -> list[int]:
    """Merge the device queues by planned start: a linear order respecting both precedence
    and every device's order."""
    n = problem.n
    prev = [-1] * n
    nxt = [-1] * n
    for seq in ev.order:
        for a, b in zip(seq, seq[1:]):
            prev[b], nxt[a] = a, b
    indeg = [len(problem.preds[i]) + (prev[i] >= 0) for i in range(n)]
    heap = [(float(ev.start[i]), i) for i in range(n) if indeg[i] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, i = heapq.heappop(heap)
        out.append(i)
        for j in [*problem.succs[i], nxt[i]]:
            if j >= 0:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(heap, (float(ev.start[j]), j))
    if len(out) != n:
        raise PlanError("the plan's device order contradicts the graph's precedence", hint="re-solve the plan")
    return out


@dataclass
class _Seg:
    device: int
    nodes: list = field(default_factory=list)   # fx node names
    inputs: list = field(default_factory=list)  # external value names, first-use order
    deps: set = field(default_factory=set)      # producer segment indices
    start: float = 0.0


def _segment(gm, problem, plan, ev, idx, segmentation):
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    pl = plan.placement
    arrival = {(t.producer, t.dst): t.arrival for t in ev.transfers if t.kind == "edge"}
    in_bytes = {t.name: t.bytes for t in problem.graph.inputs}
    segs: list[_Seg] = []
    seg_of: dict[str, int] = {}
    open_seg: dict[int, int] = {}

    def reaches(src: int, target: int) -> bool:
        stack, seen = [src], {src}
        while stack:
            s = stack.pop()
            if s == target:
                return True
            for p in segs[s].deps:
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return False

    def arrives(a, d: int) -> float:
        if a.op == "placeholder":
            return problem.comm(problem.host, d, in_bytes.get(a.name, 0.0))
        u = idx[a.name]
        return float(ev.finish[u]) if pl[u] == d else arrival.get((u, d), math.inf)

    for i in _global_order(problem, ev):
        node = fx_nodes[_fx_name(problem, i)]
        if node.op == "get_attr":
            continue
        d = pl[i]
        cur = open_seg.get(d)
        ext = []
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                continue
            s = None if a.op == "placeholder" else seg_of[a.name]
            if s is None or s != cur:
                ext.append((a, s))
        close = False
        if cur is not None:
            seg = segs[cur]
            for a, s in ext:
                if s is not None and segs[s].device != d and reaches(s, cur):
                    close = True
                elif segmentation == "faithful" and a.name not in seg.inputs:
                    close = arrives(a, d) > seg.start + 1e-12 * max(1.0, abs(seg.start))
                if close:
                    break
        if cur is None or close:
            segs.append(_Seg(d, start=float(ev.start[i])))
            if cur is not None:
                segs[-1].deps.add(cur)  # device order: a closed segment runs before the next one
            cur = open_seg[d] = len(segs) - 1
            ext = [(a, None if a.op == "placeholder" else seg_of[a.name])
                   for a in node.all_input_nodes if a.op != "get_attr"]
        seg = segs[cur]
        seg.nodes.append(node.name)
        seg_of[node.name] = cur
        for a, s in ext:
            if a.name not in seg.inputs:
                seg.inputs.append(a.name)
            if s is not None:
                seg.deps.add(s)
    return _topological(seg_of, segs)


def _topological(seg_of: dict[str, int], segs: list[_Seg]):
    """Renumber segments in a topological order of their dependencies (data and device
    order), earliest planned start first: the order in which the programs are written."""
    succ: list[list[int]] = [[] for _ in segs]
    indeg = [len(s.deps) for s in segs]
    for k, s in enumerate(segs):
        for p in s.deps:
            succ[p].append(k)
    heap = [(s.start, k) for k, s in enumerate(segs) if indeg[k] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, k = heapq.heappop(heap)
        order.append(k)
        for j in succ[k]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(heap, (segs[j].start, j))
    if len(order) != len(segs):
        raise ArtifactError("internal error: the segments form a cycle", hint="please report this bug")
    new = {old: k for k, old in enumerate(order)}
    out = [segs[old] for old in order]
    for s in out:
        s.deps = {new[p] for p in s.deps}
    return {v: new[k] for v, k in seg_of.items()}, out


def _fx_name(problem, i: int) -> str:
    nid = problem.node_name(i)
    return problem.graph.node(nid).fx_name or nid


def _mutated(gm, n) -> Any:
    """The fx node whose value ``n`` mutates in place, or None."""
    arg0 = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
    if arg0 is None:
        return None
    if n.op == "call_module":
        return arg0 if getattr(gm.get_submodule(n.target), "inplace", False) is True else None
    if n.op == "call_method":
        t = str(n.target)
        return arg0 if t.endswith("_") and not t.startswith("_") else None
    if n.op == "call_function":
        if n.target in _INPLACE_FUNCS or n.kwargs.get("inplace") is True:
            return arg0
        schema = getattr(n.target, "_schema", None)
        if schema is not None and schema.arguments:
            ai = schema.arguments[0].alias_info
            if ai is not None and ai.is_write:
                return arg0
    return None


def _check_inplace(gm, seg_of) -> None:
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        m = _mutated(gm, n)
        if m is None:
            continue
        s = seg_of[n.name]
        produced_here = seg_of.get(m.name) == s
        bad = [u.name for u in m.users if u is not n and u.op != "output" and seg_of.get(u.name) != s]
        if m.op == "get_attr" or (any(u.op == "output" for u in m.users) and not produced_here):
            bad.append("the model output" if m.op != "get_attr" else "the model's weights")
        if bad:
            raise ArtifactError(f"node {n.name!r} modifies {m.name!r} in place, which is also read by "
                                f"{', '.join(bad[:3])} in another segment", hint="trace with frontend='export' "
                                "(a functional graph), or use the out-of-place op in the model")


# ---- building segments and the schedule --------------------------------------------------
def _build(gm, problem, plan, ev, idx, seg_of, segs, example_inputs, meta) -> Artifact:
    from torch.fx.passes.split_module import split_module

    fx_nodes = {n.name: n for n in gm.graph.nodes}
    split = split_module(gm, gm, lambda n: seg_of[n.name], keep_original_node_name=True, tuple_return=True)
    devices = list(problem.devices)
    host = devices[problem.host]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sids = [f"s{k}" for k in range(len(segs))]
    modules: dict[str, nn.Module] = {}
    segments: list[Segment] = []
    values: dict[str, Value] = {p.name: _value(p, None) for p in placeholders}
    first_user: dict[str, int] = {}
    for k, seg in enumerate(segs):
        sm = split.get_submodule(f"submod_{k}")
        ins, outs, consts = _localise(sm, gm, fx_nodes)
        if set(ins) != set(seg.inputs) or not set(outs) <= set(seg.nodes):
            raise ArtifactError(f"internal error: split_module cut segment {sids[k]} differently "
                                f"(inputs {ins} vs {seg.inputs})", hint="please report this bug")
        for c in consts:
            first_user.setdefault(c, k)
        modules[sids[k]] = sm
        dev = seg.device
        nodes = [x for x in seg.nodes]
        ii = [idx[x] for x in nodes]
        segments.append(Segment(sids[k], devices[dev], tuple(ins), tuple(outs), tuple(nodes), "", "fx",
                                float(min(ev.start[i] for i in ii)), float(max(ev.finish[i] for i in ii)),
                                float(sum(problem.T[i, dev] for i in ii))))
        for o in outs:
            values[o] = _value(fx_nodes[o], sids[k])
    for c, k in sorted(first_user.items(), key=lambda kv: (kv[1], kv[0])):  # constants with their first user
        if c in idx:
            segments[k] = replace(segments[k], nodes=segments[k].nodes + (c,))
    outputs, out_values = _output_tree(gm)
    for v in out_values:
        if v not in values:
            raise ArtifactError(f"model output {v!r} is a constant attribute, not computed by the graph",
                                hint="return computed tensors from forward")
    transfers, actions = _program(problem, ev, segments, values, out_values, devices, host)
    meta = dict(meta, predicted_latency_s=float(ev.latency), predicted_period_s=float(ev.period),
                input_defaults={p.name: p.args[0] for p in placeholders if p.args and json_scalar(p.args[0])})
    sched = Schedule(tuple(devices), host, tuple(p.name for p in placeholders), outputs, values, tuple(segments),
                     tuple(transfers), actions, flatten_inputs=_is_pytree(gm), meta=meta)
    sched.validate()
    log.info("emitted %d segments, %d transfers on %d devices", len(segments), len(transfers),
             sum(1 for d in devices if actions[d]))
    return Artifact(sched, modules, example_inputs, source=gm)


def _localise(sm, gm, fx_nodes) -> tuple[list[str], list[str], list[str]]:
    """Turn get_attr inputs of a split submodule into local constants; return its input
    and output value names and the get_attr nodes it now holds."""
    consts: list[str] = []
    first = next((n for n in sm.graph.nodes if n.op != "placeholder"), None)
    taken = set(dict(sm.named_children())) | set(dict(sm.named_parameters())) | set(dict(sm.named_buffers()))
    for ph in [n for n in sm.graph.nodes if n.op == "placeholder"]:
        orig = fx_nodes[ph.target]
        if orig.op != "get_attr":
            continue
        val = _get_attr(gm, orig.target)
        if not isinstance(val, torch.Tensor):
            raise ArtifactError(f"get_attr {orig.target!r} is a {type(val).__name__}, not a tensor",
                                hint="emit supports tensor attributes only")
        name = segcode._ident("c_" + str(orig.target), taken)
        if isinstance(val, nn.Parameter):
            sm.register_parameter(name, val)
        else:
            sm.register_buffer(name, val)
        with sm.graph.inserting_before(first):
            ga = sm.graph.get_attr(name)
        ga.meta = dict(ph.meta)
        ph.replace_all_uses_with(ga)
        sm.graph.erase_node(ph)
        consts.append(orig.name)
    sm.recompile()
    ins = [str(n.target) for n in sm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in sm.graph.nodes if n.op == "output").args[0]
    outs = [n.name for n in out]
    return ins, outs, consts


def _get_attr(mod, target: str):
    obj = mod
    for atom in str(target).split("."):
        obj = getattr(obj, atom)
    return obj


def _value(n, producer: str | None) -> Value:
    from ..frontend.trace import NodeCost

    c = n.meta.get("partitioner")
    if isinstance(c, NodeCost):
        return Value(n.name, producer, float(c.output_bytes), tuple(tuple(s) for s in c.shapes), c.dtype)
    return Value(n.name, producer)


def _is_pytree(gm) -> bool:
    from torch.fx.graph import _PyTreeCodeGen

    return isinstance(gm.graph._codegen, _PyTreeCodeGen)


def _output_tree(gm) -> tuple[dict, list[str]]:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    arg = out_node.args[0]
    if _is_pytree(gm) and gm.graph._codegen.pytree_info.out_spec is not None:
        arg = pytree.tree_unflatten(list(arg) if isinstance(arg, (list, tuple)) else [arg],
                                    gm.graph._codegen.pytree_info.out_spec)
    names: list[str] = []

    def leaf(x):
        if isinstance(x, torch.fx.Node):
            names.append(x.name)
            return {"value": x.name}
        return None

    def fail(x):
        raise ArtifactError(f"model output of type {type(x).__name__} is not supported",
                            hint="return tensors, or tuples/lists/dicts of them")

    return tree_encode(arg, leaf, fail), list(dict.fromkeys(names))


def _program(problem, ev, segments, values, out_values, devices, host):
    """Transfers and per-device action lists (see the module docstring)."""
    from collections import deque

    loc = {v: (host if val.producer is None else None) for v, val in values.items()}
    seg_dev = {s.id: s.device for s in segments}
    for v, val in values.items():
        if val.producer is not None:
            loc[v] = seg_dev[val.producer]
    dpos = {d: k for k, d in enumerate(devices)}
    need: dict[str, dict[str, int]] = {}
    for k, s in enumerate(segments):
        for v in s.inputs:
            if loc[v] != s.device:
                need.setdefault(v, {}).setdefault(s.device, k)
    for v in out_values:
        if loc[v] != host:
            need.setdefault(v, {}).setdefault(host, len(segments))
    pred = {}
    for t in ev.transfers:
        if t.kind != "input":
            pred[(_fx_name(problem, t.producer), devices[t.dst])] = (t.start, t.arrival)
    actions: dict[str, list[Action]] = {d: [] for d in devices}
    transfers: list[Transfer] = []
    pending: dict[tuple[str, str], deque] = {}
    tag_of: dict[tuple[str, str], int] = {}
    have = {d: set() for d in devices}
    have[host].update(v for v, val in values.items() if val.producer is None)

    def send(v: str, src: str, dst: str) -> None:
        tag = len(transfers)
        b = values[v].bytes
        hops = problem.links.route(dpos[src], dpos[dst], b).hops
        route = tuple([src] + [devices[y] for _, y in hops]) if hops else (src, dst)
        if values[v].producer is None:
            ps, pa = 0.0, problem.comm(dpos[src], dpos[dst], b)
        else:
            ps, pa = pred.get((v, dst), (math.nan, math.nan))
        transfers.append(Transfer(tag, v, src, dst, b, route, float(ps), float(pa)))
        actions[src].append(Action.send(v, dst, tag))
        pending.setdefault((src, dst), deque()).append(tag)
        tag_of[(v, dst)] = tag

    def receive(v: str, dst: str) -> None:
        if v in have[dst]:
            return
        src = loc[v]
        q = pending[(src, dst)]
        while True:
            t = q.popleft()
            actions[dst].append(Action.recv(transfers[t].value, src, t))
            have[dst].add(transfers[t].value)
            if t == tag_of[(v, dst)]:
                return

    order = sorted((first, k, dpos[d], v, d) for k, v in enumerate(values)
                   if values[v].producer is None for d, first in need.get(v, {}).items())
    for *_, v, d in order:
        send(v, host, d)
    for s in segments:
        for v in s.inputs:
            receive(v, s.device)
        actions[s.device].append(Action.compute(s.id))
        have[s.device].update(s.outputs)
        for v in s.outputs:
            for d, _ in sorted(need.get(v, {}).items(), key=lambda kv: (kv[1], dpos[kv[0]])):
                send(v, s.device, d)
    for v in out_values:
        receive(v, host)
    left = [t for q in pending.values() for t in q]
    if left:
        raise ArtifactError(f"internal error: transfers {left} are never received", hint="please report this bug")
    return transfers, {d: tuple(a) for d, a in actions.items()}
