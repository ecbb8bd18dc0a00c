"""Framework entry points: a drop-in ``compile`` and a ``torch.compile`` backend.

``partitioner.compile(model, example_inputs, hw=..., objective=..., solver=...)`` traces,
plans and emits the model and returns a :class:`PartitionedModule` whose ``forward`` runs
the plan on the local runtime and returns what the model returns; a call with new input
shapes gets its own plan when the graph is specialised to its shapes (a
:mod:`partitioner.plan_cache`). :func:`dynamo_backend` is the ``torch.compile`` backend
(``backend="partitioner"`` through the package's entry point): it plans each graph dynamo
captures, lifting the parameters and buffers dynamo passes as inputs back into the graph,
and runs eagerly a graph called with other parameters than it was compiled with, or one
without operators.

Options of both (:data:`OPTIONS`, with defaults): ``hw``, ``objective``, ``solver``,
``time_limit``, ``seed``, ``settings``, ``threads``, ``map_devices``, ``segmentation``,
``timeout_s``, ``throughput_floor``, ``latency_ceiling``, ``coarsen_to``, ``frontend``,
``copy_same_device``, ``profile``, ``replan``, ``max_plans``, and a solver's own options as
``"SOLVER.KEY"`` (``"split.restarts": 8``). Unknown keys and ill-typed values raise
:class:`~partitioner.errors.UsageError` before tracing. Usage: docs/runtime.md.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from .errors import PartitionerError, UsageError

log = logging.getLogger(__name__)

__all__ = ["compile", "dynamo_backend", "PartitionedModule", "OPTIONS"]

#: every option accepted by :func:`compile` and :func:`dynamo_backend`, with its default
OPTIONS: dict[str, Any] = {
    "hw": "server-cpu-2gpu", "objective": "latency", "solver": "split", "time_limit": 60.0, "seed": 0,
    "settings": None, "threads": None, "map_devices": None, "segmentation": "faithful", "timeout_s": 300.0,
    "throughput_floor": None, "latency_ceiling": None, "coarsen_to": None, "frontend": "auto",
    "copy_same_device": False, "profile": False, "replan": None, "max_plans": 8,
}


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    """The options with their defaults; ``o["settings"]`` carries the solver options given
    as ``"SOLVER.KEY"`` keys (checked, as the solver name is)."""
    from dataclasses import replace

    from .ir.settings import Settings, nest_options
    from .solvers.registry import check_options, get_solver

    unknown = sorted(k for k in opts if k not in OPTIONS and "." not in k)
    if unknown:
        raise UsageError(f"unknown partitioner option(s) {unknown}",
                         hint=f"valid options: {', '.join(OPTIONS)}, and SOLVER.KEY for a solver's own options")
    o = {**OPTIONS, **{k: v for k, v in opts.items() if k in OPTIONS}}
    settings = o["settings"] or Settings(seed=o["seed"], time_limit=o["time_limit"])
    given = nest_options({k: v for k, v in opts.items() if "." in k})
    merged = {**settings.options, **{s: {**settings.options.get(s, {}), **kv} for s, kv in given.items()}}
    o["settings"] = replace(settings, options=merged)
    get_solver(o["solver"])
    check_options(o["settings"])
    return o


class PartitionedModule(nn.Module):
    """A model whose forward runs an emitted plan on the local runtime.

    Attributes
    ----------
    segments : nn.ModuleDict
        The segment modules the runtime runs (they share weights with the model when
        every device maps to the model's device).
    artifact : Artifact
    runtime : LocalRuntime
    result : api.Result or None
        The graded plan (predicted latency, bound, gap).
    plans : PlanCache or None
        Plans per input shape, when the module re-plans for new shapes; ``artifact``,
        ``runtime`` and ``result`` are those of the plan the last call used.

    Notes
    -----
    Devices are chosen by ``map_devices`` when compiling; do not call ``.to()`` on this
    module (the runtime keeps its own placement). ``save(DIR)`` writes the artifact
    for ``partitioner run DIR``.
    """

    def __init__(self, artifact, runtime, result=None, plans=None):
        super().__init__()
        self.segments = nn.ModuleDict(runtime.modules)
        object.__setattr__(self, "artifact", artifact)
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "result", result)
        object.__setattr__(self, "plans", plans)

    def forward(self, *args, **kwargs):
        if self.plans is not None:
            from .ir.inputs import with_keywords
            from .plan_cache import shape_key

            bound = with_keywords(self.artifact.schedule, args, kwargs) if kwargs else args
            res, art, rt = self.plans.get(args, kwargs, key=shape_key(bound))
            object.__setattr__(self, "result", res)
            object.__setattr__(self, "artifact", art)
            object.__setattr__(self, "runtime", rt)
        return self.runtime.run(*args, **kwargs)

    @property
    def last_stats(self):
        """:class:`~partitioner.runtime.local.RunStats` of the last call."""
        return self.runtime.last_stats

    def save(self, path, **kw):
        """Write the artifact (see :func:`partitioner.emit.build.save_artifact`)."""
        return self.artifact.save(path, **kw)

    def extra_repr(self) -> str:
        s = self.artifact.schedule
        used = sorted({seg.device for seg in s.segments})
        return (f"{len(s.segments)} segments on {', '.join(used)} (spec {s.meta.get('spec')}, solver "
                f"{s.meta.get('solver')}, predicted latency {s.meta.get('predicted_latency_s', float('nan')):.3g} s)")


def _plan_and_run(model, example_inputs, o: dict[str, Any], frontend: str, example_kwargs: dict | None = None):
    from . import api
    from .emit.build import emit
    from .ir.plan import Constraints
    from .ir.settings import Settings
    from .runtime.local import LocalRuntime

    settings = o["settings"] or Settings(seed=o["seed"], time_limit=o["time_limit"])
    cons = Constraints(throughput_floor=o["throughput_floor"], latency_ceiling=o["latency_ceiling"])
    stage = "tracing"
    try:
        loaded = api.load_model(model, example_inputs, frontend=frontend, example_kwargs=example_kwargs)
        stage = "planning"
        res = api.compile_plan(loaded, o["hw"], o["objective"], o["solver"], settings, cons,
                               coarsen_to=o["coarsen_to"])
        stage = "emitting the plan of"
        art = emit(res, segmentation=o["segmentation"])
        stage = "starting the runtime of"
        rt = LocalRuntime(art, o["map_devices"], threads=o["threads"], timeout_s=o["timeout_s"],
                          copy_same_device=o["copy_same_device"], profile=o["profile"])
    except PartitionerError:
        raise
    except Exception as err:  # noqa: BLE001 - an error from inside torch: say where, and what to do
        raise PartitionerError(f"{stage} {type(model).__name__} failed inside torch: {type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                               hint="check that the model runs eagerly on these inputs; then try another frontend "
                               "(frontend='export' or 'fx'), or report the error with its traceback "
                               "(logging at DEBUG level)") from err
    return res, art, rt


def compile(model: nn.Module, example_inputs, hw: str = "server-cpu-2gpu", objective: str = "latency",
            solver: str = "split", **opts) -> PartitionedModule:
    """Plan ``model`` for a hardware spec and return a drop-in module that runs the plan.

    Parameters
    ----------
    model : nn.Module
    example_inputs : tuple or dict
        Positional inputs of ``model.forward`` (a single tensor is accepted), or keyword
        inputs (a dict: ``{"input_ids": ..., "attention_mask": ...}``).
    hw, objective, solver : str
        Spec name or YAML path; ``"latency"`` or ``"throughput"``; a registered solver.
    **opts
        The options of :data:`OPTIONS` (``map_devices``, ``threads``, ``time_limit``...; the
        module docstring lists them); a solver's own options as ``**{"split.restarts": 8}``.

    Returns
    -------
    PartitionedModule
        ``module(*inputs)`` (or ``module(**inputs)``) equals ``model(...)``, with the same
        output type; ``module.result`` holds the predicted figures and
        ``module.last_stats`` the measured ones. A model whose config has ``use_cache`` on
        is compiled with it off (no ``past_key_values`` in the outputs; said in the log).

    Raises
    ------
    PartitionerError
        Tracing, planning or emitting failed (the message names the stage and the node).
    """
    from .frontend.capture import split_inputs
    from .plan_cache import PlanCache, shape_key

    o = _options(dict(opts, hw=hw, objective=objective, solver=solver))
    args, kwargs = split_inputs(example_inputs)
    res, art, rt = _plan_and_run(model, args, o, o["frontend"], kwargs)
    replan = o["replan"] if o["replan"] is not None else bool(art.schedule.meta.get("shape_specialised"))
    plans = None
    if replan:
        def build(a, kw):
            return _plan_and_run(model, a, o, art.schedule.meta.get("frontend") or o["frontend"], kw)

        plans = PlanCache(build, o["max_plans"], type(model).__name__)
        plans.put(shape_key(art.example_inputs), (res, art, rt))
    return PartitionedModule(art, rt, res, plans)


# ---- torch.compile backend ---------------------------------------------------------------
def dynamo_backend(gm: torch.fx.GraphModule, example_inputs: list, *, options: dict | None = None,
                   mode: str | None = None, **kw):
    """A ``torch.compile`` backend that plans, emits and runs each captured graph.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The graph dynamo captured.
    example_inputs : list
        Its inputs (parameters and buffers included where dynamo lifts them).
    options : dict, optional
        From ``torch.compile(..., options={...})``; see the module docstring.
    mode : str, optional
        Ignored (torch.compile's ``mode``).
    **kw
        The same options as keywords (for ``functools.partial``).

    Returns
    -------
    callable
        Takes the graph's inputs and returns its outputs; ``fn.partitioner`` holds the
        ``(result, artifact, runtime)`` it runs (None for a graph with dynamic shapes),
        ``fn.plans`` the plan cache.
    """
    from .plan_cache import PlanCache

    o = _options({**(options or {}), **kw})
    if o["frontend"] not in ("auto", "fx"):
        raise UsageError("the torch.compile backend traces dynamo's graph itself (fx, else torch.export)",
                         hint="leave out the `frontend` option")
    if mode not in (None, "default"):
        log.info("partitioner backend ignores torch.compile mode=%r", mode)
    if not any(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes):
        return gm.forward
    symbolic = any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and _symbolic(x))
                   for x in example_inputs)
    lifted_gm, keep, lifted = _lift_params(gm, list(example_inputs))
    keep_idx = [i for i, _ in keep]
    # fx re-traces dynamo's graph; one it cannot follow (functorch vmap calls in Hugging Face's
    # attention masks) is exported and functionalised instead (frontend auto)
    plans = PlanCache(lambda args, _kw: _plan_and_run(lifted_gm, list(args), o, "auto"), o["max_plans"],
                      "a torch.compile graph")
    if symbolic:  # planned per concrete shape on first use
        entry = None
        log.info("partitioner backend: a graph with dynamic shapes; each input shape is planned on first use")
    else:
        entry = plans.get(tuple(_real(example_inputs[i], n) for i, n in keep))
        res, art, rt = entry
        log.info("partitioner backend: %d segments, predicted latency %.3g s, %d parameters lifted",
                 len(art.schedule.segments), res.evaluation.latency, len(lifted))
    warned = []

    def compiled(*args):
        for i, t in lifted:
            if args[i] is not t:
                if not warned:
                    warned.append(True)
                    warnings.warn("partitioner backend: the graph was called with other parameters than it was "
                                  "compiled with; running it eagerly", stacklevel=2)
                return gm(*args)
        ins = [args[i] for i in keep_idx]
        rt = (entry if entry is not None else plans.get(tuple(ins)))[2]
        return rt.run(*ins)

    compiled.partitioner = entry
    compiled.plans = plans
    return compiled


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(s, torch.SymInt) for s in t.shape)


def _is_param_input(node, value) -> bool:
    if isinstance(value, nn.Parameter):
        return True
    src = getattr(node.meta.get("grapharg"), "source", None)
    if src is None:
        return False
    try:
        from torch._dynamo.source import is_from_unspecialized_param_buffer_source

        if is_from_unspecialized_param_buffer_source(src):
            return True
    except ImportError:  # pragma: no cover - older torch
        pass
    try:
        name = src.name() if callable(src.name) else src.name
    except Exception:  # noqa: BLE001
        return False
    return "._parameters[" in str(name) or "._buffers[" in str(name)


def _real(x, node):
    """A real tensor for tracing: ``x`` itself, dynamo's example behind a fake one, or zeros."""
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return x
    if not isinstance(x, torch.Tensor) or not is_fake(x):
        return x
    ex = getattr(node.meta.get("grapharg"), "example", None)
    if isinstance(ex, torch.Tensor) and not is_fake(ex):
        return ex
    return torch.zeros(tuple(x.shape), dtype=x.dtype, device=x.device)


def _lift_params(gm: torch.fx.GraphModule, example_inputs: list):
    """Copy ``gm`` with parameter/buffer inputs turned into attributes.

    Returns ``(new_gm, [(index, placeholder)] kept as inputs, [(index, tensor)] lifted)``.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return gm, list(enumerate(placeholders)), []
    graph = torch.fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    root: dict[str, Any] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            obj = gm
            for atom in str(n.target).split("."):
                obj = getattr(obj, atom)
            root[n.target] = obj
    keep, lifted = [], []
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for i, (ph, value) in enumerate(zip(placeholders, example_inputs)):
        new_ph = env[ph]
        value = _real(value, ph)
        if not (isinstance(value, torch.Tensor) and _is_param_input(ph, value)):
            keep.append((i, new_ph))
            continue
        name = f"lifted_{i}_{ph.name}"
        root[name] = value
        with graph.inserting_before(first):
            ga = graph.get_attr(name)
        new_ph.replace_all_uses_with(ga)
        graph.erase_node(new_ph)
        lifted.append((i, value))
    graph.lint()
    new_gm = torch.fx.GraphModule(root, graph, class_name="PartitionerDynamoGraph")
    return new_gm, keep, lifted
