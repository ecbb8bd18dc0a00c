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
    ({"nodes": [{"id": "a", "time_s": {"cpu": 0}}, {"id": "b"}]}, "is 0"),
    ({"nodes": [{"id": "a", "colour": 1}, {"id": "b"}]}, "unknown keys"),
    ({"format": "other/2"}, "unknown format"),
    ({"nodes": []}, "non-empty list"),
    ({"outputs": [{"src": "q", "bytes": 1}]}, "unknown node 'q'"),
])
def test_bad_graphs(change, needle):
    with pytest.raises(GraphError) as e:
        G.from_json(doc(**change))
    assert needle in str(e.value)


def test_malformed_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(GraphError, match="not valid JSON"):
        G.load(p)
    with pytest.raises(GraphError, match="does not exist"):
        G.load(tmp_path / "missing.json")
