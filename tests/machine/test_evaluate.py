import math

import numpy as np
import pytest
from instances import two_gpu_spec

from partitioner.ir.graph import CostGraph, InputTensor, Node
from partitioner.ir.plan import Constraints, Plan
from partitioner.machine.evaluate import evaluate, list_order
from partitioner.machine.problem import Problem


def chain_problem(spec=None, objective="latency", constraints=Constraints()):
    # a -> b -> c, with measured times: cpu 1.0 s each, gpus 0.1 s each
    nodes = [Node(id=x, op="matmul", output_bytes=1_000_000, param_bytes=100, time_s={"cpu": 1.0, "gpu": 0.1})
             for x in "abc"]
    g = CostGraph("chain", nodes, [("a", "b", 1e6), ("b", "c", 1e6)], [InputTensor("x", 2e6, ("a",))], [("c", 1e6)])
    return Problem(g, spec or two_gpu_spec(), objective, constraints)


def test_chain_latency_by_hand():
    p = chain_problem()
    cpu, g0, g1 = 0, 1, 2
    ev = evaluate(p, Plan((g0, g1, g0)))
    tin = 1e-5 + 2e6 / 1e10                    # host -> gpu0
    hop = 1e-5 + 1e6 / 1e10                     # one PCIe hop
    g2g = 2 * hop                               # gpu0 -> cpu0 -> gpu1 (store and forward)
    a_f = tin + 0.1
    b_f = a_f + g2g + 0.1
    c_f = b_f + g2g + 0.1
    assert ev.finish.tolist() == pytest.approx([a_f, b_f, c_f])
    assert ev.latency == pytest.approx(c_f + hop)
    # loads: gpu0 0.2, gpu1 0.1; links carry each transfer per hop
    assert ev.device_load.tolist() == pytest.approx([0.0, 0.2, 0.1])
    assert ev.link_load[(cpu, g0)] == pytest.approx((1e-5 + 2e6 / 1e10) + hop)  # input + b's output relayed
    assert ev.link_load[(g0, cpu)] == pytest.approx(hop + hop)                    # a's output, c's output
    assert ev.period == pytest.approx(0.2)
    assert ev.feasible


def test_all_on_host_has_no_transfers():
    p = chain_problem()
    ev = evaluate(p, Plan((0, 0, 0)))
    assert ev.latency == pytest.approx(3.0)
    assert ev.link_load == {} and ev.transfers == ()


def test_comm_blocks_device_adds_hop_time_to_endpoints():
    p = chain_problem(two_gpu_spec(comm_blocks=True))
    ev = evaluate(p, Plan((1, 1, 1)))
    tin = 1e-5 + 2e6 / 1e10
    tout = 1e-5 + 1e6 / 1e10
    assert ev.device_load.tolist() == pytest.approx([tin + tout, 0.3 + tin + tout, 0.0])


def test_order_against_precedence_is_infeasible():
    p = chain_problem()
    ev = evaluate(p, Plan((1, 1, 1), ((), (2, 1, 0), ())))
    assert not ev.feasible and "contradicts" in ev.violations[0]
    assert math.isinf(ev.latency)


def test_transfer_once_per_destination_at_max_bytes():
    nodes = [Node(id="p", time_s={"cpu": 1.0, "gpu": 1.0}, output_bytes=5e6),
             Node(id="q", time_s={"cpu": 1.0, "gpu": 1.0}), Node(id="r", time_s={"cpu": 1.0, "gpu": 1.0})]
    g = CostGraph("fan", nodes, [("p", "q", 1e6), ("p", "r", 3e6)], [], [])
    p = Problem(g, two_gpu_spec())
    ev = evaluate(p, Plan((0, 1, 1), ((0,), (1, 2), ())))
    edges = [t for t in ev.transfers if t.kind == "edge"]
    assert len(edges) == 1 and edges[0].bytes == 3e6
    assert ev.link_load == {(0, 1): pytest.approx(1e-5 + 3e6 / 1e10)}
    assert ev.start[1] == pytest.approx(1.0 + 1e-5 + 3e6 / 1e10)


def test_memory_peak_by_hand_and_capacity_violation():
    # a (out 4) -> b (out 2) -> c (out 1), and a -> c; on one device in order a, b, c
    nodes = [Node(id="a", output_bytes=4, param_bytes=10, time_s={"gpu": 1}),
             Node(id="b", output_bytes=2, param_bytes=20, time_s={"gpu": 1}),
             Node(id="c", output_bytes=1, time_s={"gpu": 1})]
    g = CostGraph("m", nodes, [("a", "b", 4), ("b", "c", 2), ("a", "c", 4)], [InputTensor("x", 8, ("a",))], [("c", 1)])
    spec = two_gpu_spec(capacity=36)
    p = Problem(g, spec)
    ev = evaluate(p, Plan((1, 1, 1)))
    # step a: x(8)+a(4)=12; step b: a(4)+b(2)=6; step c: a+b+c=7 -> peak 12, params 30
    assert ev.memory_peak[1] == 42
    assert not ev.feasible and "short by" in ev.violations[0]
    ok = Problem(g, two_gpu_spec(capacity=42))
    assert evaluate(ok, Plan((1, 1, 1))).feasible


def test_side_constraints():
    p = chain_problem(constraints=Constraints(throughput_floor=20.0))
    ev = evaluate(p, Plan((1, 1, 1)))  # period 0.3 -> 3.33/s
    assert not ev.feasible and "below the floor" in ev.violations[0]
    p = chain_problem(objective="throughput", constraints=Constraints(latency_ceiling=0.1))
    assert "above the ceiling" in evaluate(p, Plan((1, 1, 1))).violations[0]


def test_unsupported_and_group_violations():
    nodes = [Node(id="a", op="softmax", time_s={"gpu": 1}, supported_on=("gpu",), group="g"),
             Node(id="b", time_s={"gpu": 1, "cpu": 1}, group="g")]
    p = Problem(CostGraph("u", nodes, [("a", "b", 1)], [], []), two_gpu_spec())
    ev = evaluate(p, Plan((0, 1)))
    assert not ev.feasible
    assert any("cannot run it" in v for v in ev.violations)
    assert any("group" in v for v in ev.violations)


def test_replicas_add_throughput():
    p = chain_problem(objective="throughput")
    r0 = Plan((1, 1, 1))
    r1 = Plan((2, 2, 2))
    ev = evaluate(p, Plan((1, 1, 1), replicas=(r0, r1)))
    single = evaluate(p, r0)
    assert ev.throughput == pytest.approx(2 * single.throughput)
    assert ev.feasible
    clash = evaluate(p, Plan((1, 1, 1), replicas=(r0, r0)))
    assert not clash.feasible and "share device" in clash.violations[0]


def test_list_order_is_topological_and_deterministic():
    p = chain_problem()
    o1 = list_order(p, np.array([1, 1, 1]))
    assert o1 == list_order(p, np.array([1, 1, 1])) == ((), (0, 1, 2), ())


def test_contended_latency_serialises_a_shared_link():
    from instances import random_graph, random_spec

    from partitioner.ir.settings import Settings
    from partitioner.machine.evaluate import contended_latency
    from partitioner.solvers.registry import solve

    # two producers on the host send at once to gpu0 over one link: the second waits
    g = CostGraph("fan", [Node("a", "matmul"), Node("b", "matmul"), Node("c", "matmul")],
                  [("a", "c", 1e8), ("b", "c", 1e8)], [], [])
    spec = two_gpu_spec()
    T = np.array([[1e-3, 1e-3, 1e-3], [1e-3, 1e-3, 1e-3], [1e-3, 1e-4, 1e-4]])
    p = Problem(g, spec, "latency", T=T)
    host = p.host
    gpu = next(d for d in range(p.D) if d != host)
    plan = Plan((host, host, gpu))
    ev = evaluate(p, plan)
    one = p.comm(host, gpu, 1e8)
    assert ev.latency == pytest.approx(2e-3 + one + 1e-4)
    assert contended_latency(p, plan) >= ev.latency + 0.9 * (one - p.comm(host, gpu, 0))
    # never below the canonical latency, equal for single-device plans
    for seed in range(5):
        q = Problem(random_graph(seed, 25), random_spec(seed, 3), "latency")
        pq = solve(q, "heft", Settings())
        assert contended_latency(q, pq) >= evaluate(q, pq).latency * (1 - 1e-12)
        single = Plan((q.host,) * q.n)
        assert contended_latency(q, single) == pytest.approx(evaluate(q, single).latency, rel=1e-12)


def test_replicas_sharing_a_link_are_charged_for_it():
    """Replicas on disjoint devices whose transfers cross the same link: the link carries
    both replicas' share of the stream, so the period exceeds 1 / (sum of throughputs);
    replicas on links of their own still add their throughputs exactly."""
    from partitioner.ir.spec import parse_spec

    def spec(chain: bool):
        dev = lambda i, h: {"id": i, "host": h, "kind": "gpu" if i != "cpu0" else "cpu",  # noqa: E731
                            "peak_flops": {"fp32": 1e12}, "memory": {"capacity_bytes": 1e12, "bandwidth_Bps": 1e15}}
        links = [{"a": "cpu0", "b": "gpu0", "bandwidth_Bps": 1e9, "latency_s": 0.0}]
        links.append({"a": "gpu0" if chain else "cpu0", "b": "gpu1", "bandwidth_Bps": 1e9, "latency_s": 0.0})
        return parse_spec({"name": "chain" if chain else "star", "host_device": "cpu0",
                           "devices": [dev("cpu0", "h"), dev("gpu0", "h"), dev("gpu1", "h")], "links": links})

    g = CostGraph("one", [Node(id="a", op="matmul", flops=1e9, output_bytes=1000)], [],
                  [InputTensor("x", 4_000_000, ("a",))], [("a", 1000)])
    for chain in (False, True):
        p = Problem(g, spec(chain), "throughput")
        a, b = Plan((1,)), Plan((2,))
        ea, eb = evaluate(p, a), evaluate(p, b)
        both = evaluate(p, Plan((1,), replicas=(a, b)))
        additive = 1.0 / (ea.throughput + eb.throughput)
        if not chain:  # each replica has its own link from the host
            assert both.period == pytest.approx(additive, rel=1e-12)
        else:  # gpu1's inputs go cpu0 -> gpu0 -> gpu1: the cpu0 -> gpu0 link serves both replicas
            wa, wb = ea.throughput / (ea.throughput + eb.throughput), eb.throughput / (ea.throughput + eb.throughput)
            link = wa * 4e-3 + wb * 4e-3  # 4 MB at 1 GB/s per sample on cpu0 -> gpu0, for either replica
            assert both.period == pytest.approx(max(additive, link), rel=1e-9)
            assert both.period > additive * 1.2


def test_the_host_holds_the_model_inputs_and_outputs():
    """Issue 21: the host's memory check ignored the model's inputs and outputs. They are the
    caller's tensors, held on the host for the whole call: a plan that leaves the host idle
    still needs room there for them."""
    from partitioner.ir.graph import CostGraph, InputTensor, Node
    from partitioner.ir.plan import Plan
    from partitioner.ir.spec import parse_spec
    from partitioner.machine.evaluate import evaluate
    from partitioner.machine.problem import Problem

    g = CostGraph("io", [Node(id="a", op="matmul", flops=1e6, param_bytes=10, output_bytes=400)], [],
                  [InputTensor("x", 300, ("a",))], [("a", 400)])

    def spec(host_bytes):
        dev = lambda i, k, cap: {"id": i, "host": "h", "kind": k, "peak_flops": {"fp32": 1e12},  # noqa: E731
                                 "memory": {"capacity_bytes": cap, "bandwidth_Bps": 1e11}}
        return parse_spec({"name": "s", "memory_reserve": 0.0, "devices": [dev("cpu0", "cpu", host_bytes),
                           dev("gpu0", "gpu", 1e9)],
                           "links": [{"a": "cpu0", "b": "gpu0", "bandwidth_Bps": 1e10, "latency_s": 1e-6}]})

    on_gpu = Plan((1,))
    small = Problem(g, spec(600.0))  # 300 B of inputs + 400 B of outputs do not fit in 600 B
    assert small.capacity[small.host] == pytest.approx(600.0 - 700.0)
    ev = evaluate(small, on_gpu)
    assert not ev.feasible and "model inputs and outputs" in ev.violations[0] and "'cpu0'" in ev.violations[0]
    roomy = Problem(g, spec(1e6))
    assert evaluate(roomy, on_gpu).feasible and roomy.capacity[roomy.host] == pytest.approx(1e6 - 700.0)
