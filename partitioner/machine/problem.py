"""A cost graph priced on a hardware spec: the :class:`Problem` every solver, bound and the evaluator share.

Solvers work on integer indices: node ``i`` is ``graph.order[i]`` (a topological order)
and device ``j`` is ``spec.devices[j]``. The problem holds the machine model's tables: node
times per device (:mod:`.cost`), transfer times (:mod:`.links`), capacities and groups.
:class:`Boundary` describes a subset of the nodes to solve while the rest is fixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import InfeasibleError, PlanError
from ..ir.graph import CostGraph
from ..ir.plan import Constraints, Objective, Plan
from ..ir.spec import Spec
from .cost import cost_matrix
from .links import link_table


class Problem:
    """A cost graph on a hardware spec, with an objective and constraints.

    Parameters
    ----------
    graph : CostGraph
    spec : Spec
    objective : Objective or str
    constraints : Constraints
    T : ndarray, optional
        Precomputed ``(n, D)`` times; default: :func:`partitioner.machine.cost.cost_matrix`.
    """

    def __init__(self, graph: CostGraph, spec: Spec, objective: Objective | str = Objective.LATENCY,
                 constraints: Constraints = Constraints(), T: np.ndarray | None = None):
        self.graph = graph
        self.spec = spec
        self.objective = Objective(objective)
        self.constraints = constraints
        self.devices: list[str] = spec.device_ids
        self.D = len(self.devices)
        self.host = self.devices.index(spec.host)
        self.links = link_table(spec)
        self.T = cost_matrix(graph, spec) if T is None else np.asarray(T, dtype=float)
        self.n = len(graph)
        idx = graph.index
        self.preds: list[list[int]] = [[] for _ in range(self.n)]
        self.succs: list[list[int]] = [[] for _ in range(self.n)]
        self.succ_bytes: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]
        self.pred_bytes: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]
        es, ed, eb = [], [], []
        for u, v, b in graph.edges():
            i, j = idx[u], idx[v]
            self.preds[j].append(i)
            self.succs[i].append(j)
            self.succ_bytes[i].append((j, b))
            self.pred_bytes[j].append((i, b))
            es.append(i), ed.append(j), eb.append(b)
        for lst in (self.preds, self.succs, self.succ_bytes, self.pred_bytes):
            for x in lst:
                x.sort()
        self.edge_src = np.array(es, dtype=np.int64)
        self.edge_dst = np.array(ed, dtype=np.int64)
        self.edge_bytes = np.array(eb, dtype=float)
        self.in_tensors: list[tuple[float, tuple[int, ...]]] = [
            (float(t.bytes), tuple(sorted(idx[d] for d in t.dsts))) for t in graph.inputs]
        self.node_inputs: list[list[int]] = [[] for _ in range(self.n)]
        for k, (_, dsts) in enumerate(self.in_tensors):
            for d in dsts:
                self.node_inputs[d].append(k)
        self.outputs: list[tuple[int, float]] = [(idx[s], float(b)) for s, b in graph.outputs]
        nodes = graph.nodes
        self.param_bytes = np.array([n.param_bytes for n in nodes], dtype=float)
        self.output_bytes = np.array([n.output_bytes for n in nodes], dtype=float)
        reserve = spec.memory_reserve
        self.capacity = np.array([d.memory.capacity_bytes * (1 - reserve) for d in spec.devices])
        # the host holds the caller's model inputs and the outputs it gets back for the whole
        # call: they are not the plan's to place, so they come off the host's usable memory
        # (counted there even when the host also consumes an input: a slight overestimate; a
        # negative capacity left means no plan fits)
        self.io_bytes = float(sum(b for b, _ in self.in_tensors) + sum(b for _, b in self.outputs))
        self.capacity[self.host] -= self.io_bytes
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            if n.group is not None:
                groups.setdefault(n.group, []).append(i)
        self.groups = [g for g in groups.values() if len(g) > 1]
        self.group_of = np.full(self.n, -1, dtype=np.int64)
        for gi, g in enumerate(self.groups):
            self.group_of[g] = gi
        self.supported = np.isfinite(self.T)
        #: directed links (device index pairs), sorted; resource ``D + k`` of :meth:`transfer_loads` is ``hops[k]``
        self.hops: list[tuple[int, int]] = sorted(self.links.hop)
        self._hop_resource = {h: self.D + k for k, h in enumerate(self.hops)}
        self._comm_cache: dict[tuple[int, int, float], float] = {}
        self._loads_cache: dict[tuple[int, int, float], tuple[tuple[int, float], ...]] = {}

    # ---- helpers ------------------------------------------------------------------
    def node_name(self, i: int) -> str:
        return self.graph.order[i]

    def comm(self, a: int, b: int, nbytes: float) -> float:
        """Transfer time of ``nbytes`` from device ``a`` to device ``b``."""
        if a == b:
            return 0.0
        key = (a, b, nbytes)
        t = self._comm_cache.get(key)
        if t is None:
            t = self._comm_cache[key] = self.links.time_idx(a, b, nbytes)
        return t

    def comm_matrix(self, nbytes: float) -> np.ndarray:
        """``D x D`` transfer times of ``nbytes`` (:meth:`comm` for every pair at once)."""
        return self.links.matrix(nbytes)

    def transfer_loads(self, a: int, b: int, nbytes: float) -> tuple[tuple[int, float], ...]:
        """``(resource, seconds)``: the per-sample load one transfer of ``nbytes`` from device ``a``
        to device ``b`` puts on each resource (the period rule).

        Every hop of its route loads its directed link (resource ``D + k`` for ``hops[k]``)
        for that hop's time and, with ``comm_blocks_device``, both endpoint devices of the
        hop (resources ``< D``) as well; per hop, the link comes first, then the sender and
        the receiver. Empty when ``a == b``.
        """
        key = (a, b, nbytes)
        out = self._loads_cache.get(key)
        if out is None:
            blocks = self.spec.comm_blocks_device
            res = []
            for (x, y), t in self.links.hop_times(a, b, nbytes):
                res.append((self._hop_resource[(x, y)], t))
                if blocks:
                    res += [(x, t), (y, t)]
            out = self._loads_cache[key] = tuple(res)
        return out

    def comm_matrices(self):
        """``cm(nbytes)``: :meth:`comm_matrix`, memoised per byte size for one caller's loop
        (the arrays are shared: read them, never write)."""
        mats: dict[float, np.ndarray] = {}

        def cm(nbytes: float) -> np.ndarray:
            m = mats.get(nbytes)
            if m is None:
                m = mats[nbytes] = self.links.matrix(nbytes)
            return m

        return cm

    def with_objective(self, objective: Objective | str, constraints: Constraints | None = None) -> "Problem":
        """The same graph and spec with another objective (reuses the cost matrix)."""
        return Problem(self.graph, self.spec, objective, constraints or self.constraints, T=self.T)

    def allowed_devices(self, i: int) -> np.ndarray:
        """Devices that may run node ``i``, honouring its group (all members must support it)."""
        ok = self.supported[i].copy()
        g = self.group_of[i]
        if g >= 0:
            ok &= self.supported[self.groups[g]].all(axis=0)
        return np.flatnonzero(ok)

    def check_supported(self) -> None:
        """Raise :class:`InfeasibleError` when some node (or group) can run on no device."""
        ok = self.supported.any(axis=1)  # a fast pass; the loop below names the first node that fails
        if ok.all() and all(self.supported[g].all(axis=0).any() for g in self.groups):
            return
        for i in range(self.n):
            if not self.allowed_devices(i).size:
                n = self.graph.node(self.node_name(i))
                g = f" (with the rest of group {n.group!r})" if n.group is not None else ""
                raise InfeasibleError(
                    f"node {n.id!r} (op {n.op!r}) can run on no device of spec {self.spec.name!r}{g}",
                    hint="add a device that supports the op, or remove it from `unsupported_ops`/`supported_on`")

    def validate_plan(self, plan: Plan) -> None:
        """Structural checks: every node placed once on a known device; order a permutation."""
        if len(plan.placement) != self.n:
            raise PlanError(f"plan places {len(plan.placement)} nodes, the graph has {self.n}",
                            hint="place every node exactly once")
        pl = np.asarray(plan.placement)
        if pl.size and (pl.min() < 0 or pl.max() >= self.D):
            raise PlanError("plan names a device index outside the spec", hint=f"devices: {self.devices}")
        if plan.order is not None:
            if len(plan.order) != self.D:
                raise PlanError(f"plan order lists {len(plan.order)} devices, the spec has {self.D}")
            seen = np.zeros(self.n, dtype=bool)
            for d, seq in enumerate(plan.order):
                for i in seq:
                    if seen[i] or pl[i] != d:
                        why = "twice" if seen[i] else f"although it is placed on {self.devices[pl[i]]!r}"
                        raise PlanError(f"plan order of {self.devices[d]!r} lists node {self.node_name(i)!r} {why}",
                                        hint="list each node once, in the order of the device it is placed on")
                    seen[i] = True
            if not seen.all():
                missing = self.node_name(int(np.flatnonzero(~seen)[0]))
                raise PlanError(f"plan order leaves out node {missing!r}", hint="order every node of each device")

    def plan_from_names(self, placement: Mapping[str, str], order: Mapping[str, list[str]] | None = None,
                        **kw) -> Plan:
        """Build a Plan from node-id -> device-id mappings (as in plan.json)."""
        di = {d: j for j, d in enumerate(self.devices)}
        if not isinstance(placement, Mapping) or not all(isinstance(d, str) for d in placement.values()):
            raise PlanError("placement must be a JSON object mapping node ids to device ids",
                            hint='e.g. {"placement": {"conv1": "gpu0", ...}} or plan.json from compile')
        if order is not None:
            if not isinstance(order, Mapping) or not all(
                    isinstance(seq, list) and all(isinstance(v, str) for v in seq) for seq in order.values()):
                raise PlanError("order must be a JSON object mapping device ids to lists of node ids",
                                hint='e.g. {"order": {"gpu0": ["conv1", "relu1"], ...}}, or leave it out')
            bad_dev = sorted(set(order) - set(di))
            if bad_dev:
                raise PlanError(f"order names unknown device(s) {bad_dev}", hint=f"devices: {', '.join(self.devices)}")
            bad_node = sorted({v for seq in order.values() for v in seq if v not in self.graph.index})
            if bad_node:
                raise PlanError(f"order names unknown node(s) {bad_node[:5]}", hint="use the graph's node ids")
        missing = [v for v in self.graph.order if v not in placement]
        if missing:
            raise PlanError(f"placement leaves out {len(missing)} node(s), e.g. {missing[0]!r}",
                            hint="place every node of the graph")
        unknown = sorted(set(placement) - set(self.graph.index))
        if unknown:
            raise PlanError(f"placement names unknown node(s) {unknown[:5]}", hint="use the graph's node ids")
        bad = sorted({d for d in placement.values() if d not in di})
        if bad:
            raise PlanError(f"placement names unknown device(s) {bad}", hint=f"devices: {', '.join(self.devices)}")
        pl = tuple(di[placement[v]] for v in self.graph.order)
        od = None
        if order is not None:
            od = tuple(tuple(self.graph.index[v] for v in order.get(d, [])) for d in self.devices)
        plan = Plan(pl, od, **kw)
        self.validate_plan(plan)
        return plan

    def memory_never_binds(self) -> bool:
        """True when no placement can exceed any device's memory: every byte of the model
        (parameters, outputs, model inputs, every edge's tensor) counted once fits the smallest
        usable capacity (or memory is not constrained)."""
        if not self.constraints.memory:
            return True
        total = float(self.param_bytes.sum() + self.output_bytes.sum()
                      + sum(b for b, _ in self.in_tensors) + self.edge_bytes.sum())
        return bool(total <= self.capacity.min())

    def value_of(self, latency: float, period: float) -> float:
        """The objective's figure (seconds): latency, or the period (1 / throughput)."""
        return latency if self.objective is Objective.LATENCY else period


@dataclass(frozen=True)
class Boundary:
    """Conditions for solving a subset of the nodes while the rest is fixed.

    The split heuristic solves modules one at a time with the plan of earlier modules
    fixed; exact solvers accept a Boundary so that the same model serves whole problems
    and modules. For the whole problem (:meth:`full`), the sub-objective
    ``max_i finish_i + tail[i, device_i]`` is exactly the evaluator's latency.

    Attributes
    ----------
    nodes : tuple of int
        The subset, in topological order (predecessors outside it are fixed).
    device_ready : ndarray, shape (D,)
        Time each device becomes free (no subset node starts on ``d`` before it).
    release : ndarray, shape (k, D)
        Earliest start of ``nodes[i]`` on device ``d`` given data from outside the subset
        (model inputs from the host, tensors from fixed predecessors).
    tail : ndarray, shape (k, D)
        Time after ``nodes[i]`` finishes on ``d`` that counts in the objective (the
        output transfer to the host for model outputs; any downstream estimate).
    capacity : ndarray, shape (D,)
        Memory still free per device.
    """

    nodes: tuple[int, ...]
    device_ready: np.ndarray
    release: np.ndarray
    tail: np.ndarray
    capacity: np.ndarray

    @staticmethod
    def full(problem: Problem) -> "Boundary":
        """The whole problem: every node, inputs from the host, outputs back to it."""
        n, D = problem.n, problem.D
        release = np.zeros((n, D))
        for b, dsts in problem.in_tensors:
            row = np.array([problem.comm(problem.host, d, b) for d in range(D)])
            for j in dsts:
                np.maximum(release[j], row, out=release[j])
        tail = np.zeros((n, D))
        for s, b in problem.outputs:
            row = np.array([problem.comm(d, problem.host, b) for d in range(D)])
            np.maximum(tail[s], row, out=tail[s])
        return Boundary(tuple(range(n)), np.zeros(D), release, tail, problem.capacity.copy())
