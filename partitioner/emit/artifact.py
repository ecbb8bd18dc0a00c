"""Artifacts: an emitted plan in memory and on disk.

An :class:`Artifact` is the :class:`~partitioner.ir.schedule.Schedule` plus one callable
module per segment. :func:`partitioner.emit.build.emit` builds it in memory;
:func:`save_artifact` writes ``schedule.json``, one program + safetensors folder per
segment (:mod:`partitioner.emit.segcode`), the example inputs and the model's expected
outputs (:func:`pack_outputs`: an output tree and its tensors, so a Hugging Face
``ModelOutput`` comes back as its class) and ``manifest.json``
(:mod:`partitioner.emit.manifest`); :func:`load_artifact` checks the manifest and reads it
back in any process, running no Python from the directory. The files: docs/formats.md.
"""

from __future__ import annotations

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
from ..ir import jsonio
from ..ir.inputs import bind_inputs
from ..ir.schedule import Schedule
from ..ir.tree import tree_encode, tree_unflatten
from . import manifest, segcode

log = logging.getLogger(__name__)

__all__ = ["Artifact", "save_artifact", "load_artifact", "pack_outputs", "unpack_outputs"]


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
    content_hash : str, optional
        The sha256 content hash of the directory (:mod:`partitioner.emit.manifest`), once
        saved or loaded.
    """

    schedule: Schedule
    modules: dict[str, nn.Module]
    example_inputs: tuple | None = None
    expected_outputs: Any = None
    source: Any = None
    path: Path | None = None
    content_hash: str | None = None
    _exec_args: dict = field(default_factory=dict, repr=False)

    def save(self, path: str | Path, *, overwrite: bool = False, verify: bool = True) -> Path:
        """Write the artifact into ``path``; see :func:`save_artifact`."""
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
    a_leaves, _ = pytree.tree_flatten(actual)
    e_leaves, _ = pytree.tree_flatten(expected)
    if len(a_leaves) != len(e_leaves):
        return f"{len(a_leaves)} output values, expected {len(e_leaves)}"
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        where = f"output {k}" if len(e_leaves) > 1 else "output"
        if isinstance(a, torch.Tensor) != isinstance(e, torch.Tensor):
            return f"{where}: {_kind(a)}, expected {_kind(e)}"
        if not isinstance(e, torch.Tensor):  # a constant: None, bool, int, float, str
            bad = _const_mismatch(a, e, rtol, atol)
            if bad:
                return f"{where}: {bad}"
            continue
        scale = 1.0
        if e.is_floating_point() and e.numel():
            finite = e.detach().float()[torch.isfinite(e.detach().float())]
            if finite.numel():
                scale = max(1.0, float(finite.abs().max()))
        try:
            torch.testing.assert_close(a.detach().cpu(), e, rtol=rtol, atol=atol * scale, equal_nan=True)
        except AssertionError as err:
            return f"{where}: " + " ".join(str(err).split())
    return None


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return f"the constant {x!r:.60}"


def _const_mismatch(a: Any, e: Any, rtol: float, atol: float) -> str | None:
    """Why constant ``a`` differs from ``e`` (same type, equal; floats within tolerance), or None."""
    numbers = (int, float)
    if type(a) is not type(e) and not (isinstance(a, numbers) and isinstance(e, numbers)
                                       and not isinstance(a, bool) and not isinstance(e, bool)):
        return f"{_kind(a)}, expected {_kind(e)}"
    if isinstance(e, float) or isinstance(a, float):
        if a == e or (a != a and e != e) or abs(a - e) <= atol + rtol * abs(e):
            return None
    elif a == e:
        return None
    return f"{_kind(a)}, expected {_kind(e)}"


# ---- files -------------------------------------------------------------------------------
def read_schedule_dir(path: str | Path, what: str, written_by: str, corrupt_hint: str) -> tuple[Path, Schedule]:
    """``(root, schedule)`` of a directory holding ``schedule.json`` (an artifact or an ONNX
    export), validated; clear :class:`ArtifactError` for a missing directory or file or bad JSON."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{what} {str(root)!r} does not exist", hint=f"pass the directory written by {written_by}")
    sj = root / "schedule.json"
    if not sj.is_file():
        raise ArtifactError(f"{sj} is missing", hint=f"pass the directory written by {written_by}")
    return root, Schedule.from_json(jsonio.read(sj, error=ArtifactError, hint=corrupt_hint))


def save_artifact(art: Artifact, path: str | Path, *, overwrite: bool = False, verify: bool = True) -> Path:
    """Write ``art`` into directory ``path`` (created if missing; other files in it are
    kept, so a compile output directory can hold it next to ``plan.json``), and seal it
    with ``manifest.json`` (its content hash is then ``art.content_hash``).

    Every segment is stored as the program of its fx graph when its modules are
    ``torch.nn`` leaves and its functions are on the allow-list
    (:mod:`partitioner.emit.program`), else as the program of its ``torch.export`` ATen
    graph (which needs the example inputs). With ``verify`` (and example inputs), each
    stored segment is rebuilt from its program, as loading does, and checked against the
    in-memory one.

    Raises
    ------
    ArtifactError
        ``path`` already holds an artifact (without ``overwrite``), or a segment can be
        stored neither way, or its program computes something else.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ArtifactError(f"{root} exists and is not a directory", hint="choose another output path")
    if any((root / f).exists() for f in ("schedule.json", "segments", manifest.MANIFEST)):
        if not overwrite:
            raise ArtifactError(f"{root} already holds an artifact", hint="pass overwrite=True or another directory")
        for tree in manifest.TREES:
            shutil.rmtree(root / tree, ignore_errors=True)
        for f in (*manifest.TOP_FILES, manifest.MANIFEST):
            (root / f).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    sched = art.schedule
    ex = art.example_inputs
    expected = art.expected_outputs
    if ex is not None and (verify or not art._exec_args):
        with torch.no_grad():
            art.run_sequential(*ex, capture=True)
            if art.source is not None:
                expected = art.source(*ex)
    segments = []
    for seg in sched.segments:
        mod = art.modules[seg.id]
        args = art._exec_args.get(seg.id)
        header = (f"Segment {seg.id} of {sched.meta.get('model', 'the model')} on device {seg.device} "
                  f"(generated by partitioner.emit.build).")
        fmt = "fx"
        try:
            prog, tensors, doc = segcode.describe(mod, header)
        except segcode.NotPortable as why:
            if args is None:
                raise ArtifactError(f"segment {seg.id} cannot be stored as a program ({why}) and there are no "
                                    "example inputs to export it", hint="emit with example_inputs=...") from None
            log.info("segment %s: %s; storing its torch.export graph", seg.id, why)
            try:
                prog, tensors, doc = segcode.describe(segcode.export_flat(mod, tuple(args)), header)
            except segcode.NotPortable as why2:
                raise ArtifactError(f"segment {seg.id} cannot be stored as a program: {why}; export: {why2}",
                                    hint="mark the offending module as a leaf or use torch.nn building blocks"
                                    ) from None
            fmt = "aten"
        if verify and args is not None:
            _verify(seg.id, mod, segcode.rebuild(prog, tensors, f"segment {seg.id}"), args)
        segcode.write_segment(root / "segments" / seg.id, prog, tensors, doc)
        segments.append(replace(seg, code=f"segments/{seg.id}", format=fmt))
    if ex is not None:
        torch.save(tuple(ex), root / "example_inputs.pt")
        if expected is not None:
            torch.save(pack_outputs(expected), root / "expected_outputs.pt")
    out = replace(sched, segments=tuple(segments), meta={k: v for k, v in sched.meta.items() if k != "files"})
    (root / "schedule.json").write_text(out.dumps())
    art.schedule, art.path = out, root
    art.content_hash = manifest.seal(root)
    return root


def _verify(sid: str, ref: nn.Module, new: nn.Module, args: list) -> None:
    outs = []
    for mod in (ref, new):  # same random stream for both (dropout in training mode)
        # each side on its own copy: a segment may change its arguments in place
        mine = pytree.tree_map_only(torch.Tensor, torch.clone, list(args))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(mod(*mine))
    a, b = outs
    bad = outputs_mismatch(tuple(b), tuple(a))
    if bad is not None:
        raise ArtifactError(f"segment {sid}: the written code computes other values than the traced graph: "
                            f"{bad}", hint="please report this bug")


def load_artifact(path: str | Path, *, expect: str | None = None) -> Artifact:
    """Load and validate an artifact directory written by :func:`save_artifact`.

    Nothing from the directory is executed: its files are checked against
    ``manifest.json`` first, segments are programs checked against an allow-list, and
    tensors are read without pickle.

    Parameters
    ----------
    expect : str, optional
        The content hash the artifact must have (printed by ``partitioner compile``);
        any other is refused.

    Raises
    ------
    ArtifactError
        A missing directory or file, an unlisted file, a symbolic link, a file whose
        sha256 differs from the manifest, a content hash other than ``expect``, a file
        reference outside the directory, invalid JSON, a schedule that fails validation
        (unknown segment, cycle, deadlock...), or a program or weights that do not load.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {str(root)!r} does not exist",
                            hint="pass the directory written by `partitioner compile ... --out DIR`")
    content, files = manifest.verify(root, expect)
    root, sched = read_schedule_dir(root, "artifact directory", "`partitioner compile ... --out DIR`",
                                    "the file is corrupted; emit the plan again")
    for seg in sched.segments:
        manifest.check_relpath(seg.code, root, f"segment {seg.id!r}")
        for f in (segcode.PROGRAM_FILE, segcode.WEIGHTS_FILE):
            if f"{seg.code}/{f}" not in files:
                raise ArtifactError(f"artifact {root}: missing file {seg.code}/{f} (segment {seg.id})",
                                    hint="the artifact is incomplete; copy the whole directory or emit the plan again")
    modules = {seg.id: segcode.load_segment(root / seg.code, seg.id) for seg in sched.segments}
    ex = exp = None
    if "example_inputs.pt" in files:
        ex = tuple(torch.load(root / "example_inputs.pt", weights_only=True))
    if "expected_outputs.pt" in files:
        exp = read_expected_outputs(root / "expected_outputs.pt")
    return Artifact(sched, modules, ex, exp, path=root, content_hash=content)


# ---- expected outputs --------------------------------------------------------------------
OUTPUTS_FORMAT = "partitioner.outputs/1"


def pack_outputs(outputs: Any) -> dict:
    """Model outputs in a form ``torch.load(weights_only=True)`` reads: the structure as an
    output tree (JSON, :mod:`partitioner.ir.tree`) and the list of its tensors:
    ``{"format": "partitioner.outputs/1", "tree": JSON, "tensors": [...]}``."""
    tensors: list[torch.Tensor] = []

    def leaf(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach())
            return {"value": str(len(tensors) - 1)}
        return None

    def fail(x):
        raise ArtifactError(f"model output of type {type(x).__name__} cannot be saved",
                            hint="return tensors, or tuples/lists/dicts of them")

    tree = tree_encode(outputs, leaf, fail)
    return {"format": OUTPUTS_FORMAT, "tree": json.dumps(tree), "tensors": tensors}


def read_expected_outputs(path: Path) -> Any:
    """The model outputs saved in ``expected_outputs.pt`` (weights-only load, structure rebuilt)."""
    return unpack_outputs(torch.load(path, weights_only=True))


def unpack_outputs(obj: Any) -> Any:
    """Inverse of :func:`pack_outputs` (anything else is returned as is)."""
    if not (isinstance(obj, dict) and obj.get("format") == OUTPUTS_FORMAT):
        return obj
    tensors = obj["tensors"]
    return tree_unflatten(json.loads(obj["tree"]), lambda k: tensors[int(k)])
