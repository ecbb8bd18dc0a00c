"""Export an emitted artifact to ONNX: one ``.onnx`` file per segment plus the Schedule.

``partitioner export DIR --format onnx`` (:mod:`partitioner.cli.export`) reads an
artifact written by :mod:`partitioner.emit.build` and writes ``OUT/``:

``schedule.json``
    The same :class:`~partitioner.ir.schedule.Schedule` (same actions, transfers and values),
    every segment with ``format: "onnx"`` and ``code: "segments/<id>.onnx"``, and
    ``meta["onnx"]`` holding, per segment, the exporter used (``"dynamo"``,
    ``"torchscript"`` or ``"const"``), why the dynamo exporter was refused if it was, the
    opset, the export time, and the mapping of every ONNX graph input and output name to
    ``(value, leaf)`` of the schedule (graph names are ``in.VALUE`` / ``out.VALUE``, with
    ``.K`` appended for the K-th tensor of a value holding several); and per value its
    *layout* (see below).
    ``meta["files"]`` holds sha256 checksums of every written file.
``segments/<id>.onnx``
    The segment's ONNX graph, weights included (initializers).
``example_inputs.pt``, ``expected_outputs.pt``
    Copied from the artifact, so ``partitioner run OUT --check`` works.

Values at segment boundaries
----------------------------
A value that flows between segments may be a tensor, or a tuple/list/dict of tensors
and Python scalars (an fx node returning ``torch.chunk(...)``, ``x.size()``...). At the
boundary every value is *flattened*: its layout is a tree (the encoding of the
schedule's output trees) whose leaves are ``{"leaf": k}`` (its ``k``-th tensor: one ONNX
input or output) or ``{"const": x}`` (a Python scalar, ``None`` or string). Tensors
cross the boundary; constants are baked into the consuming graphs, which is exact as
long as they depend only on shapes: the graphs are exported with the example inputs'
static shapes. To catch values that depend on the data (``x.sum().item()``), the
artifact is also run on a random *probe* input of the same shapes and dtypes: a
constant that changes, or an ONNX graph whose outputs differ from the segment's, is an
:class:`~partitioner.errors.ArtifactError` naming the segment and the value. Other
leaf types (a ``torch.dtype``, a custom object) are refused the same way.

Exporters
---------
Each segment is wrapped in a module taking its tensor leaves positionally and returning
its output tensor leaves, then exported with ``torch.onnx.export(..., dynamo=True)``; if
that raises, or the graph does not load in onnxruntime or computes other values than
the segment on the example (and probe) inputs, the TorchScript exporter
(``dynamo=False``) is tried, and the reason is recorded. ``exporter="dynamo"`` or
``"torchscript"`` forces one exporter. The dynamo exporter takes about 1-2 s per segment
(it rebuilds its operator registry on every call); TorchScript about 0.2 s.

Limits: static shapes (run with inputs of the example shapes); values crossing a
boundary must be numpy-representable (no bfloat16); data-parallel replicas are exported
into ``OUT/replicas/rK`` like the artifact's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, UsageError
from ..ir.schedule import Schedule
from ..ir.tree import tree_encode
from .artifact import sha256_file

log = logging.getLogger(__name__)

__all__ = ["EXPORTERS", "ExportReport", "SegmentExport", "export_artifact", "export_dir", "encode", "decode",
           "pick_leaves", "tensor_leaves", "is_onnx_export"]

EXPORTERS = ("auto", "dynamo", "torchscript")
FORMAT = "onnx"
_RTOL, _ATOL = 1e-3, 1e-4  # per-segment check (ORT vs torch); the end-to-end tests use 1e-4


# ---- value layouts -------------------------------------------------------------------------
def encode(obj: Any, where: str) -> tuple[dict, list[torch.Tensor]]:
    """Flatten ``obj`` into (layout tree, tensor leaves); see the module docstring.

    Raises
    ------
    ArtifactError
        A leaf that is neither a tensor nor a JSON scalar (``where`` names the value).
    """
    leaves: list[torch.Tensor] = []

    def leaf(x):
        if isinstance(x, torch.Tensor):
            leaves.append(x)
            return {"leaf": len(leaves) - 1}
        return None

    def fail(x):
        raise ArtifactError(f"{where} holds a {type(x).__name__} ({x!r:.60}), which cannot cross an ONNX "
                            "segment boundary", hint="only tensors and tuples/lists/dicts of tensors and Python "
                            "scalars can; keep the op that makes it in one segment (another plan) or change the model")

    return tree_encode(obj, leaf, fail, sequences=(tuple, torch.Size)), leaves


def decode(tree: dict, leaves: list) -> Any:
    """Rebuild a value from its layout tree and its tensor leaves."""
    (k, v), = tree.items()
    if k == "leaf":
        return leaves[v]
    if k == "const":
        return v
    if k == "tuple":
        return tuple(decode(x, leaves) for x in v)
    if k == "list":
        return [decode(x, leaves) for x in v]
    if k == "dict":
        return {key: decode(x, leaves) for key, x in v}
    raise ArtifactError(f"malformed value layout node {k!r}", hint="export the artifact again")


def tensor_leaves(tree: dict) -> int:
    """Number of tensor leaves in a layout tree."""
    (k, v), = tree.items()
    if k == "leaf":
        return 1
    if k in ("tuple", "list"):
        return sum(tensor_leaves(x) for x in v)
    if k == "dict":
        return sum(tensor_leaves(x) for _, x in v)
    return 0


def pick_leaves(tree: dict, obj: Any) -> list:
    """The tensor leaves of ``obj`` at the ``{"leaf": k}`` positions of its layout ``tree``
    (constants are skipped even where a tracer hands back a tensor for them)."""
    (k, v), = tree.items()
    if k == "leaf":
        return [obj]
    if k == "const":
        return []
    if k in ("tuple", "list"):
        return [t for x, o in zip(v, obj) for t in pick_leaves(x, o)]
    if k == "dict":
        return [t for key, x in v for t in pick_leaves(x, obj[key])]
    raise ArtifactError(f"malformed value layout node {k!r}", hint="export the artifact again")


def _consts(tree: dict) -> list:
    (k, v), = tree.items()
    if k == "const":
        return [v]
    if k in ("tuple", "list"):
        return [c for x in v for c in _consts(x)]
    if k == "dict":
        return [c for _, x in v for c in _consts(x)]
    return []


# ---- the wrapper exported per segment --------------------------------------------------------
class _Flat(nn.Module):
    """A segment taking its inputs' tensor leaves and returning its outputs' tensor leaves."""

    def __init__(self, seg_module: nn.Module, in_trees: list[dict], in_counts: list[int], out_trees: list[dict]):
        super().__init__()
        self.seg = seg_module
        self.in_trees = in_trees
        self.in_counts = in_counts
        self.out_trees = out_trees

    def forward(self, *flat):
        args, k = [], 0
        for tree, n in zip(self.in_trees, self.in_counts):
            args.append(decode(tree, list(flat[k:k + n])))
            k += n
        outs = self.seg(*args)
        return tuple(t for tree, o in zip(self.out_trees, outs) for t in pick_leaves(tree, o))


# ---- reports ---------------------------------------------------------------------------------
@dataclass
class SegmentExport:
    """How one segment was exported."""

    segment: str
    exporter: str
    file: str
    seconds: float
    opset: int | None = None
    fallback_reason: str | None = None
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"exporter": self.exporter, "file": self.file, "export_s": round(self.seconds, 4),
                "opset": self.opset, "fallback_reason": self.fallback_reason,
                "inputs": self.inputs, "outputs": self.outputs}


@dataclass
class ExportReport:
    """Result of :func:`export_artifact`."""

    path: Path
    schedule: Schedule
    segments: list[SegmentExport]
    seconds: float
    replicas: int = 1

    def exporters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.segments:
            out[s.exporter] = out.get(s.exporter, 0) + 1
        return out


# ---- exporting -------------------------------------------------------------------------------
def _probe_inputs(example: tuple, seed: int = 1234) -> tuple:
    """Random inputs with the example's shapes, dtypes and value ranges."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)

        def one(x):
            if not isinstance(x, torch.Tensor) or x.numel() == 0:
                return x
            if x.dtype == torch.bool:
                return torch.rand(x.shape) < 0.5
            if x.is_floating_point():
                xf = x.detach().float()
                std = float(xf.std()) if x.numel() > 1 else 1.0
                std = std if math.isfinite(std) and std > 0 else 1.0
                return (torch.randn(x.shape) * std + float(xf.mean())).to(x.dtype)
            if x.is_complex():
                return x.clone()
            lo, hi = int(x.min()), int(x.max())
            return torch.randint(lo, hi + 1, x.shape, dtype=x.dtype)

        import torch.utils._pytree as pytree

        return tuple(pytree.tree_map(one, list(example)))


def _trace_values(art, inputs: tuple) -> tuple[dict[str, Any], dict[str, list]]:
    """Run the artifact sequentially; return every value and every segment's arguments."""
    from ..ir.schedule import bind_inputs

    env = bind_inputs(art.schedule, inputs)
    args_of: dict[str, list] = {}
    with torch.no_grad():
        for seg in art.schedule.segments:
            args = [env[v] for v in seg.inputs]
            args_of[seg.id] = args
            outs = art.modules[seg.id](*args)
            if not isinstance(outs, (tuple, list)) or len(outs) != len(seg.outputs):
                raise ArtifactError(f"segment {seg.id!r} returned {type(outs).__name__} instead of "
                                    f"{len(seg.outputs)} outputs", hint="emit the plan again")
            env.update(zip(seg.outputs, outs))
    return env, args_of


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings and progress logging (they go to our log instead)."""
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._export",
             "onnxscript", "onnx_ir"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_one(flat: nn.Module, args: tuple, path: Path, exporter: str, opset: int | None,
                in_names: list[str], out_names: list[str]) -> None:
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            prog = torch.onnx.export(flat, args, dynamo=True, verbose=False, opset_version=opset,
                                     input_names=in_names, output_names=out_names, external_data=False)
            size = sum(t.nbytes for t in [*flat.parameters(), *flat.buffers()])
            prog.save(str(path), external_data=size >= 1.8e9)
        else:
            torch.onnx.export(flat, args, str(path), dynamo=False, opset_version=opset, input_names=in_names,
                              output_names=out_names, do_constant_folding=True)


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _np(t: torch.Tensor):
    return t.detach().cpu().contiguous().numpy()


def _check_session(sess, names_in: list[str], out_names: list[str], cases: list[tuple[list, list]]) -> None:
    """Run ``sess`` on every (input leaves, expected output leaves) case; raise AssertionError."""
    present = {i.name for i in sess.get_inputs()}
    got_out = [o.name for o in sess.get_outputs()]
    if got_out != out_names:
        raise AssertionError(f"graph outputs are {got_out}, expected {out_names}")
    for ins, expected in cases:
        feed = {n: _np(t) for n, t in zip(names_in, ins) if n in present}
        res = sess.run(out_names, feed)
        for name, r, e in zip(out_names, res, expected):
            torch.testing.assert_close(torch.from_numpy(r), e.detach().cpu(), rtol=_RTOL, atol=_ATOL,
                                       equal_nan=True, check_dtype=False, msg=lambda m, n=name: f"{n}: {m}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def export_artifact(source: Any, dest: str | Path, *, opset: int | None = None, exporter: str = "auto",
                    probe: bool = True) -> ExportReport:
    """Export an artifact (a directory, or an in-memory :class:`~partitioner.emit.artifact.Artifact`
    with example inputs) to ONNX files in ``dest`` (created; it should be empty: the CLI
    passes a temporary directory from :func:`partitioner.emit.outdir.atomic_dir`).

    Parameters
    ----------
    opset : int, optional
        ONNX opset (default: each exporter's default).
    exporter : {"auto", "dynamo", "torchscript"}
        ``"auto"``: dynamo, falling back to TorchScript per segment.
    probe : bool
        Also check every segment on a random input of the example shapes (see the module
        docstring).

    Raises
    ------
    ArtifactError
        The artifact has no example inputs, a value cannot cross a boundary, or a segment
        cannot be exported (both exporters' reasons are given).
    """
    from .artifact import Artifact, load_artifact

    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}", hint=f"use one of {', '.join(EXPORTERS)}")
    if opset is not None and not 7 <= opset <= 30:
        raise UsageError(f"opset {opset} is out of range", hint="e.g. --opset 18")
    t_start = time.perf_counter()
    art = source if isinstance(source, Artifact) else load_artifact(source)
    src_root = None if isinstance(source, Artifact) else Path(source)
    if art.example_inputs is None:
        raise ArtifactError("the artifact holds no example inputs (example_inputs.pt): ONNX export needs them "
                            "to fix the graphs' shapes", hint="emit the plan with example inputs "
                            "(partitioner compile writes them)")
    sched = art.schedule
    root = Path(dest)
    (root / "segments").mkdir(parents=True, exist_ok=True)
    example = tuple(art.example_inputs)
    env, args_of = _trace_values(art, example)
    env_p, args_p = _trace_values(art, _probe_inputs(example)) if probe else (None, None)

    layouts: dict[str, dict] = {}
    for name in sched.values:
        if name not in env:
            continue
        prod = sched.values[name].producer
        where = f"value {name!r} ({'model input' if prod is None else 'output of segment ' + repr(prod)})"
        tree, leaves = encode(env[name], where)
        if env_p is not None and name in env_p:
            tree_p, _ = encode(env_p[name], where)
            if tree_p != tree:
                raise ArtifactError(f"{where} holds Python values that depend on the input data "
                                    f"({_consts(tree)} on the example inputs, {_consts(tree_p)} on a probe input): "
                                    "the ONNX graphs would bake them in as constants",
                                    hint="keep the op that makes it and its users in one segment, or compute it "
                                         "as a tensor in the model")
        for t in leaves:
            if t.dtype == torch.bfloat16:
                raise ArtifactError(f"{where} is a bfloat16 tensor, which onnxruntime's numpy interface cannot "
                                    "pass between segments", hint="export a float16/float32 model")
        layouts[name] = {"tree": tree, "shapes": [list(t.shape) for t in leaves],
                         "dtypes": [str(t.dtype).removeprefix("torch.") for t in leaves]}

    def leaf_names(v: str, side: str) -> list[str]:
        # prefixed: a bare value name ("add") can collide with the exporter's own names inside the graph
        n = len(layouts[v]["shapes"])
        return [f"{side}.{v}"] if n == 1 else [f"{side}.{v}.{k}" for k in range(n)]

    reports: list[SegmentExport] = []
    new_segments = []
    written: list[Path] = []
    for seg in sched.segments:
        t0 = time.perf_counter()
        in_trees = [layouts[v]["tree"] for v in seg.inputs]
        in_counts = [len(layouts[v]["shapes"]) for v in seg.inputs]
        in_map = [(v, k, n) for v in seg.inputs for k, n in enumerate(leaf_names(v, "in"))]
        out_map = [(v, k, n) for v in seg.outputs for k, n in enumerate(leaf_names(v, "out"))]
        rel = f"segments/{seg.id}.onnx"
        if not out_map:  # only Python constants come out: nothing to run
            reports.append(SegmentExport(seg.id, "const", "", time.perf_counter() - t0))
            new_segments.append(replace(seg, code="", format=FORMAT))
            continue
        flat = _Flat(art.modules[seg.id], in_trees, in_counts, [layouts[v]["tree"] for v in seg.outputs]).eval()
        flat_args = tuple(t for v, a in zip(seg.inputs, args_of[seg.id]) for t in encode(a, v)[1])
        expected = [t for o in (env[v] for v in seg.outputs) for t in encode(o, "")[1]]
        cases = [(list(flat_args), expected)]
        if args_p is not None:
            pa = tuple(t for v, a in zip(seg.inputs, args_p[seg.id]) for t in encode(a, v)[1])
            cases.append((list(pa), [t for o in (env_p[v] for v in seg.outputs) for t in encode(o, "")[1]]))
        in_names, out_names = [n for *_, n in in_map], [n for *_, n in out_map]
        tries = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
        reasons: dict[str, str] = {}
        used = None
        path = root / rel
        for ex in tries:
            for p in path.parent.glob(f"{seg.id}.onnx*"):
                p.unlink()
            try:
                _export_one(flat, flat_args, path, ex, opset, in_names, out_names)
            except Exception as err:  # noqa: BLE001 - any exporter failure: try the next one
                reasons[ex] = "export failed: " + _first_line(err)
                continue
            try:
                sess = _session(path)
            except Exception as err:  # noqa: BLE001
                reasons[ex] = "onnxruntime cannot load the graph: " + _first_line(err)
                continue
            try:
                _check_session(sess, in_names, out_names, cases)
            except AssertionError as err:
                reasons[ex] = "the graph computes other values than the segment: " + _first_line(err)
                continue
            used = ex
            present = {i.name for i in sess.get_inputs()}
            break
        if used is None:
            raise ArtifactError(f"segment {seg.id!r} ({seg.device}, {len(seg.nodes)} nodes) cannot be exported to "
                                "ONNX: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()),
                                hint="try --exporter torchscript or another --opset, or a plan that cuts the model "
                                     "elsewhere")
        if reasons:
            log.warning("segment %s: exported with %s (%s)", seg.id, used, "; ".join(reasons.values()))
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        op = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
        files = sorted(path.parent.glob(f"{seg.id}.onnx*"))
        written += files
        reports.append(SegmentExport(
            seg.id, used, rel, time.perf_counter() - t0, op, reasons.get("dynamo") if used != "dynamo" else None,
            [{"name": n, "value": v, "leaf": k} for v, k, n in in_map if n in present],
            [{"name": n, "value": v, "leaf": k} for v, k, n in out_map]))
        new_segments.append(replace(seg, code=rel, format=FORMAT))
        log.info("segment %s: %s, %.2f s", seg.id, used, time.perf_counter() - t0)

    for name in ("example_inputs.pt", "expected_outputs.pt"):
        if src_root is not None and (src_root / name).is_file():
            shutil.copyfile(src_root / name, root / name)
            written.append(root / name)
        elif src_root is None:
            obj = example if name == "example_inputs.pt" else art.expected_outputs
            if obj is None and art.source is not None:
                with torch.no_grad():
                    obj = art.source(*example)
            if obj is not None:
                torch.save(obj, root / name)
                written.append(root / name)
    meta = {k: v for k, v in sched.meta.items() if k != "files"}
    meta["onnx"] = {"format": FORMAT, "exporter": exporter, "opset": opset,
                    "source": str(src_root) if src_root else None,
                    "segments": {r.segment: r.to_json() for r in reports}, "values": layouts}
    meta["files"] = {p.relative_to(root).as_posix(): sha256_file(p) for p in written}
    out = replace(sched, segments=tuple(new_segments), meta=meta)
    out.validate()
    (root / "schedule.json").write_text(out.dumps())
    replicas = 1
    if src_root is not None and (src_root / "replicas").is_dir():
        for rdir in sorted(p for p in (src_root / "replicas").glob("r*") if p.name[1:].isdigit()):
            export_artifact(rdir, root / "replicas" / rdir.name, opset=opset, exporter=exporter, probe=probe)
            replicas += 1
    return ExportReport(root, out, reports, time.perf_counter() - t_start, replicas)


def export_dir(src: str | Path, out: str | Path | None = None, *, force: bool = False, **kw) -> ExportReport:
    """Export artifact directory ``src`` into ``out`` (default ``src/onnx``) atomically:
    nothing is left behind on failure; an existing ``out`` is refused unless ``force``."""
    from .outdir import atomic_dir

    src = Path(src)
    out = Path(out) if out is not None else src / "onnx"
    if out.resolve() == src.resolve():
        raise UsageError("the output directory is the artifact directory itself",
                         hint="choose another --out (default: DIR/onnx)")
    if not (src / "schedule.json").is_file():
        raise ArtifactError(f"{src} holds no schedule.json: not an emitted artifact",
                            hint="pass the directory written by `partitioner compile ... --out DIR`")
    with atomic_dir(out, force=force) as tmp:
        rep = export_artifact(src, tmp, **kw)
    rep.path = out
    return rep


def is_onnx_export(schedule_or_dir: Schedule | str | Path) -> bool:
    """True for a schedule (or a directory whose schedule.json is one) written by this module."""
    if isinstance(schedule_or_dir, Schedule):
        segs = schedule_or_dir.segments
        return bool(segs) and all(s.format == FORMAT for s in segs)
    import json

    p = Path(schedule_or_dir) / "schedule.json"
    try:
        d = json.loads(p.read_text())
        return isinstance(d, dict) and isinstance(d.get("meta"), dict) and "onnx" in d["meta"] and \
            all(isinstance(s, dict) and s.get("format") == FORMAT for s in d.get("segments", []))
    except (OSError, ValueError):
        return False
