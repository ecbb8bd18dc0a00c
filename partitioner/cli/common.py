"""What every command of the command line shares: the consoles, the error guard, option parsing, progress, JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console

from ..errors import PartitionerError, UsageError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one message, one line: let the terminal wrap
#: ``--debug`` (set by the app's callback): let tracebacks through
state = {"debug": False}


def fail(err: BaseException, code: int) -> None:
    msg = str(err)
    first, _, rest = msg.partition("\n")
    err_console.print(f"[bold red]error:[/] {first}", highlight=False, markup=True)
    if rest:
        err_console.print(rest, highlight=False, markup=False)
    raise typer.Exit(code)


def guard(fn):
    """Turn project errors into one message + exit 2; unexpected errors into exit 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (typer.Exit, typer.Abort):
            raise
        except PartitionerError as err:
            if state["debug"]:
                raise
            fail(err, 2)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130)
        except Exception as err:  # noqa: BLE001 - last line of defence: no bare traceback
            if state["debug"]:
                raise
            fail(RuntimeError(f"internal error: {type(err).__name__}: {err}\n"
                               "Hint: rerun with --debug for the traceback and please report it"), 1)

    return wrapper


def parse_kv(items: list[str] | None) -> dict:
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep:
            raise UsageError(f"--model-arg {it!r} is not key=value", hint="e.g. --model-arg nodes=200")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def progress_bar(disable: bool):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=disable)


def progress_sink(prog, task):
    """Render library progress events (partitioner.progress) on a rich progress task: the
    current step, and for solvers the incumbent and its gap to our bound."""
    from .. import progress
    from ..report.render import fmt_time

    state = {"step": "", "bound": None}

    def sink(kind, **data):
        if kind == "step":
            state["step"] = data["description"]
            prog.update(task, description=state["step"])
        elif kind == "bound":
            state["bound"] = data["value"]
        elif kind == "incumbent":
            v, b = data["value"], max(x for x in (state["bound"], data.get("bound"), 0.0) if x is not None)
            gap = f", gap {100 * (v - b) / v:.1f}%" if v > 0 else ""
            prog.update(task, description=f"{state['step']}: incumbent {fmt_time(v)}{gap}")

    return progress.listen(sink)


def json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
