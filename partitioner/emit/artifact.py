"""Artifacts: an emitted plan in memory and on disk.

An :class:`Artifact` is the :class:`~partitioner.ir.schedule.Schedule` plus one callable
module per segment. :func:`partitioner.emit.build.emit` builds it in memory;
:func:`save_artifact` writes it and :func:`load_artifact` reads it back in any process.

Files (``Artifact.save(DIR)``)
------------------------------
``DIR/schedule.json`` (the Schedule, with sha256 checksums of every file in
``meta.files``), ``DIR/segments/<id>/module.py`` + ``weights.safetensors`` (see
:mod:`partitioner.emit.segcode`), and, when example inputs are known,
``DIR/example_inputs.pt`` and ``DIR/expected_outputs.pt`` (the original model's outputs;
both ``torch.save`` of tensors, read with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import ArtifactError
from ..ir.schedule import Schedule, bind_inputs
from ..ir.tree import tree_unflatten
from . import segcode

log = logging.getLogger(__name__)

__all__ = ["Artifact", "save_artifact", "load_artifact"]


# ---- the artifact ------------------------------------------------------------------------
@dataclass
class Artifact:
    """An emitted plan: the Schedule and one callable module per segment.

    Attributes
    ----------
    schedule : Schedule
    modules : dict of str to nn.Module
        Segment id -> module taking the segment's inputs positionally, returning a tuple.
    example_inputs : tuple, optional
        Inputs to check the artifact with (saved as ``example_inputs.pt``).
    expected_outputs : Any, optional
        The original model's outputs on ``example_inputs`` (loaded artifacts only;
        in memory they are computed from ``source`` on save).
    source : torch.fx.GraphModule, optional
        The traced model (in memory only).
    path : Path, optional
        Where it was loaded from or saved to.
    """

    schedule: Schedule
    modules: dict[str, nn.Module]
    example_inputs: tuple | None = None
    expected_outputs: Any = None
    source: Any = None
    path: Path | None = None
    _exec_args: dict = field(default_factory=dict, repr=False)

    def save(self, path: str | Path, *, overwrite: bool = False, verify: bool = True) -> Path:
        """Write the artifact into ``path`` (see the module docstring); see :func:`save_artifact`."""
        return save_artifact(self, path, overwrite=overwrite, verify=verify)

    def segment_inputs(self, *inputs) -> dict[str, list]:
        """Run the model once (sequentially, without grad) and return every segment's
        arguments: example inputs to export or check one segment at a time."""
        with torch.no_grad():
            self.run_sequential(*inputs, capture=True)
        return dict(self._exec_args)

    def run_sequential(self, *inputs, capture: bool = False):
        """Reference executor: run the segments one after the other in this thread.

        With ``capture``, remember every segment's arguments (used by save to verify code).
        """
        env = bind_inputs(self.schedule, inputs)
        for seg in self.schedule.segments:
            args = [env[v] for v in seg.inputs]
            if capture:
                self._exec_args[seg.id] = args
            outs = self.modules[seg.id](*args)
            if not isinstance(outs, (tuple, list)) or len(outs) != len(seg.outputs):
                raise ArtifactError(f"segment {seg.id!r} returned {type(outs).__name__} instead of "
                                    f"{len(seg.outputs)} outputs", hint="emit the plan again")
            env.update(zip(seg.outputs, outs))
        return tree_unflatten(self.schedule.outputs, env.__getitem__)


# ---- output comparison -------------------------------------------------------------------
#: relative tolerance of an emitted plan's outputs against the original model's
OUTPUT_RTOL = 1e-4
#: absolute tolerance, per output tensor, as a fraction of that tensor's largest magnitude
#: (at least 1): a plan runs its segments with other intra-op thread counts than the
#: reference run, so float sums are reordered; the rounding error of a deep float32 network
#: scales with its output magnitude (ResNet-50 logits near 100 differ by ~3e-5 between one
#: and two threads), and a fixed atol would flag that reordering as a wrong plan.
OUTPUT_ATOL = 1e-5


def outputs_mismatch(actual: Any, expected: Any, *, rtol: float = OUTPUT_RTOL,
                     atol: float = OUTPUT_ATOL) -> str | None:
    """Compare a plan's outputs with the model's, leaf by leaf.

    Parameters
    ----------
    actual, expected : Any
        Output trees (tensors, tuples, lists, dicts, scalars) of the same structure.
    rtol, atol : float
        Relative tolerance, and absolute tolerance scaled by ``max(1, max|expected|)`` of each
        floating-point tensor (integer and boolean tensors must match exactly).

    Returns
    -------
    str or None
        None when they agree, else one line naming the first differing output.
    """
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if len(a_leaves) != len(e_leaves):
        return f"{len(a_leaves)} output values, expected {len(e_leaves)}"
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        scale = 1.0
        if isinstance(e, torch.Tensor) and e.is_floating_point() and e.numel():
            finite = e.detach().float()[torch.isfinite(e.detach().float())]
            if finite.numel():
                scale = max(1.0, float(finite.abs().max()))
        try:
            if isinstance(a, torch.Tensor):
                a = a.detach().cpu()
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, equal_nan=True)
        except AssertionError as err:
            where = f"output {k}" if len(e_leaves) > 1 else "output"
            return f"{where}: " + " ".join(str(err).split())
    return None


# ---- files -------------------------------------------------------------------------------
def sha256_file(p: Path) -> str:
    """Hex SHA-256 of a file (checksums recorded in ``schedule.json`` meta)."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_schedule_dir(path: str | Path, what: str, written_by: str, corrupt_hint: str) -> tuple[Path, Schedule]:
    """``(root, schedule)`` of a directory holding ``schedule.json`` (an artifact or an ONNX
    export), validated; clear :class:`ArtifactError` for a missing directory or file or bad JSON."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{what} {str(root)!r} does not exist", hint=f"pass the directory written by {written_by}")
    sj = root / "schedule.json"
    if not sj.is_file():
        raise ArtifactError(f"{sj} is missing", hint=f"pass the directory written by {written_by}")
    try:
        data = json.loads(sj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{sj} is not valid JSON: {err}", hint=corrupt_hint) from None
    return root, Schedule.from_json(data)


def save_artifact(art: Artifact, path: str | Path, *, overwrite: bool = False, verify: bool = True) -> Path:
    """Write ``art`` into directory ``path`` (created if missing; other files in it are
    kept, so a compile output directory can hold it next to ``plan.json``).

    Every segment is written as fx code when it can be rebuilt from ``torch.nn``
    constructors and torch functions, else as its ``torch.export`` ATen graph (which
    needs the example inputs). With ``verify`` (and example inputs), each written
    segment is re-instantiated from its code and checked against the in-memory one.

    Raises
    ------
    ArtifactError
        ``path`` already holds an artifact (without ``overwrite``), or a segment can be
        written neither way, or its written code computes something else.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ArtifactError(f"{root} exists and is not a directory", hint="choose another output path")
    if (root / "schedule.json").exists() or (root / "segments").exists():
        if not overwrite:
            raise ArtifactError(f"{root} already holds an artifact", hint="pass overwrite=True or another directory")
        shutil.rmtree(root / "segments", ignore_errors=True)
        (root / "schedule.json").unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    sched = art.schedule
    ex = art.example_inputs
    expected = art.expected_outputs
    if ex is not None and (verify or not art._exec_args):
        with torch.no_grad():
            art.run_sequential(*ex, capture=True)
            if art.source is not None:
                expected = art.source(*ex)
    written: list[Path] = []
    segments = []
    for seg in sched.segments:
        mod = art.modules[seg.id]
        args = art._exec_args.get(seg.id)
        header = (f"Segment {seg.id} of {sched.meta.get('model', 'the model')} on device {seg.device} "
                  f"(generated by partitioner.emit.build).")
        fmt = "fx"
        try:
            src, tensors, info = segcode.portable_source(mod, header)
        except segcode.NotPortable as why:
            if args is None:
                raise ArtifactError(f"segment {seg.id} cannot be written as fx code ({why}) and there are no "
                                    "example inputs to export it", hint="emit with example_inputs=...") from None
            log.info("segment %s: %s; writing its torch.export graph", seg.id, why)
            try:
                src, tensors, info = segcode.portable_source(segcode.export_flat(mod, tuple(args)), header)
            except segcode.NotPortable as why2:
                raise ArtifactError(f"segment {seg.id} cannot be written as code: {why}; export: {why2}",
                                    hint="mark the offending module as a leaf or use torch.nn building blocks"
                                    ) from None
            fmt = "aten"
        if verify and args is not None:
            _verify(seg.id, mod, segcode.instantiate(src, tensors, info["params"], f"check_{seg.id}"), args)
        folder = root / "segments" / seg.id
        written += segcode.write_segment(folder, src, tensors, info)
        segments.append(replace(seg, code=f"segments/{seg.id}", format=fmt))
    if ex is not None:
        torch.save(tuple(ex), root / "example_inputs.pt")
        written.append(root / "example_inputs.pt")
        if expected is not None:
            torch.save(expected, root / "expected_outputs.pt")
            written.append(root / "expected_outputs.pt")
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in written}
    out = replace(sched, segments=tuple(segments), meta=dict(sched.meta, files=files))
    (root / "schedule.json").write_text(out.dumps())
    art.schedule, art.path = out, root
    return root


def _verify(sid: str, ref: nn.Module, new: nn.Module, args: list) -> None:
    outs = []
    for mod in (ref, new):  # same random stream for both (dropout in training mode)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(mod(*args))
    a, b = outs
    bad = outputs_mismatch(tuple(b), tuple(a))
    if bad is not None:
        raise ArtifactError(f"segment {sid}: the written code computes other values than the traced graph: "
                            f"{bad}", hint="please report this bug")


def load_artifact(path: str | Path) -> Artifact:
    """Load and validate an artifact directory written by :func:`save_artifact`.

    Raises
    ------
    ArtifactError
        A missing directory or file, invalid JSON, a schedule that fails validation
        (unknown segment, cycle, deadlock...), a file whose checksum differs from the one
        recorded at emit time, or code or weights that do not load.
    """
    root, sched = read_schedule_dir(path, "artifact directory", "`partitioner compile ... --out DIR`",
                                    "the file is corrupted; emit the plan again")
    files = sched.meta.get("files", {})
    for seg in sched.segments:
        folder = (root / seg.code).resolve()
        if not seg.code or not folder.is_relative_to(root.resolve()):
            raise ArtifactError(f"segment {seg.id!r} has code path {seg.code!r} outside the artifact",
                                hint="the schedule was edited by hand; emit the plan again")
        for f in (segcode.MODULE_FILE, segcode.WEIGHTS_FILE):
            rel = f"{seg.code}/{f}"
            if not (root / rel).is_file():
                raise ArtifactError(f"artifact {root}: missing file {rel} (segment {seg.id})",
                                    hint="the artifact is incomplete; copy the whole directory or emit the plan again")
            if rel not in files:
                raise ArtifactError(f"artifact {root}: file {rel} has no checksum in schedule.json",
                                    hint="the schedule was edited by hand; emit the plan again")
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"artifact {root}: missing file {rel}", hint="copy the whole directory or emit again")
        if sha256_file(p) != digest:
            raise ArtifactError(f"artifact {root}: {rel} was modified after it was written (sha256 mismatch)",
                                hint="restore the original file or emit the plan again")
    modules = {seg.id: segcode.load_segment(root / seg.code, seg.id) for seg in sched.segments}
    ex = exp = None
    if (root / "example_inputs.pt").is_file():
        ex = tuple(torch.load(root / "example_inputs.pt", weights_only=True))
    if (root / "expected_outputs.pt").is_file():
        exp = torch.load(root / "expected_outputs.pt", weights_only=True)
    return Artifact(sched, modules, ex, exp, path=root)
