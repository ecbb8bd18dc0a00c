"""bench/equivalence.py --quick, in-process: every execution path gives the model's outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_equivalence", REPO / "bench" / "equivalence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_equivalence"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # the bench's quick subset; tests/emit and tests/runtime check each path in the default run
def test_quick_subset_has_no_failures(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    bench = _bench()
    own = torch.get_num_threads()
    try:
        records, meta = bench.run(quick=True, max_minutes=2.0, prefix=tmp_path / "eq")
    finally:
        torch.set_num_threads(own)
    fails = [(r["path"], r["model"], r["solver"], r["spec"], r.get("error")) for r in records if r["status"] == "fail"]
    assert not fails, fails
    assert meta["stopped_in"] is None and len(records) == meta["planned_cases"]
    assert {r["path"] for r in records} >= {"local", "torch.compile", "onnx-torchscript", "distributed"}
    assert sum(r["status"] == "pass" for r in records) >= len(records) - 2  # nearly all ran, not skipped
    assert (tmp_path / "eq.json").is_file() and "Summary per path" in (tmp_path / "eq.md").read_text()


def test_a_wrong_output_is_recorded_as_a_failure(monkeypatch):
    """The check can fail: perturb the reference of one model and the case is a failure."""
    bench = _bench()
    own = torch.get_num_threads()
    zoo = bench.Zoo()
    model, inputs, lm, ref = zoo.get("bert")
    zoo.cache["bert"] = (model, inputs, lm, ref + 1e-3)
    try:
        rec = bench.run_case(zoo, bench.Case("bert", "heft", "edge-soc", "latency", "local"))
    finally:
        torch.set_num_threads(own)
    assert rec["status"] == "fail" and "Tensor-likes are not close" in rec["error"], rec
