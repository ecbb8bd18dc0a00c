"""The shipped hardware specs in ``hw_specs/``: they load, every number carries its source in a
comment, and their shapes and link tables are what the specs promise."""

from __future__ import annotations

import itertools
import re

import pytest
import yaml

from partitioner.ir.spec import SPEC_DIR, list_specs, load_spec
from partitioner.machine.links import link_table

EXPECTED = {"server-cpu-2gpu", "edge-soc", "cluster-2x-a100-pcie", "cpu-threads-2"}
SPEC_FILES = sorted(SPEC_DIR.glob("*.yaml"))
SPEC_NAMES = [p.stem for p in SPEC_FILES]

#: A YAML number (int or float, YAML 1.1 or 1.2 spelling: 19.5e12, 19.5e+12, .5, 40, -3).
NUMBER = r"[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d+)(?:[eE][-+]?\d+)?"
#: A number in a value position of a line: after "key: ", "- " or a flow "[", "{", ",", and followed
#: by the end of the value (end of line, or a flow "," "]" "}").
NUMERIC_VALUE = re.compile(rf"(?:^\s*-\s+|:\s+|[\[{{,]\s*)({NUMBER})\s*(?:[,\]}}]|$)")
#: A source comment: "#" then at least a few non-blank characters.
SOURCE_COMMENT = re.compile(r"\s#\s*\S.{2,}")


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a YAML line; a '#' starts a comment at line start or after a blank."""
    m = re.search(r"(?:^|\s)#", line)
    if not m:
        return line, ""
    return line[: m.start()], line[m.start():]


@pytest.fixture(scope="module", params=SPEC_NAMES)
def spec_name(request):
    return request.param


def test_expected_specs_are_shipped_and_listed():
    assert EXPECTED <= set(SPEC_NAMES)
    assert set(list_specs()) == set(SPEC_NAMES)


def test_spec_loads_and_is_named_after_its_file(spec_name):
    spec = load_spec(spec_name)
    assert spec.name == spec_name
    assert spec.description.strip()
    assert spec.host in spec.device_ids
    for d in spec.devices:
        assert d.peak("float32") is not None, d.id
        assert d.memory.bandwidth_Bps is not None, d.id
        assert all(op == op.lower() for op in d.unsupported_ops), d.id


def test_regex_finds_numbers_in_value_positions():
    hits = ["  fp32: 19.5e12", "  fp32: 19.5e+12 ", "memory_reserve: 0.1", "    threads: 1", "  - 40",
            "  - {a: cpu0, b: gpu0, bandwidth_Bps: 31.5e9, latency_s: 5.0e-6}", "x: [1, 2]"]
    misses = ["  - id: cpu0", "name: server-cpu-2gpu", "    model: a100-pcie-40gb",
              "description: two GPUs, 2x A100 on PCIe 4.0 x16", "unsupported_ops: []"]
    for line in hits:
        assert NUMERIC_VALUE.search(line), line
    for line in misses:
        assert not NUMERIC_VALUE.search(line), line


def test_every_numeric_line_has_a_source_comment(spec_name):
    """Text check: a line with a number in a value position ends with a '# source' comment."""
    path = SPEC_DIR / f"{spec_name}.yaml"
    bad = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        code, comment = _split_comment(line)
        if NUMERIC_VALUE.search(code) and not SOURCE_COMMENT.match(comment):
            bad.append(f"{path.name}:{no}: {line.strip()}")
    assert not bad, "numbers without a source comment:\n" + "\n".join(bad)


def test_every_numeric_scalar_has_a_source_comment(spec_name):
    """Parser check: every plain YAML scalar that reads as a number is followed by a comment on its line."""
    path = SPEC_DIR / f"{spec_name}.yaml"
    text = path.read_text()
    lines = text.splitlines()
    number = re.compile(rf"{NUMBER}$")
    bad = []

    def walk(node):
        if isinstance(node, yaml.ScalarNode):
            if node.style is None and number.match(node.value):
                rest = lines[node.end_mark.line][node.end_mark.column:]
                if not SOURCE_COMMENT.search(rest):
                    bad.append(f"{path.name}:{node.start_mark.line + 1}: {node.value}")
        elif isinstance(node, yaml.SequenceNode):
            for child in node.value:
                walk(child)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(k)
                walk(v)

    walk(yaml.compose(text))
    assert not bad, "numbers without a source comment:\n" + "\n".join(bad)


def test_server_cpu_2gpu():
    spec = load_spec("server-cpu-2gpu")
    cpus = [d for d in spec.devices if d.kind == "cpu"]
    gpus = [d for d in spec.devices if d.kind == "gpu"]
    assert len(cpus) == 1 and len(gpus) == 2 and len(spec.devices) == 3
    assert gpus[0].model != gpus[1].model
    assert spec.host == cpus[0].id == "cpu0"
    assert spec.memory_reserve == pytest.approx(0.1)
    # no direct GPU-GPU link: the transfer goes through the host
    t = link_table(spec)
    g0, g1 = (g.id for g in gpus)
    assert t.transfer_time(g0, g1, 1e6) == pytest.approx(t.transfer_time(g0, "cpu0", 1e6)
                                                         + t.transfer_time("cpu0", g1, 1e6))


def test_edge_soc_has_an_npu_that_cannot_run_transformer_ops():
    spec = load_spec("edge-soc")
    kinds = sorted(d.kind for d in spec.devices)
    assert kinds == ["accelerator", "cpu", "gpu"]
    npu = next(d for d in spec.devices if d.kind == "accelerator")
    required = {"softmax", "layernorm", "embedding", "gelu", "matmul", "bmm", "baddbmm", "getitem", "view",
                "permute", "transpose", "reshape", "contiguous", "size", "cat", "truediv", "mul"}
    assert "softmax" in npu.unsupported_ops
    assert required <= set(npu.unsupported_ops)
    assert {"conv2d", "relu", "add", "batch_norm", "max_pool2d"}.isdisjoint(npu.unsupported_ops)
    assert npu.peak("float32") == npu.peak("float16")
    for d in spec.devices:
        if d.kind != "accelerator":
            assert d.unsupported_ops == ()


def _simple_paths(spec, a, b):
    adj: dict[str, set[str]] = {d: set() for d in spec.device_ids}
    for ln in spec.links:
        adj[ln.a].add(ln.b)
        adj[ln.b].add(ln.a)
    out = []

    def dfs(u, path):
        if u == b:
            out.append(path)
            return
        for v in sorted(adj[u]):
            if v not in path:
                dfs(v, path + [v])

    dfs(a, [a])
    return out


def _hop_time(spec, u, v, nbytes):
    ln = next(ln for ln in spec.links if {ln.a, ln.b} == {u, v})
    return ln.latency_s + nbytes / ln.bandwidth_Bps


def test_cluster_routes_across_nodes_through_both_hosts():
    spec = load_spec("cluster-2x-a100-pcie")
    hosts = {d.host for d in spec.devices}
    assert len(hosts) == 2
    assert spec.host == "cpu0"
    by_host = {h: sorted(d.id for d in spec.devices if d.host == h) for h in hosts}
    assert sorted(by_host.values()) == [["cpu0", "gpu0", "gpu1"], ["cpu1", "gpu2", "gpu3"]]
    t = link_table(spec)
    n = 1e6
    assert t.transfer_time("gpu0", "gpu3", n) > t.transfer_time("gpu0", "gpu1", n)
    paths = _simple_paths(spec, "gpu0", "gpu3")
    assert paths == [["gpu0", "cpu0", "cpu1", "gpu3"]]  # the only route
    expected = sum(_hop_time(spec, u, v, n) for u, v in zip(paths[0], paths[0][1:]))
    assert t.transfer_time("gpu0", "gpu3", n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("nbytes", [0.0, 1.0, 4096.0, 1e6, 3.2e8])
def test_transfer_time_zero_on_self_and_symmetric(spec_name, nbytes):
    spec = load_spec(spec_name)
    t = link_table(spec)
    for a in spec.device_ids:
        assert t.transfer_time(a, a, nbytes) == 0.0
    for a, b in itertools.combinations(spec.device_ids, 2):
        ab, ba = t.transfer_time(a, b, nbytes), t.transfer_time(b, a, nbytes)
        assert ab == pytest.approx(ba, rel=1e-12)
        assert ab > 0.0


def test_cpu_threads_2_matches_a_two_core_machine():
    spec = load_spec("cpu-threads-2")
    assert spec.device_ids == ["cpu0", "cpu1"]
    assert all(d.kind == "cpu" and d.threads == 1 and d.host == spec.devices[0].host for d in spec.devices)
    ln, = spec.links
    assert {ln.a, ln.b} == {"cpu0", "cpu1"}
