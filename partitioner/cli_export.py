"""``partitioner export DIR --format onnx`` and running an ONNX export with ``partitioner run``.

Mounted in :mod:`partitioner.cli` by::

    from . import cli_export
    app.command("export")(_guard(cli_export.export))

and dispatched from :func:`partitioner.cli_run.run` (first lines of its body)::

    from .export_onnx import is_onnx_export
    if is_onnx_export(artifact):
        from .cli_export import run_onnx
        return run_onnx(artifact, inputs=inputs, out=out, map_device=map_device, threads=threads,
                        repeat=repeat, check=check, stats=stats, json_out=json_out, stream=stream)

The export is written atomically (:func:`partitioner.outdir.atomic_dir`): a failure leaves
nothing behind, and an existing ``--out`` is refused without ``--force``. With ``--check``
(the default) the written files are run once by the onnxruntime executor on the example
inputs and compared with ``expected_outputs.pt`` before the directory is put in place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import ArtifactError, UsageError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

__all__ = ["export", "run_onnx", "providers_from_map", "FORMATS"]

FORMATS = ("onnx",)
_RTOL, _ATOL = 1e-4, 1e-4


def _check_outputs(outputs: Any, expected: Any) -> str | None:
    from .artifact import outputs_mismatch

    return outputs_mismatch(outputs, expected, rtol=_RTOL, atol=_ATOL)
    return None


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
    from .export_onnx import export_artifact
    from .outdir import atomic_dir

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

            from .runtime.onnx_rt import run_exported

            expected = torch.load(tmp / "expected_outputs.pt", weights_only=True)
            with torch.no_grad():
                outputs, _, _ = run_exported(tmp)
            mismatch = _check_outputs(outputs, expected)
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
    for it in map_device:
        k, sep, v = it.partition("=")
        if not sep or not k or not v:
            raise UsageError(f"--map {it!r} is not SPEC_DEVICE=DEVICE", hint="e.g. --map gpu0=cuda:0")
        if v == "cpu":
            out[k] = ["CPUExecutionProvider"]
        elif v == "cuda" or v.startswith("cuda:"):
            idx = v.partition(":")[2] or "0"
            if not idx.isdigit():
                raise UsageError(f"--map {it!r}: bad CUDA device index", hint="e.g. --map gpu0=cuda:1")
            out[k] = [("CUDAExecutionProvider", {"device_id": int(idx)}), "CPUExecutionProvider"]
        else:
            raise UsageError(f"--map {it!r}: an ONNX export runs on cpu or cuda[:N]", hint="e.g. --map gpu0=cuda")
    return out


def run_onnx(artifact: Path, *, inputs: Optional[Path] = None, out: Optional[Path] = None,
             map_device: Optional[list[str]] = None, threads: Optional[int] = None, repeat: int = 1,
             check: bool = False, stats: Optional[Path] = None, json_out: bool = False, stream: int = 0,
             parallel: bool = False) -> None:
    """``partitioner run DIR`` for an ONNX export directory (same options and output as
    for a torch artifact; ``--map gpu0=cuda`` selects CUDAExecutionProvider)."""
    import torch

    from .cli_run import read_inputs, report_run, write_outputs
    from .runtime.onnx_rt import OnnxRuntime

    if repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {repeat}", hint="e.g. --repeat 10")
    if stream:
        raise UsageError("--stream is not supported for ONNX exports", hint="run the torch artifact with --stream")
    rt = OnnxRuntime(artifact, providers_from_map(map_device), threads, parallel=parallel)
    s = rt.schedule
    if inputs is None:
        ex = Path(artifact) / "example_inputs.pt"
        if not ex.is_file():
            raise UsageError(f"{artifact} holds no example_inputs.pt", hint="pass --inputs FILE")
        args = tuple(torch.load(ex, weights_only=True))
    else:
        args = read_inputs(inputs, s.inputs)
    runs = []
    for _ in range(repeat):
        outputs, st = rt.run_with_stats(*args)
        runs.append(st)
    if out is not None:
        write_outputs(out, outputs)
    mismatch = None
    if check:
        exp = Path(artifact) / "expected_outputs.pt"
        if not exp.is_file():
            raise UsageError(f"{artifact} holds no expected_outputs.pt", hint="run without --check")
        mismatch = _check_outputs(outputs, torch.load(exp, weights_only=True))
    report_run(s, artifact, runs, outputs_file=out, check=check, mismatch=mismatch, stats=stats, json_out=json_out,
               engine="onnx")


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)
