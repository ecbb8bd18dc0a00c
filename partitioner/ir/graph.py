"""The cost graph: a networkx DiGraph of operators with typed attributes.

Nodes carry a :class:`Node` (op, FLOPs, bytes, measured times, support, group); edges
carry the bytes of the tensor the consumer needs. Model inputs arrive from, and outputs
return to, the spec's host device. The JSON interchange format is
``partitioner.costgraph/1`` (format in docs/formats.md); :func:`load` validates it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from ..errors import GraphError

FORMAT = "partitioner.costgraph/1"

_NODE_KEYS = {"id", "op", "flops", "param_bytes", "output_bytes", "bytes_moved", "time_s",
              "supported_on", "group", "dtype", "module_path", "fx_name"}


@dataclass(frozen=True)
class Node:
    """One operator of the cost graph. Units: FLOPs, bytes, seconds."""

    id: str
    op: str = "unknown"
    flops: float = 0.0
    param_bytes: int = 0
    output_bytes: int = 0
    bytes_moved: int | None = None  # memory traffic for the roofline; None: inputs + output + params
    time_s: Mapping[str, float] = field(default_factory=dict)
    supported_on: tuple[str, ...] | None = None
    group: str | None = None
    dtype: str = "float32"
    module_path: str = ""
    fx_name: str | None = None


@dataclass(frozen=True)
class InputTensor:
    """A model input: ``bytes`` arrive from the host at every node in ``dsts``."""

    name: str
    bytes: int
    dsts: tuple[str, ...]


class CostGraph:
    """A validated DAG of operators.

    Parameters
    ----------
    name : str
        Name of the model.
    nodes : list of Node
        Operators, in a deterministic order (used to break ties everywhere).
    edges : list of (src, dst, bytes)
        Data dependencies with the bytes the consumer needs.
    inputs : list of InputTensor
        Model inputs (transferred from the host once per destination device).
    outputs : list of (src, bytes)
        Model outputs (transferred back to the host).

    Raises
    ------
    GraphError
        Unknown or duplicate ids, self-loops, cycles, negative or non-finite numbers.
    """

    def __init__(self, name: str, nodes: list[Node], edges: list[tuple[str, str, float]],
                 inputs: list[InputTensor] = (), outputs: list[tuple[str, float]] = ()):
        self.name = name
        g = nx.DiGraph()
        for n in nodes:
            if n.id in g:
                raise GraphError(f"cost graph {name!r}: duplicate node id {n.id!r}", hint="node ids must be unique")
            _check_node(n, name)
            g.add_node(n.id, node=n)
        for src, dst, b in edges:
            for end in (src, dst):
                if end not in g:
                    raise GraphError(f"cost graph {name!r}: edge {src!r} -> {dst!r} names unknown node {end!r}",
                                     hint="every edge must connect ids listed in `nodes`")
            if src == dst:
                raise GraphError(f"cost graph {name!r}: self-loop on node {src!r}", hint="remove the edge")
            _check_number(b, f"edge {src!r} -> {dst!r} bytes", name)
            if g.has_edge(src, dst):
                g[src][dst]["bytes"] = max(g[src][dst]["bytes"], float(b))
            else:
                g.add_edge(src, dst, bytes=float(b))
        for t in inputs:
            _check_number(t.bytes, f"input {t.name!r} bytes", name)
            for d in t.dsts:
                if d not in g:
                    raise GraphError(f"cost graph {name!r}: input {t.name!r} feeds unknown node {d!r}",
                                     hint="`inputs[].dst` must be a node id")
        for src, b in outputs:
            if src not in g:
                raise GraphError(f"cost graph {name!r}: output from unknown node {src!r}",
                                 hint="`outputs[].src` must be a node id")
            _check_number(b, f"output of {src!r} bytes", name)
        if not nx.is_directed_acyclic_graph(g):
            cycle = nx.find_cycle(g)
            path = " -> ".join([e[0] for e in cycle] + [cycle[-1][1]])
            raise GraphError(f"cost graph {name!r} has a cycle: {path}",
                             hint="a cost graph must be a DAG; remove the back edge")
        self.g = g
        self.inputs: tuple[InputTensor, ...] = tuple(inputs)
        self.outputs: tuple[tuple[str, float], ...] = tuple((s, float(b)) for s, b in outputs)
        pos = {n.id: i for i, n in enumerate(nodes)}
        self.order: list[str] = list(nx.lexicographical_topological_sort(g, key=pos.__getitem__))
        self.index: dict[str, int] = {v: i for i, v in enumerate(self.order)}

    # ---- access -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def node(self, v: str) -> Node:
        return self.g.nodes[v]["node"]

    @property
    def nodes(self) -> list[Node]:
        """Nodes in topological order."""
        return [self.g.nodes[v]["node"] for v in self.order]

    def edges(self) -> list[tuple[str, str, float]]:
        return [(u, v, d["bytes"]) for u, v, d in self.g.edges(data=True)]

    def input_bytes(self, v: str) -> float:
        """Bytes a node reads from its predecessors and the model inputs."""
        b = sum(d["bytes"] for _, _, d in self.g.in_edges(v, data=True))
        return b + sum(t.bytes for t in self.inputs if v in t.dsts)

    def bytes_moved(self, v: str) -> float:
        n = self.node(v)
        if n.bytes_moved is not None:
            return float(n.bytes_moved)
        return float(self.input_bytes(v) + n.output_bytes + n.param_bytes)

    # ---- JSON ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        nodes = []
        for n in self.nodes:
            d: dict[str, Any] = {"id": n.id, "op": n.op, "flops": n.flops, "param_bytes": n.param_bytes,
                                 "output_bytes": n.output_bytes}
            if n.bytes_moved is not None:
                d["bytes_moved"] = n.bytes_moved
            if n.time_s:
                d["time_s"] = dict(n.time_s)
            if n.supported_on is not None:
                d["supported_on"] = list(n.supported_on)
            if n.group is not None:
                d["group"] = n.group
            if n.dtype != "float32":
                d["dtype"] = n.dtype
            if n.module_path:
                d["module_path"] = n.module_path
            if n.fx_name is not None and n.fx_name != n.id:
                d["fx_name"] = n.fx_name
            nodes.append(d)
        inputs = [{"name": t.name, "dst": dst, "bytes": t.bytes} for t in self.inputs for dst in t.dsts]
        return {
            "format": FORMAT,
            "name": self.name,
            "nodes": nodes,
            "edges": [{"src": u, "dst": v, "bytes": b} for u, v, b in self.edges()],
            "inputs": inputs,
            "outputs": [{"src": s, "bytes": b} for s, b in self.outputs],
        }

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))


def _check_number(x: Any, what: str, graph: str) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise GraphError(f"cost graph {graph!r}: {what} must be a number, got {x!r}", hint="use plain numbers")
    if not math.isfinite(x) or x < 0:
        raise GraphError(f"cost graph {graph!r}: {what} must be finite and >= 0, got {x}",
                         hint="costs and sizes are seconds and bytes; fix the value")


def _check_node(n: Node, graph: str) -> None:
    for attr in ("flops", "param_bytes", "output_bytes"):
        _check_number(getattr(n, attr), f"node {n.id!r} {attr}", graph)
    if n.bytes_moved is not None:
        _check_number(n.bytes_moved, f"node {n.id!r} bytes_moved", graph)
    for k, t in n.time_s.items():
        _check_number(t, f"node {n.id!r} time_s[{k!r}]", graph)
        if t == 0:
            raise GraphError(f"cost graph {graph!r}: node {n.id!r} time_s[{k!r}] is 0",
                             hint="a measured time must be > 0; leave the key out to use the roofline")


def from_json(data: Any, source: str = "<json>") -> CostGraph:
    """Build a :class:`CostGraph` from a parsed ``partitioner.costgraph/1`` document."""
    if not isinstance(data, dict):
        raise GraphError(f"{source}: a cost graph must be a JSON object", hint="see the format in the README")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise GraphError(f"{source}: unknown format {fmt!r}", hint=f'set "format": "{FORMAT}"')
    unknown = set(data) - {"format", "name", "nodes", "edges", "inputs", "outputs", "description"}
    if unknown:
        raise GraphError(f"{source}: unknown top-level keys {sorted(unknown)}", hint="remove them")
    name = str(data.get("name", Path(source).stem))
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise GraphError(f"{source}: `nodes` must be a non-empty list", hint="list the operators")
    nodes = []
    for i, rn in enumerate(raw_nodes):
        if not isinstance(rn, dict) or "id" not in rn:
            raise GraphError(f"{source}: nodes[{i}] must be an object with an `id`", hint="give every node an id")
        if not isinstance(rn["id"], (str, int)) or isinstance(rn["id"], bool) or str(rn["id"]) == "":
            raise GraphError(f"{source}: nodes[{i}] has id {rn['id']!r}; an id is a non-empty string (or an integer)",
                             hint="give every node a unique string id")
        bad = set(rn) - _NODE_KEYS
        if bad:
            raise GraphError(f"{source}: node {rn['id']!r} has unknown keys {sorted(bad)}",
                             hint=f"allowed keys: {', '.join(sorted(_NODE_KEYS))}")
        ts = rn.get("time_s", {}) or {}
        if not isinstance(ts, dict):
            raise GraphError(f"{source}: node {rn['id']!r} time_s must be an object", hint='e.g. {"gpu0": 0.001}')
        so = rn.get("supported_on")
        if so is not None and (not isinstance(so, list) or not all(isinstance(x, str) for x in so)):
            raise GraphError(f"{source}: node {rn['id']!r} supported_on must be a list of device ids, models or "
                             f"kinds, got {so!r}", hint='e.g. "supported_on": ["gpu"]')
        nodes.append(Node(
            id=str(rn["id"]), op=str(rn.get("op", "unknown")), flops=rn.get("flops", 0.0),
            param_bytes=rn.get("param_bytes", 0), output_bytes=rn.get("output_bytes", 0),
            bytes_moved=rn.get("bytes_moved"), time_s={str(k): v for k, v in ts.items()},
            supported_on=tuple(str(s) for s in so) if so is not None else None,
            group=str(rn["group"]) if rn.get("group") is not None else None,
            dtype=str(rn.get("dtype", "float32")), module_path=str(rn.get("module_path", "")),
            fx_name=rn.get("fx_name"),
        ))

    def _items(key: str, fields: tuple[str, ...]) -> list[dict]:
        items = data.get(key, [])
        if items is None:
            items = []
        if not isinstance(items, list):
            raise GraphError(f"{source}: `{key}` must be a list", hint="see the format in the README")
        for i, it in enumerate(items):
            if not isinstance(it, dict) or any(f not in it for f in fields):
                raise GraphError(f"{source}: {key}[{i}] must have keys {list(fields)}", hint="see the README")
        return items

    edges = [(str(e["src"]), str(e["dst"]), e.get("bytes", 0)) for e in _items("edges", ("src", "dst"))]
    ins: dict[str, tuple[float, list[str]]] = {}
    for i, it in enumerate(_items("inputs", ("dst",))):
        nm = str(it.get("name", f"input{i}"))
        b = it.get("bytes", 0)
        prev = ins.setdefault(nm, (b, []))
        prev[1].append(str(it["dst"]))
        ins[nm] = (max(prev[0], b) if isinstance(b, (int, float)) else b, prev[1])
    inputs = [InputTensor(nm, b, tuple(d)) for nm, (b, d) in ins.items()]
    outputs = [(str(o["src"]), o.get("bytes", 0)) for o in _items("outputs", ("src",))]
    return CostGraph(name, nodes, edges, inputs, outputs)


def load(path: str | os.PathLike) -> CostGraph:
    """Load and validate a cost-graph JSON file."""
    p = Path(path)
    if not p.is_file():
        raise GraphError(f"cost graph file {str(p)!r} does not exist", hint="check the path")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraphError(f"{p}: not valid JSON: {err}", hint="fix the JSON syntax") from None
    return from_json(data, str(p))


# ---- lowering from torch.fx ------------------------------------------------------------
def from_fx(gm, name: str = "model") -> CostGraph:
    """Lower a traced GraphModule (see :func:`partitioner.frontend.trace.trace`) to a CostGraph.

    Placeholders become model inputs (transferred from the host); the output node's
    arguments become model outputs. Every other node becomes an operator whose costs come
    from ``node.meta["partitioner"]``.
    """
    from torch.fx.node import map_arg

    nodes: list[Node] = []
    edges: list[tuple[str, str, float]] = []
    inputs: list[InputTensor] = []
    outputs: list[tuple[str, float]] = []
    placeholders: dict[str, float] = {}
    users_of_ph: dict[str, list[str]] = {}
    out_bytes: dict[str, float] = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("partitioner")
        if n.op == "placeholder":
            placeholders[n.name] = float(meta.output_bytes) if meta else 0.0
            users_of_ph[n.name] = []
            continue
        if n.op == "output":
            seen: set[str] = set()
            def _out(a):
                if a.op == "placeholder" or a.name in seen:
                    return a
                seen.add(a.name)
                outputs.append((a.name, out_bytes.get(a.name, 0.0)))
                return a
            map_arg(n.args, _out)
            continue
        if meta is None:
            raise GraphError(f"fx node {n.name!r} has no cost annotation",
                             hint="trace the model with partitioner.frontend.trace.trace()")
        nodes.append(Node(id=n.name, op=meta.op, flops=float(meta.flops), param_bytes=int(meta.param_bytes),
                          output_bytes=int(meta.output_bytes), bytes_moved=int(meta.bytes_moved),
                          dtype=meta.dtype or "float32", module_path=meta.module_path, fx_name=n.name))
        out_bytes[n.name] = float(meta.output_bytes)
        preds: list = []
        map_arg((n.args, n.kwargs), lambda a: preds.append(a) or a)
        for p in dict.fromkeys(preds):
            if p.op == "placeholder":
                users_of_ph[p.name].append(n.name)
            else:
                edges.append((p.name, n.name, out_bytes.get(p.name, 0.0)))
    for ph, b in placeholders.items():
        if users_of_ph[ph]:
            inputs.append(InputTensor(ph, b, tuple(users_of_ph[ph])))
    return CostGraph(name, nodes, edges, inputs, outputs)
