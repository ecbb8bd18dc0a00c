"""export_onnx + runtime/onnx_rt + cli_export: ONNX export of emitted plans, run by onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import partitioner.zoo as models
import pytest
import torch
from instances import two_gpu_spec
from torch import nn
from typer.testing import CliRunner

from partitioner import api
from partitioner.emit import onnx as export_onnx
from partitioner.emit.build import emit
from partitioner.emit.onnx import export_artifact, export_dir, is_onnx_export
from partitioner.errors import ArtifactError, UsageError
from partitioner.ir.plan import Plan
from partitioner.machine.problem import Problem
from partitioner.runtime.onnx_rt import OnnxRuntime, run_exported

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = dict(rtol=1e-4, atol=1e-4)
ZOO = {"resnet18": dict(image=32), "bert": dict(layers=2, hidden=64, heads=2, seq=16),
       "randwire-er": dict(nodes=4, image=32, channels=8)}
_MODELS: dict = {}


def zoo(name):
    if name not in _MODELS:
        model, inputs = models.get_model(name, **ZOO[name])
        with torch.no_grad():
            ref = model(*inputs)
        _MODELS[name] = (model, inputs, api.load_model(model, inputs), ref)
    return _MODELS[name]


def artifact_dir(tmp: Path, name: str, spec: str, solver: str) -> Path:
    model, inputs, lm, _ = zoo(name)
    res = api.compile_plan(lm, spec, solver=solver)
    emit(res).save(tmp / "art")
    return tmp / "art"


# ---- tiny models ---------------------------------------------------------------------------
class Chain(nn.Module):
    def __init__(self, n=6, w=12):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w, w) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Tuples(nn.Module):
    """A tuple (chunk), an int (size) and a torch.Size flow between segments; dict output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        parts = torch.chunk(self.a(x), 2, dim=1)
        n = x.size(0)
        shape = x.shape
        h = self.b(torch.cat([parts[1], parts[0]], 1))
        h = h.reshape(n, -1) + parts[0].sum()
        return {"h": h.reshape(shape), "parts": (parts[0], parts[1]), "n": n}


class DataDependent(nn.Module):
    """A Python float computed from the data (.item()) crosses a segment boundary."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        s = self.a(x).sum().item()
        return x * s


def tiny_artifact(tmp: Path, model: nn.Module, x, stride: int = 1) -> Path:
    """Emit ``model`` with every node placed round robin over cpu0/gpu0/gpu1 (many boundaries)."""
    torch.manual_seed(0)
    lm = api.load_model(model, (x,))
    p = Problem(lm.graph, two_gpu_spec(), "latency")
    plan = Plan(tuple((i // stride) % 3 for i in range(p.n)), solver="round-robin")
    emit((lm.gm, p, plan), example_inputs=(x,)).save(tmp / "art")
    return tmp / "art"


# ---- equivalence ---------------------------------------------------------------------------
def _cases():
    """Every model x solver x spec; the default run keeps one case per model."""
    out = []
    for name in ZOO:
        for solver in ("heft", "greedy"):
            for spec in ("server-cpu-2gpu", "edge-soc"):
                quick = (solver, spec) == ("heft", "server-cpu-2gpu")
                out.append(pytest.param(name, spec, solver, marks=() if quick else pytest.mark.slow))
    return out


@pytest.mark.parametrize("name,spec,solver", _cases())
def test_export_runs_like_the_model(tmp_path, name, spec, solver):
    """Every model x solver x spec, TorchScript exporter (fast); the dynamo path is below."""
    model, inputs, _, ref = zoo(name)
    src = artifact_dir(tmp_path, name, spec, solver)
    rep = export_dir(src, tmp_path / "onnx", exporter="torchscript")
    s = rep.schedule
    assert is_onnx_export(tmp_path / "onnx") and not is_onnx_export(src)
    assert all(seg.format == "onnx" and (tmp_path / "onnx" / seg.code).is_file() for seg in s.segments)
    for seg in s.segments:  # every ONNX name maps to a value the segment reads or writes
        e = s.meta["onnx"]["segments"][seg.id]
        assert {m["value"] for m in e["inputs"]} <= set(seg.inputs)
        assert {m["value"] for m in e["outputs"]} == set(seg.outputs)
    with torch.no_grad():
        rt = OnnxRuntime(tmp_path / "onnx", threads=1)
        torch.testing.assert_close(rt.run(*inputs), ref, **TOL)
        out, st = rt.run_with_stats(*inputs)
    torch.testing.assert_close(out, ref, **TOL)
    assert len(st.actions) == sum(len(a) for a in s.actions.values())
    assert {a.name for a in st.actions if a.op == "compute"} == {seg.id for seg in s.segments}


@pytest.mark.slow  # the dynamo exporter takes seconds per segment; the TorchScript path runs by default
def test_dynamo_exporter_and_parallel_runtime(tmp_path):
    """resnet18 (7 segments), default exporter: dynamo for every segment, recorded per segment."""
    _, inputs, _, ref = zoo("resnet18")
    src = artifact_dir(tmp_path, "resnet18", "server-cpu-2gpu", "heft")
    rep = export_dir(src, tmp_path / "onnx")
    assert rep.exporters() == {"dynamo": len(rep.schedule.segments)}
    data = json.loads((tmp_path / "onnx" / "schedule.json").read_text())
    assert {e["exporter"] for e in data["meta"]["onnx"]["segments"].values()} == {"dynamo"}
    assert all(e["opset"] >= 18 for e in data["meta"]["onnx"]["segments"].values())
    with torch.no_grad():
        for parallel in (False, True):
            out, st, _ = run_exported(tmp_path / "onnx", parallel=parallel, threads=1)
            torch.testing.assert_close(out, ref, **TOL)
            assert all(0 <= a.start_s <= a.end_s <= st.wall_s for a in st.actions)


def test_dynamo_refusal_falls_back_to_torchscript(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(3, 12)
    src = tiny_artifact(tmp_path, model, x, stride=4)
    real = export_onnx._export_one

    def picky(flat, args, path, exporter, *a, **kw):
        if exporter == "dynamo" and "s1" in path.name:
            raise RuntimeError("unsupported operator aten::fancy")
        return real(flat, args, path, exporter, *a, **kw)

    monkeypatch.setattr(export_onnx, "_export_one", picky)
    rep = export_dir(src, tmp_path / "onnx")
    used = {r.segment: r.exporter for r in rep.segments}
    assert used["s1"] == "torchscript" and set(used.values()) == {"dynamo", "torchscript"}
    meta = json.loads((tmp_path / "onnx" / "schedule.json").read_text())["meta"]["onnx"]["segments"]
    assert "aten::fancy" in meta["s1"]["fallback_reason"] and meta["s0"]["fallback_reason"] is None
    with torch.no_grad():
        torch.testing.assert_close(OnnxRuntime(tmp_path / "onnx").run(x), model(x), **TOL)
    with pytest.raises(ArtifactError, match="segment 's1'.*aten::fancy"):  # dynamo only: no fallback
        export_dir(src, tmp_path / "onnx2", exporter="dynamo")
    assert not (tmp_path / "onnx2").exists()


def test_tuples_ints_and_pytree_outputs_cross_boundaries(tmp_path):
    torch.manual_seed(0)
    model, x = Tuples().eval(), torch.randn(3, 8)
    src = tiny_artifact(tmp_path, model, x)
    rep = export_dir(src, tmp_path / "onnx", exporter="torchscript")
    lay = rep.schedule.meta["onnx"]["values"]
    kinds = {next(iter(v["tree"])) for v in lay.values()}
    assert {"tuple", "const", "leaf"} <= kinds  # chunk's tuple, size's int, tensors
    crossing = {t.value for t in rep.schedule.transfers}
    assert any(next(iter(lay[v]["tree"])) == "tuple" for v in crossing)  # a tuple is transferred
    with torch.no_grad():
        out = OnnxRuntime(tmp_path / "onnx").run(x)
        ref = model(x)
    assert out["n"] == 3 and isinstance(out["parts"], tuple)
    torch.testing.assert_close(out, ref, **TOL)


def test_data_dependent_python_value_is_refused(tmp_path):
    torch.manual_seed(0)
    src = tiny_artifact(tmp_path, DataDependent().eval(), torch.randn(2, 4))
    with pytest.raises(ArtifactError, match="depend on the input data") as ei:
        export_dir(src, tmp_path / "onnx", exporter="torchscript")
    assert "segment 's" in str(ei.value)
    assert not (tmp_path / "onnx").exists()


# ---- runtime failures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(3, 12)
    src = tiny_artifact(tmp, model, x, stride=4)
    export_dir(src, tmp / "onnx", exporter="torchscript")
    return model, x, src, tmp / "onnx"


def test_missing_or_modified_onnx_file(small_export, tmp_path):
    import shutil

    _, _, _, onnx_dir = small_export
    bad = tmp_path / "bad"
    shutil.copytree(onnx_dir, bad)
    (bad / "segments" / "s1.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"missing file segments/s1\.onnx"):
        OnnxRuntime(bad)
    shutil.copytree(onnx_dir, tmp_path / "mod")
    with open(tmp_path / "mod" / "segments" / "s0.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        OnnxRuntime(tmp_path / "mod")
    with pytest.raises(ArtifactError, match="not an ONNX export"):
        OnnxRuntime(small_export[2])


def test_wrong_shape_and_providers(small_export):
    _, x, _, onnx_dir = small_export
    rt = OnnxRuntime(onnx_dir)
    with pytest.raises(UsageError, match="static shapes"):
        rt.run(torch.randn(5, 12))
    from partitioner.errors import RuntimeFailure

    with pytest.raises(RuntimeFailure, match="NoSuchExecutionProvider"):
        OnnxRuntime(onnx_dir, providers={"gpu0": ["NoSuchExecutionProvider"]})


# ---- CLI -----------------------------------------------------------------------------------
def _app():
    """The package CLI: `partitioner export` and `partitioner run` (which dispatches ONNX exports)."""
    from partitioner.cli.main import app

    return app


def test_cli_export_run_and_refusals(small_export, tmp_path):
    model, x, src, _ = small_export
    app, runner = _app(), CliRunner()
    out = tmp_path / "exp"
    r = runner.invoke(app, ["export", str(src), "--format", "onnx", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "outputs match expected_outputs.pt" in r.output and (out / "schedule.json").is_file()
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    stamp = (out / "schedule.json").stat().st_mtime_ns
    r = runner.invoke(app, ["export", str(src), "--out", str(out), "--exporter", "torchscript"])
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "schedule.json").stat().st_mtime_ns == stamp
    r = runner.invoke(app, ["export", str(src), "--out", str(out), "--exporter", "torchscript", "--force",
                            "--opset", "17", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["exporters"] == {"torchscript": 3}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    r = runner.invoke(app, ["run", str(out), "--check", "--stats", str(tmp_path / "st.json")])
    assert r.exit_code == 0 and "outputs match" in r.output, r.output
    assert json.loads((tmp_path / "st.json").read_text())["summary"]["format"] == "onnx"
    r = runner.invoke(app, ["export", str(src), "--format", "tflite", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown export format" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_cli_failure_leaves_nothing(small_export, tmp_path, monkeypatch):
    _, _, src, _ = small_export

    def broken(flat, args, path, exporter, *a, **kw):
        if "s2" in path.name:
            raise RuntimeError(f"{exporter} cannot do it")
        return real(flat, args, path, exporter, *a, **kw)

    real = export_onnx._export_one
    monkeypatch.setattr(export_onnx, "_export_one", broken)
    r = CliRunner().invoke(_app(), ["export", str(src), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 2, r.output
    assert "segment 's2'" in r.output and "dynamo" in r.output and "torchscript" in r.output
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_a_crafted_segment_id_writes_nothing_outside_out(small_export, tmp_path):
    """A segment id such as ``../../evil`` once named a file outside --out, which stayed there
    after the export failed. Such ids are refused before any file is written: when the
    artifact is loaded, and by the exporter itself for an artifact built in memory."""
    import shutil
    from dataclasses import replace

    from partitioner.emit.artifact import load_artifact
    from partitioner.emit.manifest import seal

    _, _, src, _ = small_export
    art_dir = tmp_path / "work" / "art"
    shutil.copytree(src, art_dir)
    text = (art_dir / "schedule.json").read_text()
    (art_dir / "schedule.json").write_text(text.replace('"s2"', '"../../evil"'))
    seal(art_dir)  # a consistent manifest: the id itself must be refused
    out = tmp_path / "work" / "exp"
    r = CliRunner().invoke(_app(), ["export", str(art_dir), "--out", str(out), "--exporter", "torchscript"])
    assert r.exit_code == 2 and "segment id '../../evil'" in r.output, r.output
    assert not out.exists() and not list(tmp_path.rglob("evil*"))
    art = load_artifact(src)
    sched = art.schedule
    seg = next(x for x in sched.segments if x.id == "s2")
    bad = replace(sched, segments=tuple(replace(x, id="../../evil") if x is seg else x for x in sched.segments))
    crafted = replace(art, schedule=bad, modules=dict(art.modules, **{"../../evil": art.modules["s2"]}))
    dest = tmp_path / "dest" / "a" / "b"
    with pytest.raises(ArtifactError, match="cannot name a file"):
        export_artifact(crafted, dest, exporter="torchscript")
    assert not (tmp_path / "dest").exists() and not list(tmp_path.rglob("evil*"))


def test_export_needs_example_inputs(small_export, tmp_path):
    import shutil

    _, _, src, _ = small_export
    shutil.copytree(src, tmp_path / "art")
    (tmp_path / "art" / "example_inputs.pt").unlink()
    (tmp_path / "art" / "expected_outputs.pt").unlink()
    from partitioner.emit.manifest import seal

    seal(tmp_path / "art")
    with pytest.raises(ArtifactError, match="no example inputs"):
        export_artifact(tmp_path / "art", tmp_path / "o")
