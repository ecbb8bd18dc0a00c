"""The command line: happy paths and every bad input gives one clear message and exit 2."""

import json

import pytest
from typer.testing import CliRunner

from partitioner.cli.main import app

runner = CliRunner()

TINY = {
    "format": "partitioner.costgraph/1", "name": "tiny",
    "nodes": [{"id": "a", "op": "conv2d", "flops": 2.3e8, "param_bytes": 36864, "output_bytes": 802816},
              {"id": "b", "op": "matmul", "flops": 1.0e6, "output_bytes": 4000}],
    "edges": [{"src": "a", "dst": "b", "bytes": 802816}],
    "inputs": [{"dst": "a", "bytes": 602112}], "outputs": [{"src": "b", "bytes": 4000}],
}


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(TINY))
    return p


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compile_cost_graph_writes_plan(tiny, tmp_path):
    out = tmp_path / "out"
    r = run("compile", tiny, "--hw", "server-cpu-2gpu", "--solver", "heft", "--out", out)
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["placement"]) == {"a", "b"}
    assert plan["bound_s"] <= plan["value_s"] and 0 <= plan["gap"] < 1
    assert (out / "report.md").read_text().startswith("# Plan for `tiny`")
    assert "gap" in r.output and str(out) in r.output
    # refuse an existing directory, replace it with --force
    r2 = run("compile", tiny, "--out", out)
    assert r2.exit_code == 2 and "already exists" in r2.output and "--force" in r2.output
    assert run("compile", tiny, "--out", out, "--force").exit_code == 0


def test_evaluate_given_placement(tiny, tmp_path):
    pl = tmp_path / "pl.json"
    pl.write_text(json.dumps({"a": "gpu0", "b": "gpu0"}))
    r = run("evaluate", tiny, "--hw", "server-cpu-2gpu", "--placement", pl, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["devices"]["gpu0"]["nodes"] == 2 and s["feasible"]


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["edges"].append({"src": "b", "dst": "a", "bytes": 1}), "cycle"),
    (lambda d: d["edges"].append({"src": "a", "dst": "zz", "bytes": 1}), "unknown node"),
    (lambda d: d["nodes"][0].update(flops=-1), ">= 0"),
    (lambda d: d["nodes"][0].update(op="conv2d", supported_on=["accelerator"]), "can run on no device"),
    (lambda d: d["nodes"][0].update(param_bytes=1e15), "fit"),
    (lambda d: d["nodes"][1].update(flops=float("nan")), "flops"),
    (lambda d: d["nodes"][1].update(time_s={"gpu0": -1.0}), "time"),
    (lambda d: d["nodes"].append(dict(d["nodes"][0])), "duplicate"),
    (lambda d: d.pop("nodes"), "nodes"),
    (lambda d: d["nodes"][1].update(time_s={"gpu0": 0.0}), "is 0"),
    (lambda d: d["nodes"][0].update(id=None), "an id is a non-empty string"),
    (lambda d: d["nodes"][1].update(supported_on="gpu"), "supported_on must be a list"),
    (lambda d: d.update(edges={}), "`edges` must be a list"),
])
def test_bad_cost_graphs_exit_2_and_write_nothing(tmp_path, mutate, needle):
    d = json.loads(json.dumps(TINY))
    mutate(d)
    g = tmp_path / "g.json"
    g.write_text(json.dumps(d))
    out = tmp_path / "out"
    r = run("compile", g, "--solver", "heft", "--out", out)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_bad_arguments(tiny, tmp_path):
    cases = [
        (("compile", tiny, "--hw", "nope"), "unknown hardware spec"),
        (("compile", tiny, "--solver", "nope", "--out", tmp_path / "o1"), "unknown solver"),
        (("compile", tiny, "--objective", "speed", "--out", tmp_path / "o2"), "--objective"),
        (("compile", tiny, "--time-limit", "0", "--out", tmp_path / "o3"), "time-limit"),
        (("compile", "no-such-model", "--out", tmp_path / "o4"), "unknown model"),
        (("compile", tmp_path / "missing.json", "--out", tmp_path / "o5"), "does not exist"),
        (("evaluate", tiny, "--placement", tmp_path / "missing.json"), "does not exist"),
        (("specs", "show", "nope"), "unknown hardware spec"),
    ]
    for args, needle in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_bad_model_args_placements_and_output_paths(tiny, tmp_path):
    """Each gives exit code 2 and one message naming the problem (no "internal error")."""
    (tmp_path / "file.txt").write_text("x")
    place = tmp_path / "p.json"
    cases = [
        (("compile", "resnet50", "--model-arg", "bogus=1", "--no-emit"), "has no argument 'bogus'", None),
        (("compile", "randwire-ws", "--model-arg", "nodes=abc", "--no-emit"), "expects a value of type int", None),
        (("compile", "randwire-ws", "--model-arg", "nodes=-3", "--no-emit"), "cannot be built with", None),
        (("compile", "bert", "--model-arg", "layers=0", "--no-emit"), "sizes must be positive", None),
        (("compile", tiny, "--threads", "0"), "--threads must be >= 1", None),
        (("compile", tiny, "--out", tmp_path / "file.txt" / "x"), "is not a directory", None),
        (("evaluate", tiny, "--placement", place), "placement must be a JSON object", '{"placement": 5}'),
        (("evaluate", tiny, "--placement", place), "order must be a JSON object",
         '{"placement": {"a": "gpu0", "b": "gpu0"}, "order": [1, 2]}'),
        (("evaluate", tiny, "--placement", place), "order names unknown node(s) ['zz']",
         '{"placement": {"a": "gpu0", "b": "gpu0"}, "order": {"gpu0": ["a", "zz"]}}'),
        (("evaluate", tiny, "--placement", place), "lists node 'b' although it is placed on 'gpu1'",
         '{"placement": {"a": "gpu0", "b": "gpu1"}, "order": {"gpu0": ["a", "b"]}}'),
    ]
    for k, (args, needle, content) in enumerate(cases):
        if content is not None:
            place.write_text(content)
        if args[0] == "compile" and "--out" not in args:
            args = args + ("--out", tmp_path / f"o{k}")
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output and "internal error" not in r.output, (args, r.output)
        assert not (tmp_path / f"o{k}").exists()


def test_bad_spec_file(tiny, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ndevices:\n  - {id: c, host: h, kind: fpga, memory: {capacity_bytes: 1.0e+9}}\n")
    r = run("compile", tiny, "--hw", spec, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "unknown device kind 'fpga'" in r.output
    spec.write_text("name: s\ndevices:\n  - {id: a, host: h, kind: cpu, memory: {capacity_bytes: 1.0e+9}}\n"
                    "  - {id: b, host: g, kind: cpu, memory: {capacity_bytes: 1.0e+9}}\n")
    r = run("compile", tiny, "--hw", spec, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no route between devices 'a' and 'b'" in r.output


def test_listings():
    for args, needle in ((("specs",), "server-cpu-2gpu"), (("specs", "show", "edge-soc"), "dla0"),
                         (("models",), "resnet50"), (("solvers",), "heft")):
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert needle in r.output


def test_compare_table_json_and_plot(tiny, tmp_path):
    js, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    r = run("compare", tiny, "--solvers", "heft,milp-highs,cpsat,single", "--time-limit", "5",
            "--json", js, "--plot", png)
    assert r.exit_code == 0, r.output
    out = json.loads(js.read_text())
    rows = {row["solver"]: row for row in out["rows"]}
    assert set(rows) == {"heft", "milp-highs", "cpsat", "single"}
    assert rows["milp-highs"]["status"] == rows["cpsat"]["status"] == "optimal"
    assert rows["milp-highs"]["value_s"] == pytest.approx(rows["cpsat"]["value_s"], rel=1e-5)
    for row in rows.values():
        assert row["value_over_bound"] >= 1 - 1e-9 and row["value_s"] >= rows["cpsat"]["value_s"] * (1 - 1e-5)
    assert png.stat().st_size > 1000
    assert "value/bound" in r.output and "milp-highs" in r.output


def test_compare_keeps_the_table_when_a_solver_finds_no_plan(tiny, tmp_path, monkeypatch):
    """A solver that stops without a plan (and without proving infeasibility) is a
    "no_solution" row; the other solvers' rows are still shown and written."""
    from partitioner.errors import NoSolutionError
    from partitioner.solvers.registry import SOLVERS, SolverInfo

    def nothing(problem, settings):
        raise NoSolutionError("stub: no feasible plan found within the time limit", hint="raise the time limit")

    monkeypatch.setitem(SOLVERS, "nothing", SolverInfo("nothing", nothing, "finds nothing", True, None))
    js = tmp_path / "c.json"
    r = run("compare", tiny, "--solvers", "heft,nothing,greedy", "--time-limit", "5", "--json", js)
    assert r.exit_code == 0, r.output
    rows = {row["solver"]: row for row in json.loads(js.read_text())["rows"]}
    assert rows["nothing"]["status"] == "no_solution" and "within the time limit" in rows["nothing"]["error"]
    assert rows["heft"]["value_s"] > 0 and rows["greedy"]["value_s"] > 0


def test_compare_defaults_and_bad_input(tiny, tmp_path):
    r = run("compare", tiny, "--time-limit", "5", "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    names = {row["solver"] for row in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert {"split", "heft", "cpsat", "milp-cbc", "milp-highs"} <= names and "milp" not in names
    r = run("compare", tiny, "--solvers", "heft,nosuch")
    assert r.exit_code == 2 and "unknown solver 'nosuch'" in r.output
    r = run("compare", tiny, "--solvers", ",")
    assert r.exit_code == 2 and "--solvers is empty" in r.output
    r = run("compare", tiny, "--time-limit", "0")
    assert r.exit_code == 2 and "time-limit" in r.output
    r = run("compare", tiny, "--json", tmp_path / "nodir" / "x.json")
    assert r.exit_code == 2 and "writable" in r.output


def test_malformed_json_and_untraceable_model(tmp_path):
    g = tmp_path / "g.json"
    g.write_text('{"nodes": [')
    r = run("compile", g, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "JSON" in r.output and not (tmp_path / "o").exists()
    src = tmp_path / "m.py"
    src.write_text("import torch\n"
                   "class M(torch.nn.Module):\n"
                   "    def forward(self, x):\n"
                   "        if x.sum() > 0:\n"
                   "            return x * 2\n"
                   "        return x\n"
                   "def factory():\n"
                   "    return M(), (torch.ones(2, 2),)\n")
    r = run("compile", f"{src}:factory", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "--frontend export" in r.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, needle", [
    ("bandwidth_Bps: 0", "bandwidth"), ("bandwidth_Bps: -5", "bandwidth"), ("bandwidth_Bps: .nan", "bandwidth"),
])
def test_bad_link_numbers(tiny, tmp_path, bad, needle):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ndevices:\n"
                    "  - {id: a, host: h, kind: cpu, peak_flops: {fp32: 1.0e+11}, memory: {capacity_bytes: 1.0e+9}}\n"
                    "  - {id: b, host: h, kind: gpu, peak_flops: {fp32: 1.0e+12}, memory: {capacity_bytes: 1.0e+9}}\n"
                    f"links:\n  - {{a: a, b: b, {bad}, latency_s: 1.0e-6}}\n")
    r = run("compile", tiny, "--hw", spec, "--out", tmp_path / "o")
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
