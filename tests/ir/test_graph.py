import json
import math

import pytest

from partitioner.errors import GraphError
from partitioner.ir import graph as G

DOC = {
    "format": "partitioner.costgraph/1",
    "name": "tiny",
    "nodes": [
        {"id": "a", "op": "conv2d", "flops": 2.3e8, "param_bytes": 36864, "output_bytes": 802816},
        {"id": "b", "op": "matmul", "flops": 1.0e6, "output_bytes": 4000,
         "time_s": {"cpu": 0.0021, "gpu0": 0.0001}, "supported_on": ["cpu", "gpu"], "group": "g1"},
    ],
    "edges": [{"src": "a", "dst": "b", "bytes": 802816}],
    "inputs": [{"dst": "a", "bytes": 602112}],
    "outputs": [{"src": "b", "bytes": 4000}],
}


def doc(**kw):
    d = json.loads(json.dumps(DOC))
    d.update(kw)
    return d


def test_design_example_round_trips(tmp_path):
    g = G.from_json(DOC)
    assert g.order == ["a", "b"]
    assert g.node("b").time_s == {"cpu": 0.0021, "gpu0": 0.0001}
    assert g.node("b").supported_on == ("cpu", "gpu")
    p = tmp_path / "g.json"
    g.save(p)
    g2 = G.load(p)
    assert g2.to_json() == g.to_json()
    assert g2.bytes_moved("a") == 602112 + 802816 + 36864


def test_integer_ids_are_strings():
    d = doc(nodes=[{"id": 1}, {"id": 2}], edges=[{"src": 1, "dst": 2, "bytes": 5}], inputs=[], outputs=[])
    assert G.from_json(d).order == ["1", "2"]


def test_shared_input_is_one_tensor():
    d = doc(nodes=[{"id": "a"}, {"id": "b"}], edges=[], outputs=[],
            inputs=[{"name": "x", "dst": "a", "bytes": 10}, {"name": "x", "dst": "b", "bytes": 10}])
    g = G.from_json(d)
    assert len(g.inputs) == 1 and g.inputs[0].dsts == ("a", "b")


@pytest.mark.parametrize("change, needle", [
    ({"edges": [{"src": "a", "dst": "zz", "bytes": 1}]}, "unknown node 'zz'"),
    ({"edges": [{"src": "a", "dst": "b", "bytes": 1}, {"src": "b", "dst": "a", "bytes": 1}]}, "has a cycle"),
    ({"edges": [{"src": "a", "dst": "a", "bytes": 1}]}, "self-loop"),
    ({"edges": [{"src": "a", "dst": "b", "bytes": -3}]}, "must be finite and >= 0"),
    ({"nodes": [{"id": "a", "flops": math.nan}, {"id": "b"}]}, "must be finite"),
    ({"nodes": [{"id": "a"}, {"id": "a"}]}, "duplicate node id"),
    ({"nodes": [{"id": "a", "time_s": {"cpu": -1e-6}}, {"id": "b"}]}, "must be finite and >= 0"),
    ({"nodes": [{"id": "a", "time_s": {"cpu": math.nan}}, {"id": "b"}]}, "must be finite and >= 0"),
    ({"nodes": [{"id": "a", "time_s": {"cpu": 1e12}}, {"id": "b"}]}, "above the largest value"),
    ({"nodes": [{"id": "a", "flops": 1e300}, {"id": "b"}]}, "flops is 1e+300, above the largest value"),
    ({"edges": [{"src": "a", "dst": "b", "bytes": 1e200}]}, "above the largest value"),
    ({"edges": [{"src": "a", "dst": "b", "bytes": 8}, {"src": "a", "dst": "b", "bytes": 4}]},
     "edges[0] and edges[1] both connect 'a' -> 'b'"),
    ({"edges": [{"src": "a", "dst": "b", "bytes": 8}, {"src": "a", "dst": "b", "bytes": 8}]}, "both connect"),
    ({"nodes": [{"id": "a", "colour": 1}, {"id": "b"}]}, "unknown keys"),
    ({"format": "other/2"}, "unknown format"),
    ({"nodes": []}, "non-empty list"),
    ({"outputs": [{"src": "q", "bytes": 1}]}, "unknown node 'q'"),
])
def test_bad_graphs(change, needle):
    with pytest.raises(GraphError) as e:
        G.from_json(doc(**change))
    assert needle in str(e.value)


def test_zero_measured_times_are_accepted():
    """Profilers report 0 s for free ops (views, reshapes): a measurement, not an error."""
    g = G.from_json(doc(nodes=[{"id": "a", "time_s": {"cpu": 0}}, {"id": "b", "time_s": {"cpu": 0.0}}]))
    assert g.node("a").time_s == {"cpu": 0} and g.node("b").time_s == {"cpu": 0.0}


def test_duplicate_edges_hint_names_the_rule():
    with pytest.raises(GraphError) as e:
        G.from_json(doc(edges=[{"src": "a", "dst": "b", "bytes": 8}, {"src": "a", "dst": "b", "bytes": 4}]))
    assert "list each (src, dst) pair once" in e.value.hint and "largest bytes" in e.value.hint


def test_deeply_nested_json_is_a_clean_error(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('{"format": "partitioner.costgraph/1", "nodes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(GraphError, match="nested too deeply"):
        G.load(p)


def test_malformed_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(GraphError, match="not valid JSON"):
        G.load(p)
    with pytest.raises(GraphError, match="does not exist"):
        G.load(tmp_path / "missing.json")
