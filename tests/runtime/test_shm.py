"""Channels of the process runtime (partitioner.runtime.shm), both ends in one process."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from partitioner.errors import RuntimeFailure
from partitioner.runtime.shm import Inbox, Outbox, channel


@pytest.fixture
def ends():
    send, recv = channel(mp.get_context("spawn"), slots=2)
    out, inb = Outbox(*send, stall_s=0.5), Inbox(*recv)
    yield out, inb
    out.close()
    inb.close()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_values_arrive_equal_and_independent_of_the_slot(ends):
    out, inb = ends
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    value = {"a": base.t(), "b": (torch.tensor([True, False]), 3, "x"), "c": torch.empty(0, 5),
             "d": torch.tensor(7, dtype=torch.int8), "e": [base[:, 1], None],
             "f": torch.eye(3).to_sparse()}
    out.send(("value", 4, 9), value, has_value=True)
    msg, got = inb.recv()
    assert msg == ("value", 4, 9)
    assert got["b"][1:] == (3, "x") and got["e"][1] is None
    for k in ("a", "c", "d"):
        assert got[k].dtype == value[k].dtype and torch.equal(got[k], value[k])
    assert torch.equal(got["b"][0], value["b"][0]) and torch.equal(got["e"][0], base[:, 1])
    assert torch.equal(got["f"].to_dense(), torch.eye(3))
    got["a"].zero_()  # the receiver's copy is its own: the slot may be reused at once
    assert base.sum() > 0


def test_slots_are_reused_and_grown_and_messages_without_values_pass(ends):
    out, inb = ends
    for k in range(7):  # more messages than slots, each received before the next
        x = torch.full((10 ** k % 5000 + 1,), float(k))
        out.send(("v", k), x, has_value=True)
        out.send(("abort", k))
        assert torch.equal(inb.recv()[1], x)
        assert inb.recv() == (("abort", k), None)
    out.send(("v", 8), (1, "two"), has_value=True)  # a value without tensors
    assert inb.recv() == (("v", 8), (1, "two"))


def test_a_sender_gives_up_when_the_receiver_stops_reading(ends):
    out, inb = ends
    for k in range(2):
        out.send(("v", k), torch.ones(3), has_value=True)
    with pytest.raises(RuntimeFailure, match="has not read a value"):
        out.send(("v", 2), torch.ones(3), has_value=True)
    assert torch.equal(inb.recv()[1], torch.ones(3))
