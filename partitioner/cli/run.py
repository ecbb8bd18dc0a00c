"""``partitioner run DIR`` (a torch artifact or an ONNX export), and the helper that writes an artifact next to ``plan.json``.

Inputs and outputs are files (:mod:`partitioner.runtime.io`); without ``--inputs``,
``DIR/example_inputs.pt`` (written at emit time) is used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UsageError
from ..ir import jsonio
from ..runtime.io import parse_device_map, read_inputs, write_outputs
from .common import console, err_console, json_default, write_atomic
from .export import check_onnx_outputs, providers_from_map

__all__ = ["run", "run_onnx", "write_artifact", "replica_dirs"]


def run(
    artifact: Path = typer.Argument(..., help="Artifact directory (schedule.json + segments/)"),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs: .pt or .safetensors "
                                          "(default: DIR/example_inputs.pt)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the outputs (.pt or .safetensors)"),
    map_device: Optional[list[str]] = typer.Option(None, "--map", help="SPEC_DEVICE=TORCH_DEVICE, e.g. "
                                                   "gpu0=cuda:0 (repeatable; default: all on cpu)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads per CPU worker"),
    repeat: int = typer.Option(1, "--repeat", help="Number of runs (times are reported for the last)"),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds before a run is declared hung"),
    check: bool = typer.Option(False, "--check", help="Compare the outputs with DIR/expected_outputs.pt; "
                               "exit 1 if they differ"),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Write measured per-action times (JSON)"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary"),
    stream: int = typer.Option(0, "--stream", help="Pipeline N copies of the inputs through the plan (all "
                               "replicas of a data-parallel plan) and report measured vs predicted samples/s"),
    expect: Optional[str] = typer.Option(None, "--expect", help="Refuse to run unless the artifact's content "
                                         "hash (printed by compile) is HASH"),
    runtime: str = typer.Option("threads", "--runtime", help="threads: one worker thread per device; processes: "
                                "one process per device (CPU, inference); auto: measure both on a short stream "
                                "and keep the faster (with --stream)"),
    segments: str = typer.Option("eager", "--segments", help="eager: call the segments' modules; traced: run "
                                 "them as TorchScript traces, which compute without holding Python's interpreter "
                                 "lock (faster streams of models made of many small ops; inference only); auto: "
                                 "measure both on a short stream and keep the faster (with --stream)"),
):
    """Run an emitted plan on this machine (one worker thread per device of the spec)."""
    import torch

    from ..emit.artifact import load_artifact, outputs_mismatch
    from ..emit.outdir import check_out_file
    from ..runtime.local import MODES, LocalRuntime
    from ..runtime.traced import SEGMENT_MODES

    if repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {repeat}", hint="e.g. --repeat 10")
    check_out_file(out, "--out")  # before any work: a run is never lost to an unwritable path
    check_out_file(stats, "--stats")
    from ..emit.onnx import is_onnx_export

    if is_onnx_export(artifact):  # `partitioner export DIR --format onnx` output: run it with onnxruntime

        return run_onnx(artifact, inputs=inputs, out=out, map_device=map_device, threads=threads,
                        repeat=repeat, check=check, stats=stats, json_out=json_out, stream=stream, expect=expect)
    art = load_artifact(artifact, expect=expect)
    if inputs is None:
        if art.example_inputs is None:
            raise UsageError(f"{artifact} holds no example_inputs.pt", hint="pass --inputs FILE")
        args = art.example_inputs
    else:
        args = read_inputs(inputs, art.schedule.inputs)
    if stream < 0:
        raise UsageError(f"--stream must be >= 0, got {stream}", hint="e.g. --stream 32")
    for option, value, valid in (("--runtime", runtime, MODES), ("--segments", segments, SEGMENT_MODES)):
        if value not in (*valid, "auto") or (value == "auto" and not stream):
            raise UsageError(f"{option} must be {', '.join(valid)} or auto (auto with --stream), got {value!r}",
                             hint=f"e.g. --stream 60 {option} auto")
    if stream:
        return _run_stream(art, artifact, args, stream, (parse_device_map(map_device) or None), threads, timeout, check, out, stats,
                           json_out, runtime, segments)
    runs = []
    with torch.no_grad(), LocalRuntime(art, (parse_device_map(map_device) or None), threads=threads, timeout_s=timeout,
                                       mode=runtime, segments=segments) as rt:
        for _ in range(repeat):
            outputs, st = rt.run_with_stats(*args)
            runs.append(st)
    if out is not None:
        _write(out, "--out", lambda: write_outputs(out, outputs))
    mismatch = None
    if check:
        if art.expected_outputs is None:
            raise UsageError(f"{artifact} holds no expected_outputs.pt", hint="run without --check")
        mismatch = outputs_mismatch(outputs, art.expected_outputs)
    report_run(art.schedule, artifact, runs, outputs_file=out, check=check, mismatch=mismatch, stats=stats,
               json_out=json_out, content_hash=art.content_hash)


def report_run(s, artifact: Path, runs: list, *, outputs_file: Path | None, check: bool, mismatch: str | None,
               stats: Path | None, json_out: bool, engine: str = "", content_hash: str | None = None) -> None:
    """Report measured runs of schedule ``s`` (the last one's times; the fidelity summary over
    all): ``--stats`` JSON, ``--json`` or a table, then exit 1 if ``--check`` failed."""
    from ..measure.fidelity import fidelity_summary, fidelity_table, from_profile

    st = runs[-1]
    summary = {"artifact": str(artifact), "model": s.meta.get("model"), "spec": s.meta.get("spec"),
               "segments": len(s.segments), "transfers": len(s.transfers), "measured_s": st.wall_s,
               "predicted_latency_s": s.meta.get("predicted_latency_s"), "busy_s": st.busy_s(),
               "check": None if not check else (mismatch is None),
               "out": str(outputs_file) if outputs_file else None, "content_sha256": content_hash}
    if engine:
        summary["format"] = engine
    fid = fidelity_summary(s, runs)
    summary["fidelity_summary"] = fid
    if stats is not None:
        text = jsonio.dumps(dict(st.to_json(), fidelity=st.fidelity(s), summary=summary), indent=1,
                            default=json_default)
        _write(stats, "--stats", lambda: write_atomic(stats, text))
    if json_out:
        console.print_json(jsonio.dumps(summary, default=json_default))
    else:
        t = Table(title=f"{s.meta.get('model')} on {s.meta.get('spec')}" + (f" ({engine}runtime)" if engine else "")
                  + f": {len(s.segments)} segments, {len(s.transfers)} transfers")
        for col in ("device", "segments", "busy (measured)", "compute (predicted)"):
            t.add_column(col, justify="left" if col == "device" else "right")
        busy = st.busy_s()
        for d in s.devices:
            segs = [x for x in s.segments if x.device == d]
            if segs:
                t.add_row(d, str(len(segs)), _fmt(busy.get(d, 0.0)), _fmt(sum(x.predicted_compute_s for x in segs)))
        console.print(t)
        pl = s.meta.get("predicted_latency_s")
        if content_hash:
            console.print(f"artifact content sha256 {content_hash}", highlight=False)
        console.print(f"measured {_fmt(st.wall_s)} end to end (predicted latency "
                      f"{_fmt(pl) if pl is not None else 'n/a'})"
                      + (f"; wrote {outputs_file}" if outputs_file else ""))
        if from_profile(s):
            console.print(fidelity_table(s, summary=fid))
        if check and mismatch is None:
            console.print("outputs match expected_outputs.pt")
    if mismatch is not None:
        err_console.print(f"[bold red]error:[/] outputs differ from expected_outputs.pt: {mismatch}")
        raise typer.Exit(1)


def replica_dirs(artifact: Path) -> list[Path]:
    """The artifact directories of a data-parallel plan: ``DIR`` (replica 0) then
    ``DIR/replicas/r1``, ``r2``... (written by :func:`write_artifact`)."""
    extra = sorted((p for p in (artifact / "replicas").glob("r*") if p.name[1:].isdigit()),
                   key=lambda p: int(p.name[1:])) if (artifact / "replicas").is_dir() else []
    return [artifact, *extra]


def _run_stream(art, artifact: Path, args: tuple, n: int, mapping, threads, timeout, check, out, stats, json_out,
                runtime: str = "threads", segments: str = "eager"):
    """``--stream N``: pipeline N copies of ``args`` (over every replica) and report rates."""
    import torch

    from ..emit.artifact import load_artifact, outputs_mismatch
    from ..runtime.local import MODES, choose_mode, open_replicas
    from ..runtime.stream import stream_replicas
    from ..runtime.traced import SEGMENT_MODES

    arts = [art] + [load_artifact(p) for p in replica_dirs(artifact)[1:]]
    choice = {"mode": runtime, "segments": segments}
    if "auto" in (runtime, segments):
        rts, choice = choose_mode(arts, tuple(args), mapping, threads=threads, timeout_s=timeout,
                                  modes=MODES if runtime == "auto" else (runtime,),
                                  segments=SEGMENT_MODES if segments == "auto" else (segments,))
    else:
        rts = open_replicas(arts, mapping, threads=threads, timeout_s=timeout, mode=runtime, segments=segments)
    try:
        with torch.no_grad():
            outputs, st = stream_replicas(rts, [tuple(args)] * n)
    finally:
        for rt in rts:
            rt.close()
    if out is not None:
        _write(out, "--out", lambda: write_outputs(out, outputs[-1]))
    mismatch = None
    if check:
        if art.expected_outputs is None:
            raise UsageError(f"{artifact} holds no expected_outputs.pt", hint="run without --check")
        for k, o in enumerate(outputs):
            bad = outputs_mismatch(o, art.expected_outputs)
            if bad is not None:
                mismatch = f"sample {k}: {bad}"
                break
    s = art.schedule
    summary = {"artifact": str(artifact), "model": s.meta.get("model"), "spec": s.meta.get("spec"),
               "content_sha256": art.content_hash,
               "replicas": len(arts), "samples": n, "wall_s": st.wall_s, "samples_per_s": st.samples_per_s,
               "steady_samples_per_s": st.steady_samples_per_s,
               "predicted_samples_per_s": st.predicted_samples_per_s, "runtime": choice,
               "check": None if not check else (mismatch is None)}
    if stats is not None:
        text = jsonio.dumps(dict(st.to_json(), summary=summary), indent=1, default=json_default)
        _write(stats, "--stats", lambda: write_atomic(stats, text))
    if json_out:
        console.print_json(jsonio.dumps(summary, default=json_default))
    else:
        pred = st.predicted_samples_per_s
        trial = (f"; chosen by a {choice['trial_samples']}-sample trial: "
                 + ", ".join(f"{k} {v:.4g}/s" for k, v in choice["rates"].items()) if "trial_samples" in choice else "")
        console.print(f"{s.meta.get('model')} on {s.meta.get('spec')}: {n} samples through {len(arts)} "
                      f"replica(s) in {_fmt(st.wall_s)} ({choice['mode']} runtime, {choice['segments']} segments{trial}); artifact content sha256 "
                      f"{art.content_hash}", highlight=False)
        console.print(f"measured {st.samples_per_s:.4g} samples/s ({st.steady_samples_per_s:.4g} steady), "
                      + (f"predicted {pred:.4g} samples/s" if math.isfinite(pred) else "predicted n/a"))
        if check and mismatch is None:
            console.print("outputs match expected_outputs.pt")
    if mismatch is not None:
        err_console.print(f"[bold red]error:[/] outputs differ from expected_outputs.pt: {mismatch}")
        raise typer.Exit(1)


def write_artifact(result, directory: Path, *, segmentation: str = "faithful", display: str | None = None) -> str:
    """Emit ``result`` and save the artifact into ``directory`` (next to ``plan.json``),
    replicas of a data-parallel plan in ``directory/replicas/rK``, all sealed by one manifest.

    ``display`` is the directory name to show in the note (the final ``--out`` when
    ``directory`` is a temporary one). Returns a one-line note for the console (with the
    content hash); a result without a traced model (a cost-graph JSON) writes nothing and
    says so.
    """
    from ..emit.build import emit_replicas
    from ..emit.manifest import seal

    model = getattr(result, "model", None)
    if model is None or getattr(model, "gm", None) is None:
        return "no artifact: the model is a cost graph, there is no code to emit"
    if any(t.is_meta for t in (*model.gm.parameters(), *model.gm.buffers())):
        return "no artifact: the model is on the meta device (no weights to save); the plan is in plan.json"
    arts = emit_replicas(result, segmentation=segmentation)
    arts[0].save(directory)
    for k, a in enumerate(arts[1:], start=1):
        a.save(Path(directory) / "replicas" / f"r{k}")
    h = seal(directory) if len(arts) > 1 else arts[0].content_hash
    s = arts[0].schedule
    more = f"; {len(arts)} data-parallel replicas (DIR, DIR/replicas/r1...)" if len(arts) > 1 else ""
    return (f"artifact: schedule.json + {len(s.segments)} segments, {len(s.transfers)} transfers{more}; content "
            f"sha256 {h} (run it: partitioner run {display or directory} --expect {h})")


def _write(path: Path, option: str, write) -> None:
    """Run ``write()``; a failure to write ``path`` (checked up front, so rare: a full disk) is a clean error."""
    try:
        write()
    except OSError as err:
        raise UsageError(f"cannot write {option} {str(path)!r}: {err.strerror or err}",
                         hint=f"give {option} a writable path with free space") from None


def _fmt(x: float | None) -> str:
    from ..report.render import fmt_time

    return "n/a" if x is None or not math.isfinite(x) else fmt_time(x)


def run_onnx(artifact: Path, *, inputs: Optional[Path] = None, out: Optional[Path] = None,
             map_device: Optional[list[str]] = None, threads: Optional[int] = None, repeat: int = 1,
             check: bool = False, stats: Optional[Path] = None, json_out: bool = False, stream: int = 0,
             parallel: bool = False, expect: Optional[str] = None) -> None:
    """``partitioner run DIR`` for an ONNX export directory (same options and output as
    for a torch artifact; ``--map gpu0=cuda`` selects CUDAExecutionProvider)."""
    import torch

    from ..runtime.onnx_rt import OnnxRuntime

    if repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {repeat}", hint="e.g. --repeat 10")
    if stream:
        raise UsageError("--stream is not supported for ONNX exports", hint="run the torch artifact with --stream")
    from ..emit.artifact import read_expected_outputs
    from ..emit.outdir import check_out_file

    check_out_file(out, "--out")
    check_out_file(stats, "--stats")
    rt = OnnxRuntime(artifact, providers_from_map(map_device), threads, parallel=parallel, expect=expect)
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
        _write(out, "--out", lambda: write_outputs(out, outputs))
    mismatch = None
    if check:
        exp = Path(artifact) / "expected_outputs.pt"
        if not exp.is_file():
            raise UsageError(f"{artifact} holds no expected_outputs.pt", hint="run without --check")
        mismatch = check_onnx_outputs(outputs, read_expected_outputs(exp))
    report_run(s, artifact, runs, outputs_file=out, check=check, mismatch=mismatch, stats=stats, json_out=json_out,
               engine="onnx", content_hash=rt.content_hash)
