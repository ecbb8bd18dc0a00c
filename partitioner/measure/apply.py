"""Applying a profile to a cost graph and a spec (part of :mod:`partitioner.measure.profile`).

:func:`match_devices` pairs spec devices with profiled ones (an explicit map, else same
id, else same model, else a CPU whose thread budget matches); :func:`apply_profile`
writes the measured times into a :class:`~partitioner.ir.graph.CostGraph`;
:func:`with_profile` does it for a loaded model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from ..errors import CostModelError, UsageError
from ..machine.cost import FREE_OPS
from .profile import (
    MIN_CORRECTED_FRACTION,
    Profile,
    _key,
    load_profile,
    node_overhead,
    node_signature,
)

log = logging.getLogger(__name__)

__all__ = ["match_devices", "apply_profile", "with_profile"]

def match_devices(spec, profile: Profile, device_map: dict[str, str] | None = None) -> dict[str, str]:
    """Spec device id -> profiled device id, for every spec device that one matches.

    Rules (first that applies): ``device_map``; a profiled device with the same id; with
    the same model; a CPU whose thread budget equals the spec device's ``threads``; for a
    GPU, the only GPU model in the profile; for a CPU without ``threads``, the only CPU
    model in the profile.

    Raises
    ------
    UsageError
        ``device_map`` names a spec device or a profiled device that does not exist.
    """
    device_map = dict(device_map or {})
    ids = spec.device_ids
    for s, p in device_map.items():
        if s not in ids:
            raise UsageError(f"device map names {s!r}, which is not a device of spec {spec.name!r}",
                             hint=f"spec devices: {', '.join(ids)}")
        if p not in profile.devices:
            raise UsageError(f"device map sends {s!r} to {p!r}, which the profile does not hold",
                             hint=f"profiled devices: {', '.join(profile.devices) or '(none)'}")
    gpu_models = sorted({d["model"] for d in profile.devices.values() if d["kind"] == "gpu"})
    cpu_models = sorted({d["model"] for d in profile.devices.values() if d["kind"] == "cpu"})
    out = {}
    for dev in spec.devices:
        cand = device_map.get(dev.id)
        for pid, pd in profile.devices.items():
            if cand is not None:
                break
            if pid == dev.id or (dev.model and pd["model"] == dev.model):
                cand = pid
        if cand is None and dev.kind == "cpu" and dev.threads is not None:
            cand = next((pid for pid, pd in profile.devices.items()
                         if pd["kind"] == "cpu" and pd.get("threads") == dev.threads), None)
        only = gpu_models if dev.kind == "gpu" else cpu_models if dev.kind == "cpu" and dev.threads is None else []
        if cand is None and len(only) == 1:
            cand = next(pid for pid, pd in profile.devices.items() if pd["model"] == only[0])
        if cand is not None:
            out[dev.id] = cand
    return out


def _node_keys(graph, profile: Profile, gm) -> dict[str, str]:
    if gm is not None:
        keys = {}
        for n in gm.graph.nodes:
            sig = node_signature(gm, n)
            if sig is not None:
                keys[n.name] = _key(sig)
        return keys
    g = profile.graphs.get(graph.name)
    if g is None:
        raise CostModelError(f"the profile holds no graph {graph.name!r} (it holds: {', '.join(profile.graphs) or 'none'})",
                             hint="pass the traced model (LoadedModel.gm), or profile this model")
    return dict(g["nodes"])


def apply_profile(graph, profile: Profile, spec, *, gm: torch.fx.GraphModule | None = None,
                  device_map: dict[str, str] | None = None, strict: bool = False, overhead: bool = True):
    """A copy of ``graph`` whose nodes carry the profile's times as ``time_s[spec device id]``.

    With ``overhead`` (the default), every measured node time on a device also carries that
    device model's per-node overhead (:func:`partitioner.measure.profile.node_overhead`: the whole
    pass of the graph's own code, as the runtime runs it, minus the sum of the per-node
    medians, per timed node; never below ``MIN_CORRECTED_FRACTION`` of the measured time),
    so that a device's predicted whole-model time is what running the graph's code measured.

    Parameters
    ----------
    graph : CostGraph
    profile : Profile
    spec : Spec
        Its devices are matched to profiled ones with :func:`match_devices`.
    gm : GraphModule, optional
        The traced graph ``graph`` was lowered from: node signatures are computed from it.
        Without it, the profile's node map for a graph of the same name is used.
    device_map : dict, optional
        Explicit spec device id -> profiled device id.
    strict : bool
        Raise when a node that launches a kernel has no time for a matched device.
    overhead : bool
        Add the per-node overhead from the profile's whole passes (see above).

    Raises
    ------
    CostModelError
        No spec device matches a profiled device, or (``strict``) a node is not covered.
    """
    from ..ir.graph import CostGraph

    matched = match_devices(spec, profile, device_map)
    if not matched:
        raise CostModelError(f"no device of spec {spec.name!r} matches a profiled device "
                             f"({', '.join(profile.devices) or 'none'})",
                             hint="map them explicitly (e.g. --map cpu0=cpu:1t), or set `threads`/`model` in the spec")
    keys = _node_keys(graph, profile, gm)
    over = {sid: (node_overhead(profile, graph.name, profile.model_of(pid)) or 0.0) if overhead else 0.0
            for sid, pid in matched.items()}
    nodes, missing = [], []
    for n in graph.nodes:
        k = keys.get(n.fx_name or n.id, keys.get(n.id))
        ts = dict(n.time_s)
        if k is not None:
            for sid, pid in matched.items():
                t = profile.time(k, profile.model_of(pid))
                if t is not None:
                    ts[sid] = max(t + over[sid], MIN_CORRECTED_FRACTION * t)
                else:
                    missing.append((n.id, sid))
        elif n.op not in FREE_OPS:
            missing.extend((n.id, sid) for sid in matched)
        nodes.append(replace(n, time_s=ts))
    if missing:
        msg = (f"the profile has no time for {len(missing)} (node, device) pairs, e.g. node {missing[0][0]!r} on "
               f"{missing[0][1]!r}; they keep the roofline")
        if strict:
            raise CostModelError(msg, hint="profile this model (same shapes) on the matched devices")
        log.warning(msg)
    log.info("applied profile to %s: spec devices %s; per-node overhead %s", graph.name, matched,
             {k: f"{1e6 * v:.2f} us" for k, v in over.items()})
    edges = graph.edges()
    return CostGraph(graph.name, nodes, edges, list(graph.inputs), list(graph.outputs))


def with_profile(loaded, spec, profile: Profile | str | os.PathLike, device_map: dict[str, str] | None = None):
    """A :class:`~partitioner.api.LoadedModel` whose cost graph carries the profile's times
    for ``spec`` (the one-line hook of ``compile_plan(..., profile=...)``)."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    return replace(loaded, graph=apply_profile(loaded.graph, prof, spec, gm=loaded.gm, device_map=device_map))
