"""Artifact save and load time: ResNet-50 (and BERT-base) planned, emitted, saved and loaded.

For each model: compile with ``--solver`` (default ``heft``) on ``--hw``, emit, then time
``Artifact.save`` (with its self-check, as ``partitioner compile`` does; the first save
and the median of ``--rounds`` more, since the first pays one-time costs such as the
first forward pass) and ``load_artifact`` in a fresh interpreter (median of ``--rounds``
loads, torch already imported, so only the artifact's own reading and rebuilding is timed). Writes
``bench/results/artifact_io.json`` and ``.md`` (``--tag`` names the row, e.g. ``before``)
with the 1-minute load average before and after: the machine is shared, so say it.

Usage::

    python bench/artifact_io.py --tag after
    python bench/artifact_io.py --models resnet50 --rounds 5 --tag before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from partitioner import api  # noqa: E402
from partitioner.emit.build import emit  # noqa: E402

_CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
from partitioner.emit.artifact import load_artifact
t = time.perf_counter()
art = load_artifact({path!r})
print(time.perf_counter() - t)
"""


def measure(model: str, hw: str, solver: str, rounds: int) -> dict:
    res = api.compile_plan(model, hw, "latency", solver)
    art = emit(res)
    with tempfile.TemporaryDirectory() as tmp:
        saves = []
        for k in range(rounds + 1):
            path = Path(tmp) / f"art{k}"
            t = time.perf_counter()
            art.save(path)
            saves.append(time.perf_counter() - t)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        loads = []
        for _ in range(rounds):
            r = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT), path=str(path))],
                               capture_output=True, text=True, check=True, cwd=tmp)
            loads.append(float(r.stdout.strip().splitlines()[-1]))
    return {"model": model, "hw": hw, "solver": solver, "segments": len(art.schedule.segments),
            "bytes": size, "first_save_s": saves[0], "save_s": statistics.median(saves[1:]), "save_s_all": saves,
            "load_s": statistics.median(loads), "load_s_all": loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "bert"])
    ap.add_argument("--hw", default="server-cpu-2gpu")
    ap.add_argument("--solver", default="heft")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="current")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "artifact_io")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = [dict(measure(m, a.hw, a.solver, a.rounds), tag=a.tag) for m in a.models]
    load1 = os.getloadavg()[0]
    jf = a.out.with_suffix(".json")
    data = json.loads(jf.read_text()) if jf.is_file() else {"runs": []}
    data["runs"] = [r for r in data["runs"] if r["tag"] != a.tag]
    data["runs"].append({"tag": a.tag, "load_before": load0, "load_after": load1, "rows": rows})
    jf.parent.mkdir(parents=True, exist_ok=True)
    jf.write_text(json.dumps(data, indent=1))
    lines = ["| tag | model | segments | MB | first save (s) | save (s) | load (s) | load avg before/after |",
             "|---|---|---|---|---|---|---|---|"]
    for run in data["runs"]:
        for r in run["rows"]:
            lines.append(f"| {run['tag']} | {r['model']} | {r['segments']} | {r['bytes'] / 1e6:.1f} | "
                         f"{r['first_save_s']:.2f} | {r['save_s']:.2f} | {r['load_s']:.3f} | "
                         f"{run['load_before']:.2f} / {run['load_after']:.2f} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
