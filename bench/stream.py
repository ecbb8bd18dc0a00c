"""Pipelined throughput benchmark: measured samples/s of a streamed plan vs the prediction.

For each model, on ``hw_specs/cpu-threads-2.yaml`` (this machine as two one-thread
logical CPUs), plan for throughput (``--solver``, default ``pipeline-dp``), emit the plan
and run it on the local runtime (one worker thread per logical device, one intra-op
thread each) in two ways over the same ``--samples`` inputs:

* **one at a time**: ``LocalRuntime.run`` per sample (no overlap between samples);
* **streamed**: ``LocalRuntime.stream`` (device ``d`` works on sample ``k + 1`` while the
  next device works on sample ``k``).

Reported per model: predicted samples/s (``1 / predicted_period_s`` of the schedule,
i.e. the evaluator's period), measured streamed samples/s (whole wall time, and steady
state between the first and last completion), one-at-a-time samples/s, the streaming
speedup and measured/predicted. The two modes are interleaved for ``--rounds`` rounds
and medians are reported, with the 1-minute load average before and after: the machine's
2 cores are shared with other processes, so a loaded machine shows little or no overlap
gain (two workers then share one free core).

Usage::

    python bench/stream.py                      # mlp, resnet18 (64x64), bert; ~1-2 min
    python bench/stream.py --models mlp --samples 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from partitioner import api  # noqa: E402
from partitioner.emit.build import emit  # noqa: E402
from partitioner.runtime.local import LocalRuntime  # noqa: E402

log = logging.getLogger("bench.stream")


def _mlp():
    torch.manual_seed(0)
    w = 768
    model = nn.Sequential(*[nn.Sequential(nn.Linear(w, w), nn.ReLU()) for _ in range(8)]).eval()
    return model, (torch.randn(64, w),)


def _zoo(name, **kw):
    import partitioner.zoo as models

    return lambda: models.get_model(name, **kw)


MODELS = {"mlp": _mlp, "resnet18": _zoo("resnet18", image=64), "bert": _zoo("bert")}


def bench_model(name: str, solver: str, samples: int, rounds: int) -> dict:
    model, inputs = MODELS[name]()
    t0 = time.perf_counter()
    res = api.compile_plan(model, "cpu-threads-2", "throughput", solver, example_inputs=inputs)
    art = emit(res)
    compile_s = time.perf_counter() - t0
    s = art.schedule
    xs = [tuple(inputs)] * samples
    seq_rates, st_rates, steady_rates = [], [], []
    load0 = os.getloadavg()[0]
    with torch.no_grad(), LocalRuntime(art, threads=1) as rt:
        rt.run(*inputs)  # warm-up
        ref = rt.run(*inputs)
        for _ in range(rounds):
            t = time.perf_counter()
            for x in xs:
                rt.run(*x)
            seq_rates.append(samples / (time.perf_counter() - t))
            outs, st = rt.stream(xs)
            st_rates.append(st.samples_per_s)
            steady_rates.append(st.steady_samples_per_s)
        torch.testing.assert_close(outs[-1], ref)
    pred = 1.0 / s.meta["predicted_period_s"]
    med = statistics.median
    row = {"model": name, "solver": solver, "status": res.status, "segments": len(s.segments),
           "devices_used": sorted({x.device for x in s.segments}), "samples": samples, "rounds": rounds,
           "predicted_samples_per_s": pred, "predicted_latency_s": s.meta["predicted_latency_s"],
           "streamed_samples_per_s": med(st_rates), "streamed_steady_samples_per_s": med(steady_rates),
           "one_at_a_time_samples_per_s": med(seq_rates),
           "speedup_stream_vs_one_at_a_time": med(st_rates) / med(seq_rates),
           "measured_over_predicted": med(st_rates) / pred,
           "all_streamed": st_rates, "all_one_at_a_time": seq_rates, "compile_s": compile_s,
           "load1_before": load0, "load1_after": os.getloadavg()[0]}
    log.info("%s: predicted %.1f/s, streamed %.1f/s, one at a time %.1f/s", name, pred, row["streamed_samples_per_s"],
             row["one_at_a_time_samples_per_s"])
    return row


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"spec": "cpu-threads-2", "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "stream.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Pipelined throughput (local runtime, streamed vs one sample at a time)", "",
             f"Spec `cpu-threads-2` (two one-thread logical CPUs) on a {os.cpu_count()}-core machine shared with "
             "other processes; medians over the rounds. Load = 1-minute load average before/after.", "",
             "| model | solver | segments | predicted /s | streamed /s | steady /s | one at a time /s | "
             "stream speedup | measured/predicted | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['solver']} | {r['segments']} | {r['predicted_samples_per_s']:.1f} | "
                     f"{r['streamed_samples_per_s']:.1f} | {r['streamed_steady_samples_per_s']:.1f} | "
                     f"{r['one_at_a_time_samples_per_s']:.1f} | {r['speedup_stream_vs_one_at_a_time']:.2f}x | "
                     f"{r['measured_over_predicted']:.2f} | {r['load1_before']:.1f}/{r['load1_after']:.1f} |")
    (out / "stream.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--solver", default="pipeline-dp")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ns = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = [bench_model(m, ns.solver, ns.samples, ns.rounds) for m in ns.models]
    write(rows, ns.out)


if __name__ == "__main__":
    main()
