"""Artifacts as data: loading runs no Python from the directory, one content hash covers every
file, and file references stay inside the directory (issue 21, findings 1 and 9)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from instances import two_gpu_spec
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from partitioner import api
from partitioner.emit import program
from partitioner.emit.artifact import load_artifact
from partitioner.emit.build import emit
from partitioner.emit.manifest import seal
from partitioner.errors import ArtifactError, UsageError
from partitioner.ir.plan import Plan
from partitioner.machine.problem import Problem


class Small(nn.Module):
    """Leaf modules, a torch function, a tensor method, getattr and two outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        h = h.mul(2.0)
        return self.fc(h) * x.shape[0], h


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, x = Small().eval(), torch.randn(2, 3, 8, 8)
    lm = api.load_model(model, (x,))
    p = Problem(lm.graph, two_gpu_spec(), "latency")
    plan = Plan(tuple((i // 2) % 3 for i in range(p.n)), solver="round-robin")
    art = emit((lm.gm, p, plan), example_inputs=(x,))
    root = art.save(tmp_path_factory.mktemp("trust") / "art")
    with torch.no_grad():
        ref = model(x)
    return root, art, x, ref


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(saved[0], dst)
    return dst


def _program(root: Path, sid: str = "s0") -> tuple[Path, dict]:
    p = root / "segments" / sid / "program.json"
    return p, json.loads(p.read_text())


def test_content_hash_is_sha256sum_of_the_listing(saved):
    """The hash anyone can recompute: sha256 of `sha256sum` lines over every file, sorted."""
    root, art, *_ = saved
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                   and p.name != "manifest.json")
    assert {"schedule.json", "example_inputs.pt", "expected_outputs.pt", "segments/s0/program.json",
            "segments/s0/weights.safetensors", "segments/s0/module.py"} <= set(files)
    listing = "".join(f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    assert art.content_hash == hashlib.sha256(listing.encode()).hexdigest()
    assert load_artifact(root, expect=art.content_hash).content_hash == art.content_hash
    assert load_artifact(root, expect=art.content_hash.upper()).content_hash == art.content_hash
    with pytest.raises(UsageError, match="not a sha256"):
        load_artifact(root, expect="abc")


def test_module_py_is_never_executed(saved, copy, tmp_path):
    """Finding 1: a module.py that would create a marker file, with the manifest sealed again
    (as whoever can write the directory can): loading and running never execute it."""
    _, _, x, ref = saved
    marker = tmp_path / "MARKER"
    for seg in sorted((copy / "segments").iterdir()):
        (seg / "module.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nraise SystemExit(3)\n")
    seal(copy)
    back = load_artifact(copy)
    out = back.run_sequential(x)
    torch.testing.assert_close(out, ref)
    r = CliRunner().invoke(_app(), ["run", str(copy), "--check"])
    assert r.exit_code == 0 and "outputs match" in r.output, r.output
    assert not marker.exists()


def _insert(prog: dict, node: dict) -> None:
    k = next(i for i, n in enumerate(prog["nodes"]) if n["op"] != "placeholder")
    prog["nodes"].insert(k, node)


def _call(target, *args, op="call_function", name="evil", **kwargs):
    return {"op": op, "name": name, "target": target, "args": program.encode(tuple(args)),
            "kwargs": {"dict": kwargs}}


def _payloads(marker: str) -> dict:
    code = f"open({marker!r}, 'w')"
    first = lambda p: next(n["name"] for n in p["nodes"] if n["op"] == "placeholder")  # noqa: E731
    return {
        "builtins.exec": lambda p: _insert(p, _call("builtins.exec", code)),
        "builtins.eval": lambda p: _insert(p, _call("builtins.eval", code)),
        "builtins.open": lambda p: _insert(p, _call("builtins.open", marker, "w")),
        "os.system": lambda p: _insert(p, _call("os.system", f"touch {marker}")),
        "torch.load": lambda p: _insert(p, _call("torch.load", marker)),
        "torch.from_file": lambda p: _insert(p, _call("torch.from_file", marker)),
        "torch.ops.aten.set_": lambda p: _insert(p, _call("torch.ops.aten.set_.source_Tensor", 0)),
        "torch.ops.higher_order": lambda p: _insert(p, _call("torch.ops.higher_order.cond", 0)),
        "method register_hook": lambda p: _insert(p, _call("register_hook", {"node": first(p)}, op="call_method")),
        "method __class__": lambda p: _insert(p, _call("__class__", {"node": first(p)}, op="call_method")),
        "getattr __class__": lambda p: _insert(p, _call("builtins.getattr", {"node": first(p)}, "__class__")),
        "keyword injection": lambda p: _insert(p, _call("torch.relu", {"node": first(p)},
                                                        **{f"x={code}#": 1})),
        "name injection": lambda p: _insert(p, _call("torch.relu", {"node": first(p)}, name=f"a = {code}; b")),
        "module class": lambda p: p["modules"].update(evil={"class": "Sequential", "args": [], "kwargs": {}}),
        "module outside nn": lambda p: p["modules"].update(evil={"class": "os", "args": [], "kwargs": {}}),
        "call_module path": lambda p: _insert(p, _call("conv.__class__", {"node": first(p)}, op="call_module")),
        "unknown value tag": lambda p: _insert(p, {"op": "call_function", "name": "evil", "target": "torch.relu",
                                                   "args": {"tuple": [{"pickle": code}]}, "kwargs": {"dict": {}}}),
    }


@pytest.mark.parametrize("case", list(_payloads("m")))
def test_program_cannot_run_code(copy, tmp_path, case):
    """Finding 1: a program.json that names code (or tries to inject it into the generated
    forward), sealed again, is refused before anything runs."""
    marker = tmp_path / "MARKER"
    path, prog = _program(copy, "s1" if case.startswith("module") else "s0")
    if case.startswith("module") and not prog["modules"]:
        path, prog = _program(copy, "s0")
    _payloads(str(marker))[case](prog)
    path.write_text(json.dumps(prog))
    seal(copy)
    with pytest.raises(ArtifactError, match="refused|malformed|not an identifier") as e:
        load_artifact(copy)
    assert "Hint" in str(e.value)
    assert not marker.exists()


def test_swapped_weights_need_expect(saved, copy):
    """Zeroed weights and matching expected outputs, sealed again: without --expect the run
    even passes --check; with the hash printed at compile time it is refused (exit 2)."""
    root, art, x, _ = saved
    w = copy / "segments" / "s0" / "weights.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(w)).items()}, str(w))
    seal(copy)
    bad = load_artifact(copy)
    torch.save(bad.run_sequential(x), copy / "expected_outputs.pt")
    seal(copy)
    app, runner = _app(), CliRunner()
    r = runner.invoke(app, ["run", str(copy), "--check"])
    assert r.exit_code == 0 and "outputs match" in r.output  # what --check alone cannot see
    r = runner.invoke(app, ["run", str(copy), "--check", "--expect", art.content_hash])
    assert r.exit_code == 2 and "content hash" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["run", str(root), "--check", "--expect", art.content_hash, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["content_sha256"] == art.content_hash, r.output


def test_inputs_and_expected_outputs_are_covered(copy):
    """Finding 9: example_inputs.pt and expected_outputs.pt are in the manifest."""
    for name in ("example_inputs.pt", "expected_outputs.pt"):
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data + b"\0")
        with pytest.raises(ArtifactError, match=f"{name} was modified"):
            load_artifact(copy)
        (copy / name).write_bytes(data)
    load_artifact(copy)


@pytest.mark.parametrize("ref", ["../outside", "/etc", "segments/../../x", "segments/s0/../../.."])
def test_segment_reference_outside_the_directory(copy, ref):
    """Finding 9: a schedule whose segment points outside the directory, sealed again."""
    d = json.loads((copy / "schedule.json").read_text())
    d["segments"][0]["code"] = ref
    (copy / "schedule.json").write_text(json.dumps(d))
    seal(copy)
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        load_artifact(copy)


@pytest.mark.parametrize("ref", ["../../etc/passwd", "/etc/passwd", "segments/../schedule.json"])
def test_manifest_listing_outside_the_directory(copy, ref):
    """Finding 9: a manifest that lists a file outside the directory is refused (not read)."""
    m = json.loads((copy / "manifest.json").read_text())
    m["files"][ref] = "0" * 64
    from partitioner.emit.manifest import content_hash

    m["sha256"] = content_hash(m["files"])
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        load_artifact(copy)


@pytest.mark.parametrize("what", ["segments/s0/weights.safetensors", "segments/s1", "example_inputs.pt",
                                  "manifest.json"])
def test_symlinks_are_refused(copy, tmp_path, what):
    """Finding 9: a symlink anywhere in the artifact, even to an identical file, is refused."""
    target = tmp_path / "elsewhere"
    shutil.move(copy / what, target)
    (copy / what).symlink_to(target, target_is_directory=target.is_dir())
    with pytest.raises(ArtifactError, match="symbolic link") as e:
        load_artifact(copy)
    assert "Hint" in str(e.value)


def test_unlisted_and_missing_files(copy):
    (copy / "segments" / "s0" / "extra.py").write_text("print('hi')\n")
    with pytest.raises(ArtifactError, match="segments/s0/extra.py is not listed"):
        load_artifact(copy)
    (copy / "segments" / "s0" / "extra.py").unlink()
    (copy / "plan.json").write_text("{}")  # beside the artifact, as compile writes it: not part of it
    load_artifact(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(copy)


def test_replicas_are_covered(saved, copy):
    """Finding 9: replicas/rK are in the top-level manifest and its content hash."""
    _, art, *_ = saved
    shutil.copytree(copy, copy / "replicas" / "r1", ignore=shutil.ignore_patterns("replicas"))
    h = seal(copy)
    assert h != art.content_hash and load_artifact(copy, expect=h).content_hash == h
    w = copy / "replicas" / "r1" / "segments" / "s0" / "weights.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(w)).items()}, str(w))
    seal(copy / "replicas" / "r1")  # the replica's own manifest agrees: the top-level one does not
    with pytest.raises(ArtifactError, match="replicas/r1/(manifest.json|segments/.*) was modified"):
        load_artifact(copy)
    seal(copy)
    with pytest.raises(ArtifactError, match="content hash"):
        load_artifact(copy, expect=h)


def test_values_and_allow_lists():
    vals = (None, True, 3, -2.5, float("inf"), float("nan"), "s", (1, (2,)), [1, 2], {"k": (1,)},
            slice(1, None, 2), Ellipsis, torch.float16, torch.device("cpu"), torch.channels_last, torch.strided,
            1 + 2j)
    back = program.decode(json.loads(json.dumps(program.encode(vals), allow_nan=False)))
    assert repr(back) == repr(vals) and all(type(a) is type(b) for a, b in zip(back, vals))
    for fn in (torch.relu, torch.nn.functional.gelu, torch.nn.functional.relu, torch.ops.aten.add.Tensor,
               torch.ops.aten.convolution.default, getattr, len, torch.flatten, torch.split):
        assert program._resolve(program.function_name(fn)) is fn
    for fn in (torch.load, torch.save, exec, eval, open, print, torch.from_file, torch.ops.aten.set_.source_Tensor,
               torch.hub.load, torch.compile, shutil.rmtree, torch.sparse_coo_tensor, torch.ops.aten._reshape_alias,
               torch.ops.aten._unsafe_index.Tensor, torch.ops.aten.sparse_coo_tensor.size):
        with pytest.raises(program.NotAllowed):
            program.function_name(fn)
    assert program.method_allowed("view") and program.method_allowed("add_")
    assert not any(program.method_allowed(m) for m in ("register_hook", "apply_", "__class__", "storage",
                                                       "const_data_ptr", "sparse_resize_"))
    assert program.attribute_allowed("shape") and not program.attribute_allowed("grad_fn")
    assert not program.attribute_allowed("__class__")


def test_compile_prints_the_hash_and_run_checks_it(tmp_path):
    (tmp_path / "m.py").write_text("import torch\nfrom torch import nn\n\n\ndef make():\n    torch.manual_seed(0)\n"
                                   "    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)), "
                                   "(torch.randn(3, 6),)\n")
    app, runner, out = _app(), CliRunner(), tmp_path / "out"
    r = runner.invoke(app, ["compile", f"{tmp_path / 'm.py'}:make", "--out", str(out), "--no-gantt", "--json"])
    assert r.exit_code == 0, r.output
    h = json.loads(r.output)["artifact_sha256"]
    assert len(h) == 64 and load_artifact(out).content_hash == h
    r = runner.invoke(app, ["compile", f"{tmp_path / 'm.py'}:make", "--out", str(out), "--no-gantt", "--force"])
    assert r.exit_code == 0 and f"--expect {h}" in r.output.replace("\n", ""), r.output
    r = runner.invoke(app, ["run", str(out), "--check", "--expect", h])
    assert r.exit_code == 0 and h in r.output.replace("\n", ""), r.output
    for bad, needle in (("0" * 64, "content hash"), ("xyz", "not a sha256")):
        r = runner.invoke(app, ["run", str(out), "--expect", bad])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def _app():
    from partitioner.cli.main import app

    return app


def test_bitwise_aten_operators_under_dunder_names_are_allowed():
    """ATen registers its bitwise and shift operators as ``aten::__and__`` etc.; graphs of
    recent transformers releases use them for masks, so they must load (other dunder and
    private names stay refused)."""
    from partitioner.emit import program

    assert program._resolve("torch.ops.aten.__and__.Tensor") is torch.ops.aten.__and__.Tensor
    assert program._resolve("torch.ops.aten.__or__.Tensor") is torch.ops.aten.__or__.Tensor
    for bad in ("torch.ops.aten.__class__", "torch.ops.aten.__loader__", "torch.ops.aten._foreach_add"):
        with pytest.raises(program.NotAllowed):
            program._resolve(bad)
