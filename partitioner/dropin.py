"""Framework entry points: a drop-in ``compile`` and a ``torch.compile`` backend.

``partitioner.dropin.compile(model, example_inputs, hw=..., objective=..., solver=...)``
traces the model, plans it for the spec, emits the plan and returns a
:class:`PartitionedModule`: an ``nn.Module`` whose ``forward`` runs the plan on the local
runtime (:mod:`partitioner.runtime.local`) and returns what the model returns.

``dynamo_backend`` is a ``torch.compile`` backend: ``torch.compile(model,
backend=dynamo_backend, options={...})``, or ``backend="partitioner"`` once the package's
``torch_dynamo_backends`` entry point is installed. ``torch.compile`` hands a custom
backend its ``options`` dict as the keyword argument ``options`` (and ``mode`` as
``mode``); the same keys may also be bound with ``functools.partial``. Each graph dynamo
captures is planned and emitted separately (graph breaks give several plans). Recent
torch versions (``inline_inbuilt_nn_modules``, default since 2.5) pass parameters and
buffers as graph inputs: the backend lifts every input that is a parameter or buffer
(an ``nn.Parameter``, or a dynamo source under a module's ``_parameters``/``_buffers``)
back into a constant of the graph, so that it is placed with the operators that use it
instead of being sent from the host on every call. The compiled function checks on every
call that the lifted tensors are the same objects (a recompiled model or another
instance of the same class would pass others) and otherwise runs the graph eagerly, with
a warning. Graphs with symbolic shapes or without operators run eagerly too.

Options (both entry points)
---------------------------
``hw`` (spec name or path, default ``"server-cpu-2gpu"``), ``objective``
(``"latency"``), ``solver`` (``"heft"``), ``time_limit`` (s), ``seed``, ``threads``
(CPU intra-op budget per worker), ``map_devices`` (spec device -> torch device, default
all cpu), ``segmentation`` (``"faithful"`` | ``"minimal"``), ``timeout_s``,
``throughput_floor``, ``latency_ceiling``, ``coarsen_to``, ``frontend`` (``compile``
only: ``"fx"`` | ``"export"``), ``settings`` (a :class:`~partitioner.machine.problem.Settings`).
Unknown keys raise :class:`~partitioner.errors.UsageError`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from .errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["compile", "dynamo_backend", "PartitionedModule", "OPTIONS"]

#: every option accepted by :func:`compile` and :func:`dynamo_backend`, with its default
OPTIONS: dict[str, Any] = {
    "hw": "server-cpu-2gpu", "objective": "latency", "solver": "heft", "time_limit": 60.0, "seed": 0,
    "settings": None, "threads": None, "map_devices": None, "segmentation": "faithful", "timeout_s": 300.0,
    "throughput_floor": None, "latency_ceiling": None, "coarsen_to": None, "frontend": "fx",
    "copy_same_device": False, "profile": False,
}


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise UsageError(f"unknown partitioner option(s) {unknown}", hint=f"valid options: {', '.join(OPTIONS)}")
    return {**OPTIONS, **opts}


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

    Notes
    -----
    Devices are chosen by ``map_devices`` when compiling; do not call ``.to()`` on this
    module (the runtime keeps its own placement). ``save(DIR)`` writes the artifact
    for ``partitioner run DIR``.
    """

    def __init__(self, artifact, runtime, result=None):
        super().__init__()
        self.segments = nn.ModuleDict(runtime.modules)
        object.__setattr__(self, "artifact", artifact)
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "result", result)

    def forward(self, *args):
        return self.runtime.run(*args)

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


def _plan_and_run(model, example_inputs, o: dict[str, Any], frontend: str):
    from . import api
    from .emit.build import emit
    from .ir.plan import Constraints
    from .ir.settings import Settings
    from .runtime.local import LocalRuntime

    settings = o["settings"] or Settings(seed=o["seed"], time_limit=o["time_limit"])
    cons = Constraints(throughput_floor=o["throughput_floor"], latency_ceiling=o["latency_ceiling"])
    loaded = api.load_model(model, tuple(example_inputs), frontend=frontend)
    res = api.compile_plan(loaded, o["hw"], o["objective"], o["solver"], settings, cons, coarsen_to=o["coarsen_to"])
    art = emit(res, segmentation=o["segmentation"])
    rt = LocalRuntime(art, o["map_devices"], threads=o["threads"], timeout_s=o["timeout_s"],
                      copy_same_device=o["copy_same_device"], profile=o["profile"])
    return res, art, rt


def compile(model: nn.Module, example_inputs, hw: str = "server-cpu-2gpu", objective: str = "latency",
            solver: str = "heft", **opts) -> PartitionedModule:
    """Plan ``model`` for a hardware spec and return a drop-in module that runs the plan.

    Parameters
    ----------
    model : nn.Module
    example_inputs : tuple
        Positional inputs of ``model.forward`` (a single tensor is accepted).
    hw, objective, solver : str
        Spec name or YAML path; ``"latency"`` or ``"throughput"``; a registered solver.
    **opts
        See the module docstring (``map_devices``, ``threads``, ``time_limit``...).

    Returns
    -------
    PartitionedModule
        ``module(*inputs)`` equals ``model(*inputs)``; ``module.result`` holds the
        predicted figures and ``module.last_stats`` the measured ones.

    Raises
    ------
    PartitionerError
        Tracing, planning or emitting failed (the message names the stage and the node).
    """
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    o = _options(dict(opts, hw=hw, objective=objective, solver=solver))
    res, art, rt = _plan_and_run(model, example_inputs, o, o["frontend"])
    return PartitionedModule(art, rt, res)


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
        ``(result, artifact, runtime)`` it runs.
    """
    o = _options({**(options or {}), **kw})
    if o["frontend"] != "fx":
        raise UsageError("the torch.compile backend traces dynamo's graph with the fx frontend",
                         hint="leave out the `frontend` option")
    if mode not in (None, "default"):
        log.info("partitioner backend ignores torch.compile mode=%r", mode)
    if not any(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes):
        return gm.forward
    if any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and _symbolic(x)) for x in example_inputs):
        warnings.warn("partitioner backend: dynamic shapes are not supported, running this graph eagerly "
                      "(use torch.compile(..., dynamic=False))", stacklevel=2)
        return gm.forward
    lifted_gm, keep, lifted = _lift_params(gm, list(example_inputs))
    real = [_real(example_inputs[i], n) for i, n in keep]
    res, art, rt = _plan_and_run(lifted_gm, real, o, "fx")
    keep_idx = [i for i, _ in keep]
    warned = []

    def compiled(*args):
        for i, t in lifted:
            if args[i] is not t:
                if not warned:
                    warned.append(True)
                    warnings.warn("partitioner backend: the graph was called with other parameters than it was "
                                  "compiled with; running it eagerly", stacklevel=2)
                return gm(*args)
        return rt.run(*[args[i] for i in keep_idx])

    compiled.partitioner = (res, art, rt)
    log.info("partitioner backend: %d segments, predicted latency %.3g s, %d parameters lifted",
             len(art.schedule.segments), res.evaluation.latency, len(lifted))
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
