"""onnxruntime executor for an ONNX export (:mod:`partitioner.emit.onnx`).

:class:`OnnxRuntime` loads ``DIR/schedule.json`` (validated, every file checked against
its sha256), opens one :class:`onnxruntime.InferenceSession` per segment and follows the
Schedule's per-device actions:

* ``parallel=False`` (default): one thread runs every device's program in turn, in a
  valid interleaving fixed once (each device runs its actions in order until it reaches
  a recv whose send has not happened yet; then the next device), so every compute sees
  exactly the values the schedule says it holds;
* ``parallel=True``: one thread per device, as :class:`~partitioner.runtime.local.LocalRuntime`;
  sends post to a mailbox and recvs wait for it (``session.run`` releases the GIL, so
  devices compute concurrently).

Values are kept as lists of numpy arrays (a value's tensor leaves, see
:func:`partitioner.emit.onnx.encode`); a send hands the arrays to the peer (on one
machine, a transfer is a reference). Execution providers: ``providers`` is a list for
every segment, or a dict spec device id -> list (default ``["CPUExecutionProvider"]``);
a provider this onnxruntime build lacks is a :class:`~partitioner.errors.RuntimeFailure`.
``threads`` sets ``intra_op_num_threads`` (an int, or a dict per spec device).

:meth:`OnnxRuntime.run` returns the model's outputs (torch tensors, structured like the
model's); :meth:`OnnxRuntime.run_with_stats` also returns a
:class:`~partitioner.runtime.local.RunStats` with every action's measured interval.
:func:`run_exported` is the one-call form used by ``partitioner run`` for an export dir.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..emit.artifact import read_schedule_dir, sha256_file
from ..errors import ArtifactError, RuntimeFailure, UsageError
from ..ir.schedule import Action, Schedule, sequential_order
from ..ir.tree import tree_unflatten

log = logging.getLogger(__name__)

__all__ = ["OnnxRuntime", "run_exported", "load_export"]

_HINT = "export the artifact again: partitioner export DIR --format onnx --out OUT --force"


def load_export(path: str | Path) -> Schedule:
    """Read and check an ONNX export directory; return its Schedule.

    Raises
    ------
    ArtifactError
        A missing directory or file (``segments/s3.onnx``), invalid JSON, a schedule that
        fails validation or is not an ONNX export, or a file modified since export.
    """
    root, sched = read_schedule_dir(path, "ONNX export directory",
                                    "`partitioner export DIR --format onnx`", _HINT)
    onnx_meta = sched.meta.get("onnx")
    if not isinstance(onnx_meta, dict) or not isinstance(onnx_meta.get("segments"), dict) \
            or not isinstance(onnx_meta.get("values"), dict):
        raise ArtifactError(f"{root} is not an ONNX export (schedule.json has no meta.onnx)",
                            hint="run it with `partitioner run` (local runtime), or export it first")
    files = sched.meta.get("files", {})
    for seg in sched.segments:
        entry = onnx_meta["segments"].get(seg.id)
        if seg.format != "onnx" or entry is None:
            raise ArtifactError(f"segment {seg.id!r} is not an ONNX segment (format {seg.format!r})", hint=_HINT)
        if entry.get("exporter") == "const":
            continue
        p = (root / seg.code).resolve()
        if not seg.code or not p.is_relative_to(root.resolve()):
            raise ArtifactError(f"segment {seg.id!r} has file path {seg.code!r} outside the export", hint=_HINT)
        if not p.is_file():
            raise ArtifactError(f"ONNX export {root}: missing file {seg.code} (segment {seg.id} on {seg.device})",
                                hint="the export is incomplete; copy the whole directory or " + _HINT)
        if seg.code not in files:
            raise ArtifactError(f"ONNX export {root}: {seg.code} has no checksum in schedule.json", hint=_HINT)
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"ONNX export {root}: missing file {rel}", hint="copy the whole directory or " + _HINT)
        if sha256_file(p) != digest:
            raise ArtifactError(f"ONNX export {root}: {rel} was modified after it was written (sha256 mismatch)",
                                hint="restore the original file or " + _HINT)
    for v in sched.values:
        if v not in onnx_meta["values"] and any(v in s.inputs for s in sched.segments):
            raise ArtifactError(f"value {v!r} has no layout in meta.onnx.values", hint=_HINT)
    return sched


class OnnxRuntime:
    """Run an ONNX export directory with onnxruntime (see the module docstring).

    Parameters
    ----------
    path : str or Path
        Directory written by :func:`partitioner.emit.onnx.export_dir`.
    providers : list or dict, optional
        Execution providers for every segment, or per spec device id; default CPU.
    threads : int or dict, optional
        ``intra_op_num_threads`` of every session, or per spec device id.
    parallel : bool
        One thread per device (else one thread, a fixed valid interleaving).
    timeout_s : float
        With ``parallel``, the longest a recv waits.
    """

    def __init__(self, path: str | Path, providers: list | dict | None = None, threads: int | dict | None = None,
                 *, parallel: bool = False, timeout_s: float = 300.0):
        import onnxruntime as ort

        self.path = Path(path)
        self.schedule = s = load_export(self.path)
        meta = s.meta["onnx"]
        self.entries: dict[str, dict] = meta["segments"]
        self.layouts: dict[str, dict] = meta["values"]
        self.parallel = parallel
        self.timeout_s = float(timeout_s)
        avail = set(ort.get_available_providers())
        self.sessions: dict[str, Any] = {}
        self.providers: dict[str, list] = {}
        for seg in s.segments:
            prov = self._pick(providers, seg.device, ["CPUExecutionProvider"], "providers")
            prov = [prov] if isinstance(prov, str) else list(prov)
            missing = [p if isinstance(p, str) else p[0] for p in prov
                       if (p if isinstance(p, str) else p[0]) not in avail]
            if missing:
                raise RuntimeFailure(f"segment {seg.id} ({seg.device}): execution provider(s) {missing} are not "
                                     f"available in this onnxruntime build (available: {sorted(avail)})",
                                     hint="install onnxruntime-gpu for CUDAExecutionProvider, or use the CPU")
            self.providers[seg.device] = prov
            if self.entries[seg.id].get("exporter") == "const":
                continue
            so = ort.SessionOptions()
            so.log_severity_level = 3
            n = self._pick(threads, seg.device, None, "threads")
            if n is not None:
                if not isinstance(n, int) or n < 1:
                    raise UsageError(f"threads must be integers >= 1, got {n!r}", hint="e.g. threads=1")
                so.intra_op_num_threads = n
                so.inter_op_num_threads = 1
            try:
                self.sessions[seg.id] = ort.InferenceSession(str(self.path / seg.code), so, providers=prov)
            except Exception as err:  # noqa: BLE001
                raise ArtifactError(f"segment {seg.id}: onnxruntime cannot load {seg.code}: "
                                    f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                                    hint="the file is corrupted or needs a newer onnxruntime; " + _HINT) from None
        self._segs = {x.id: x for x in s.segments}
        self._order = sequential_order(s)
        self._free = {d: {} for d in s.devices}
        for d in s.devices:
            for v, k in s.last_uses(d).items():
                self._free[d].setdefault(k, []).append(v)
        self._lock = threading.Lock()
        self.last_stats = None
        self._in_shapes = {v: self.layouts[v]["shapes"] for v in s.inputs if v in self.layouts}
        log.info("onnx runtime: %d sessions, providers %s", len(self.sessions), self.providers)

    @staticmethod
    def _pick(opt, dev: str, default, what: str):
        if isinstance(opt, dict):
            return opt.get(dev, default)
        if opt is None:
            return default
        if what == "threads" and not isinstance(opt, int):
            raise UsageError(f"threads must be an int or a dict, got {type(opt).__name__}", hint="e.g. threads=1")
        return opt

    # -- values
    def _bind(self, inputs: tuple) -> dict[str, list]:
        import torch

        from ..emit.onnx import encode
        from ..ir.schedule import bind_inputs

        env = bind_inputs(self.schedule, inputs)
        out: dict[str, list] = {}
        for v, obj in env.items():
            lay = self.layouts.get(v)
            if lay is None:
                continue
            tree, leaves = encode(obj, f"model input {v!r}")
            if tree != lay["tree"]:
                raise UsageError(f"model input {v!r} has another structure or other Python values than the "
                                 "example inputs the export was made with", hint="pass inputs like the example inputs")
            arrs = []
            for k, t in enumerate(leaves):
                if list(t.shape) != lay["shapes"][k]:
                    raise UsageError(f"model input {v!r} has shape {list(t.shape)}, but the ONNX graphs were "
                                     f"exported for {lay['shapes'][k]} (static shapes)",
                                     hint="export again with example inputs of this shape, or use `partitioner "
                                          "run` on the torch artifact")
                arrs.append(t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
            out[v] = arrs
        return out

    def _compute(self, sid: str, vals: dict[str, list]) -> None:
        entry = self.entries[sid]
        seg = self._segs[sid]
        if entry.get("exporter") == "const":
            for v in seg.outputs:
                vals[v] = []
            return
        feed = {}
        for m in entry["inputs"]:
            feed[m["name"]] = vals[m["value"]][m["leaf"]]
        names = [m["name"] for m in entry["outputs"]]
        res = self.sessions[sid].run(names, feed)
        for v in seg.outputs:
            vals[v] = [None] * len(self.layouts[v]["shapes"])
        for m, r in zip(entry["outputs"], res):
            vals[m["value"]][m["leaf"]] = r

    def _outputs(self, host_vals: dict[str, list], as_numpy: bool):
        import torch

        from ..emit.onnx import decode

        def lookup(v):
            arrs = host_vals[v]
            leaves = arrs if as_numpy else [torch.from_numpy(np.ascontiguousarray(a)) for a in arrs]
            return decode(self.layouts[v]["tree"], leaves)

        return tree_unflatten(self.schedule.outputs, lookup)

    # -- running
    def run(self, *inputs, as_numpy: bool = False) -> Any:
        """Run once; return the outputs (torch tensors unless ``as_numpy``)."""
        return self.run_with_stats(*inputs, as_numpy=as_numpy)[0]

    def run_with_stats(self, *inputs, as_numpy: bool = False):
        """Run once; return ``(outputs, RunStats)`` (also kept in ``last_stats``)."""
        from .stats import ActionTime, RunStats  # noqa: F401

        bound = self._bind(inputs)
        s = self.schedule
        with self._lock:
            vals: dict[str, dict[str, list]] = {d: {} for d in s.devices}
            vals[s.host].update(bound)
            times: list[ActionTime] = []
            t0 = time.perf_counter()
            if self.parallel:
                self._run_threads(vals, times, t0)
            else:
                mail: dict[int, list] = {}
                for d, k in self._order:
                    self._step(d, k, vals[d], mail, times, t0, None)
            wall = time.perf_counter() - t0
        times.sort(key=lambda a: (a.start_s, a.device, a.index))
        self.last_stats = RunStats(wall, times)
        return self._outputs(vals[s.host], as_numpy), self.last_stats

    def _step(self, d: str, k: int, vals: dict, mail: dict, times: list, t0: float, events) -> None:
        from .stats import ActionTime

        a: Action = self.schedule.actions[d][k]
        start = time.perf_counter()
        try:
            if a.op == "compute":
                self._compute(a.segment, vals)
                name = a.segment
            elif a.op == "send":
                mail[a.tag] = vals[a.value]
                if events is not None:
                    events[a.tag].set()
                name = a.value
            else:
                if events is not None and not events[a.tag].wait(timeout=self.timeout_s):
                    raise RuntimeFailure(f"device {d} waited {self.timeout_s:.0f} s at action #{k} for "
                                         f"{a.value!r} from {a.peer}, which never arrived",
                                         hint="the sending device failed or is stuck; raise timeout_s")
                if a.tag not in mail:
                    raise RuntimeFailure(f"device {d} at action #{k}: {a.value!r} from {a.peer} was never sent",
                                         hint="the sending device failed")
                vals[a.value] = mail[a.tag]
                name = a.value
        except (RuntimeFailure, ArtifactError):
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime errors
            raise RuntimeFailure(f"device {d} failed at action #{k} ({a.describe()}): {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}",
                                 hint="check the inputs' shapes and dtypes against the example inputs") from err
        times.append(ActionTime(d, k, a.op, name, start - t0, time.perf_counter() - t0))
        for v in self._free[d].get(k, ()):
            vals.pop(v, None)

    def _run_threads(self, vals: dict, times: list, t0: float) -> None:
        s = self.schedule
        events = {t.tag: threading.Event() for t in s.transfers}
        mail: dict[int, list] = {}
        errors: list[tuple[float, BaseException]] = []
        lock = threading.Lock()

        def body(d: str) -> None:
            local: list = []
            try:
                for k in range(len(s.actions.get(d, ()))):
                    if errors:
                        return
                    self._step(d, k, vals[d], mail, local, t0, events)
            except BaseException as err:  # noqa: BLE001 - re-raised by the caller
                with lock:
                    errors.append((time.perf_counter(), err))
                for e in events.values():
                    e.set()
            finally:
                with lock:
                    times.extend(local)

        threads = [threading.Thread(target=body, args=(d,), name=f"onnx-{d}", daemon=True)
                   for d in s.devices if s.actions.get(d)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise min(errors, key=lambda e: e[0])[1]


def run_exported(path: str | Path, inputs: tuple | None = None, *, providers: list | dict | None = None,
                 threads: int | dict | None = None, parallel: bool = False, repeat: int = 1):
    """Load an ONNX export and run it ``repeat`` times on ``inputs`` (default: its
    ``example_inputs.pt``); return ``(outputs, RunStats of the last run, OnnxRuntime)``."""
    import torch

    root = Path(path)
    rt = OnnxRuntime(root, providers, threads, parallel=parallel)
    if inputs is None:
        ex = root / "example_inputs.pt"
        if not ex.is_file():
            raise UsageError(f"{root} holds no example_inputs.pt", hint="pass --inputs FILE")
        inputs = tuple(torch.load(ex, weights_only=True))
    out = st = None
    for _ in range(max(1, repeat)):
        out, st = rt.run_with_stats(*inputs)
    return out, st, rt
