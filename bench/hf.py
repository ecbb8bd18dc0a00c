"""Hugging Face transformers models, unchanged, through every entry point (issue 20).

Nine models built from their transformers configs (``examples/hf_models.py``: BERT-base,
DistilBERT, GPT-2, T5-small, BART-base, ViT-base, a small Llama, a small Mistral,
Whisper-tiny; random weights, batch 2, sequence 64), each with the defaults (frontend auto)
through four paths:

* ``cli``: ``partitioner compile examples/hf_models.py:NAME_base --solver S`` then
  ``partitioner run DIR --check`` (a saved, reloaded artifact; run in this process with
  typer's runner, the same code as the console script);
* ``api``: :func:`partitioner.api.compile_plan` + :func:`partitioner.emit.build.emit`, run by
  the local runtime with the keyword inputs;
* ``dropin``: ``partitioner.compile(model, inputs)`` called as ``fast(**inputs)``;
* ``torch.compile``: ``torch.compile(model, backend=...)`` with the partitioner backend
  (a wrapper that records each planned graph, then returns what
  :func:`partitioner.dropin.dynamo_backend` returns).

Each path's outputs are compared with the model's own (``use_cache`` off, as the plan
runs; for torch.compile the cache is on, as the user's call had it, and ``past_key_values``
is left out of the comparison): same output class, every tensor ``allclose`` (rtol 1e-4,
atol 1e-4). Recorded per model and path: the graph's node count, the frontend used, the
plan (solver, predicted latency, lower bound, gap, solve time), the check, the wall time.

Usage::

    python bench/hf.py                       # all nine, base sizes, solver split
    python bench/hf.py --size tiny --models bert gpt2
    python bench/hf.py --paths api cli

Writes ``bench/results/hf.json`` and ``bench/results/hf.md`` (``--out-prefix`` changes the
names), with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hf_models  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from partitioner import api, dropin  # noqa: E402
from partitioner.cli.main import app  # noqa: E402
from partitioner.emit.build import emit  # noqa: E402
from partitioner.frontend.capture import no_cache  # noqa: E402
from partitioner.ir.settings import Settings  # noqa: E402
from partitioner.runtime.local import LocalRuntime  # noqa: E402

log = logging.getLogger("bench.hf")
PATHS = ("cli", "api", "dropin", "torch.compile")
HW = "server-cpu-2gpu"
TOL = dict(rtol=1e-4, atol=1e-4)


def check(out, ref, skip=("past_key_values",)) -> tuple[bool, str]:
    """(ok, why): same class, same fields, allclose."""
    if type(out) is not type(ref):
        return False, f"type {type(out).__name__} != {type(ref).__name__}"
    keys = [k for k in ref.keys() if k not in skip]
    if [k for k in out.keys() if k not in skip] != keys:
        return False, f"fields {list(out.keys())} != {list(ref.keys())}"
    worst = 0.0
    for k in keys:
        a, b = getattr(out, k), getattr(ref, k)
        if not torch.allclose(a, b, **TOL):
            return False, f"{k}: max abs diff {float((a - b).abs().max()):.3g}"
        worst = max(worst, float((a - b).abs().max()))
    return True, f"max abs diff {worst:.2g}"


def plan_row(res) -> dict[str, Any]:
    s = res.summary()
    return {"nodes": s["nodes"], "solver": s["solver"], "status": s["status"], "predicted_latency_s": s["latency_s"],
            "bound_s": s["bound_s"], "gap": s["gap"], "solve_time_s": s["solve_time_s"]}


def run_api(name, model, inputs, ref, o):
    res = api.compile_plan(model, HW, solver=o.solver, settings=Settings(time_limit=o.time_limit),
                           example_inputs=inputs)
    art = emit(res)
    with LocalRuntime(art) as rt, torch.no_grad():
        out = rt.run(**inputs)
    ok, why = check(out, ref)
    return dict(plan_row(res), frontend=art.schedule.meta["frontend"], segments=len(art.schedule.segments),
                ok=ok, check=why)


def run_cli(name, model, inputs, ref, o):
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "plan"
        r = runner.invoke(app, ["compile", f"{ROOT / 'examples' / 'hf_models.py'}:{name}_{o.size}" if o.size != "tiny"
                                else f"{ROOT / 'examples' / 'hf_models.py'}:{name}", "--hw", HW, "--solver", o.solver,
                                "--time-limit", str(o.time_limit), "--out", str(out), "--no-gantt", "--json"])
        if r.exit_code != 0:
            return {"ok": False, "check": "compile failed: " + r.output.strip().splitlines()[-1][:300]}
        s = json.loads(r.output[r.output.index("{"):])
        sched = json.loads((out / "schedule.json").read_text())
        r = runner.invoke(app, ["run", str(out), "--check", "--json"])
        run = json.loads(r.output[r.output.index("{"):]) if "{" in r.output else {}
        return {"nodes": s["nodes"], "solver": s["solver"], "status": s["status"],
                "predicted_latency_s": s["latency_s"], "bound_s": s["bound_s"], "gap": s["gap"],
                "solve_time_s": s["solve_time_s"], "frontend": sched["meta"].get("frontend"),
                "segments": len(sched["segments"]), "ok": r.exit_code == 0 and run.get("check") is True,
                "check": "run --check: outputs match" if r.exit_code == 0 else r.output.strip()[-300:]}


def run_dropin(name, model, inputs, ref, o):
    fast = dropin.compile(model, inputs, hw=HW, solver=o.solver, time_limit=o.time_limit)
    with torch.no_grad():
        out = fast(**inputs)
    ok, why = check(out, ref)
    return dict(plan_row(fast.result), frontend=fast.artifact.schedule.meta["frontend"],
                segments=len(fast.artifact.schedule.segments), ok=ok, check=why)


def run_torch_compile(name, model, inputs, ref_cache, o):
    planned = []

    def backend(gm, example_inputs, **kw):
        fn = dropin.dynamo_backend(gm, example_inputs, options={"hw": HW, "solver": o.solver,
                                                                 "time_limit": o.time_limit}, **kw)
        planned.append(getattr(fn, "partitioner", None))
        return fn

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(**inputs)
    torch._dynamo.reset()
    ok, why = check(out, ref_cache)
    plans = [p[0] for p in planned if p is not None]
    row = plan_row(plans[0]) if len(plans) == 1 else {"nodes": sum(plan_row(p)["nodes"] for p in plans)}
    return dict(row, graphs=len(planned), frontend=plans[0].model.gm.meta.get("partitioner_frontend") if plans else "",
                ok=ok, check=why)


RUNNERS = {"cli": run_cli, "api": run_api, "dropin": run_dropin, "torch.compile": run_torch_compile}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base", choices=("tiny", "base"))
    ap.add_argument("--models", nargs="*", default=list(hf_models.NAMES))
    ap.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS)
    ap.add_argument("--solver", default="split")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--out-prefix", default="hf")
    o = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("torch", "partitioner"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    import transformers

    load0 = os.getloadavg()
    rows = []
    for name in o.models:
        model, inputs = hf_models.build(name, o.size)
        params = sum(p.numel() for p in model.parameters())
        ref = eager(model, inputs, cache=False)
        ref_cache = eager(model, inputs, cache=True)
        for path in o.paths:
            t0 = time.perf_counter()
            try:
                row = RUNNERS[path](name, model, inputs, ref_cache if path == "torch.compile" else ref, o)
            except Exception as err:  # noqa: BLE001 - a failure is data
                row = {"ok": False, "check": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
                log.debug("%s", traceback.format_exc())
            row = {"model": name, "size": o.size, "params": params, "path": path,
                   "inputs": {k: list(v.shape) for k, v in inputs.items()}, **row,
                   "wall_s": round(time.perf_counter() - t0, 2)}
            log.info("%s %s: %s (%s) in %.1f s", name, path, "ok" if row["ok"] else "FAILED", row.get("check"),
                     row["wall_s"])
            rows.append(row)
    load1 = os.getloadavg()
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "hw": HW, "solver": o.solver, "time_limit_s": o.time_limit,
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in load1]}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{o.out_prefix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{o.out_prefix}.md").write_text(markdown(meta, rows))
    failed = [r for r in rows if not r["ok"]]
    log.info("%d of %d cases pass; wrote %s.json/.md", len(rows) - len(failed), len(rows), out / o.out_prefix)
    return 1 if failed else 0


def eager(model, inputs, cache):
    with torch.no_grad():
        if cache:
            return model(**inputs)
        with no_cache(model, inputs):
            return model(**inputs)


def markdown(meta: dict, rows: list[dict]) -> str:
    def t(x):
        return "" if x is None else f"{x * 1e3:.3g} ms"

    lines = [f"# Hugging Face models through every entry point ({meta['solver']}, {meta['hw']})", "",
             f"transformers {meta['transformers']}, torch {meta['torch']}, {meta['machine']}, {meta['cpus']} CPUs; "
             f"load average before {meta['load_before']}, after {meta['load_after']}. Random weights; every spec "
             "device mapped onto the CPU; check: same output class, allclose rtol 1e-4 atol 1e-4. torch.compile rows: "
             "the graphs dynamo captured (one each here), traced by frontend auto; wall times include tracing and, "
             "for the CLI, writing, verifying and re-running the artifact (machine shared, see the load).", "",
             "| model | params | path | frontend | nodes | segments (graphs) | solver | predicted latency | bound | gap "
             "| check | wall |", "|" + "---|" * 12]
    for r in rows:
        gap = f"{100 * r['gap']:.1f}%" if isinstance(r.get("gap"), (int, float)) else ""
        lines.append(f"| {r['model']} ({r['size']}) | {r['params'] / 1e6:.1f}M | {r['path']} | {r.get('frontend', '')} "
                     f"| {r.get('nodes', '')} | {r.get('segments', r.get('graphs', ''))} | {r.get('solver', '')} "
                     f"| {t(r.get('predicted_latency_s'))} | {t(r.get('bound_s'))} | {gap} "
                     f"| {'pass' if r['ok'] else 'FAIL'}: {r.get('check', '')} | {r['wall_s']:.1f} s |")
    ok = sum(r["ok"] for r in rows)
    lines += ["", f"{ok} of {len(rows)} cases pass."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
