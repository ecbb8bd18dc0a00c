"""Pipelined throughput benchmark: a streamed 2-stage plan against its prediction and eager PyTorch.

For each zoo model (``--models``: resnet18, resnet50, bert, inception), on
``hw_specs/cpu-threads-2.yaml`` (this 2-core machine as two one-thread logical CPUs):

1. profile the model on one logical CPU (``cpu:1t``, what ``partitioner profile MODEL
   --devices cpu:1t`` does: ops in context, transfers, co-running, hand-offs);
2. plan it for throughput from the profile (``--solver``, default ``pipeline-dp``;
   ``--profile-map cpu0=cpu:1t --profile-map cpu1=cpu:1t``) and emit the plan in **both
   stage orders**: the host ``cpu0`` running the first stage (``host-first``), and the
   same plan mirrored (cpu0 and cpu1 swapped: the host runs the last stage,
   ``host-second``); each is graded by the evaluator for its own predicted rate;
3. stream ``--samples`` copies of the example inputs through each plan with every local
   runtime asked for (``--runtimes``: ``threads``, one worker thread per device, and/or
   ``processes``, one process per device; ``+traced`` runs the segments as TorchScript
   traces), ``--repeats`` times (median reported);
4. measure the alternatives a user has on this machine, each over the same number of
   samples, ``--repeats`` times: eager PyTorch on one thread, on two threads
   (``torch.set_num_threads(2)``), two Python threads each running the model eagerly with
   one intra-op thread (samples shared), and two processes doing the same.

Every figure comes with the 1-minute load average before and after its model, the CPU
pressure (PSI), and the share of the machine's CPU time other processes (not this one or
its children) took while it was measured. A model's figures are marked busy when other
processes took >= ``QUIET_OTHERS`` of the CPU time during any of its measurements (a
measurement so disturbed is repeated first, up to ``--retries`` times). The load averages
are recorded, not used: they count the benchmark's own two busy cores, and the previous
model's for a minute after it.

Usage::

    python bench/stream.py                           # the four models, ~5-8 min on a quiet machine
    python bench/stream.py --models resnet18 --repeats 3 --samples 40
    python bench/stream.py --wait-quiet              # wait (bounded) for an idle machine before each model
    python bench/stream.py --models bert --merge     # re-measure one model, keep the others' rows

Writes ``bench/results/stream.json`` and ``bench/results/stream.md`` (and the profiles it made
under ``bench/results/profiles/stream-MODEL.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.stream")

MODELS = ("resnet18", "resnet50", "bert", "inception")
SPEC = "cpu-threads-2"
DEVICE_MAP = {"cpu0": "cpu:1t", "cpu1": "cpu:1t"}
#: a model's figures are quiet when other processes took less than QUIET_OTHERS of the
#: machine's CPU time during every measurement
QUIET_OTHERS = 0.1
#: targets of issue 22: streamed / predicted (median of the repeats) and streamed / eager on one thread
TARGET_PREDICTED, TARGET_EAGER1 = 0.9, 1.7


# -- machine state --------------------------------------------------------------------------------------------

def load_state() -> dict:
    """The clock, the 1-minute load average and the CPU pressure (PSI "some" avg10, %, where known)."""
    psi = Path("/proc/pressure/cpu")
    first = psi.read_text().split("avg10=", 1)[1] if psi.exists() else ""
    return {"time": time.strftime("%H:%M:%S"), "load1": round(os.getloadavg()[0], 2),
            **({"cpu_pressure_avg10": float(first.split()[0])} if first else {})}


def cpu_ticks() -> tuple[int, int] | None:
    """(all, idle) CPU ticks of the machine so far (Linux ``/proc/stat``)."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(v[:8]), v[3] + v[4]
    except (OSError, IndexError, ValueError):
        return None


def own_ticks() -> int:
    """CPU ticks this process, its waited-for children and its live children (the device
    processes of the process runtime, the eager processes) used so far."""
    t = os.times()
    ticks = int(round((t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")))
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f[1] == me:  # fields after the name: state, ppid, ..., utime (12), stime (13)
            ticks += int(f[11]) + int(f[12])
    return ticks


class Others:
    """Share of the machine's CPU time other processes took between ``start`` and ``stop``
    (this process and its children excepted)."""

    def __enter__(self):
        self.t0, self.own0 = cpu_ticks(), own_ticks()
        return self

    def __exit__(self, *exc):
        t1, own1 = cpu_ticks(), own_ticks()
        self.share = math.nan
        if self.t0 and t1 and t1[0] > self.t0[0]:
            total, idle = t1[0] - self.t0[0], t1[1] - self.t0[1]
            self.share = max(0.0, (total - idle - (own1 - self.own0)) / total)


def wait_idle(max_wait_s: float, idle_s: float = 10.0, step_s: float = 2.0) -> float:
    """Wait (at most ``max_wait_s``) until other processes have left at least ``1 - QUIET_OTHERS``
    of the machine's CPU time idle for ``idle_s`` in a row; the seconds waited."""
    t0 = time.perf_counter()
    calm = 0.0
    while calm < idle_s and time.perf_counter() - t0 < max_wait_s:
        a = cpu_ticks()
        time.sleep(step_s)
        b = cpu_ticks()
        idle = (b[1] - a[1]) / max(1, b[0] - a[0]) if a and b else 1.0
        calm = calm + step_s if idle >= 1 - QUIET_OTHERS else 0.0
    return round(time.perf_counter() - t0, 1)


def quietly(fn, ns):
    """``fn()`` measured while other processes stay (nearly) off the CPU: measured again,
    after waiting for an idle machine, when others took ``QUIET_OTHERS`` or more of the CPU
    time (at most ``ns.retries`` times). Returns ``(fn(), others' share, tries discarded)``."""
    dropped = 0
    while True:
        with Others() as o:
            value = fn()
        if not o.share >= QUIET_OTHERS or dropped >= ns.retries:
            return value, o.share, dropped
        dropped += 1
        log.info("others took %.0f%% of the CPU: measuring again", 100 * o.share)
        wait_idle(ns.max_wait_s)


# -- eager alternatives ---------------------------------------------------------------------------------------

def _eager_loop(model, inputs, n: int) -> None:
    with torch.inference_mode():
        for _ in range(n):
            model(*inputs)


def eager_rate(model, inputs, n: int, threads: int) -> float:
    """Samples/s of ``n`` eager calls on one Python thread with ``threads`` intra-op threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _eager_loop(model, inputs, 2)
        t = time.perf_counter()
        _eager_loop(model, inputs, n)
        return n / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)


def eager_threads_rate(model, inputs, n: int, k: int = 2) -> float:
    """Samples/s of ``k`` Python threads sharing ``n`` eager calls, one intra-op thread each."""
    go = threading.Barrier(k + 1)

    def body(m: int) -> None:
        torch.set_num_threads(1)
        _eager_loop(model, inputs, 2)
        go.wait()
        _eager_loop(model, inputs, m)

    shares = [n // k + (i < n % k) for i in range(k)]
    ts = [threading.Thread(target=body, args=(m,)) for m in shares]
    for t in ts:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return n / (time.perf_counter() - t0)


def _proc_body(name: str, m: int, ready, go, done) -> None:
    import partitioner.zoo as models

    torch.set_num_threads(1)
    model, inputs = models.get_model(name)
    _eager_loop(model, inputs, 2)
    ready.put(os.getpid())
    go.wait()
    _eager_loop(model, inputs, m)
    done.put(time.perf_counter())


def eager_processes_rate(name: str, n: int, k: int = 2) -> float:
    """Samples/s of ``k`` processes sharing ``n`` eager calls of zoo model ``name``, one
    thread each (from the moment all are warm to the last one's end)."""
    ctx = mp.get_context("spawn")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [n // k + (i < n % k) for i in range(k)]
    ps = [ctx.Process(target=_proc_body, args=(name, m, ready, go, done)) for m in shares]
    for p in ps:
        p.start()
    try:
        for _ in ps:
            ready.get(timeout=300)
        t0 = time.perf_counter()
        go.set()
        end = max(done.get(timeout=600) for _ in ps)
        return n / (end - t0)
    finally:
        for p in ps:
            p.join(timeout=30)


# -- plans ------------------------------------------------------------------------------------------------------

def _mirrored(plan):
    """The same plan with devices 0 and 1 swapped (the other stage order)."""
    from partitioner.ir.plan import Plan

    swap = lambda p: Plan(tuple(1 - d for d in p.placement),  # noqa: E731
                          (p.order[1], p.order[0]) if p.order else None, solver=p.solver + "-mirrored",
                          status=p.status,
                          replicas=tuple(swap(r) for r in p.replicas) if p.replicas else None)
    return swap(plan)


def plans(name: str, profile: Path, solver: str) -> dict:
    """Both stage orders of the plan from ``profile``: {order: (Result, [Artifact per replica])}."""
    from partitioner.api import compile_plan
    from partitioner.emit.build import emit_replicas
    from partitioner.grade import grade

    res = compile_plan(name, SPEC, "throughput", solver, profile=str(profile), device_map=DEVICE_MAP)
    host = res.problem.host
    first = next((s for s in (res.plan.replicas or (res.plan,))), res.plan).placement[0]
    base = res if first == host else None
    other = grade(res.problem, _mirrored(res.plan), res.bound, model=res.model)
    other.extra = dict(res.extra)
    if base is None:
        base, other = other, res
    return {"host-first": (base, emit_replicas(base)), "host-second": (other, emit_replicas(other))}


def make_profile(name: str, out: Path, repeats: int) -> dict:
    """``partitioner profile NAME --devices cpu:1t --out OUT`` (the CLI's steps, in process)."""
    from partitioner.measure.devices import parse_devices
    from partitioner.measure.handoff import add_alternation
    from partitioner.measure.links import add_corun, add_transfers
    from partitioner.measure.profile import profile_model

    before = load_state()
    t0 = time.perf_counter()
    devs = parse_devices("cpu:1t")
    prof, loaded = profile_model(name, devs, repeats=repeats)
    add_transfers(prof, devs)
    add_corun(prof, loaded.gm, loaded.example_inputs, devs, name=loaded.graph.name, rounds=max(3, repeats // 2))
    add_alternation(prof, loaded, devs)
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.save(out)
    return {"file": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
            "seconds": round(time.perf_counter() - t0, 1), "load_before": before, "load_after": load_state()}


# -- streaming -------------------------------------------------------------------------------------------------

def stream_rates(arts: list, inputs: tuple, ref, n: int, ns, runtime: str) -> dict:
    """Median samples/s of ``ns.repeats`` streams of ``n`` samples through the replicas ``arts``
    (outputs checked against ``ref``). With one replica, also where the time went: each
    device's busy share of the stream's wall time (near 1 on the bottleneck device: the
    runtime overlaps samples fully) and each segment's median streamed compute time over
    its predicted one (above 1: the devices slow each other down, or the machine is busy)."""
    from partitioner.runtime.local import open_replicas
    from partitioner.runtime.stream import stream_replicas

    rates, steady, others, busy, slow, dropped = [], [], [], [], [], 0
    with torch.inference_mode():
        mode, _, seg = runtime.partition("+")
        rts = open_replicas(arts, mode=mode, timeout_s=600, segments=seg or "eager")
        try:
            stream_replicas(rts, [tuple(inputs)] * min(n, 8))  # warm-up
            for _ in range(ns.repeats):
                (outs, st), share, k = quietly(
                    lambda: rts[0].stream([tuple(inputs)] * n) if len(rts) == 1
                    else stream_replicas(rts, [tuple(inputs)] * n), ns)
                rates.append(st.samples_per_s)
                steady.append(st.steady_samples_per_s)
                others.append(share)
                dropped += k
                if st.actions:
                    busy.append(_busy_share(st))
                    slow.append(_slowdown(st, arts[0].schedule))
        finally:
            for rt in rts:
                rt.close()
    torch.testing.assert_close(outs[-1], ref, rtol=1e-3, atol=1e-4)
    out = {"samples_per_s": statistics.median(rates), "steady_samples_per_s": statistics.median(steady),
           "all": rates, "others_cpu_share": others, "disturbed_and_repeated": dropped}
    if busy:
        k = rates.index(out["samples_per_s"]) if out["samples_per_s"] in rates else 0
        out["device_busy_share"], out["compute_over_predicted"] = busy[k], slow[k]
    return out


def _busy_share(st) -> dict:
    tot: dict[str, float] = {}
    for acts in st.actions:
        for a in acts:
            if a.op == "compute":
                tot[a.device] = tot.get(a.device, 0.0) + a.duration_s
    return {d: round(t / st.wall_s, 3) for d, t in sorted(tot.items())}


def _slowdown(st, schedule) -> dict:
    per: dict[str, list[float]] = {}
    for acts in st.actions:
        for a in acts:
            if a.op == "compute":
                per.setdefault(a.name, []).append(a.duration_s)
    pred = {sg.id: sg.predicted_compute_s for sg in schedule.segments}
    return {sid: round(statistics.median(v) / pred[sid], 3) for sid, v in sorted(per.items()) if pred.get(sid)}


def median_of(fn, ns) -> dict:
    rates, others, dropped = [], [], 0
    for _ in range(ns.repeats):
        rate, share, k = quietly(fn, ns)
        rates.append(rate)
        others.append(share)
        dropped += k
    return {"samples_per_s": statistics.median(rates), "all": rates, "others_cpu_share": others,
            "disturbed_and_repeated": dropped}


def bench_model(name: str, ns) -> dict:
    import partitioner.zoo as models

    waited = wait_idle(ns.max_wait_s) if ns.wait_quiet else 0.0
    before = load_state()
    prof_path = ROOT / "bench" / "results" / "profiles" / f"stream-{name}.json"
    if ns.reuse_profiles and prof_path.exists():
        profiling = {"file": str(prof_path.relative_to(ROOT)), "reused": True}
    else:
        profiling, share, k = quietly(lambda: make_profile(name, prof_path, ns.profile_repeats), ns)
        profiling.update(others_cpu_share=share, disturbed_and_repeated=k)
    both = plans(name, prof_path, ns.solver)
    model, inputs = models.get_model(name)
    with torch.inference_mode():
        ref = model(*inputs)
    pred = max(sum(1.0 / a.schedule.meta["predicted_period_s"] for a in arts) for _, arts in both.values())
    n = ns.samples or max(16, int(round(ns.seconds * pred)))
    row = {"model": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
           "solver": ns.solver, "samples": n, "repeats": ns.repeats, "waited_for_quiet_s": waited,
           "load_before": before, "profile": profiling, "orders": {}}
    for order, (res, arts) in both.items():
        s = arts[0].schedule
        predicted = sum(1.0 / a.schedule.meta["predicted_period_s"] for a in arts)
        o = {"predicted_samples_per_s": predicted, "segments": len(s.segments), "replicas": len(arts),
             "stages": [[sg.device, sg.predicted_compute_s] for sg in s.segments], "runtimes": {}}
        for runtime in ns.runtimes:
            o["runtimes"][runtime] = stream_rates(arts, inputs, ref, n, ns, runtime)
            log.info("%s %s %s: streamed %.1f/s, predicted %.1f/s", name, order, runtime,
                     o["runtimes"][runtime]["samples_per_s"], predicted)
        row["orders"][order] = o
    row["eager_1_thread"] = median_of(lambda: eager_rate(model, inputs, n, 1), ns)
    row["eager_2_threads"] = median_of(lambda: eager_rate(model, inputs, n, 2), ns)
    row["eager_2_python_threads"] = median_of(lambda: eager_threads_rate(model, inputs, n), ns)
    row["eager_2_processes"] = median_of(lambda: eager_processes_rate(name, n), ns)
    row["load_after"] = load_state()
    shares = [x for r in _measurements(row) for x in r["others_cpu_share"] if not math.isnan(x)]
    shares += [profiling["others_cpu_share"]] if not math.isnan(profiling.get("others_cpu_share", math.nan)) else []
    row["others_cpu_share_max"] = max(shares, default=math.nan)
    row["quiet"] = row["others_cpu_share_max"] < QUIET_OTHERS
    e1 = row["eager_1_thread"]["samples_per_s"]
    for o in row["orders"].values():
        for r in o["runtimes"].values():
            r["over_predicted"] = r["samples_per_s"] / o["predicted_samples_per_s"]
            r["over_eager_1_thread"] = r["samples_per_s"] / e1
            r["meets_targets"] = r["over_predicted"] >= TARGET_PREDICTED and r["over_eager_1_thread"] >= TARGET_EAGER1
    log.info("%s: eager 1t %.1f/s, 2t %.1f/s, 2 threads %.1f/s, 2 processes %.1f/s (load %.2f -> %.2f)", name, e1,
             row["eager_2_threads"]["samples_per_s"], row["eager_2_python_threads"]["samples_per_s"],
             row["eager_2_processes"]["samples_per_s"], before["load1"], row["load_after"]["load1"])
    return row


def _measurements(row: dict) -> list[dict]:
    alts = [row[k] for k in ("eager_1_thread", "eager_2_threads", "eager_2_python_threads", "eager_2_processes")]
    return [x for o in row["orders"].values() for x in o["runtimes"].values()] + alts


# -- report ----------------------------------------------------------------------------------------------------

def write(rows: list[dict], out: Path, ns, meta: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or {"spec": SPEC, "solver": ns.solver, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quiet_others": QUIET_OTHERS,
            "targets": {"over_predicted": TARGET_PREDICTED, "over_eager_1_thread": TARGET_EAGER1},
            "command": " ".join(sys.argv)}
    (out / "stream.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Pipelined throughput: streamed plans vs predicted vs eager PyTorch", "",
             f"`bench/stream.py` on spec `{SPEC}` (this {os.cpu_count()}-core machine as two one-thread logical "
             f"CPUs), plans by `{ns.solver}` from a `cpu:1t` profile, in both stage orders (host-first: the "
             "host `cpu0` runs the first stage; host-second: the same plan mirrored). Streamed: median of "
             f"{ns.repeats} streams. Eager alternatives over the same samples (median of {ns.repeats}). "
             f"Targets: streamed >= {TARGET_PREDICTED}x predicted and >= {TARGET_EAGER1}x eager on one thread. "
             f"Load: 1-minute load average before/after the model (recorded, not used: it counts the benchmark's "
             f"own two busy cores, and the previous model's for a minute) and the largest share of the machine's "
             f"CPU time other processes took during one of its measurements; a model is marked busy (indicative "
             f"only) when others took >= {QUIET_OTHERS:.0%}. Busy: the "
             "bottleneck device's compute time over the stream's wall time (1.0: the runtime keeps it busy all "
             "the time). Compute/pred: the slowest segment's median streamed compute time over its predicted "
             "one (above 1: the devices slow each other down, or the machine is busy).", "",
             "| model | order | runtime | predicted /s | streamed /s | /predicted | /eager 1t | busy | compute/pred | "
             "eager 1t /s | eager 2t /s | 2 threads /s | 2 processes /s | targets | load |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        e = [r[k]["samples_per_s"] for k in ("eager_1_thread", "eager_2_threads", "eager_2_python_threads",
                                             "eager_2_processes")]
        load = (f"{r['load_before']['load1']:.2f}/{r['load_after']['load1']:.2f}, others "
                f"{r.get('others_cpu_share_max', math.nan):.0%}" + ("" if r["quiet"] else " busy"))
        for order, o in r["orders"].items():
            for rt, x in o["runtimes"].items():
                busy = max(x.get("device_busy_share", {}).values(), default=math.nan)
                slow = max(x.get("compute_over_predicted", {}).values(), default=math.nan)
                lines.append(f"| {r['model']} | {order} | {rt} | {o['predicted_samples_per_s']:.1f} | "
                             f"{x['samples_per_s']:.1f} | {x['over_predicted']:.2f} | {x['over_eager_1_thread']:.2f}x | "
                             f"{busy:.2f} | {slow:.2f} | {e[0]:.1f} | {e[1]:.1f} | {e[2]:.1f} | {e[3]:.1f} | "
                             f"{'met' if x['meets_targets'] else 'missed'} | {load} |")
    lines += ["", "## Where the plan wins, and where it does not", ""] + verdicts(rows)
    (out / "stream.md").write_text("\n".join(lines) + "\n")


def verdicts(rows: list[dict]) -> list[str]:
    """One plain sentence per model: the best streamed plan against the best eager alternative."""
    out = []
    names = {"eager_1_thread": "eager on one thread", "eager_2_threads": "eager on two threads",
             "eager_2_python_threads": "two eager Python threads", "eager_2_processes": "two eager processes"}
    for r in rows:
        best_alt = max(names, key=lambda k: r[k]["samples_per_s"])
        alt = r[best_alt]["samples_per_s"]
        plan = [(x["samples_per_s"], order, rt) for order, o in r["orders"].items() for rt, x in o["runtimes"].items()]
        rate, order, rt = max(plan)
        worst = min(plan)
        verb = "beats" if rate > 1.02 * alt else "matches" if rate >= 0.98 * alt else "loses to"
        out.append(f"- **{r['model']}**: the best streamed plan ({order}, {rt}) runs {rate:.1f}/s and {verb} the best "
                   f"eager alternative, {names[best_alt]} ({alt:.1f}/s, {rate / alt:.2f}x); the slowest variant "
                   f"({worst[1]}, {worst[2]}) runs {worst[0]:.1f}/s. Eager on two threads: "
                   f"{r['eager_2_threads']['samples_per_s']:.1f}/s." + ("" if r["quiet"] else " (busy machine)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--solver", default="pipeline-dp")
    ap.add_argument("--runtimes", nargs="+", default=["threads", "processes"], choices=["threads", "processes", "threads+traced", "processes+traced"],
                    help="RUNTIME[+traced]: the worker threads or device processes, with the segments run as "
                    "TorchScript traces when +traced")
    ap.add_argument("--samples", type=int, default=0, help="samples per stream (default: about --seconds worth)")
    ap.add_argument("--seconds", type=float, default=3.0, help="target length of one stream at the predicted rate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-repeats", type=int, default=10)
    ap.add_argument("--reuse-profiles", action="store_true", help="use bench/results/profiles/stream-MODEL.json "
                    "when it exists")
    ap.add_argument("--wait-quiet", action="store_true", help="wait (at most --max-wait-s) for an idle machine "
                    "before each model")
    ap.add_argument("--retries", type=int, default=3, help="measure again (after waiting for an idle machine) "
                    "when other processes took a share of the CPU time during a measurement")
    ap.add_argument("--max-wait-s", type=float, default=600.0)
    ap.add_argument("--merge", action="store_true", help="keep the rows of other models already in OUT/stream.json "
                    "(measure the models one at a time, in quiet windows)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--render", action="store_true", help="only write OUT/stream.md again from OUT/stream.json "
                    "(its measurements and meta as they are)")
    ns = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ns.render:
        data = json.loads((ns.out / "stream.json").read_text())
        for r in data["rows"]:
            r["quiet"] = r.get("others_cpu_share_max", 1.0) < QUIET_OTHERS
        data["meta"]["quiet_others"] = QUIET_OTHERS
        data["meta"].pop("quiet_load", None)
        return write(data["rows"], ns.out, ns, data["meta"])
    rows = [bench_model(m, ns) for m in ns.models]
    old = ns.out / "stream.json"
    if ns.merge and old.exists():
        kept = [r for r in json.loads(old.read_text()).get("rows", [])
                if r.get("model") not in ns.models and "orders" in r]  # rows of this script's format only
        rows = sorted(kept + rows, key=lambda r: MODELS.index(r["model"]) if r["model"] in MODELS else 99)
    write(rows, ns.out, ns)


if __name__ == "__main__":
    main()
