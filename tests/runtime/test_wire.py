"""runtime/wire.py: the rendezvous bound to MASTER_ADDR, the shared secret, sealed headers, bounded sizes."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from partitioner.runtime import wire as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _other_local_address() -> str | None:
    """An address of this machine that is not loopback (None without a network)."""
    try:
        addr = W.local_address("192.0.2.1", 9)  # TEST-NET-1: only the route is looked up, nothing is sent
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_rank_0_serves_the_store_on_master_addr_only(monkeypatch):
    """MASTER_ADDR=127.0.0.1 must not listen on the machine's other interfaces (torch's
    env:// store listens on all of them)."""
    other = _other_local_address()
    if other is None:
        pytest.skip("no non-loopback address on this machine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store = W.open_store(0, 1, timeout_s=5)
    store.set("k", "v")
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with pytest.raises(OSError), socket.create_connection((other, port), timeout=2):
        pass
    del store


def test_the_store_refuses_an_address_that_is_not_ours(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")  # not an address of this machine
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(W.DistributedFailure, match="rank 0 cannot listen on MASTER_ADDR:MASTER_PORT"):
        W.open_store(0, 2, timeout_s=1)


def test_the_secret_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv(W.SECRET_ENV, raising=False)
    monkeypatch.delenv(W.SECRET_FILE_ENV, raising=False)
    with pytest.raises(W.DistributedFailure, match="no shared secret") as e:
        W.read_secret()
    assert W.SECRET_ENV in e.value.hint
    monkeypatch.setenv(W.SECRET_ENV, "short")
    with pytest.raises(W.DistributedFailure, match="fewer than 16"):
        W.read_secret()
    monkeypatch.delenv(W.SECRET_ENV)
    (tmp_path / "s").write_text(W.new_secret() + "\n")
    monkeypatch.setenv(W.SECRET_FILE_ENV, str(tmp_path / "s"))
    assert W.read_secret() == (tmp_path / "s").read_text().strip().encode()
    monkeypatch.setenv(W.SECRET_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(W.DistributedFailure, match="cannot read the shared secret"):
        W.read_secret()


def test_a_sealed_header_opens_only_with_the_same_secret_nonce_and_route():
    a = W.Sealer(b"s" * 32, b"n" * 32)
    desc = {"v": W.describe((torch.ones(2), 3), []), "digest": None}
    blob = a.seal(desc, 1, 0, 7)
    assert a.open(blob, 1, 0, 7, "x") == json.loads(json.dumps(desc))
    for sealer, route in ((W.Sealer(b"t" * 32, b"n" * 32), (1, 0, 7)),   # another secret
                          (W.Sealer(b"s" * 32, b"m" * 32), (1, 0, 7)),   # a replay from another run
                          (a, (1, 0, 8)), (a, (2, 0, 7))):               # another transfer, another sender
        with pytest.raises(W.DistributedFailure, match="does not carry the run's HMAC"):
            sealer.open(blob, *route, "x")
    changed = blob.replace(b"[2]", b"[9]")
    assert changed != blob
    with pytest.raises(W.DistributedFailure, match="HMAC"):
        a.open(changed, 1, 0, 7, "x")
    deep = {"v": json.loads("[" * 40 + "]" * 40)}
    with pytest.raises(W.DistributedFailure, match="nested more than 32"):
        a.open(a.seal(deep, 1, 0, 7), 1, 0, 7, "x")


@pytest.mark.parametrize("desc", [
    {"t": [[2, 3], "load"]},                     # not a dtype: getattr(torch, "load") once
    {"t": [[-1], "float32"]},
    {"t": [[2.5], "float32"]},
    {"t": [[1] * 17, "float32"]},
    {"tuple": {"t": [[1], "float32"]}},
    {"x": 1, "y": 2},
    {"c": [1, 2]},
])
def test_malformed_descriptions_are_refused_before_anything_is_allocated(desc):
    with pytest.raises(W.DistributedFailure, match="malformed"):
        W.tensor_specs(desc, [])


def test_received_sizes_are_bounded_by_the_declared_bytes():
    declared = 5 * 16 * 4  # a float32 [5, 16] value as traced
    W.check_leaves([((7, 16), torch.float32)], declared, 64, "x")  # another batch size: fine
    W.check_leaves([((1 << 18,), torch.float32)], declared, 64, "x")  # 1 MiB: the floor of the budget
    with pytest.raises(W.DistributedFailure, match=r"more than 64 x the 320 bytes") as e:
        W.check_leaves([((1 << 40,), torch.float32)], declared, 64, "x")  # 4 TiB announced: refused
    assert "--max-scale" in e.value.hint
    with pytest.raises(W.DistributedFailure, match="tensors announced"):
        W.check_leaves([((1,), torch.float32)] * (W.STRIDE - 1), declared, 64, "x")


def test_the_digest_covers_every_byte_and_the_split_between_leaves():
    a, b = torch.arange(6, dtype=torch.float32), torch.arange(6, dtype=torch.float32)
    assert W.digest([a]) == W.digest([b]) and W.digest([a.to(torch.bfloat16)]) is not None
    b[3] = 0.5
    assert W.digest([a]) != W.digest([b])
    assert W.digest([a[:2], a[2:]]) != W.digest([a[:3], a[3:]])
