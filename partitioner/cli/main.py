"""The ``partitioner`` command line (typer + rich).

Every command reports bad input as one clear message and exits with code 2; it never
shows a bare traceback (``--debug`` shows it). Output directories are written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UsageError
from ..runtime.io import parse_device_map
from . import export as cli_export
from . import profile as cli_profile
from . import run as cli_run
from .common import (
    console,
    err_console,
    guard,
    json_default,
    parse_kv,
    progress_bar,
    progress_sink,
    state,
    write_atomic,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Place and order every operator of a DNN across heterogeneous devices.")
specs_app = typer.Typer(help="List the shipped hardware specs, or show one.", invoke_without_command=True)
app.add_typer(specs_app, name="specs")
@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress.")):
    state["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def _profile_kw(profile: Optional[Path], profile_map: Optional[list[str]]) -> dict:
    """``profile=`` / ``device_map=`` for api.compile_plan / api.compare from --profile / --profile-map."""
    if profile is None:
        if profile_map:
            raise UsageError("--profile-map needs --profile", hint="pass --profile FILE (from `partitioner profile`)")
        return {}
    return {"profile": profile, "device_map": parse_device_map(profile_map, "--profile-map", "PROFILED_DEVICE", "cpu0=cpu:1t") or None}


def _settings(seed, time_limit, threads, backend):
    from ..ir.settings import Settings

    if time_limit is not None and not time_limit > 0:
        raise UsageError(f"--time-limit must be > 0 seconds, got {time_limit}", hint="pass e.g. --time-limit 60")
    if backend not in ("highs", "cbc"):
        raise UsageError(f"--backend must be highs or cbc, got {backend!r}", hint="use --backend highs")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}", hint="e.g. --threads 2")
    return Settings(seed=seed, time_limit=time_limit, threads=threads, milp_backend=backend)


def _objective(objective: str) -> str:
    if objective not in ("latency", "throughput"):
        raise UsageError(f"--objective must be latency or throughput, got {objective!r}",
                         hint="use --objective latency or --objective throughput")
    return objective


def _summary_table(res) -> Table:
    from ..report.render import fmt_bytes, fmt_time

    s = res.summary()
    t = Table(title=f"{s['model']} on {s['spec']} ({s['objective']}, solver {s['solver']}: {s['status']})")
    for col in ("device", "nodes", "busy", "params", "memory peak", "usable"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for d, info in s["devices"].items():
        t.add_row(d, str(info["nodes"]), fmt_time(info["load_s"]), fmt_bytes(info["param_bytes"]),
                  fmt_bytes(info["memory_peak_bytes"]), fmt_bytes(info["capacity_bytes"]))
    return t


@app.command()
@guard
def compile(
    model: str = typer.Argument(..., help="Zoo name, path/to/file.py:factory, a cost-graph .json or an .onnx file"),
    hw: str = typer.Option("server-cpu-2gpu", "--hw", help="Spec name or YAML path"),
    objective: str = typer.Option("latency", help="latency | throughput"),
    solver: str = typer.Option("heft", help="Solver name (see `partitioner solvers`)"),
    out: Path = typer.Option(Path("out/plan"), "--out", help="Output directory"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory"),
    seed: int = typer.Option(0, help="Random seed"),
    time_limit: Optional[float] = typer.Option(60.0, "--time-limit", help="Solver time limit (s)"),
    threads: int = typer.Option(1, help="Solver threads"),
    backend: str = typer.Option("highs", help="MILP backend: highs | cbc"),
    frontend: str = typer.Option("fx", help="Tracing frontend: fx | export"),
    throughput_floor: Optional[float] = typer.Option(None, help="Latency objective: minimum samples/s"),
    latency_ceiling: Optional[float] = typer.Option(None, help="Throughput objective: maximum latency (s)"),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help="Zoo factory argument key=value"),
    coarsen: Optional[int] = typer.Option(None, "--coarsen", help="Solve on the graph coarsened to N nodes"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Measured costs: a file from `partitioner profile`"),
    profile_map: Optional[list[str]] = typer.Option(None, "--profile-map",
                                                    help="SPEC_DEVICE=PROFILED_DEVICE, e.g. cpu0=cpu:1t (repeatable)"),
    no_gantt: bool = typer.Option(False, "--no-gantt", help="Skip DIR/gantt.png"),
    no_emit: bool = typer.Option(False, "--no-emit", help="Skip the runnable artifact (schedule.json, segments)"),
    json_out: bool = typer.Option(False, "--json", help="Print the plan summary as JSON"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors"),
):
    """Compile MODEL for a hardware spec: trace, solve, grade, and write DIR/plan.json + report.md."""
    from .. import api
    from ..emit.outdir import atomic_dir, check_out_dir
    from ..ir.plan import Constraints
    from ..report import render as report

    check_out_dir(out, force)
    settings = _settings(seed, time_limit, threads, backend)
    cons = Constraints(throughput_floor=throughput_floor, latency_ceiling=latency_ceiling)
    with progress_bar(quiet or json_out) as prog:
        task = prog.add_task(f"compiling {model} for {hw}", total=None)
        with progress_sink(prog, task):
            res = api.compile_plan(model, hw, _objective(objective), solver, settings, cons, frontend=frontend,
                                   model_kwargs=parse_kv(model_arg), coarsen_to=coarsen,
                                   **_profile_kw(profile, profile_map))
    with atomic_dir(out, force) as tmp:
        (tmp / "plan.json").write_text(json.dumps(res.to_json(), indent=1))
        emit_note = None if no_emit else cli_run.write_artifact(res, tmp, display=str(out))
        (tmp / "report.md").write_text(report.markdown(res))
        res.problem.graph.save(tmp / "costgraph.json")
        (tmp / "trace.json").write_text(json.dumps(report.chrome_trace(res)))
        if not no_gantt:
            report.gantt_png(res, tmp / "gantt.png")
    s = res.summary()
    if res.plan.info.get("interrupted"):
        err_console.print(f"[yellow]interrupted:[/] solver {res.plan.info['interrupted']} was stopped; "
                          f"{out} holds {res.plan.info.get('interrupted_plan', 'the HEFT plan it started from')}, gap {100 * res.gap:.2f}%")
    if json_out:
        console.print_json(json.dumps(dict(s, out=str(out))))
        return
    if quiet:
        return
    console.print(_summary_table(res))
    from ..report.render import fmt_time

    ratio = s["value_s"] / s["bound_s"] if s["bound_s"] > 0 else math.inf
    console.print(f"predicted latency [bold]{fmt_time(s['latency_s'])}[/], throughput "
                  f"[bold]{s['throughput_per_s']:.2f}[/] samples/s; lower bound on {s['objective']} "
                  f"{fmt_time(s['bound_s'])} ({s['bound_binding']}); gap [bold]{100 * s['gap']:.2f}%[/] "
                  f"(value/bound {ratio:.3f}); status {s['status']}; solved in {s['solve_time_s']:.3f} s")
    console.print(f"wrote {out}/plan.json, report.md, costgraph.json, trace.json (Perfetto)"
                  + ("" if no_gantt else ", gantt.png"))
    if emit_note:
        console.print(emit_note)


@app.command()
@guard
def evaluate(
    graph: str = typer.Argument(..., help="Cost-graph .json, zoo name or file.py:factory"),
    hw: str = typer.Option("server-cpu-2gpu", "--hw", help="Spec name or YAML path"),
    placement: Path = typer.Option(..., "--placement", help="plan.json, or a JSON {node: device} mapping"),
    objective: str = typer.Option("latency", help="latency | throughput"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON"),
):
    """Grade a given placement (and order, if the file has one) with the evaluator."""
    from .. import api
    from ..ir.spec import load_spec
    from ..machine.problem import Problem

    if not placement.is_file():
        raise UsageError(f"placement file {str(placement)!r} does not exist", hint="check the path")
    try:
        data = json.loads(placement.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{placement}: not valid JSON: {err}", hint="fix the JSON") from None
    if not isinstance(data, dict):
        raise UsageError(f"{placement}: expected a JSON object", hint="a {node: device} mapping or a plan.json")
    pl = data.get("placement", data)
    order = data.get("order") if "placement" in data else None
    loaded = api.load_model(graph)
    problem = Problem(loaded.graph, load_spec(hw), _objective(objective))
    plan = problem.plan_from_names(pl, order, solver="given", status="given")
    res = api.grade(problem, plan)
    s = res.summary()
    if json_out:
        console.print_json(json.dumps(s))
    else:
        console.print(_summary_table(res))
        from ..report.render import fmt_time

        console.print(f"latency {fmt_time(s['latency_s'])}, period {fmt_time(s['period_s'])}, bound "
                      f"{fmt_time(s['bound_s'])}, gap {100 * s['gap']:.2f}%, feasible: {s['feasible']}")
        for v in s["violations"]:
            console.print(f"[red]violation:[/] {v}")
    if not s["feasible"]:
        raise typer.Exit(1)


@app.command()
@guard
def compare(
    model: str = typer.Argument(..., help="Zoo name, path/to/file.py:factory, a cost-graph .json or an .onnx file"),
    hw: str = typer.Option("server-cpu-2gpu", "--hw", help="Spec name or YAML path"),
    objective: str = typer.Option("latency", help="latency | throughput"),
    solvers: Optional[str] = typer.Option(None, "--solvers",
                                          help="Comma-separated solver names (default: all that fit the size)"),
    time_limit: float = typer.Option(60.0, "--time-limit", help="Time limit per solver (s)"),
    seed: int = typer.Option(0, help="Random seed"),
    threads: int = typer.Option(1, help="Solver threads"),
    backend: str = typer.Option("highs", help="Backend of the `milp` solver: highs | cbc"),
    coarsen: Optional[int] = typer.Option(None, "--coarsen", help="Solve on the graph coarsened to N nodes"),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", help="Zoo factory argument key=value"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Measured costs: a file from `partitioner profile`"),
    profile_map: Optional[list[str]] = typer.Option(None, "--profile-map",
                                                    help="SPEC_DEVICE=PROFILED_DEVICE, e.g. cpu0=cpu:1t (repeatable)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON to this file"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a value/bound bar chart (PNG)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors"),
):
    """Run several solvers on one problem: value, value/bound, status, gap and time of each."""
    from .. import api
    from ..report.render import fmt_time

    settings = _settings(seed, time_limit, threads, backend)
    names = [x.strip() for x in solvers.split(",") if x.strip()] if solvers else None
    if solvers is not None and not names:
        raise UsageError("--solvers is empty", hint="e.g. --solvers split,heft,milp")
    for path, what in ((json_file, "--json"), (plot, "--plot")):
        if path is not None and (path.is_dir() or not path.parent.exists() and str(path.parent) != ""):
            raise UsageError(f"{what} {str(path)!r}: not a writable file path",
                             hint="name a file in an existing directory")
    with progress_bar(quiet) as prog:
        task = prog.add_task("loading", total=None)
        with progress_sink(prog, task):
            loaded = api.load_model(model, model_kwargs=parse_kv(model_arg))

        def progress(name, row):
            if row is not None and not quiet:
                v = row.get("value_s")
                prog.console.print(f"  {name}: {row['status']}" + (f", {fmt_time(v)}" if v is not None else ""))

        with progress_sink(prog, task):
            out = api.compare(loaded, hw, _objective(objective), names, settings, on_solver=progress,
                              coarsen_to=coarsen, **_profile_kw(profile, profile_map))
    if json_file is not None:
        write_atomic(json_file, json.dumps(out, indent=1, default=json_default))
    if plot is not None:
        _compare_plot(out, plot)
    if quiet:
        return
    size = f"{out['nodes']} nodes" + (f", solved coarsened to {out['coarse_nodes']}" if out["coarse_nodes"] else "")
    t = Table(title=f"{out['model']} on {out['spec']} ({out['objective']}, {size}); "
                    f"lower bound {fmt_time(out['bound_s'])} ({out['bound_binding']})")
    for c in ("solver", "value", "value/bound", "status", "gap", "time"):
        t.add_column(c, justify="left" if c in ("solver", "status") else "right")
    for r in out["rows"]:
        if "value_s" in r:
            t.add_row(r["solver"], fmt_time(r["value_s"]), f"{r['value_over_bound']:.3f}", r["status"],
                      f"{100 * r['gap']:.2f}%", f"{r['solve_time_s']:.2f} s")
        else:
            t.add_row(r["solver"], "-", "-", r["status"], "-", "-")
    console.print(t)
    for r in out["rows"]:
        if "error" in r:
            console.print(f"[yellow]{r['solver']}:[/] {r['error']}")
    if json_file is not None:
        console.print(f"wrote {json_file}")
    if plot is not None:
        console.print(f"wrote {plot}")


def _compare_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["rows"] if "value_over_bound" in r]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 1.5), 3.2))
    ax.bar([r["solver"] for r in rows], [r["value_over_bound"] for r in rows], color="#4c72b0")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("value / lower bound")
    ax.set_title(f"{out['model']} on {out['spec']} ({out['objective']})", fontsize=9)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


@specs_app.callback()
@guard
def specs(ctx: typer.Context):
    """List the shipped hardware specs."""
    if ctx.invoked_subcommand:
        return
    from ..ir.spec import list_specs, load_spec

    t = Table(title="hardware specs")
    for c in ("name", "devices", "hosts", "description"):
        t.add_column(c)
    for name in list_specs():
        s = load_spec(name)
        t.add_row(name, ", ".join(f"{d.id} ({d.model or d.kind})" for d in s.devices),
                  str(len({d.host for d in s.devices})), s.description)
    console.print(t)


@specs_app.command("show")
@guard
def specs_show(name: str = typer.Argument(..., help="Spec name or YAML path")):
    """Print one spec: its devices, links and the pairwise transfer table."""
    from ..ir.spec import load_spec, spec_path
    from ..machine.links import link_table
    from ..report.render import fmt_bytes

    spec = load_spec(name)
    console.print(f"[bold]{spec.name}[/]  ({spec_path(name)})\n{spec.description}")
    console.print(f"host device: {spec.host}; comm_blocks_device: {spec.comm_blocks_device}; "
                  f"memory_reserve: {spec.memory_reserve}")
    t = Table(title="devices")
    for c in ("id", "host", "kind", "model", "fp32 peak", "memory", "mem bw", "unsupported ops"):
        t.add_column(c)
    for d in spec.devices:
        peak = d.peak("fp32")
        bw = d.memory.bandwidth_Bps
        t.add_row(d.id, d.host, d.kind, d.model, f"{peak / 1e12:.2f} TFLOP/s" if peak else "-",
                  fmt_bytes(d.memory.capacity_bytes), f"{bw / 1e9:.1f} GB/s" if bw else "-",
                  ", ".join(d.unsupported_ops) or "-")
    console.print(t)
    lt = Table(title="transfer time of 1 MB (routed)")
    lt.add_column("from \\ to")
    for d in spec.device_ids:
        lt.add_column(d, justify="right")
    for a in spec.device_ids:
        lt.add_row(a, *[f"{link_table(spec).transfer_time(a, b, 1e6) * 1e6:.1f} us" for b in spec.device_ids])
    console.print(lt)


@app.command()
@guard
def models():
    """List the model zoo."""
    import partitioner.zoo as zoo

    t = Table(title="model zoo")
    t.add_column("name")
    t.add_column("description")
    for name, desc in zoo.list_models():
        t.add_row(name, desc)
    console.print(t)


@app.command()
@guard
def solvers():
    """List the registered solvers."""
    from ..solvers.registry import SOLVERS

    t = Table(title="solvers")
    t.add_column("name")
    t.add_column("exact")
    t.add_column("description")
    for name, info in sorted(SOLVERS.items()):
        t.add_row(name, "yes" if info.exact else "no", info.description)
    console.print(t)


app.command("run")(guard(cli_run.run))
app.command("export")(guard(cli_export.export))
app.command("profile")(guard(cli_profile.profile))
app.command("calibrate")(guard(cli_profile.calibrate))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
