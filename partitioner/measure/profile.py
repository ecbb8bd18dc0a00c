"""Measured per-node times on local devices, cached in a JSON profile.

Two ways of timing a node, both under ``torch.no_grad()`` (the plan runs for inference):

``mode="context"`` (the default)
    The whole graph runs ``warmup`` + ``repeats`` times through a :class:`torch.fx.Interpreter`
    on each requested local device, and every node that launches a kernel is timed where it
    sits in the real forward pass (``torch.cuda.synchronize`` before and after it on a GPU).
    Cache state then matches a real run: a layer's weights come from memory, as they do
    when the rest of the model has gone through the caches in between. An op's time is the
    median over every pass and every node with its signature. Every timed pass is
    followed by a *whole pass*: the GraphModule's own generated code called as one
    function, which is how the runtime runs a segment (no interpreter, no timers). The
    gap between its median and the sum of the per-node medians, spread over the timed
    nodes, is the device's *per-node overhead* (``graphs[name]["whole"][model]``,
    :func:`whole_pass_record`), which :func:`apply_profile` adds to every measured node so
    that a device's predicted whole-model time is what running the code measured (on a
    loaded machine, preemptions between nodes are in the whole pass but not in a node's
    median; on a GPU, per-node synchronisation inflates node times: the overhead is then
    negative). It costs ``2 * (warmup + repeats)`` forward passes per device.
``mode="isolated"``
    At every node, the node alone is called on its real input tensors: ``warmup`` calls,
    then ``repeats`` samples, each the mean of ``number`` back-to-back calls (``number``
    grows until a sample lasts at least ``min_sample_s``). Repeated calls keep the layer's
    weights in cache, so this *under-estimates* in-model times (ResNet-50 on one thread:
    the sum of isolated times was 14% below the forward pass, the in-context sum within
    1%; see ``bench/results/fidelity.md``). Kept for ops too fast to time in one call.

On a machine shared with other processes, a sample during which this process's threads
waited for a CPU (run-queue wait in Linux ``/proc/self/task/*/schedstat``,
:func:`runqueue_wait_s`) for more than ``CLEAN_WAIT`` of its duration is *contended*:
sampling continues until ``repeats`` clean samples (at most ``3 * repeats`` in all), and the
median is taken over the clean ones (over all when fewer than half are clean); in
context mode, the same holds for whole passes, except that with too few clean passes the
least contended half is kept. Each measurement records ``samples``,
``clean``, the median wait fraction, the load average and the ``method``.

Keys
----
A time is stored under (op signature, device model). The signature names what runs and on
what (:func:`node_signature`): the module's ``repr`` (class and configuration, not the
weights) or the function / method, the shapes and dtypes of the tensor arguments (from the
trace's ``node.meta``) and the constant arguments. Nodes with the same signature (the
repeated blocks of a ResNet or a transformer) are timed once per device model, and a
profile file passed back as ``cache`` is reused: only (signature, model) pairs it lacks
are measured.

Devices
-------
``cpu`` (the current intra-op thread count), ``cpu:Nt`` (a *logical CPU device*: the CPU
with an intra-op budget of N threads, device model ``cpu-Nt``), ``cuda`` / ``cuda:K``
(model ``cuda-<device name>``). Logical CPU devices with different budgets are a real,
measurable heterogeneous system on a CPU-only machine (see ``hw_specs/cpu-threads-2.yaml``).
Each CPU device is timed with ``torch.set_num_threads(N)`` on the calling thread (restored
afterwards).

Transfers
---------
:func:`measure_transfers` measures every pair of profiled devices. Between two logical
devices on the same torch device the local runtime passes a value by reference: the cost
is the hand-off between two threads as the runtime meets it (``latency_s``: a receiver
asleep in its recv while the sender computed, woken by ``threading.Event.set`` while the
sender goes on computing; ``pingpong_latency_s``: half the round trip of a hot
ping-pong, for reference), and ``copy_*`` fits a ``clone`` (used when the runtime copies).
:func:`partitioner.measure.links.measure_corun` measures how much two logical CPUs slow
each other down when they compute at the same time, and
:func:`partitioner.measure.handoff.measure_alternation` what a hand-off between two of them
costs beyond the wake-up when the model's own segments alternate (added to that link's
latency when planning for the graph).
Across torch devices, ``tensor.to(dst)`` is timed for several sizes and
``latency + bytes / bandwidth`` is fitted by least squares.

Applying a profile
------------------
:func:`apply_profile` writes the measured times into a :class:`~partitioner.ir.graph.CostGraph`
as ``time_s`` keyed by *spec device id* (the most specific key, see
:mod:`partitioner.machine.cost`), for every spec device matched to a profiled device
(:func:`match_devices`: an explicit map, else same id, else same model, else a CPU whose
``threads`` equals the budget, else the only profiled model of the device's kind). Unmatched
devices keep the roofline (calibrate it with :mod:`partitioner.measure.calibrate`).
``partitioner.api.compile_plan(..., profile=FILE, device_map=...)`` (``compile --profile``)
does both: calibrated spec, measured node times and links.

File format ``partitioner.profile/1``: ``devices`` (id -> kind, model, torch_device,
threads), ``ops`` (key -> op, signature, flops, bytes_moved, dtype, ``times`` per device
model: median_s, p25_s, p75_s, repeats, number, load1), ``graphs`` (graph name ->
``nodes``: node id -> key; optional ``whole``: device model -> whole-pass record, and
``corun``: the co-run slowdowns of :func:`partitioner.measure.links.measure_corun`;
``alternation``: the hand-off probes of :func:`partitioner.measure.handoff.measure_alternation`),
``transfers`` and ``runs`` (settings, duration and the load average of each run).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx

from .. import progress
from ..errors import CostModelError, UsageError
from ..machine.cost import FREE_OPS
from .devices import LocalDevice, parse_devices
from .timing import _profile_in_context, _Timer

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "LocalDevice", "Profile", "parse_devices", "node_signature", "profile_model", "profile_graph",
           "load_profile", "whole_pass_record", "node_overhead", "MIN_CORRECTED_FRACTION"]

FORMAT = "partitioner.profile/1"
_PROFILE_HINT = "create it with `partitioner profile MODEL --devices cpu:1t,cpu:2t --out FILE`"


# ---- signatures ----------------------------------------------------------------------------
def _describe_arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        meta = a.meta.get("partitioner")
        if meta is None:
            return f"?{a.op}"
        shapes = ",".join("x".join(str(d) for d in s) for s in meta.shapes)
        return f"T[{shapes}:{meta.dtype}]"
    if isinstance(a, (list, tuple)):
        inner = ",".join(_describe_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, dict):
        return "{" + ",".join(f"{k}={_describe_arg(v)}" for k, v in sorted(a.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(a, torch.Tensor):  # a constant tensor baked into the graph
        return f"C[{'x'.join(map(str, a.shape))}:{str(a.dtype).removeprefix('torch.')}]"
    return repr(a)


def _target_name(gm: torch.fx.GraphModule, n: torch.fx.Node) -> str:
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        text = re.sub(r"\s+", " ", repr(mod))
        return f"module:{text}{'' if not mod.training else ':train'}"
    if n.op == "call_method":
        return f"method:{n.target}"
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten:{t}"
    mod = getattr(t, "__module__", None) or ""
    return f"fn:{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}"


def node_signature(gm: torch.fx.GraphModule, n: torch.fx.Node) -> str | None:
    """What node ``n`` runs and on which shapes, or None for a node that launches no kernel
    (placeholders, output, ``get_attr``, :data:`partitioner.machine.cost.FREE_OPS`)."""
    if n.op in ("placeholder", "output", "get_attr"):
        return None
    meta = n.meta.get("partitioner")
    if meta is None:
        raise CostModelError(f"fx node {n.name!r} carries no shapes", hint="trace the model with partitioner.frontend.trace.trace()")
    if meta.op in FREE_OPS:
        return None
    return f"{_target_name(gm, n)}|{_describe_arg(n.args)}|{_describe_arg(n.kwargs)}"


def _key(signature: str) -> str:
    return hashlib.sha1(signature.encode()).hexdigest()[:16]


# ---- the profile ---------------------------------------------------------------------------
class Profile:
    """Measured op times and transfers; see the module docstring for the JSON layout."""

    def __init__(self, data: dict | None = None):
        data = data or {}
        self.devices: dict[str, dict] = dict(data.get("devices", {}))
        self.ops: dict[str, dict] = dict(data.get("ops", {}))
        self.graphs: dict[str, dict] = dict(data.get("graphs", {}))
        self.transfers: list[dict] = list(data.get("transfers", []))
        self.runs: list[dict] = list(data.get("runs", []))

    def time(self, key: str, model: str) -> float | None:
        """Median seconds of op ``key`` on device model ``model`` (None if not measured)."""
        t = self.ops.get(key, {}).get("times", {}).get(model)
        return None if t is None else float(t["median_s"])

    def model_of(self, device_id: str) -> str:
        return self.devices[device_id]["model"]

    def counts(self) -> dict[str, int]:
        """How many nodes of the profiled graphs use each op key."""
        c: dict[str, int] = {}
        for g in self.graphs.values():
            for k in g["nodes"].values():
                c[k] = c.get(k, 0) + 1
        return c

    def transfer(self, a: str, b: str) -> dict | None:
        """The transfer measurement between profiled devices ``a`` and ``b`` (either direction)."""
        for t in self.transfers:
            if (t["src"], t["dst"]) in ((a, b), (b, a)):
                return t
        return None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "devices": self.devices, "ops": self.ops, "graphs": self.graphs,
                "transfers": self.transfers, "runs": self.runs}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed over ``path``)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, p)
        return p


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file.

    Raises
    ------
    CostModelError
        The file is missing, not JSON, of another format, or its entries are malformed.
    """
    p = Path(path)
    if not p.is_file():
        raise CostModelError(f"profile file {str(p)!r} does not exist", hint=_PROFILE_HINT)
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CostModelError(f"profile {p} is not valid JSON: {err}",
                             hint="the file is corrupted; delete it and profile again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CostModelError(f"{p} is not a profile (format {got!r}, expected {FORMAT!r})",
                             hint=f"pass a file written by `partitioner profile`; {_PROFILE_HINT}")
    _validate(data, str(p))
    return Profile(data)


def _validate(data: dict, source: str) -> None:
    def bad(what: str) -> CostModelError:
        return CostModelError(f"profile {source}: {what}", hint="the file is corrupted; delete it and profile again")

    for key, typ in (("devices", dict), ("ops", dict), ("graphs", dict), ("transfers", list), ("runs", list)):
        if not isinstance(data.get(key, typ()), typ):
            raise bad(f"`{key}` must be a {typ.__name__}")
    for did, d in data.get("devices", {}).items():
        if not isinstance(d, dict) or not isinstance(d.get("model"), str) or d.get("kind") not in ("cpu", "gpu"):
            raise bad(f"device {did!r} needs a `model` and a `kind` (cpu or gpu)")
    for k, op in data.get("ops", {}).items():
        if not isinstance(op, dict) or not isinstance(op.get("times"), dict):
            raise bad(f"op {k!r} has no `times`")
        for m, t in op["times"].items():
            x = t.get("median_s") if isinstance(t, dict) else None
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0):
                raise bad(f"op {k!r} on {m!r}: median_s must be a finite number > 0, got {x!r}")
    for name, g in data.get("graphs", {}).items():
        if not isinstance(g, dict) or not isinstance(g.get("nodes"), dict):
            raise bad(f"graph {name!r} has no `nodes` map")
        missing = sorted({k for k in g["nodes"].values() if k not in data.get("ops", {})})
        if missing:
            raise bad(f"graph {name!r} names unknown op keys {missing[:3]}")
        for m, w in (g.get("whole") or {}).items():
            x = w.get("node_overhead_s") if isinstance(w, dict) else None
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise bad(f"graph {name!r}: whole-pass record of {m!r} needs a finite node_overhead_s")
    for t in data.get("transfers", []):
        if not isinstance(t, dict) or not {"src", "dst", "latency_s"} <= set(t):
            raise bad("every transfer needs src, dst and latency_s")


#: The per-node overhead of a whole pass never takes a node below this fraction of its measured time.
MIN_CORRECTED_FRACTION = 0.1


def whole_pass_record(profile: "Profile", graph: str, model: str, whole_s: float, *, samples: int = 0,
                      clean: int = 0) -> dict[str, Any]:
    """The whole-pass record of ``graph`` on device model ``model``: the measured time of
    the graph's own code called as one function (``whole_s``, what the runtime does), the
    sum of the profile's per-node medians over the graph's timed nodes (``node_sum_s``,
    what the cost model adds up), and the per-node overhead that reconciles them::

        node_overhead_s = (whole_s - node_sum_s) / timed_nodes

    (negative when timing nodes one by one inflates them, e.g. a GPU synchronised after
    every node). :func:`partitioner.measure.apply.apply_profile` adds it to every timed
    node's time on that device."""
    keys = profile.graphs[graph]["nodes"]
    times = [profile.time(k, model) for k in keys.values()]
    times = [t for t in times if t is not None]
    node_sum = float(sum(times))
    n = len(times)
    return {"whole_s": float(whole_s), "node_sum_s": node_sum, "timed_nodes": n,
            "node_overhead_s": (float(whole_s) - node_sum) / n if n else 0.0,
            "samples": int(samples), "clean": int(clean), "load1": round(os.getloadavg()[0], 2)}


def node_overhead(profile: "Profile", graph: str | None, model: str) -> float | None:
    """The per-node overhead (seconds, may be negative) of device model ``model``: from the
    whole-pass record of ``graph`` when the profile has one, else the median over the
    profile's other graphs measured on that model, else None (:func:`whole_pass_record`)."""
    recs = {g: d.get("whole", {}).get(model) for g, d in profile.graphs.items()}
    rec = recs.get(graph) if graph is not None else None
    if rec is not None:
        return float(rec["node_overhead_s"])
    others = [float(r["node_overhead_s"]) for r in recs.values() if r is not None]
    return float(np.median(others)) if others else None


def profile_graph(gm: torch.fx.GraphModule, example_inputs: tuple, devices: str | list, *, name: str | None = None,
                  warmup: int = 2, repeats: int = 10, min_sample_s: float = 2e-4,
                  cache: Profile | str | os.PathLike | None = None, mode: str = "context") -> Profile:
    """Time every node of a traced graph on each local device (see the module docstring).

    Parameters
    ----------
    gm : torch.fx.GraphModule
        From :func:`partitioner.frontend.trace.trace` (``node.meta["partitioner"]`` on every node).
    example_inputs : tuple
        The inputs the graph was traced with.
    devices : str or list
        ``"cpu:1t,cpu:2t"`` or parsed :class:`LocalDevice` objects.
    name : str, optional
        The graph's name in the profile (default ``gm``'s class name); use the cost graph's
        name so that :func:`apply_profile` can find it without the fx graph.
    warmup, repeats : int
        Untimed calls (passes) before timing, and timed samples (the median is kept).
    min_sample_s : float
        Isolated mode: a sample repeats the call until it lasts at least this long.
    mode : {"context", "isolated"}
        Time nodes inside whole-graph passes (default), or each node alone (module docstring).
    cache : Profile or path, optional
        Existing measurements: (op, device model) pairs in it are not timed again. A path
        that does not exist yet starts an empty profile.

    Returns
    -------
    Profile
        ``cache`` (or a new profile) with the new measurements and this graph's node map.
    """
    if warmup < 0 or repeats < 1:
        raise UsageError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}",
                         hint="e.g. --warmup 2 --repeats 10")
    if mode not in ("context", "isolated"):
        raise UsageError(f"unknown profiling mode {mode!r}", hint="use context (whole-graph passes) or isolated")
    if isinstance(devices, list) and devices and all(isinstance(d, LocalDevice) for d in devices):
        devs = list(devices)
    else:
        devs = parse_devices(devices)
    if isinstance(cache, Profile):
        prof = cache
    elif cache is not None and Path(cache).exists():
        prof = load_profile(cache)
    else:
        prof = Profile()
    name = name or type(gm).__name__
    keys: dict[str, str] = {}
    for n in gm.graph.nodes:
        sig = node_signature(gm, n)
        if sig is None:
            continue
        k = _key(sig)
        keys[n.name] = k
        meta = n.meta["partitioner"]
        entry = prof.ops.setdefault(k, {"op": meta.op, "signature": sig, "flops": float(meta.flops),
                                        "bytes_moved": float(meta.bytes_moved), "dtype": meta.dtype or "float32",
                                        "times": {}})
        if entry.get("signature") != sig:  # pragma: no cover - a 64-bit hash collision
            raise CostModelError(f"profile key collision for {n.name!r}", hint="delete the cache and profile again")
    for d in devs:
        known = prof.devices.get(d.id)
        if known is not None and known.get("model") != d.model:
            raise CostModelError(f"profile device {d.id!r} was model {known.get('model')!r}, now {d.model!r}",
                                 hint="use a new profile file for a different machine")
        prof.devices[d.id] = d.to_json()
    want: dict[str, list[LocalDevice]] = {}
    for k in dict.fromkeys(keys.values()):
        missing = [d for d in devs if d.model not in prof.ops[k]["times"]]
        if missing:
            want[k] = missing
    n_pairs = sum(len(v) for v in want.values())
    cached = len(set(keys.values())) * len(devs) - n_pairs
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    passes: dict[str, dict] = {}
    if want:
        progress.step(f"profiling {name}: {n_pairs} (op, device) pairs, {cached} cached")

        def sink(k, model, rec):
            prof.ops[k]["times"][model] = rec

        flat = [a.detach() if isinstance(a, torch.Tensor) else a for a in example_inputs]
        mha = getattr(torch.backends, "mha", None)
        fast = mha.get_fastpath_enabled() if mha is not None else None
        saved = [(b, b.detach().clone()) for b in gm.buffers()]
        try:
            with torch.no_grad():
                if mode == "isolated":
                    _Timer(gm, keys, want, warmup, repeats, min_sample_s, sink).run(*flat)
                else:
                    for d in devs:
                        todo = {k for k, ds in want.items() if d in ds}
                        if not todo:
                            continue
                        recs, info = _profile_in_context(gm, flat, keys, d, warmup, repeats)
                        passes[d.id] = info
                        for k in sorted(todo):
                            sink(k, d.model, recs[k])
        finally:
            with torch.no_grad():
                for buf, c in saved:
                    if buf.shape == c.shape:
                        buf.copy_(c)
            if mha is not None:
                mha.set_fastpath_enabled(fast)
    wall = time.perf_counter() - t0
    whole = dict(prof.graphs.get(name, {}).get("whole", {})) if prof.graphs.get(name, {}).get("nodes") == keys else {}
    prof.graphs[name] = {"nodes": keys}
    for d in devs:
        info = passes.get(d.id)
        if info is not None and "whole_median_s" in info:
            whole[d.model] = whole_pass_record(prof, name, d.model, info["whole_median_s"],
                                               samples=info["whole_samples"], clean=info["whole_clean"])
    if whole:
        prof.graphs[name]["whole"] = whole
    prof.runs.append({"graph": name, "devices": [d.id for d in devs], "timed": n_pairs, "cached": cached,
                      "unique_ops": len(set(keys.values())), "nodes": len(keys), "wall_s": wall,
                      "warmup": warmup, "repeats": repeats, "min_sample_s": min_sample_s, "mode": mode,
                      **({"passes": passes} if passes else {}),
                      "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in os.getloadavg()],
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
                      "cpu_count": os.cpu_count()})
    log.info("profiled %s on %s: %d pairs timed, %d cached, %.1f s (load %.2f -> %.2f)", name,
             ",".join(d.id for d in devs), n_pairs, cached, wall, load_before[0], os.getloadavg()[0])
    return prof


def profile_model(ref: Any, devices: str | list = "cpu", *, example_inputs: tuple | None = None,
                  model_kwargs: dict | None = None, frontend: str = "fx", **kw) -> tuple[Profile, Any]:
    """Load (trace) a model with :func:`partitioner.api.load_model` and profile it.

    Returns ``(profile, loaded_model)``; ``kw`` as for :func:`profile_graph`.
    """
    from ..frontend.load import load_model

    loaded = load_model(ref, example_inputs, frontend=frontend, model_kwargs=model_kwargs)
    if loaded.gm is None:
        raise UsageError(f"{ref!r} is a cost graph, not a model: there is nothing to run",
                         hint="profile a zoo name, path/to/file.py:factory or an nn.Module")
    return profile_graph(loaded.gm, loaded.example_inputs, devices, name=loaded.graph.name, **kw), loaded

