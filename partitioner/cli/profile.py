"""Command-line functions for ``partitioner profile`` and ``partitioner calibrate``.

They are plain typer-annotated functions that :mod:`partitioner.cli.main` registers;
``compile --profile FILE [--profile-map SPEC_DEVICE=PROFILED_DEVICE]`` passes the profile
to :func:`partitioner.api.compile_plan`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UsageError
from ..runtime.io import parse_device_map
from .common import console, parse_kv, progress_bar, progress_sink


def profile(
    model: str = typer.Argument(..., help="Zoo name or path/to/file.py:factory"),
    devices: str = typer.Option("cpu", "--devices", help="Comma-separated: cpu, cpu:Nt (N threads), cuda, cuda:K"),
    out: Path = typer.Option(Path("profile.json"), "--out", help="Profile file; an existing one is reused as cache"),
    repeats: int = typer.Option(10, "--repeats", help="Timed samples per op (the median is kept)"),
    warmup: int = typer.Option(2, "--warmup", help="Untimed calls before sampling"),
    min_sample_s: float = typer.Option(2e-4, "--min-sample-s", help="Isolated mode: repeat fast ops until a sample "
                                       "lasts this long"),
    mode: str = typer.Option("context", "--mode", help="context: time nodes inside whole-model passes (as they run); "
                             "isolated: each node alone"),
    transfers: bool = typer.Option(True, "--transfers/--no-transfers", help="Measure transfers between devices"),
    corun: bool = typer.Option(True, "--corun/--no-corun", help="Measure how much logical CPUs slow each other down "
                               "when they compute at the same time (context mode)"),
    handoff: bool = typer.Option(True, "--handoff/--no-handoff", help="Measure what a hand-off between two logical "
                                 "CPUs costs on the model's own segments, run by the local runtime (context mode)"),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore the existing --out file (no cache)"),
    frontend: str = typer.Option("fx", help="Tracing frontend: fx | export"),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help="Zoo factory argument key=value"),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors"),
):
    """Time every operator of MODEL on each local device and write (or extend) a profile file."""
    from ..measure.devices import parse_devices
    from ..measure.handoff import add_alternation
    from ..measure.links import add_corun, add_transfers
    from ..measure.profile import load_profile, profile_model

    devs = parse_devices(devices)
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory", hint="give a file path, e.g. --out profile.json")
    cache = None if fresh or not out.exists() else load_profile(out)

    with progress_bar(quiet or json_out) as prog:
        task = prog.add_task(f"profiling {model} on {devices}", total=None)
        with progress_sink(prog, task):
            prof, loaded = profile_model(model, devs, model_kwargs=parse_kv(model_arg), frontend=frontend,
                                         warmup=warmup, repeats=repeats, min_sample_s=min_sample_s, cache=cache,
                                         mode=mode)
            if transfers and devs:
                prog.update(task, description="measuring transfers between devices")
                add_transfers(prof, devs)
            if corun and mode == "context" and any(d.kind == "cpu" for d in devs):
                prog.update(task, description="measuring logical CPUs computing at the same time")
                add_corun(prof, loaded.gm, loaded.example_inputs, devs, name=loaded.graph.name,
                          rounds=max(3, repeats // 2))
            if handoff and transfers and mode == "context" and any(d.kind == "cpu" for d in devs):
                prog.update(task, description="measuring hand-offs between logical CPUs on the model's segments")
                add_alternation(prof, loaded, devs)
    prof.save(out)
    run = prof.runs[-1]
    keys = prof.graphs[loaded.graph.name]["nodes"]
    totals = {d.id: sum(prof.time(k, d.model) or 0.0 for k in keys.values()) for d in devs}
    whole = prof.graphs[loaded.graph.name].get("whole", {})
    corun_recs = prof.graphs[loaded.graph.name].get("corun", [])
    alt_recs = prof.graphs[loaded.graph.name].get("alternation", [])
    summary = {"model": loaded.graph.name, "out": str(out), "nodes": run["nodes"], "unique_ops": run["unique_ops"],
               "timed": run["timed"], "cached": run["cached"], "wall_s": run["wall_s"],
               "load_before": run["load_before"], "load_after": run["load_after"],
               "sum_of_node_times_s": totals,
               "whole_pass_s": {d.id: whole[d.model]["whole_s"] for d in devs if d.model in whole},
               "node_overhead_s": {d.id: whole[d.model]["node_overhead_s"] for d in devs if d.model in whole},
               "corun_slowdown": [{"a": r["a"], "b": r["b"], "slowdown_a": r["slowdown"]["a"],
                                   "slowdown_b": r["slowdown"]["b"]} for r in corun_recs],
               "handoff_excess_per_transfer_s": {r["device"]: r["excess_per_transfer_s"] for r in alt_recs},
               "transfers": [{k: t[k] for k in ("src", "dst", "mode", "latency_s") if k in t}
                             for t in prof.transfers]}
    if json_out:
        console.print_json(json.dumps(summary))
        return
    if quiet:
        return
    from ..report.render import fmt_time

    t = Table(title=f"profile of {loaded.graph.name}: {run['nodes']} nodes, {run['unique_ops']} distinct ops")
    for col in ("device", "model", "sum of node times", "whole pass (as run)", "per-node overhead"):
        t.add_column(col, justify="left" if col in ("device", "model") else "right")
    for d in devs:
        w = whole.get(d.model)
        t.add_row(d.id, d.model, fmt_time(totals[d.id]), fmt_time(w["whole_s"]) if w else "-",
                  f"{1e6 * w['node_overhead_s']:+.2f} us" if w else "-")
    console.print(t)
    for r in corun_recs:
        console.print(f"computing at the same time, {r['a']} and {r['b']} run {r['slowdown']['a']:.2f}x and "
                      f"{r['slowdown']['b']:.2f}x slower than alone")
    for r in alt_recs:
        console.print(f"a hand-off between two {r['device']} devices costs {1e6 * r['excess_per_transfer_s']:.0f} us "
                      f"more than the wake-up probe's {1e6 * r['link_latency_s']:.0f} us (the model in "
                      f"{r['chunks']} alternating chunks: {1e3 * r['alternating_s']:.2f} ms measured, "
                      f"{1e3 * r['predicted_alternating_s']:.2f} ms predicted)")
    console.print(f"timed {run['timed']} (op, device) pairs, {run['cached']} from the cache, in {run['wall_s']:.1f} s "
                  f"(load {run['load_before'][0]:.2f} -> {run['load_after'][0]:.2f} on {os.cpu_count()} cores); "
                  f"wrote {out}")


def calibrate(
    profile_file: Path = typer.Argument(..., metavar="PROFILE", help="A profile written by `partitioner profile`"),
    hw: str = typer.Option(..., "--hw", help="Spec name or YAML path to calibrate"),
    out: Path = typer.Option(..., "--out", help="Where to write the calibrated spec YAML"),
    device_map: Optional[list[str]] = typer.Option(None, "--map", help="SPEC_DEVICE=PROFILED_DEVICE, e.g. cpu0=cpu:1t"),
    no_overhead: bool = typer.Option(False, "--no-overhead", help="Keep the spec's launch overhead"),
    copy_same_device: bool = typer.Option(False, "--copy-same-device",
                                          help="Links between logical devices copy values (default: by reference)"),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file"),
    json_out: bool = typer.Option(False, "--json", help="Print the fits as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors"),
):
    """Fit a spec's roofline efficiencies (and launch overheads, links) to a profile; write SPEC.yaml."""
    from ..ir.spec import load_spec
    from ..measure import calibrate as cal_mod
    from ..measure.profile import load_profile

    if out.exists() and not force:
        raise UsageError(f"{out} exists", hint="pass --force to replace it, or choose another --out")
    spec = load_spec(hw)
    prof = load_profile(profile_file)
    cal = cal_mod.calibrate(spec, prof, device_map=parse_device_map(device_map, value="PROFILED_DEVICE", example="cpu0=cpu:1t"), fit_overhead=not no_overhead,
                            copy_same_device=copy_same_device)
    cal_mod.write_spec_yaml(cal, out, profile_path=str(profile_file))
    if json_out:
        console.print_json(json.dumps(dict(cal.to_json(), out=str(out))))
        return
    if quiet:
        return
    t = Table(title=f"calibration of {spec.name} from {profile_file}")
    for col in ("device", "from", "f_compute", "f_memory", "launch", "median err", "p90 err", "sum err"):
        t.add_column(col, justify="left" if col in ("device", "from") else "right")

    def pct(before, after, attr):
        return f"{100 * getattr(before, attr):.0f}% -> {100 * getattr(after, attr):.0f}%" if after else "-"

    for d, f in cal.fits.items():
        t.add_row(d, f.source, f"{f.factor_compute:.3g}", f"{f.factor_memory:.3g}", f"{f.launch_overhead_s:.2e} s",
                  pct(f.before, f.after, "median"), pct(f.before, f.after, "p90"), pct(f.before, f.after, "total"))
    console.print(t)
    for k, v in cal.links.items():
        console.print(f"link {k}: latency {v['latency_s']:.3g} s, bandwidth {v['bandwidth_Bps']:.3g} B/s (measured)")
    console.print(f"wrote {out}")
