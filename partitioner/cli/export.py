"""``partitioner export DIR --format onnx`` (an ONNX export of an artifact; ``partitioner run`` runs it).

The export is written atomically (:func:`partitioner.emit.outdir.atomic_dir`): a failure leaves
nothing behind, and an existing ``--out`` is refused without ``--force``. With ``--check``
(the default) the written files are run once by the onnxruntime executor on the example
inputs and compared with ``expected_outputs.pt`` before the directory is put in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import ArtifactError, UsageError
from ..runtime.io import parse_device_map
from .common import console

__all__ = ["export", "providers_from_map", "check_onnx_outputs", "FORMATS"]

FORMATS = ("onnx",)
_RTOL, _ATOL = 1e-4, 1e-4


def check_onnx_outputs(outputs: Any, expected: Any) -> str | None:
    """Outputs of an ONNX export against the model's (ONNX Runtime's kernels differ from torch's in rounding)."""
    from ..emit.artifact import outputs_mismatch

    return outputs_mismatch(outputs, expected, rtol=_RTOL, atol=_ATOL)


def export(
    artifact: Path = typer.Argument(..., help="Artifact directory (schedule.json + segments/), from compile"),
    format: str = typer.Option("onnx", "--format", help="Export format (onnx)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: DIR/onnx)"),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)"),
    exporter: str = typer.Option("auto", "--exporter", help="auto (dynamo, TorchScript fallback per segment), "
                                 "dynamo or torchscript"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory"),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the export with onnxruntime on the "
                               "example inputs and compare with expected_outputs.pt before writing it"),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Also check each segment on a random input of "
                               "the example shapes (catches values that depend on the data)"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary"),
):
    """Export an emitted plan to one ONNX file per segment plus the schedule (runs with onnxruntime)."""
    from ..emit.onnx import export_artifact
    from ..emit.outdir import atomic_dir

    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}", hint=f"use --format {' or '.join(FORMATS)}")
    src = Path(artifact)
    if not src.is_dir():
        raise ArtifactError(f"artifact directory {str(src)!r} does not exist",
                            hint="pass the directory written by `partitioner compile ... --out DIR`")
    if not (src / "schedule.json").is_file():
        raise ArtifactError(f"{src} holds no schedule.json: not an emitted artifact",
                            hint="pass the directory written by `partitioner compile ... --out DIR`")
    dest = Path(out) if out is not None else src / "onnx"
    if dest.resolve() == src.resolve():
        raise UsageError("--out is the artifact directory itself", hint="choose another --out (default: DIR/onnx)")
    mismatch = None
    with atomic_dir(dest, force=force) as tmp:
        rep = export_artifact(src, tmp, opset=opset, exporter=exporter, probe=probe)
        if check and (tmp / "expected_outputs.pt").is_file():
            import torch

            from ..runtime.onnx_rt import run_exported

            expected = torch.load(tmp / "expected_outputs.pt", weights_only=True)
            with torch.no_grad():
                outputs, _, _ = run_exported(tmp)
            mismatch = check_onnx_outputs(outputs, expected)
            if mismatch is not None:
                raise ArtifactError(f"the ONNX export computes other outputs than the model: {mismatch}",
                                    hint="try --exporter torchscript or another --opset; nothing was written")
    s = rep.schedule
    segs = {seg.id: seg for seg in s.segments}
    summary = {"artifact": str(src), "out": str(dest), "format": format, "segments": len(rep.segments),
               "exporters": rep.exporters(), "replicas": rep.replicas, "export_s": rep.seconds,
               "check": (mismatch is None) if check else None,
               "fallbacks": {r.segment: r.fallback_reason for r in rep.segments if r.fallback_reason}}
    if json_out:
        console.print_json(json.dumps(summary))
        return
    t = Table(title=f"{s.meta.get('model')} on {s.meta.get('spec')}: {len(rep.segments)} ONNX segments")
    for col in ("segment", "device", "exporter", "opset", "inputs", "outputs", "export time"):
        t.add_column(col, justify="left" if col in ("segment", "device", "exporter") else "right")
    for r in rep.segments:
        t.add_row(r.segment, segs[r.segment].device, r.exporter, str(r.opset or "-"), str(len(r.inputs)),
                  str(len(r.outputs)), f"{r.seconds:.2f} s")
    console.print(t)
    for sid, why in summary["fallbacks"].items():
        console.print(f"{sid}: TorchScript exporter used ({why})", highlight=False)
    console.print(f"wrote {dest} in {rep.seconds:.1f} s" + ("; outputs match expected_outputs.pt"
                                                              if check and mismatch is None else "")
                  + f" (run it: partitioner run {dest})", highlight=False)


def providers_from_map(map_device: list[str] | None) -> dict[str, list] | None:
    """``--map SPEC_DEVICE=cpu|cuda[:N]`` -> onnxruntime providers per spec device."""
    if not map_device:
        return None
    out: dict[str, list] = {}
    for k, v in parse_device_map(map_device, value="DEVICE").items():
        if v == "cpu":
            out[k] = ["CPUExecutionProvider"]
        elif v == "cuda" or v.startswith("cuda:"):
            idx = v.partition(":")[2] or "0"
            if not idx.isdigit():
                raise UsageError(f"--map {k}={v}: bad CUDA device index", hint="e.g. --map gpu0=cuda:1")
            out[k] = [("CUDAExecutionProvider", {"device_id": int(idx)}), "CPUExecutionProvider"]
        else:
            raise UsageError(f"--map {k}={v}: an ONNX export runs on cpu or cuda[:N]", hint="e.g. --map gpu0=cuda")
    return out


