"""Numbers, nesting and JSON the solvers and loaders can handle: clean errors (exit 2, one
message with a hint) instead of crashes, and standard JSON out."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from partitioner import api
from partitioner.cli.main import app
from partitioner.errors import (
    ArtifactError,
    CostModelError,
    GraphError,
    SpecError,
    UsageError,
)
from partitioner.ir import jsonio
from partitioner.ir.graph import from_json
from partitioner.ir.schedule import Schedule, valid_segment_id
from partitioner.ir.spec import load_spec, parse_spec

TINY = {
    "format": "partitioner.costgraph/1", "name": "tiny",
    "nodes": [{"id": "a", "op": "conv2d", "flops": 2.3e8, "param_bytes": 36864, "output_bytes": 802816},
              {"id": "b", "op": "matmul", "flops": 1.0e6, "output_bytes": 4000,
               "time_s": {"cpu": 0.0021, "gpu0": 0.0001}}],
    "edges": [{"src": "a", "dst": "b", "bytes": 802816}],
    "inputs": [{"dst": "a", "bytes": 602112}], "outputs": [{"src": "b", "bytes": 4000}],
}


def spec_doc(bw=31.5e9, lat=5e-6, peak=1e13):
    dev = lambda i, kind: {"id": i, "host": "n0", "kind": kind, "peak_flops": {"fp32": peak},  # noqa: E731
                           "memory": {"capacity_bytes": 1e10, "bandwidth_Bps": 1e11}}
    return {"name": "t", "devices": [dev("cpu0", "cpu"), dev("gpu0", "gpu")],
            "links": [{"a": "cpu0", "b": "gpu0", "bandwidth_Bps": bw, "latency_s": lat}]}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("change, needle", [
    (dict(bw=1e-300), "links.0.bandwidth_Bps: Value error, bandwidth_Bps must be a finite number in [1, 1e+16], "
                      "got 1e-300"),
    (dict(bw=1e300), "bandwidth_Bps must be a finite number"),
    (dict(lat=1e30), "latency_s must be a finite number in [0, 1e+06]"),
    (dict(peak=1e-300), "peak_flops.fp32 must be a finite number"),
])
def test_spec_numbers_outside_what_the_solvers_handle_are_named(change, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_doc(**change))
    assert needle in str(e.value) and e.value.hint


def test_tiny_bandwidth_is_exit_2_not_an_internal_error(tmp_path):
    """The case that crashed the bound LP ("internal error", exit 1), and a legal spec whose
    derived transfer time is beyond what the LPs and MILPs solve reliably."""
    import yaml

    g = tmp_path / "g.json"
    g.write_text(json.dumps(TINY))
    for bw, needle in ((1e-300, "bandwidth_Bps must be a finite number"),
                       (1.0, "takes 1e+14 s, beyond the 1e+09 s the solvers handle")):
        doc = spec_doc(bw=bw)
        big = dict(TINY, edges=[{"src": "a", "dst": "b", "bytes": 1e14}])
        g.write_text(json.dumps(big))
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
        r = run("compile", g, "--hw", tmp_path / "s.yaml", "--out", tmp_path / "o", "--no-gantt", "-q")
        assert r.exit_code == 2, r.output
        assert needle in r.output and "Hint:" in r.output and "internal error" not in r.output
        assert not (tmp_path / "o").exists()


def test_check_magnitudes_names_the_node_and_device():
    g = from_json(dict(TINY, nodes=[dict(TINY["nodes"][0], flops=1e18), TINY["nodes"][1]]))
    with pytest.raises(CostModelError, match=r"node 'a' takes 2e\+12 s on device 'cpu0', beyond the 1e\+09 s"):
        api.compile_plan(api.load_model(g), parse_spec(spec_doc(peak=1e6)), "latency", "heft")


def test_sub_femtosecond_times_are_refused_with_their_name():
    """1e-30 s made the bound LP report an infinite bound (a "bug" message); 0 is fine."""
    tiny_t = dict(TINY, nodes=[dict(TINY["nodes"][0], time_s={"cpu": 1e-30}), TINY["nodes"][1]])
    with pytest.raises(GraphError, match=r"node 'a' time_s\['cpu'\] is 1e-30 s, between 0 and"):
        from_json(tiny_t)
    tiny_flops = {"format": "partitioner.costgraph/1", "name": "tf", "nodes": [{"id": "a", "flops": 1e-300}]}
    with pytest.raises(CostModelError, match="every operator of 'tf' takes at most"):
        api.compile_plan(api.load_model(from_json(tiny_flops)), parse_spec(spec_doc()), "latency", "heft")


def test_zero_cost_plan_writes_standard_json(tmp_path):
    """Free ops only: period 0, throughput infinite, which plan.json writes as null."""
    free = {"format": "partitioner.costgraph/1", "name": "free",
            "nodes": [{"id": "a", "time_s": {"cpu": 0, "gpu": 0}}, {"id": "b", "time_s": {"cpu": 0, "gpu": 0}}],
            "edges": [{"src": "a", "dst": "b", "bytes": 0}]}
    g = tmp_path / "free.json"
    g.write_text(json.dumps(free))
    r = run("compile", g, "--out", tmp_path / "o", "--no-gantt", "-q")
    assert r.exit_code == 0, r.output

    def refuse(x):
        raise ValueError(f"non-standard JSON constant {x}")

    for name in ("plan.json", "costgraph.json", "trace.json"):
        doc = json.loads((tmp_path / "o" / name).read_text(), parse_constant=refuse)
        if name == "plan.json":
            assert doc["latency_s"] == 0 and doc["throughput_per_s"] is None
    r = run("compile", g, "--out", tmp_path / "o2", "--no-gantt", "--json")
    assert r.exit_code == 0 and json.loads(r.output, parse_constant=refuse)["throughput_per_s"] is None


def test_jsonio_writes_only_standard_json():
    import numpy as np

    doc = {"a": math.inf, "b": [1.5, -math.inf, math.nan, (np.float64(2.0), np.int64(3))], "c": np.array([1, 2])}
    assert json.loads(jsonio.dumps(doc)) == {"a": None, "b": [1.5, None, None, [2.0, 3]], "c": [1, 2]}
    with pytest.raises(ValueError):
        json.dumps({"x": math.inf}, allow_nan=False)  # what jsonio.dumps passes on


DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_nesting_is_a_clean_error_in_every_loader(tmp_path):
    from partitioner.emit.artifact import read_schedule_dir
    from partitioner.measure.profile import load_profile

    p = tmp_path / "deep.json"
    p.write_text('{"format": "x", "nodes": ' + DEEP + "}")
    (tmp_path / "schedule.json").write_text(p.read_text())
    for load, err in ((lambda: load_profile(p), CostModelError),
                      (lambda: read_schedule_dir(tmp_path, "artifact", "emit", "emit again"), ArtifactError),
                      (lambda: jsonio.read(p, error=UsageError, hint="h"), UsageError)):
        with pytest.raises(err, match="nested too deeply"):
            load()
    r = run("evaluate", "resnet18", "--placement", p)
    assert r.exit_code == 2 and "nested too deeply" in r.output
    r = run("compile", "resnet18", "--model-arg", "x=" + DEEP, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--model-arg x: the value is nested too deeply" in r.output
    y = tmp_path / "deep.yaml"
    y.write_text("name: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(SpecError, match="nested too deeply"):
        load_spec(y)


def _schedule(seg_id="s0", outputs=None, meta=None) -> dict:
    return {"format": "partitioner.schedule/1", "devices": ["A"], "host": "A", "inputs": ["x"],
            "outputs": outputs or {"value": "y"}, "values": [{"name": "x"}, {"name": "y", "producer": seg_id}],
            "segments": [{"id": seg_id, "device": "A", "inputs": ["x"], "outputs": ["y"]}], "transfers": [],
            "actions": {"A": [["compute", seg_id]]}, "meta": meta or {}}


@pytest.mark.parametrize("sid", ["../../evil", "/etc/x", "a/b", "..", ".hidden", "", "x" * 129, "a\\b", "s0\n",
                                 "[*]"])
def test_segment_ids_that_are_not_plain_file_names_are_refused(sid):
    assert not valid_segment_id(sid)
    with pytest.raises(ArtifactError, match="segment id"):
        Schedule.from_json(_schedule(sid))


def test_segment_ids_emit_writes_are_valid_and_trees_are_bounded():
    for sid in ("s0", "s12", "seg_3.a-b", "x" * 128):
        assert valid_segment_id(sid) and Schedule.from_json(_schedule(sid))
    deep = {"value": "y"}
    for _ in range(150):
        deep = {"tuple": [deep]}
    with pytest.raises(ArtifactError, match="output tree is nested more than 100 levels"):
        Schedule.from_json(_schedule(outputs=deep))
    with pytest.raises(ArtifactError, match="meta is nested"):
        Schedule.from_json(_schedule(meta={"k": json.loads("[" * 200 + "]" * 200)}))


def test_graph_limits_are_named():
    with pytest.raises(GraphError, match="time_s.*above the largest value"):
        from_json(dict(TINY, nodes=[dict(TINY["nodes"][0], time_s={"cpu": 1e10}), TINY["nodes"][1]]))
