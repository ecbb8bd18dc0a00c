"""Streaming a batch of samples through one or more local runtimes: stages overlap across
samples, and the replicas of a data-parallel plan share the stream in proportion to their
predicted rates."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch

from ..errors import RuntimeFailure, UsageError
from .stats import StreamStats, _predicted_rate


def split_stream(n: int, rates: list[float]) -> list[int]:
    """Replica of each of ``n`` samples, in proportion to ``rates`` (smooth weighted
    round robin: deterministic, and every prefix of the stream is split as evenly as
    possible). Non-finite or non-positive rates count as equal shares."""
    if not rates:
        raise UsageError("no replicas to split the stream over", hint="pass at least one runtime")
    w = [r if math.isfinite(r) and r > 0 else math.nan for r in rates]
    if any(math.isnan(x) for x in w):
        w = [1.0] * len(rates)
    total, credit, out = sum(w), [0.0] * len(w), []
    for _ in range(n):
        credit = [c + x for c, x in zip(credit, w)]
        k = max(range(len(w)), key=lambda i: (credit[i], -i))
        credit[k] -= total
        out.append(k)
    return out


def stream_replicas(runtimes: list, inputs_list: list) -> tuple[list, StreamStats]:
    """Data parallelism: share a stream of samples among replicas (one LocalRuntime per
    replica, on disjoint devices), in proportion to their predicted throughputs
    (:func:`split_stream`); each replica pipelines its share (:meth:`LocalRuntime.stream`)
    and all replicas run at the same time. Outputs come back in input order; the
    predicted rate is the sum of the replicas'."""
    rates = [_predicted_rate(rt.schedule) for rt in runtimes]
    assign = split_stream(len(inputs_list), rates)
    shares = [[i for i, a in enumerate(assign) if a == r] for r in range(len(runtimes))]
    results: list[Any] = [None] * len(runtimes)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def go(r: int) -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                t = time.perf_counter()
                results[r] = (t, runtimes[r].stream([inputs_list[i] for i in shares[r]]))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            results[r] = err

    t0 = time.perf_counter()
    threads = [threading.Thread(target=go, args=(r,), name=f"partitioner-replica{r}") for r in range(len(runtimes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for r, res in enumerate(results):
        if isinstance(res, BaseException):
            if isinstance(res, RuntimeFailure):
                raise RuntimeFailure(f"replica {r}: {res.message}", hint=res.hint) from res
            raise res
    outputs: list[Any] = [None] * len(inputs_list)
    starts, ends = [0.0] * len(inputs_list), [0.0] * len(inputs_list)
    for r, (ts, (outs, st)) in enumerate(results):
        for j, i in enumerate(shares[r]):
            outputs[i] = outs[j]
            starts[i], ends[i] = st.starts_s[j] + ts - t0, st.ends_s[j] + ts - t0
    pred = sum(rates) if all(math.isfinite(x) for x in rates) else math.nan
    return outputs, StreamStats(len(inputs_list), wall, starts, ends, pred)
