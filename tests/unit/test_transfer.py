"""KV transfer backends: pages move bit-exactly into other page ids of another pool, other
pages stay untouched, and release/failure paths never hang or write stale data.

NIXL runs with its two agents in two spawned processes (as the workers use it)."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any

import numpy as np
import pytest
import torch

from runtime.engine.kv_pool import KVPool
from runtime.ipc import decode, encode
from runtime.messages import KVDestination, KVDone
from runtime.transfer import TransferError, TransferState, make_transfer
from runtime.transfer.fake import FakeFabric, FakeReceiver, FakeSender
from runtime.transfer.nixl import merged_rows, nixl_available
from runtime.transfer.zmq_inline import ZmqReceiver, ZmqSender

LAYERS, PAGE, HEADS, DIM = 3, 4, 2, 8
SRC_PAGES = [7, 2, 9, 4]  # non-contiguous, out of order
DST_PAGES = [3, 11, 1, 6]
NUM_TOKENS = 3 * PAGE + 1  # the last page is partly filled
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WAIT_S = 20.0


def random_pool(num_pages: int, dtype: torch.dtype, seed: int) -> KVPool:
    pool = KVPool(LAYERS, num_pages, PAGE, HEADS, DIM, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g).to(dtype))
    return pool


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def tokens(kv: torch.Tensor, pages: list[int], num_tokens: int) -> torch.Tensor:
    """[layers, 2, num_tokens, Hkv, D]: the first num_tokens slots of `pages` of a pool's kv."""
    _, L, _, ps, H, D = kv.shape
    n = -(-num_tokens // ps)
    return kv[pages[:n]].permute(1, 2, 0, 3, 4, 5).reshape(L, 2, n * ps, H, D)[:, :, :num_tokens]


def assert_transferred(src: KVPool, dst: KVPool, before: torch.Tensor, num_tokens: int = NUM_TOKENS) -> None:
    """The first num_tokens slots of DST_PAGES equal SRC_PAGES' bit for bit; every page not
    in DST_PAGES is exactly as before."""
    assert torch.equal(bits(tokens(dst.kv, DST_PAGES, num_tokens)), bits(tokens(src.kv, SRC_PAGES, num_tokens)))
    others = [p for p in range(dst.num_pages) if p not in DST_PAGES]
    assert torch.equal(bits(dst.kv[others]), bits(before[others]))


def wire(msg: Any) -> Any:
    """Through the real codec: the transfer dict and payload must survive msgpack."""
    return decode(encode(msg))


def wait(poll: Any, room: int, timeout: float = WAIT_S) -> TransferState:
    deadline = time.monotonic() + timeout
    state = poll(room)
    while not state.finished and time.monotonic() < deadline:
        time.sleep(0.001)
        state = poll(room)
    return state


def kv_done(room: int, payload: bytes) -> KVDone:
    return KVDone(room=room, rid="r", ok=True, error="", first_token=1, first_logprob=None, cached_tokens=0, payload=payload)


def handshake(sender: Any, receiver: Any, room: int, num_tokens: int = NUM_TOKENS) -> TransferState:
    """The worker-driven flow of DESIGN.md steps 3-4, messages through the codec."""
    dest = wire(KVDestination(room=room, rid="r", decode_id=0, pages=DST_PAGES, transfer=receiver.destination(room, DST_PAGES)))
    payload = sender.start(room, SRC_PAGES, dest.transfer, num_tokens)
    assert wait(sender.poll, room) is TransferState.DONE
    done = wire(kv_done(room, payload))
    state = receiver.complete(room, done.payload, num_tokens)
    return state if state.finished else wait(receiver.poll, room)


# ---- in-process backends -----------------------------------------------------------------
def zmq_pair(src: KVPool, dst: KVPool) -> tuple[Any, Any]:
    return ZmqSender(src, 0), ZmqReceiver(dst, 0)


def fake_pair(src: KVPool, dst: KVPool) -> tuple[Any, Any]:
    fabric = FakeFabric(latency_polls=3)
    return FakeSender(src, 0, fabric), FakeReceiver(dst, 0, fabric)


PAIRS = {"zmq": zmq_pair, "fake": fake_pair}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", list(PAIRS))
def test_pages_arrive_bit_exact(backend: str, dtype: str) -> None:
    src, dst = random_pool(12, DTYPES[dtype], 1), random_pool(16, DTYPES[dtype], 2)
    before = dst.kv.clone()
    sender, receiver = PAIRS[backend](src, dst)
    assert handshake(sender, receiver, room=5) is TransferState.DONE
    assert_transferred(src, dst, before)
    assert sender.bytes_sent == receiver.bytes_received > 0
    assert sender.failures == receiver.failures == 0
    for side in (sender, receiver):
        side.release(5)
        assert side.poll(5) is TransferState.FAILED  # forgotten


@pytest.mark.parametrize("backend", list(PAIRS))
def test_whole_pages_and_many_rooms(backend: str) -> None:
    src, dst = random_pool(12, torch.float32, 3), random_pool(16, torch.float32, 4)
    before = dst.kv.clone()
    sender, receiver = PAIRS[backend](src, dst)
    for room in (1, 2):  # the same pages again: idempotent
        assert handshake(sender, receiver, room, num_tokens=len(SRC_PAGES) * PAGE) is TransferState.DONE
    assert_transferred(src, dst, before, num_tokens=len(SRC_PAGES) * PAGE)


def test_zmq_payload_holds_only_the_prompt_tokens() -> None:
    src, dst = random_pool(12, torch.bfloat16, 5), random_pool(16, torch.bfloat16, 6)
    sender, receiver = zmq_pair(src, dst)
    payload = sender.start(1, SRC_PAGES, receiver.destination(1, DST_PAGES), NUM_TOKENS)
    assert len(payload) == LAYERS * 2 * NUM_TOKENS * HEADS * DIM * 2
    # the documented wire layout: the full pages whole, then the partial page's first slots
    full = NUM_TOKENS // PAGE
    want = torch.cat([bits(src.kv[SRC_PAGES[:full]]).flatten(), bits(src.kv[SRC_PAGES[full], :, :, : NUM_TOKENS % PAGE]).flatten()])
    assert bytes(payload) == want.numpy().tobytes()
    before = dst.kv.clone()
    receiver.complete(1, payload, NUM_TOKENS)
    last = DST_PAGES[full]
    # slots past the prompt in the last page are not written
    assert torch.equal(bits(dst.kv[last, :, :, 1:]), bits(before[last, :, :, 1:]))


def test_zmq_bad_payload_fails_and_writes_nothing() -> None:
    src, dst = random_pool(12, torch.float32, 7), random_pool(16, torch.float32, 8)
    sender, receiver = zmq_pair(src, dst)
    payload = sender.start(1, SRC_PAGES, receiver.destination(1, DST_PAGES), NUM_TOKENS)
    before = dst.kv.clone()
    assert receiver.complete(1, payload[:-4], NUM_TOKENS) is TransferState.FAILED
    assert receiver.failures == 1
    assert torch.equal(dst.kv, before)
    receiver.release(1)


@pytest.mark.parametrize("backend", list(PAIRS))
def test_released_room_is_never_written(backend: str) -> None:
    """A KVDone that arrives after a timeout released the room must not touch the pages
    (they may already belong to another request)."""
    src, dst = random_pool(12, torch.float32, 9), random_pool(16, torch.float32, 10)
    sender, receiver = PAIRS[backend](src, dst)
    dest = receiver.destination(3, DST_PAGES)
    receiver.release(3)  # the decode worker timed out and freed the pages
    payload = sender.start(3, SRC_PAGES, dest, NUM_TOKENS)
    wait(sender.poll, 3)
    before = dst.kv.clone()
    assert receiver.complete(3, payload, NUM_TOKENS) is TransferState.FAILED
    assert receiver.poll(3) is TransferState.FAILED
    if backend == "zmq":  # inline data is dropped; the fake (like NIXL) writes regardless
        assert torch.equal(dst.kv, before)
    assert receiver.bytes_received == 0


@pytest.mark.parametrize("backend", list(PAIRS))
def test_release_is_safe_in_every_state(backend: str) -> None:
    src, dst = random_pool(12, torch.float32, 11), random_pool(16, torch.float32, 12)
    sender, receiver = PAIRS[backend](src, dst)
    sender.release(99)
    receiver.release(99)  # unknown rooms
    receiver.destination(1, DST_PAGES)
    receiver.release(1)  # bootstrapping
    receiver.release(1)  # twice
    dest = receiver.destination(2, DST_PAGES)
    sender.start(2, SRC_PAGES, dest, NUM_TOKENS)
    sender.release(2)  # possibly mid-transfer
    sender.release(2)
    receiver.release(2)
    assert sender.poll(2) is receiver.poll(2) is TransferState.FAILED


def test_fake_failure_and_latency() -> None:
    src, dst = random_pool(12, torch.float32, 13), random_pool(16, torch.float32, 14)
    fabric = FakeFabric(latency_polls=2)
    sender, receiver = FakeSender(src, 0, fabric), FakeReceiver(dst, 0, fabric)
    before = dst.kv.clone()
    fabric.fail_rooms.add(8)
    dest = receiver.destination(8, DST_PAGES)
    assert sender.start(8, SRC_PAGES, dest, NUM_TOKENS) == b""
    assert sender.poll(8) is TransferState.FAILED
    assert sender.failures == 1
    assert receiver.poll(8) is TransferState.BOOTSTRAPPING  # no notification ever comes
    sender.release(8)
    receiver.release(8)
    assert torch.equal(dst.kv, before)

    dest = receiver.destination(9, DST_PAGES)
    sender.start(9, SRC_PAGES, dest, NUM_TOKENS)
    assert [sender.poll(9) for _ in range(3)] == [TransferState.TRANSFERRING] * 2 + [TransferState.DONE]
    assert receiver.complete(9, b"", NUM_TOKENS) is TransferState.DONE
    assert_transferred(src, dst, before)


@pytest.mark.parametrize("backend", list(PAIRS))
def test_mismatches_are_refused_clearly(backend: str) -> None:
    src, dst = random_pool(12, torch.float32, 15), random_pool(16, torch.float32, 16)
    sender, receiver = PAIRS[backend](src, dst)
    dest = receiver.destination(1, DST_PAGES)
    with pytest.raises(TransferError, match="same --transfer"):
        sender.start(1, SRC_PAGES, {**dest, "backend": "other"}, NUM_TOKENS)
    with pytest.raises(TransferError, match="layouts differ"):
        sender.start(1, SRC_PAGES, {**dest, "layout": {**dest["layout"], "dtype": "bfloat16"}}, NUM_TOKENS)
    with pytest.raises(TransferError, match="destination pages"):
        sender.start(1, SRC_PAGES[:3], dest, NUM_TOKENS)
    with pytest.raises(TransferError, match="do not fit"):
        sender.start(1, SRC_PAGES, dest, len(SRC_PAGES) * PAGE + 1)
    with pytest.raises(TransferError, match="outside the pool"):
        receiver.destination(2, [0, 1])  # page 0 is reserved
    assert sender.poll(1) is TransferState.FAILED  # a refused start is not tracked


def test_make_transfer() -> None:
    pool = random_pool(4, torch.float32, 0)
    assert isinstance(make_transfer("zmq", pool, 0, "prefill"), ZmqSender)
    assert isinstance(make_transfer("zmq", pool, 0, "decode"), ZmqReceiver)
    assert isinstance(make_transfer("fake", pool, 0, "prefill"), FakeSender)
    auto = make_transfer("auto", pool, 0, "decode")
    assert auto.kind == ("nixl" if nixl_available() else "zmq")
    auto.close()
    with pytest.raises(ValueError, match="role"):
        make_transfer("zmq", pool, 0, "router")
    with pytest.raises(ValueError, match="transfer backend"):
        make_transfer("carrier-pigeon", pool, 0, "prefill")


# ---- NIXL descriptors ---------------------------------------------------------------------
def test_nixl_rows_merge_runs_of_consecutive_pages() -> None:
    B, SB, DB = 1 << 20, 1 << 40, 1 << 41  # block (page) bytes, source and destination bases

    def rows(src: list[int], dst: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        s, d = merged_rows(src, dst, B, SB, DB)
        assert s.dtype == d.dtype == np.uint64 and s.shape == d.shape and s.shape[1] == 2
        assert int(s[:, 1].sum()) == len(src) * B  # every page moved once, whole
        return [tuple(map(int, r)) for r in s], [tuple(map(int, r)) for r in d]

    # one run on both sides: a single descriptor of all the pages
    assert rows([3, 4, 5, 6], [10, 11, 12, 13]) == ([(SB + 3 * B, 4 * B)], [(DB + 10 * B, 4 * B)])
    # scattered pages: one descriptor per page, in order
    s, d = rows(SRC_PAGES, DST_PAGES)
    assert s == [(SB + p * B, B) for p in SRC_PAGES] and d == [(DB + p * B, B) for p in DST_PAGES]
    # runs break wherever either side stops going up by one
    s, d = rows([2, 3, 4, 9, 10, 7, 8], [5, 6, 7, 1, 2, 3, 9])
    assert s == [(SB + 2 * B, 3 * B), (SB + 9 * B, 2 * B), (SB + 7 * B, B), (SB + 8 * B, B)]
    assert d == [(DB + 5 * B, 3 * B), (DB + 1 * B, 2 * B), (DB + 3 * B, B), (DB + 9 * B, B)]
    assert rows([1, 2], [5, 4]) == ([(SB + B, B), (SB + 2 * B, B)], [(DB + 5 * B, B), (DB + 4 * B, B)])
    assert rows([7], [1]) == ([(SB + 7 * B, B)], [(DB + B, B)])


# ---- NIXL: one agent per process ------------------------------------------------------------
def _nixl_child(role: str, cmds: Any, results: Any) -> None:
    """Runs in a spawned process: executes (op, *args) commands on this side's backend."""
    sides: dict[int, Any] = {}
    pools: dict[int, KVPool] = {}
    while True:
        op, *args = cmds.get(timeout=120)
        try:
            if op == "close":
                for s in sides.values():
                    s.close()
                results.put("closed")
                return
            if op == "init":  # worker id, dtype, pages, seed
                wid, dtype, num_pages, seed = args
                pools[wid] = random_pool(num_pages, DTYPES[dtype], seed)
                sides[wid] = make_transfer("nixl", pools[wid], wid, role)
                out: Any = sides[wid].kind
            elif op == "kv":
                out = pools[args[0]].kv.clone()
            elif op == "dest":  # wid, room, pages
                out = sides[args[0]].destination(args[1], args[2])
            elif op == "send":  # wid, room, dest, num_tokens[, source pages]
                wid, room, dest, num_tokens, *src = args
                payload = sides[wid].start(room, src[0] if src else SRC_PAGES, dest, num_tokens)
                out = (payload, wait(sides[wid].poll, room).name, sides[wid].bytes_sent)
            elif op == "complete":  # wid, room, num_tokens
                wid, room, num_tokens = args
                state = sides[wid].complete(room, b"", num_tokens)
                out = (state if state.finished else wait(sides[wid].poll, room)).name
            elif op == "poll":
                out = sides[args[0]].poll(args[1]).name
            elif op == "release":
                sides[args[0]].release(args[1])
                out = None
            else:
                raise ValueError(op)
            results.put(("ok", out))
        except Exception as e:  # noqa: BLE001 - reported to the test process
            results.put(("err", f"{type(e).__name__}: {e}"))


class _Peer:
    def __init__(self, ctx: Any, role: str) -> None:
        self.cmds, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_nixl_child, args=(role, self.cmds, self.results), daemon=True)
        self.proc.start()

    def __call__(self, *cmd: Any, timeout: float = 60.0) -> Any:
        self.cmds.put(cmd)
        try:
            status, out = self.results.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"NIXL peer did not answer {cmd[0]!r} in {timeout}s") from None
        if status == "err":
            raise RuntimeError(out)
        return out

    def stop(self) -> None:
        try:
            self.cmds.put(("close",))
            self.results.get(timeout=10)
        except Exception:  # noqa: BLE001 - it may already be dead
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


@pytest.fixture(scope="module")
def nixl_peers() -> Any:
    if not nixl_available():
        pytest.skip("nixl is not installed")
    ctx = mp.get_context("spawn")
    peers = []
    try:
        peers.append(_Peer(ctx, "prefill"))
        peers.append(_Peer(ctx, "decode"))
        yield peers
    finally:
        for p in peers:
            p.stop()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nixl_two_processes_bit_exact(nixl_peers: Any, dtype: str) -> None:
    prefill, decode_ = nixl_peers
    wid = list(DTYPES).index(dtype)  # one agent pair per dtype
    assert prefill("init", wid, dtype, 12, 21) == "nixl"
    assert decode_("init", wid, dtype, 16, 22) == "nixl"
    src, before = random_pool(12, DTYPES[dtype], 21), decode_("kv", wid)
    dest = wire(KVDestination(room=40, rid="r", decode_id=wid, pages=DST_PAGES, transfer=decode_("dest", wid, 40, DST_PAGES)))
    payload, state, sent = prefill("send", wid, 40, dest.transfer, NUM_TOKENS)
    assert (payload, state) == (b"", "DONE")
    assert sent == len(DST_PAGES) * LAYERS * 2 * PAGE * HEADS * DIM * src.kv.element_size()
    assert decode_("complete", wid, 40, NUM_TOKENS) == "DONE"
    dst = random_pool(16, DTYPES[dtype], 22)
    dst.kv.copy_(decode_("kv", wid))
    assert_transferred(src, dst, before)
    # whole pages are written: the tail of the last page too
    assert torch.equal(bits(dst.kv[DST_PAGES]), bits(src.kv[SRC_PAGES]))
    prefill("release", wid, 40)
    decode_("release", wid, 40)


def test_nixl_merged_runs_land_bit_exact(nixl_peers: Any) -> None:
    """Runs of consecutive pages go as one descriptor each: every page still lands in its
    own destination page, and nothing else is touched."""
    prefill, decode_ = nixl_peers
    wid, src_pages, dst_pages = 3, [2, 3, 4, 9, 10, 7], [5, 6, 7, 1, 2, 12]
    prefill("init", wid, "bfloat16", 12, 41)
    decode_("init", wid, "bfloat16", 16, 42)
    src, before = random_pool(12, torch.bfloat16, 41), decode_("kv", wid)
    dest = wire(KVDestination(room=60, rid="r", decode_id=wid, pages=dst_pages, transfer=decode_("dest", wid, 60, dst_pages)))
    num_tokens = len(src_pages) * PAGE - 2
    _, state, sent = prefill("send", wid, 60, dest.transfer, num_tokens, src_pages)
    assert state == "DONE" and sent == len(src_pages) * src.page_bytes
    assert decode_("complete", wid, 60, num_tokens) == "DONE"
    after = decode_("kv", wid)
    assert torch.equal(bits(after[dst_pages]), bits(src.kv[src_pages]))
    others = [p for p in range(16) if p not in dst_pages]
    assert torch.equal(bits(after[others]), bits(before[others]))
    prefill("release", wid, 60)
    decode_("release", wid, 60)


def test_nixl_failure_paths(nixl_peers: Any) -> None:
    prefill, decode_ = nixl_peers
    wid = 7
    prefill("init", wid, "float32", 12, 31)
    decode_("init", wid, "float32", 16, 32)
    dest = decode_("dest", wid, 50, DST_PAGES)
    # an address outside the registered region: refused before anything moves
    with pytest.raises(RuntimeError, match="TransferError"):
        prefill("send", wid, 50, {**dest, "base": 4096}, NUM_TOKENS)
    with pytest.raises(RuntimeError, match="same --transfer"):
        prefill("send", wid, 50, {**dest, "backend": "zmq"}, NUM_TOKENS)
    assert prefill("poll", wid, 50) == "FAILED"  # refused starts are not tracked
    assert decode_("poll", wid, 50) == "BOOTSTRAPPING"  # still waiting: the worker's timeout decides
    # the decode side gives up first; the late write's notification must not revive the room
    decode_("release", wid, 50)
    _, state, _ = prefill("send", wid, 50, dest, NUM_TOKENS)
    assert state == "DONE"
    assert decode_("poll", wid, 50) == "FAILED"
    prefill("release", wid, 50)
    prefill("release", wid, 50)
    decode_("release", wid, 50)
