"""Equivalence conformance (issue 5): every execution path gives the original model's outputs.

For every zoo model (small variants so it runs on CPU; the LLM entries use tiny configs
of the same family and say so), every registered solver and every shipped spec, the
plan is compiled (:func:`partitioner.api.compile_plan`; exact solvers on a graph
coarsened to 30 nodes with a 5 s time limit), emitted (:func:`partitioner.emit.build.emit`;
every replica of a data-parallel plan) and run by the local runtime with every spec
device mapped onto the CPU; its outputs must equal the model's
(``torch.testing.assert_close``, rtol 1e-4, atol 1e-5). Then, for a subset that still
covers every model and every spec (one solver per model x spec, rotating):

* ``artifact``: saved to disk, loaded back (:func:`partitioner.emit.artifact.load_artifact`) and run;
* ``torch.compile``: ``torch.compile(model, backend=partial(dynamo_backend, ...))``;
* ``onnx-torchscript``: :func:`partitioner.emit.onnx.export_dir` with the TorchScript
  exporter, run by :class:`partitioner.runtime.onnx_rt.OnnxRuntime` (rtol 1e-4, atol 1e-4,
  the ONNX tests' tolerance: onnxruntime's kernels differ from torch's);
* ``onnx-dynamo``: the dynamo exporter, every model once (specs and solvers rotating, so
  every spec is covered too);
* ``distributed``: :func:`partitioner.runtime.distributed.launch`, one rank (process) per
  server, for one model on each multi-server spec (``cluster-2x-a100-pcie``,
  ``hetero-2server``) and a synthetic 3-server spec; both the solver's plan and a
  round-robin plan that crosses every server.

Every case is recorded (model, solver, spec, objective, path, status, error/reason, time);
failures are data: each case is caught on its own. A plan the solver cannot make
(``InfeasibleError``: e.g. memory on a small spec; a ``UsageError`` refusal) is *skipped*
with the reason; any other error, or outputs that differ, is a *failure*.

Usage::

    python bench/equivalence.py                    # everything (bounded by --max-minutes, default 20)
    python bench/equivalence.py --quick            # a few cases, < 1 min
    python bench/equivalence.py --max-minutes 5    # stop early, recording how far it got

Writes ``bench/results/equivalence.json`` and ``bench/results/equivalence.md``
(``--out-prefix`` changes the names).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import partitioner.zoo as models  # noqa: E402
import torch  # noqa: E402
from partitioner.zoo.gpt2 import gpt2  # noqa: E402
from partitioner.zoo.llama import LlamaConfig, llama  # noqa: E402

from partitioner import api  # noqa: E402
from partitioner.errors import InfeasibleError, UsageError  # noqa: E402
from partitioner.ir.settings import Settings  # noqa: E402
from partitioner.ir.spec import list_specs, load_spec, parse_spec  # noqa: E402
from partitioner.solvers.registry import SOLVERS  # noqa: E402

log = logging.getLogger("bench.equivalence")

TOL = dict(rtol=1e-4, atol=1e-5)
ONNX_TOL = dict(rtol=1e-4, atol=1e-4)
TIME_LIMIT = 5.0
COARSEN_TO = 30
OBJECTIVES = ("latency", "throughput")
PATHS = ("local", "artifact", "torch.compile", "onnx-torchscript", "onnx-dynamo", "distributed")


# ---- models ----------------------------------------------------------------------------------
def _tiny_llama(heads: int, kv_heads: int) -> Callable:
    cfg = LlamaConfig(vocab=256, dim=64, layers=2, heads=heads, kv_heads=kv_heads, ffn=128, max_position=64)
    return lambda: llama(cfg, seq=16, dtype=torch.float32, device="cpu")


#: zoo name -> (factory of the small variant, what was changed)
VARIANTS: dict[str, tuple[Callable, str]] = {
    "resnet18": (partial(models.get_model, "resnet18", image=32), "image 32x32"),
    "resnet50": (partial(models.get_model, "resnet50", image=32), "image 32x32"),
    "inception": (partial(models.get_model, "inception", image=64), "image 64x64"),
    "bert": (partial(models.get_model, "bert", layers=2, hidden=64, heads=2, seq=16), "2 layers, hidden 64, seq 16"),
    "bert-base": (partial(models.get_model, "bert-base", seq=8), "full size (12 layers, hidden 768), seq 8"),
    **{f"randwire-{g}": (partial(models.get_model, f"randwire-{g}", nodes=6, image=32, channels=8),
                         "6 nodes/stage, 8 channels, image 32x32") for g in ("ws", "er", "ba")},
    # LLMs: tiny configs of the same family (fp32, CPU) in place of the fp16 / meta-device sizes;
    # grouped-query attention kept where the real model has it (llama-1b 32/4, llama-70b 64/8).
    **{n: (_tiny_llama(4, 4), "tiny Llama (dim 64, 2 layers, 4 heads, MHA, seq 16, fp32)")
       for n in ("llama-125m", "llama-7b", "llama-13b")},
    **{n: (_tiny_llama(8, 1), "tiny Llama (dim 64, 2 layers, GQA 8/1 heads, seq 16, fp32)")
       for n in ("llama-1b", "llama-70b")},
    **{n: (partial(gpt2, "gpt2-tiny", layers=2, seq=16, dtype=torch.float32, device="cpu"),
           "gpt2-tiny (dim 64, 2 layers, 4 heads, seq 16, fp32)")
       for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
}


@dataclass
class Zoo:
    """Small model variants, traced once each, with their reference outputs."""

    cache: dict = field(default_factory=dict)

    def get(self, name: str):
        if isinstance(self.cache.get(name), Exception):
            raise self.cache[name]
        if name not in self.cache:
            factory, _ = VARIANTS[name]
            try:
                model, inputs = factory()
            except Exception as err:  # noqa: BLE001 - remembered: every case of this model fails alike
                self.cache[name] = err
                raise
            model = model.eval()
            with torch.no_grad():
                ref = model(*inputs)
            lm = api.load_model(model, tuple(inputs))
            self.cache[name] = (model, tuple(inputs), lm, ref)
        return self.cache[name]


def three_host_spec():
    """Four devices on three servers (as in tests/test_runtime_distributed.py)."""
    dev = lambda i, h: {"id": i, "host": h, "kind": "cpu", "peak_flops": {"fp32": 1e11},  # noqa: E731
                        "memory": {"capacity_bytes": 1e10, "bandwidth_Bps": 1e11}}
    return parse_spec({"name": "three-hosts", "host_device": "cpu0",
                       "devices": [dev("cpu0", "h0"), dev("acc0", "h0"), dev("cpu1", "h1"), dev("cpu2", "h2")],
                       "links": [{"a": "cpu0", "b": "acc0", "bandwidth_Bps": 3e10},
                                 {"a": "cpu0", "b": "cpu1", "bandwidth_Bps": 1e10, "latency_s": 1e-5},
                                 {"a": "cpu1", "b": "cpu2", "bandwidth_Bps": 1e10, "latency_s": 1e-5},
                                 {"a": "cpu0", "b": "cpu2", "bandwidth_Bps": 1e10, "latency_s": 1e-5}]})


def get_spec(name: str):
    return three_host_spec() if name == "three-hosts" else load_spec(name)


# ---- cases -----------------------------------------------------------------------------------
@dataclass
class Case:
    model: str
    solver: str
    spec: str
    objective: str
    path: str
    plan: str = "solver"  # "solver" or "round-robin" (distributed only)


class Skip(Exception):
    """A case that cannot run, with the reason."""


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _where(err: BaseException) -> str:
    """Innermost frame inside the partitioner package (for diagnosing failures)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/partitioner/" in f.filename]
    f = frames[-1] if frames else None
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}" if f else ""


def _settings() -> Settings:
    return Settings(seed=0, time_limit=TIME_LIMIT, threads=1)


def _coarsen(solver: str) -> int | None:
    return COARSEN_TO if SOLVERS[solver].exact else None


def plan_for(zoo: Zoo, c: Case):
    """compile_plan, with the plan-stage refusals turned into skips."""
    _, _, lm, _ = zoo.get(c.model)
    try:
        return api.compile_plan(lm, get_spec(c.spec), c.objective, c.solver, _settings(),
                                coarsen_to=_coarsen(c.solver))
    except InfeasibleError as err:
        raise Skip(first_line(err)) from None
    except UsageError as err:
        raise Skip(first_line(err)) from None


def _compare(out, ref, tol=TOL) -> float:
    torch.testing.assert_close(out, ref, **tol)
    leaves = [(a, b) for a, b in zip(_leaves(out), _leaves(ref)) if a.is_floating_point()]
    return max((float((a - b).abs().max()) for a, b in leaves if a.numel()), default=0.0)


def _leaves(x) -> list:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def run_local(zoo: Zoo, c: Case, info: dict) -> None:
    from partitioner.emit.build import emit, emit_replicas
    from partitioner.runtime.local import LocalRuntime

    _, inputs, _, ref = zoo.get(c.model)
    res = plan_for(zoo, c)
    info.update(plan_status=res.plan.status, devices_used=len(set(res.plan.placement)),
                replicas=len(res.plan.replicas or ()))
    arts = emit_replicas(res) if res.plan.replicas else [emit(res)]
    diffs = []
    for art in arts:
        info["segments"] = info.get("segments", 0) + len(art.schedule.segments)
        if c.path == "artifact":
            from partitioner.emit.artifact import load_artifact

            with tempfile.TemporaryDirectory(prefix="equiv-") as tmp:
                root = art.save(Path(tmp) / "art")
                art = load_artifact(root)
                diffs.append(_run_rt(LocalRuntime, art, inputs, ref))
        else:
            diffs.append(_run_rt(LocalRuntime, art, inputs, ref))
    info["max_abs_diff"] = max(diffs)


def _run_rt(cls, art, inputs, ref) -> float:
    with cls(art, threads=1, timeout_s=120) as rt, torch.no_grad():
        out = rt.run(*inputs)
    return _compare(out, ref)


def run_dynamo(zoo: Zoo, c: Case, info: dict) -> None:
    from partitioner.dropin import dynamo_backend

    model, inputs, _, ref = zoo.get(c.model)
    seen = []

    def backend(gm, example_inputs, **kw):
        fn = dynamo_backend(gm, example_inputs, **kw)
        seen.append(fn)
        return fn

    be = partial(backend, hw=get_spec(c.spec), objective=c.objective, solver=c.solver, threads=1,
                 time_limit=TIME_LIMIT, coarsen_to=_coarsen(c.solver))
    torch._dynamo.reset()
    try:
        cm = torch.compile(model, backend=be, dynamic=False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = cm(*inputs)
        info["graphs"] = len(seen)
        info["segments"] = sum(len(fn.partitioner[1].schedule.segments) for fn in seen if hasattr(fn, "partitioner"))
        if not any(hasattr(fn, "partitioner") for fn in seen):
            raise AssertionError("dynamo captured no graph that the partitioner planned")
        info["max_abs_diff"] = _compare(out, ref)
    except Exception as err:  # noqa: BLE001 - plan-stage refusals inside the backend are skips
        cause = err
        while cause is not None and not isinstance(cause, (InfeasibleError, UsageError)):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise Skip(first_line(cause)) from None
        raise
    finally:
        torch._dynamo.reset()


def run_onnx(zoo: Zoo, c: Case, info: dict) -> None:
    from partitioner.emit.build import emit
    from partitioner.emit.onnx import export_dir
    from partitioner.runtime.onnx_rt import OnnxRuntime

    _, inputs, _, ref = zoo.get(c.model)
    res = plan_for(zoo, c)
    info.update(plan_status=res.plan.status, devices_used=len(set(res.plan.placement)))
    art = emit(res)
    info["segments"] = len(art.schedule.segments)
    exporter = "dynamo" if c.path == "onnx-dynamo" else "torchscript"
    with tempfile.TemporaryDirectory(prefix="equiv-onnx-") as tmp:
        src = art.save(Path(tmp) / "art")
        rep = export_dir(src, Path(tmp) / "onnx", exporter=exporter)
        info["exporters"] = rep.exporters()
        rt = OnnxRuntime(Path(tmp) / "onnx", threads=1)
        with torch.no_grad():
            out = rt.run(*inputs)
    info["max_abs_diff"] = _compare(out, ref, ONNX_TOL)


def round_robin(problem):
    """Chunks of consecutive nodes cycling over every device (crosses every server)."""
    from partitioner.ir.plan import Plan

    chunk = max(1, problem.n // (2 * problem.D))
    pl = []
    for i in range(problem.n):
        ok = [int(d) for d in problem.allowed_devices(i)]
        want = (i // chunk) % problem.D
        pl.append(want if want in ok else ok[(i // chunk) % len(ok)])
    for g in problem.groups:  # nodes that must share a device: the first one's device
        for v in g:
            pl[v] = pl[g[0]]
    return Plan(tuple(pl), solver="round-robin")


def run_distributed(zoo: Zoo, c: Case, info: dict) -> None:
    from partitioner.emit.build import emit
    from partitioner.machine.problem import Problem
    from partitioner.runtime import distributed as D
    from partitioner.runtime.launch import launch

    _, inputs, lm, ref = zoo.get(c.model)
    if c.plan == "round-robin":
        p = Problem(lm.graph, get_spec(c.spec), c.objective)
        art = emit((lm.gm, p, round_robin(p)), example_inputs=inputs)
    else:
        art = emit(plan_for(zoo, c))
    lay = D.layout(art.schedule)
    used = {seg.device for seg in art.schedule.segments}
    info.update(segments=len(art.schedule.segments), ranks=len(lay.hosts),
                servers_computing=len({lay.rank_of[d] for d in used}))
    with tempfile.TemporaryDirectory(prefix="equiv-dist-") as tmp:
        root = art.save(Path(tmp) / "art")
        torch.save(tuple(inputs), Path(tmp) / "inputs.pt")
        out = launch(root, Path(tmp) / "inputs.pt", timeout_s=120, threads=1)
    info["max_abs_diff"] = _compare(out, ref)


RUNNERS = {"local": run_local, "artifact": run_local, "torch.compile": run_dynamo,
           "onnx-torchscript": run_onnx, "onnx-dynamo": run_onnx, "distributed": run_distributed}


def run_case(zoo: Zoo, c: Case) -> dict:
    rec: dict[str, Any] = dict(vars(c))
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        RUNNERS[c.path](zoo, c, info)
        rec["status"] = "pass"
    except Skip as s:
        rec.update(status="skipped", reason=str(s))
    except Exception as err:  # noqa: BLE001 - failures are data
        rec.update(status="fail", error=first_line(err), where=_where(err))
        log.debug("case %s failed", c, exc_info=True)
    rec["time_s"] = round(time.perf_counter() - t0, 3)
    rec.update(info)
    return rec


# ---- the case list ---------------------------------------------------------------------------
def plan_cases(quick: bool) -> list[tuple[str, list[Case]]]:
    """Phases in the order they run (the broadest coverage first, so an early stop still
    covers every model, spec and path)."""
    names = [n for n, _ in models.list_models()]
    specs = list_specs()
    solvers = sorted(SOLVERS)
    heur = [s for s in solvers if not SOLVERS[s].exact]
    exact = [s for s in solvers if SOLVERS[s].exact]
    if quick:
        ms, ss = ["resnet18", "bert", "llama-125m"], ["server-cpu-2gpu", "edge-soc"]
        return [("quick", [Case(m, s, sp, "latency", "local") for m in ms for sp in ss for s in ("heft", "greedy")]
                 + [Case("bert", "cpsat", "server-cpu-2gpu", "latency", "local"),
                    Case("gpt2", "split", "edge-soc", "throughput", "local"),
                    Case("resnet18", "greedy", "edge-soc", "latency", "torch.compile"),
                    Case("bert", "heft", "server-cpu-2gpu", "latency", "onnx-torchscript"),
                    Case("bert", "heft", "three-hosts", "latency", "distributed", "round-robin")])]
    sub_solvers = heur  # rotating solver of the per-path subsets
    subset = [(m, sp, sub_solvers[(i + j) % len(sub_solvers)])
              for i, m in enumerate(names) for j, sp in enumerate(specs)]
    # the dynamo exporter is slow (~25 s a plan): every model once, the specs and solvers rotating
    dyn = [(m, specs[i % len(specs)], sub_solvers[i % len(sub_solvers)]) for i, m in enumerate(names)]
    phases = [
        ("local latency, heuristics", [Case(m, s, sp, "latency", "local") for m in names for sp in specs for s in heur]),
        ("torch.compile subset", [Case(m, s, sp, "latency", "torch.compile") for m, sp, s in subset]),
        ("onnx torchscript subset", [Case(m, s, sp, "latency", "onnx-torchscript") for m, sp, s in subset]),
        ("onnx dynamo, every model (specs rotating)", [Case(m, s, sp, "latency", "onnx-dynamo")
                                                        for m, sp, s in dyn]),
        ("distributed", [Case(m, "heft", sp, "latency", "distributed", pl)
                         for m, sp in (("resnet18", "cluster-2x-a100-pcie"), ("llama-70b", "hetero-2server"),
                                       ("bert", "three-hosts")) for pl in ("solver", "round-robin")]),
        ("artifact save/load subset", [Case(m, s, sp, "latency", "artifact") for m, sp, s in subset]),
        ("local latency, exact (coarsened to 30, 5 s)", _interleave(exact, specs, names, "latency")),
        ("local throughput, heuristics", [Case(m, s, sp, "throughput", "local")
                                          for m in names for sp in specs for s in heur]),
        ("local throughput, exact (coarsened to 30, 5 s)", _interleave(exact, specs, names, "throughput")),
    ]
    return phases


def _interleave(solvers: list[str], specs: list[str], names: list[str], objective: str) -> list[Case]:
    """One case per solver in turn, (model, spec) pairs by diagonals (each run of len(names)
    pairs holds every model and every spec): an early stop still covers every solver, model and spec."""
    pairs = [(m, specs[(i + d) % len(specs)]) for d in range(len(specs)) for i, m in enumerate(names)]
    per = [[Case(m, s, sp, objective, "local") for m, sp in pairs] for s in solvers]
    return [c for group in zip(*per) for c in group]


# ---- report ----------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in records:
        key = f"{r['path']} ({r['objective']})"
        row = out.setdefault(key, {"cases": 0, "pass": 0, "fail": 0, "skipped": 0, "time_s": 0.0})
        row["cases"] += 1
        row[r["status"]] += 1
        row["time_s"] = round(row["time_s"] + r["time_s"], 1)
    return out


def write(records: list[dict], meta: dict, prefix: Path) -> None:
    summary = summarize(records)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps({"meta": meta, "summary": summary, "cases": records},
                                                      indent=1))
    md = ["# Equivalence conformance (issue 5)", "",
          f"Written by `bench/equivalence.py{' --quick' if meta['quick'] else ''}` on {meta['date']} "
          f"({meta['platform']}, torch {meta['torch']}, 1 intra-op thread). Every figure below was "
          "measured by that run.", "",
          f"Ran {len(records)} of {meta['planned_cases']} planned cases in {meta['wall_s']:.0f} s "
          f"(bound: {meta['max_minutes']} min). "
          + (f"**Stopped early** during phase '{meta['stopped_in']}': {meta['not_run']} cases not run."
             if meta.get("stopped_in") else "All planned cases ran."), "",
          f"Tolerance: local/artifact/torch.compile/distributed rtol {TOL['rtol']}, atol {TOL['atol']}; "
          f"ONNX rtol {ONNX_TOL['rtol']}, atol {ONNX_TOL['atol']}. Exact solvers "
          f"({', '.join(meta['exact_solvers'])}) on graphs coarsened to {COARSEN_TO} nodes, "
          f"time limit {TIME_LIMIT:g} s.", "",
          "## Models (small variants)", "", "| zoo name | built as |", "|---|---|"]
    md += [f"| {n} | {VARIANTS[n][1]} |" for n in meta["models"]]
    md += ["", "## Phases", "", "| phase | planned | ran |", "|---|---:|---:|"]
    md += [f"| {p['phase']} | {p['planned']} | {p['ran']} |" for p in meta["phases"]]
    md += ["", "## Summary per path", "", "| path (objective) | cases | pass | fail | skipped | time (s) |",
           "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {k} | {v['cases']} | {v['pass']} | {v['fail']} | {v['skipped']} | {v['time_s']} |"
           for k, v in summary.items()]
    cov = {}
    for r in records:
        cov.setdefault(r["path"], (set(), set(), set()))
        cov[r["path"]][0].add(r["model"])
        cov[r["path"]][1].add(r["spec"])
        cov[r["path"]][2].add(r["solver"])
    md += ["", "Coverage (models / specs / solvers with at least one case):", ""]
    md += [f"- {p}: {len(a)} models, {len(b)} specs, {len(c)} solvers" for p, (a, b, c) in cov.items()]
    fails = [r for r in records if r["status"] == "fail"]
    md += ["", f"## Failures ({len(fails)})", ""]
    if fails:
        md += ["| path | model | solver | spec | objective | plan | error | where |", "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['path']} | {r['model']} | {r['solver']} | {r['spec']} | {r['objective']} | {r['plan']} | "
               f"{_md(r['error'])} | {r.get('where', '')} |" for r in fails]
    else:
        md.append("None.")
    skips = [r for r in records if r["status"] == "skipped"]
    md += ["", f"## Skipped ({len(skips)})", ""]
    if skips:
        md += ["| path | model | solver | spec | objective | reason |", "|---|---|---|---|---|---|"]
        md += [f"| {r['path']} | {r['model']} | {r['solver']} | {r['spec']} | {r['objective']} | {_md(r['reason'])} |"
               for r in skips]
    else:
        md.append("None.")
    Path(f"{prefix}.md").write_text("\n".join(md) + "\n")


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


# ---- main ------------------------------------------------------------------------------------
def run(quick: bool = False, max_minutes: float = 20.0, prefix: Path | None = None,
        on_case: Callable[[dict], None] | None = None, only: str | None = None) -> tuple[list[dict], dict]:
    """Run the cases (``only``: the phases whose name contains it); return ``(records, meta)``
    (and write them when ``prefix`` is given)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    deadline = t0 + 60 * max_minutes
    phases = [(n, cs) for n, cs in plan_cases(quick) if only is None or only in n]
    zoo = Zoo()
    records: list[dict] = []
    meta: dict[str, Any] = dict(
        quick=quick, max_minutes=max_minutes, date=time.strftime("%Y-%m-%d %H:%M"),
        platform=platform.platform(), torch=torch.__version__, solvers=sorted(SOLVERS),
        exact_solvers=sorted(s for s in SOLVERS if SOLVERS[s].exact), specs=list_specs() + ["three-hosts"],
        models=sorted({c.model for _, cs in phases for c in cs}, key=list(VARIANTS).index),
        planned_cases=sum(len(cs) for _, cs in phases), phases=[], stopped_in=None, not_run=0)
    for name, cases in phases:
        entry = {"phase": name, "planned": len(cases), "ran": 0}
        meta["phases"].append(entry)
        log.info("phase %s: %d cases", name, len(cases))
        for k, c in enumerate(cases):
            if time.perf_counter() > deadline:
                meta["stopped_in"] = meta["stopped_in"] or name
                meta["not_run"] += len(cases) - k
                break
            rec = run_case(zoo, c)
            records.append(rec)
            entry["ran"] += 1
            log.info("%-16s %-12s %-12s %-21s %-10s %-7s %6.2fs %s", c.path, c.model, c.solver, c.spec,
                     c.objective, rec["status"], rec["time_s"], rec.get("error") or rec.get("reason") or "")
            if on_case:
                on_case(rec)
        meta["wall_s"] = time.perf_counter() - t0
        if prefix is not None:
            write(records, meta, prefix)
    meta["wall_s"] = time.perf_counter() - t0
    if prefix is not None:
        write(records, meta, prefix)
    return records, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few cases (< 1 min)")
    ap.add_argument("--max-minutes", type=float, default=20.0, help="stop starting cases after this long")
    ap.add_argument("--out-prefix", default=None,
                    help="write PREFIX.json and PREFIX.md (default bench/results/equivalence, "
                         "equivalence.quick with --quick)")
    ap.add_argument("--phases", default=None, help="run only the phases whose name contains this "
                    "(e.g. 'throughput'; write them with --out-prefix)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("partitioner", "torch", "torch._dynamo", "torch.onnx", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    prefix = Path(a.out_prefix or ROOT / "bench" / "results" / ("equivalence.quick" if a.quick else "equivalence"))
    records, meta = run(a.quick, a.max_minutes, prefix, only=a.phases)
    s = summarize(records)
    log.info("done in %.0f s: %s", meta["wall_s"], json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
