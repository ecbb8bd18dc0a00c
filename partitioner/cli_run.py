"""``partitioner run DIR`` and the helper that writes an artifact next to ``plan.json``.

Mounted in :mod:`partitioner.cli` by::

    from . import cli_run
    app.command("run")(_guard(cli_run.run))

and in ``compile``, inside its ``atomic_dir`` block::

    note = cli_run.write_artifact(res, tmp, display=str(out))


Input and output files
----------------------
``.pt``: ``torch.save`` of a tensor or a tuple/list of them (read with
``weights_only=True``). ``.safetensors``: tensors named after the schedule's inputs, or
``input_0``, ``input_1``... (outputs are written as ``output_0``...). Without
``--inputs``, ``DIR/example_inputs.pt`` (written at emit time) is used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UsageError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

__all__ = ["run", "write_artifact", "read_inputs", "write_outputs", "replica_dirs"]


def read_inputs(path: Path, input_names: tuple[str, ...] = ()) -> tuple:
    """Read call inputs from a ``.pt`` or ``.safetensors`` file (see the module docstring)."""
    import torch

    if not path.is_file():
        raise UsageError(f"inputs file {str(path)!r} does not exist", hint="pass --inputs FILE (.pt or .safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"{path}: not a readable safetensors file: {err}", hint="write it with "
                             "safetensors.torch.save_file") from None
        if input_names and set(input_names) <= set(data):
            return tuple(data[n] for n in input_names)
        keys = sorted(data, key=lambda k: (len(k), k))
        return tuple(data[k] for k in keys)
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read it as torch.save data with weights_only=True: "
                         f"{type(err).__name__}: {str(err).splitlines()[0]}",
                         hint="save a tensor or a tuple of tensors with torch.save") from None
    if isinstance(obj, (tuple, list)):
        return tuple(obj)
    return (obj,)


def write_outputs(path: Path, outputs: Any) -> None:
    """Write outputs to ``.pt`` (the structure as is) or ``.safetensors`` (flat tensors)."""
    import torch
    import torch.utils._pytree as pytree

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
        save_file({f"output_{k}": t.detach().cpu().contiguous() for k, t in enumerate(leaves)}, str(path))
    else:
        torch.save(outputs, path)


def _map(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k or not v:
            raise UsageError(f"--map {it!r} is not SPEC_DEVICE=TORCH_DEVICE", hint="e.g. --map gpu0=cuda:0")
        out[k] = v
    return out


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
    runtime: str = typer.Option("threads", "--runtime", help="threads: one worker thread per device; processes: "
                                "one process per device (CPU, inference); auto: measure both on a short stream "
                                "and keep the faster (with --stream)"),
):
    """Run an emitted plan on this machine (one worker thread per device of the spec)."""
    import torch

    from .artifact import outputs_mismatch
    from .emit import load_artifact
    from .runtime.local import LocalRuntime

    if repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {repeat}", hint="e.g. --repeat 10")
    from .export_onnx import is_onnx_export

    if is_onnx_export(artifact):  # `partitioner export DIR --format onnx` output: run it with onnxruntime
        from .cli_export import run_onnx

        return run_onnx(artifact, inputs=inputs, out=out, map_device=map_device, threads=threads,
                        repeat=repeat, check=check, stats=stats, json_out=json_out, stream=stream)
    art = load_artifact(artifact)
    if inputs is None:
        if art.example_inputs is None:
            raise UsageError(f"{artifact} holds no example_inputs.pt", hint="pass --inputs FILE")
        args = art.example_inputs
    else:
        args = read_inputs(inputs, art.schedule.inputs)
    if stream < 0:
        raise UsageError(f"--stream must be >= 0, got {stream}", hint="e.g. --stream 32")
    if runtime not in ("threads", "processes", "auto") or (runtime == "auto" and not stream):
        raise UsageError(f"--runtime must be threads, processes or auto (auto with --stream), got {runtime!r}",
                         hint="e.g. --stream 60 --runtime auto")
    if stream:
        return _run_stream(art, artifact, args, stream, _map(map_device), threads, timeout, check, out, stats,
                           json_out, runtime)
    runs = []
    with torch.no_grad(), LocalRuntime(art, _map(map_device), threads=threads, timeout_s=timeout,
                                       mode=runtime) as rt:
        for _ in range(repeat):
            outputs, st = rt.run_with_stats(*args)
            runs.append(st)
    if out is not None:
        write_outputs(out, outputs)
    mismatch = None
    if check:
        if art.expected_outputs is None:
            raise UsageError(f"{artifact} holds no expected_outputs.pt", hint="run without --check")
        mismatch = outputs_mismatch(outputs, art.expected_outputs)
    report_run(art.schedule, artifact, runs, outputs_file=out, check=check, mismatch=mismatch, stats=stats,
               json_out=json_out)


def report_run(s, artifact: Path, runs: list, *, outputs_file: Path | None, check: bool, mismatch: str | None,
               stats: Path | None, json_out: bool, engine: str = "") -> None:
    """Report measured runs of schedule ``s`` (the last one's times; the fidelity summary over
    all): ``--stats`` JSON, ``--json`` or a table, then exit 1 if ``--check`` failed."""
    from .fidelity import fidelity_summary, fidelity_table, from_profile

    st = runs[-1]
    summary = {"artifact": str(artifact), "model": s.meta.get("model"), "spec": s.meta.get("spec"),
               "segments": len(s.segments), "transfers": len(s.transfers), "measured_s": st.wall_s,
               "predicted_latency_s": s.meta.get("predicted_latency_s"), "busy_s": st.busy_s(),
               "check": None if not check else (mismatch is None),
               "out": str(outputs_file) if outputs_file else None}
    if engine:
        summary["format"] = engine
    fid = fidelity_summary(s, runs)
    summary["fidelity_summary"] = fid
    if stats is not None:
        stats.parent.mkdir(parents=True, exist_ok=True)
        stats.write_text(json.dumps(dict(st.to_json(), fidelity=st.fidelity(s), summary=summary), indent=1,
                                    default=_json_default))
    if json_out:
        console.print_json(json.dumps(summary, default=_json_default))
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
                runtime: str = "threads"):
    """``--stream N``: pipeline N copies of ``args`` (over every replica) and report rates."""
    import torch

    from .artifact import outputs_mismatch
    from .emit import load_artifact
    from .runtime.local import choose_mode, open_replicas, stream_replicas

    arts = [art] + [load_artifact(p) for p in replica_dirs(artifact)[1:]]
    choice = {"mode": runtime}
    if runtime == "auto":
        rts, choice = choose_mode(arts, tuple(args), mapping, threads=threads, timeout_s=timeout)
    else:
        rts = open_replicas(arts, mapping, threads=threads, timeout_s=timeout, mode=runtime)
    try:
        with torch.no_grad():
            outputs, st = stream_replicas(rts, [tuple(args)] * n)
    finally:
        for rt in rts:
            rt.close()
    if out is not None:
        write_outputs(out, outputs[-1])
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
               "replicas": len(arts), "samples": n, "wall_s": st.wall_s, "samples_per_s": st.samples_per_s,
               "steady_samples_per_s": st.steady_samples_per_s,
               "predicted_samples_per_s": st.predicted_samples_per_s, "runtime": choice,
               "check": None if not check else (mismatch is None)}
    if stats is not None:
        stats.parent.mkdir(parents=True, exist_ok=True)
        stats.write_text(json.dumps(dict(st.to_json(), summary=summary), indent=1, default=_json_default))
    if json_out:
        console.print_json(json.dumps(summary, default=_json_default))
    else:
        pred = st.predicted_samples_per_s
        trial = (f"; chosen by a {choice['trial_samples']}-sample trial: threads {choice['threads']:.4g}/s, "
                 f"processes {choice['processes']:.4g}/s" if "trial_samples" in choice else "")
        console.print(f"{s.meta.get('model')} on {s.meta.get('spec')}: {n} samples through {len(arts)} "
                      f"replica(s) in {_fmt(st.wall_s)} ({choice['mode']} runtime{trial})")
        console.print(f"measured {st.samples_per_s:.4g} samples/s ({st.steady_samples_per_s:.4g} steady), "
                      + (f"predicted {pred:.4g} samples/s" if math.isfinite(pred) else "predicted n/a"))
        if check and mismatch is None:
            console.print("outputs match expected_outputs.pt")
    if mismatch is not None:
        err_console.print(f"[bold red]error:[/] outputs differ from expected_outputs.pt: {mismatch}")
        raise typer.Exit(1)


def write_artifact(result, directory: Path, *, segmentation: str = "faithful", display: str | None = None) -> str:
    """Emit ``result`` and save the artifact into ``directory`` (next to ``plan.json``).

    ``display`` is the directory name to show in the note (the final ``--out`` when
    ``directory`` is a temporary one). Returns a one-line note for the console; a result
    without a traced model (a cost-graph JSON) writes nothing and says so.
    """
    from .emit import emit_replicas

    model = getattr(result, "model", None)
    if model is None or getattr(model, "gm", None) is None:
        return "no artifact: the model is a cost graph, there is no code to emit"
    if any(t.is_meta for t in (*model.gm.parameters(), *model.gm.buffers())):
        return "no artifact: the model is on the meta device (no weights to save); the plan is in plan.json"
    arts = emit_replicas(result, segmentation=segmentation)
    arts[0].save(directory)
    for k, a in enumerate(arts[1:], start=1):
        a.save(Path(directory) / "replicas" / f"r{k}")
    s = arts[0].schedule
    more = f"; {len(arts)} data-parallel replicas (DIR, DIR/replicas/r1...)" if len(arts) > 1 else ""
    return (f"artifact: schedule.json + {len(s.segments)} segments, {len(s.transfers)} transfers{more} "
            f"(run it: partitioner run {display or directory})")


def _fmt(x: float | None) -> str:
    from .report import fmt_time

    return "n/a" if x is None or not math.isfinite(x) else fmt_time(x)


def _json_default(o):
    from .cli import _json_default as default

    return default(o)
