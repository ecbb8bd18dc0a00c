"""``first-fit`` and ``balanced``: the contiguous splits a practitioner tries first.

Both walk a linear order of *units* (a node, or a whole co-location group at the position
of its first member, :func:`unit_order`) and cut it into contiguous stages, one device each:

* **first-fit** fills one device until the next unit's parameters no longer fit, then opens
  the next device (devices in index order, the host last: the usual "fill GPU 0, then GPU
  1, ..." when a model does not fit one accelerator);
* **balanced** cuts the order into stages of equal work over the accelerators (work shares
  in proportion to each device's speed), closing a stage early when the next unit does
  not fit its memory.

A unit that the stage's device cannot run goes to the fastest device that can and still
has room. Activations count too: the evaluator's memory peak of each device is checked,
and a device that overflows gets a smaller parameter budget and the walk is redone
(:func:`.listsched.fit_memory`, at most ``FIT_ROUNDS`` rounds). Units left when every stage is full
go to the device with the most room (the host, with a roomy host). The per-device order
is the linear order restricted to the device. Status "heuristic"; ``claimed`` is the
evaluator's figure.

"""

from __future__ import annotations

import math

import numpy as np

from ...ir.plan import Plan
from ...ir.settings import Settings
from ...machine.problem import Problem
from ..registry import register
from .listsched import fit_memory
from .peft import allowed_mask

FIT_ROUNDS = 12


def unit_order(problem: Problem) -> list[list[int]]:
    """Nodes in units: a co-location group is one unit at the position of its first member
    (in topological index order), any other node its own unit."""
    units: list[list[int]] = []
    seen = np.zeros(problem.n, dtype=bool)
    for v in range(problem.n):
        if seen[v]:
            continue
        g = problem.group_of[v]
        mem = sorted(problem.groups[g]) if g >= 0 else [v]
        seen[mem] = True
        units.append(mem)
    return units


def stage_devices(problem: Problem) -> list[int]:
    """Devices in the order stages use them: every non-host device by index, the host last."""
    return [d for d in range(problem.D) if d != problem.host] + [problem.host]


def device_speed(problem: Problem, allowed: np.ndarray) -> np.ndarray:
    """Relative speed of each device: work of the nodes every device can run, fastest = 1."""
    common = allowed.all(axis=1)
    if not common.any():
        common = np.ones(problem.n, dtype=bool)
    T = np.where(allowed[common], problem.T[common], np.nan)
    tot = np.nansum(T, axis=0)
    tot = np.where(tot > 0, tot, np.nan)
    speed = np.nanmin(tot) / tot
    return np.nan_to_num(speed, nan=0.0)


def _index_order(problem: Problem, pl: np.ndarray) -> tuple[tuple[int, ...], ...]:
    order: list[list[int]] = [[] for _ in range(problem.D)]
    for v in range(problem.n):
        order[int(pl[v])].append(v)
    return tuple(tuple(o) for o in order)


def segment_peak(problem: Problem, nodes: list[int], d: int, pl: np.ndarray) -> float:
    """The evaluator's memory peak of device ``d`` if it runs exactly ``nodes`` (sorted by
    index, in that order): their parameters plus the largest sum of live activations. A
    producer outside ``nodes`` (placed elsewhere, or not yet: ``pl`` -1) sends its tensor,
    at its largest edge to ``nodes``, live from its first to its last consumer there."""
    pos = {v: i for i, v in enumerate(nodes)}
    m = len(nodes)
    if m == 0:
        return 0.0
    diff = np.zeros(m + 1)
    pb, ob = problem.param_bytes, problem.output_bytes
    params = float(pb[nodes].sum())
    remote: dict[int, list] = {}
    for i, u in enumerate(nodes):
        last = i
        for j in problem.succs[u]:
            k = pos.get(j)
            if k is not None and k > last:
                last = k
        diff[i] += ob[u]
        diff[last + 1] -= ob[u]
        for w, b in problem.pred_bytes[u]:
            if w in pos or pl[w] == d:
                continue
            r = remote.get(w)
            if r is None:
                remote[w] = [i, i, b]
            else:
                r[1] = i
                r[2] = max(r[2], b)
        for k in problem.node_inputs[u]:
            key = -1 - k
            r = remote.get(key)
            if r is None:
                remote[key] = [i, i, problem.in_tensors[k][0]]
            else:
                r[1] = i
    for a, c, b in remote.values():
        diff[a] += b
        diff[c + 1] -= b
    return params + float(np.cumsum(diff[:m]).max())


class _Walker:
    """A contiguous walk over the units: stages end where their exact memory peak
    (:func:`segment_peak`) would exceed the device's target, or (balanced) its work share."""

    def __init__(self, problem: Problem):
        self.p = problem
        self.units = unit_order(problem)
        self.allowed = allowed_mask(problem)
        self.seq = stage_devices(problem)
        D = problem.D
        self.uok = np.array([self.allowed[u].all(axis=0) for u in self.units]).reshape(len(self.units), D)
        self.speed = device_speed(problem, self.allowed)
        T = np.where(self.allowed, problem.T, np.nan)
        mean = np.nan_to_num(np.nanmean(T, axis=1), nan=0.0)
        self.uwork = np.array([mean[u].sum() for u in self.units])
        # units no stage device but a roomier one can hold: the device with most capacity
        self.spill = int(np.argmax(np.where(self.uok.any(axis=0), problem.capacity, -1.0)))

    def _nodes(self, ks) -> list[int]:
        return sorted(v for k in ks for v in self.units[k])

    def _fits(self, ks: list[int], d: int, target: float, pl: np.ndarray) -> bool:
        return segment_peak(self.p, self._nodes(ks), d, pl) <= target

    def _longest(self, ks: list[int], d: int, target: float, pl: np.ndarray) -> int:
        """The largest ``e`` such that ``ks[:e]`` fits ``d`` (galloping, then bisection)."""
        if not ks or not self._fits(ks[:1], d, target, pl):
            return 0
        lo, step = 1, 1
        while lo < len(ks):
            hi = min(len(ks), lo + step)
            if not self._fits(ks[:hi], d, target, pl):
                break
            lo, step = hi, step * 2
        else:
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._fits(ks[:mid], d, target, pl):
                lo = mid
            else:
                hi = mid
        return lo

    def walk(self, target: np.ndarray, balanced: bool) -> np.ndarray:
        """Stages over :func:`stage_devices` in order; ``target`` is each device's memory."""
        p = self.p
        pl = np.full(p.n, -1, dtype=np.int64)
        todo = list(range(len(self.units)))
        stages = self.seq
        if balanced:
            acc = [d for d in self.seq if d != p.host] or list(self.seq)
            share = self.speed[acc] / max(float(self.speed[acc].sum()), 1e-300)
            ends = dict(zip(acc, np.cumsum(share) * float(self.uwork.sum())))
        done = 0.0
        for s, d in enumerate(stages):
            if not todo:
                break
            last = s == len(stages) - 1
            # units d cannot run wait for a later stage (or the spill device)
            here = [k for k in todo if self.uok[k, d]]
            if balanced and d in ends and not last:
                cum = done + np.cumsum(self.uwork[here]) - 0.5 * self.uwork[here]
                here = here[:int(np.searchsorted(cum, ends[d], side="right"))]
            e = len(here) if last else self._longest(here, d, target[d], pl)
            if e == 0 and here and not last:
                # the next unit fits d in no way: it goes to the spill device, d stays open
                k = here[0]
                pl[self.units[k]] = self.spill if self.uok[k, self.spill] else int(np.flatnonzero(self.uok[k])[0])
                todo.remove(k)
                e = self._longest(here[1:], d, target[d], pl)
                here = here[1:]
            take = set(here[:e])
            for k in here[:e]:
                pl[self.units[k]] = d
                done += self.uwork[k]
            todo = [k for k in todo if k not in take]
        for k in todo:  # nothing could hold them: the spill device (or any allowed one)
            pl[self.units[k]] = self.spill if self.uok[k, self.spill] else int(np.flatnonzero(self.uok[k])[0])
        return pl

    def first_fit(self, target: np.ndarray) -> np.ndarray:
        return self.walk(target, balanced=False)

    def balanced(self, target: np.ndarray) -> np.ndarray:
        return self.walk(target, balanced=True)


def _solve(problem: Problem, settings: Settings, kind: str) -> Plan:
    if problem.n == 0:
        return Plan((), tuple(() for _ in range(problem.D)), status="heuristic", claimed=0.0)
    w = _Walker(problem)
    walk = w.first_fit if kind == "first-fit" else w.balanced

    def build(budget: np.ndarray) -> Plan:
        pl = walk(budget)
        return Plan(tuple(int(x) for x in pl), _index_order(problem, pl), status="heuristic")

    plan, ev, rounds = fit_memory(problem, build, FIT_ROUNDS, settings.deadline())
    value = ev.value(problem.objective)
    used = sorted({int(d) for d in plan.placement})
    info = {"fit_rounds": rounds, "devices": [problem.devices[d] for d in used], "feasible": ev.feasible}
    return plan.with_(claimed=float(value) if math.isfinite(value) else None, info=info)


@register("first-fit", "contiguous first-fit: fill one device in topological order until the next "
                       "unit's memory no longer fits, then the next")
def solve_first_fit(problem: Problem, settings: Settings) -> Plan:
    """First-fit contiguous split (see the module docstring)."""
    return _solve(problem, settings, "first-fit")


@register("balanced", "contiguous stages of equal work (in proportion to device speed) over the "
                      "accelerators, memory-respecting")
def solve_balanced(problem: Problem, settings: Settings) -> Plan:
    """Balanced contiguous split (see the module docstring)."""
    return _solve(problem, settings, "balanced")
