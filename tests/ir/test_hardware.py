import math

import pytest

from partitioner.errors import SpecError
from partitioner.ir.spec import parse_spec
from partitioner.machine.links import link_table

BASE = {"name": "s", "devices": [
    {"id": "cpu0", "host": "a", "kind": "cpu", "peak_flops": {"fp32": 1e12}, "memory": {"capacity_bytes": 1e9, "bandwidth_Bps": 1e11}},
    {"id": "gpu0", "host": "a", "kind": "gpu", "peak_flops": {"fp32": 1e13}, "memory": {"capacity_bytes": 1e9, "bandwidth_Bps": 1e12}},
    {"id": "cpu1", "host": "b", "kind": "cpu", "peak_flops": {"fp32": 1e12}, "memory": {"capacity_bytes": 1e9, "bandwidth_Bps": 1e11}},
    {"id": "gpu1", "host": "b", "kind": "gpu", "peak_flops": {"fp32": 1e13}, "memory": {"capacity_bytes": 1e9, "bandwidth_Bps": 1e12}},
], "links": [
    {"a": "cpu0", "b": "gpu0", "bandwidth_Bps": 2e10, "latency_s": 1e-5},
    {"a": "cpu1", "b": "gpu1", "bandwidth_Bps": 2e10, "latency_s": 1e-5},
    {"a": "cpu0", "b": "cpu1", "bandwidth_Bps": 1e10, "latency_s": 5e-6},
]}


def spec_with(**changes):
    import copy

    d = copy.deepcopy(BASE)
    d.update(changes)
    return d


def test_routing_through_hosts_adds_hops():
    s = parse_spec(BASE)
    t = link_table(s).transfer_time("gpu0", "gpu1", 1e6)
    expect = (1e-5 + 1e6 / 2e10) * 2 + 5e-6 + 1e6 / 1e10
    assert t == pytest.approx(expect, rel=1e-12)
    assert link_table(s).transfer_time("gpu1", "gpu0", 1e6) == pytest.approx(t)
    assert link_table(s).transfer_time("gpu0", "gpu0", 1e9) == 0
    hops = link_table(s).route(1, 3, 1e6).hops
    assert [s.device_ids[a] for a, _ in hops] + [s.device_ids[hops[-1][1]]] == ["gpu0", "cpu0", "cpu1", "gpu1"]


def test_best_route_depends_on_size():
    # a slow-latency fat link vs a fast-latency thin link: small tensors take one, big the other
    d = spec_with(links=[
        {"a": "cpu0", "b": "gpu0", "bandwidth_Bps": 1e9, "latency_s": 1e-6},
        {"a": "cpu0", "b": "cpu1", "bandwidth_Bps": 1e11, "latency_s": 1e-6},
        {"a": "cpu1", "b": "gpu0", "bandwidth_Bps": 1e11, "latency_s": 1e-3},
        {"a": "cpu1", "b": "gpu1", "bandwidth_Bps": 1e10, "latency_s": 1e-6},
    ])
    lt = link_table(parse_spec(d))
    small, big = 1e3, 1e9
    assert lt.transfer_time("cpu0", "gpu0", small) == pytest.approx(1e-6 + small / 1e9)
    assert lt.transfer_time("cpu0", "gpu0", big) == pytest.approx(1e-6 + 1e-3 + 2 * big / 1e11)
    m = lt.matrix(big)
    assert m[0, 1] == pytest.approx(lt.transfer_time("cpu0", "gpu0", big))
    assert all(m[i, i] == 0 for i in range(4))


@pytest.mark.parametrize("change, needle", [
    ({"links": BASE["links"][:2]}, "no route between devices"),
    ({"devices": [dict(BASE["devices"][0], kind="fpga")] + BASE["devices"][1:]}, "unknown device kind 'fpga'"),
    ({"links": BASE["links"] + [{"a": "cpu0", "b": "tpu9", "bandwidth_Bps": 1e9}]}, "unknown device 'tpu9'"),
    ({"links": BASE["links"] + [{"a": "cpu0", "b": "gpu1", "bandwidth_Bps": -1}]}, "bandwidth_Bps must be"),
    ({"links": BASE["links"] + [{"a": "cpu0", "b": "gpu1", "bandwidth_Bps": math.nan}]}, "bandwidth_Bps must be"),
    ({"links": BASE["links"] + [{"a": "gpu0", "b": "cpu0", "bandwidth_Bps": 1e9}]}, "listed twice"),
    ({"devices": BASE["devices"] + [BASE["devices"][0]]}, "duplicate device ids"),
    ({"host_device": "gpu7"}, "host_device 'gpu7'"),
    ({"memory_reserve": 1.5}, "memory_reserve"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_bad_specs_give_clear_errors(change, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_with(**change))
    assert needle in str(e.value)
    assert e.value.hint


def test_host_defaults_to_first_cpu():
    s = parse_spec(BASE)
    assert s.host == "cpu0"
    assert parse_spec(spec_with(host_device="gpu1")).host == "gpu1"


def test_missing_spec_file_and_name():
    from partitioner.ir.spec import load_spec

    with pytest.raises(SpecError, match="unknown hardware spec"):
        load_spec("no-such-spec")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("/nonexistent/x.yaml")
