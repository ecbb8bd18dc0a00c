"""Local launcher of :mod:`partitioner.runtime.distributed`: run an artifact directory as one
process per server of its plan on this machine (tests, the equivalence bench, a single
machine), with a watchdog that names the rank, its server and its error when one fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..ir.schedule import Schedule
from .distributed import ERROR_PREFIX, DistributedFailure, layout

__all__ = ["launch"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_error(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(ERROR_PREFIX):
            try:
                return json.loads(line[len(ERROR_PREFIX):])
            except json.JSONDecodeError:
                return line[len(ERROR_PREFIX):]
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def launch(artifact: str | Path, inputs: str | Path | None = None, *, nprocs: int | None = None,
           backend: str = "gloo", timeout_s: float = 120.0, grace_s: float = 3.0, startup_s: float = 60.0,
           threads: int = 1,
           env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> Any:
    """Run an artifact directory as ``nprocs`` local processes (one per server of the plan).

    Each process is ``python -m partitioner.runtime.distributed DIR ...`` with
    MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK set, and
    ``threads`` intra-op threads. Each rank bounds its rendezvous by ``startup_s`` and its
    run by ``timeout_s`` (from its own start, after joining the process group).
    A watchdog ends the run when a process exits non-zero (the others get ``grace_s`` to
    report their own error, then are killed) or when ``startup_s + timeout_s + grace_s``
    have passed (all killed).

    Returns
    -------
    The outputs of rank 0.

    Raises
    ------
    DistributedFailure
        With the error of every rank that reported one (rank, server, transfer).
    """
    root = Path(artifact)
    try:
        sched = Schedule.from_json(json.loads((root / "schedule.json").read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"cannot read {root / 'schedule.json'}: {err}",
                            hint="pass the directory written by emit/save") from None
    lay = layout(sched)
    k = nprocs or len(lay.hosts)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="partitioner-dist-") as tmp:
        out = Path(tmp) / "outputs.pt"
        procs, logs = [], []
        for r in range(k):
            e = dict(os.environ, **(env or {}), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                     WORLD_SIZE=str(k), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(k),
                     OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            cmd = [sys.executable, "-m", "partitioner.runtime.distributed", str(root), "--backend", backend,
                   "--timeout", str(timeout_s), "--init-timeout", str(startup_s), "--threads", str(threads),
                   *extra_args]
            if inputs is not None:
                cmd += ["--inputs", str(inputs)]
            if r == 0:
                cmd += ["--out", str(out)]
            logs.append(Path(tmp) / f"rank{r}.err")
            with open(logs[-1], "wb") as f:
                procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=f))
        deadline = time.monotonic() + startup_s + timeout_s + grace_s
        first_bad: int | None = None
        stop_at = deadline
        try:
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if bad and first_bad is None:
                    first_bad = bad[0]
                    stop_at = min(deadline, time.monotonic() + grace_s)
                if time.monotonic() > stop_at:
                    break
                time.sleep(0.05)
        finally:
            watchdog_killed = set()
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    watchdog_killed.add(r)
            for p in procs:
                p.wait()
        codes = [p.returncode for p in procs]
        if first_bad is None and all(c == 0 for c in codes) and out.is_file():
            return torch.load(out, weights_only=True)
        parts = []
        order = ([first_bad] if first_bad is not None else []) + [r for r in range(k) if r != first_bad]
        for r in order:
            host = lay.hosts[r] if r < len(lay.hosts) else "?"
            msg = _rank_error(logs[r])
            if codes[r] == 0:
                continue
            if r in watchdog_killed:
                state = "killed by the watchdog"
            elif codes[r] < 0:
                state = f"was killed by signal {signal.Signals(-codes[r]).name}"
            else:
                state = f"exited with code {codes[r]}"
            parts.append(f"rank {r} (host {host}) {state}" + (f": {msg}" if msg else ""))
        timed_out = first_bad is None
        head = (f"the distributed run did not finish within {startup_s + timeout_s:.0f} s" if timed_out
                else f"the distributed run failed (rank {first_bad} exited first)")
        raise DistributedFailure(head + "; " + "; ".join(parts),
                                 hint="a rank died or hangs: see its error above; raise timeout_s if it is slow")
