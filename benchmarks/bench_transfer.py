"""KV transfer bandwidth: a prefill-side process writes KV pages into a decode-side
process's pool through each backend, driven exactly as the workers drive it
(KVDestination and KVDone through the workers' own runtime.ipc queues over ipc://).

Time per transfer is taken on the decode side, from destination() to DONE (device
synchronized): handshake, gather, wire, scatter or RDMA write, notification. Baselines in
the same run, in one process: a contiguous torch copy of the same bytes between the two
devices (the practical ceiling) and a torch page gather -> copy -> scatter.

The pools are the engine's own KVPool: page-major, so each page is one contiguous block
of all layers' K and V. Page ids are ascending on both sides (NIXL merges the whole
transfer into one descriptor) or random (one descriptor per page).

    python benchmarks/bench_transfer.py                                    # CPU -> CPU
    python benchmarks/bench_transfer.py --src-device cuda:0 --dst-device cuda:1
    Default pool: 512 pages of 1 MiB (32 layers x k/v x 16 tokens x 8 heads x 64 dims,
    bf16); --layers/--heads/--head-dim/--page-size change the page size.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAIT_S = 120.0


def _pool(args: argparse.Namespace, device: str, fill: bool) -> Any:
    from runtime.engine.kv_pool import KVPool

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    pool = KVPool(args.layers, args.pages + 1, args.page_size, args.heads, args.head_dim, getattr(torch, args.dtype), device)
    if fill:
        g = torch.Generator(device=pool.kv.device).manual_seed(0)
        pool.kv.view(torch.uint8).random_(0, 256, generator=g)  # any bit pattern, NaNs included
    return pool


def _pages(args: argparse.Namespace, order: str, seed: int) -> list[int]:
    n = args.pages_per_transfer or args.pages
    if order == "ascending":
        return list(range(1, n + 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(args.pages, generator=g)[:n] + 1).tolist()


def _checksum(pool: Any, pages: list[int]) -> int:
    # bytes as int32 words (every dtype's size divides 4 bytes per page row): order-sensitive
    # enough to catch misplaced pages because pages are summed with their position weights.
    blocks = pool.kv[pages].contiguous().view(torch.int32).to(torch.int64)  # page-major: [n, ...]
    w = torch.arange(1, len(pages) + 1, device=blocks.device, dtype=torch.int64).view(-1, *([1] * (blocks.dim() - 1)))
    return int((blocks * w).sum().item())


def _sync(pool: Any) -> None:
    if pool.kv.is_cuda:
        torch.cuda.synchronize(pool.kv.device)


async def _recv(q: Any, what: str) -> Any:
    msg = await q.recv_timeout(WAIT_S)
    if msg is None:
        raise TimeoutError(f"no {what} within {WAIT_S}s")
    return msg


def _links(addr: str, me: str, peer: str) -> tuple[Any, Any]:
    """The workers' own typed queues (runtime.ipc): PULL bound here, PUSH to the peer."""
    import zmq.asyncio

    from runtime import ipc

    ctx = zmq.asyncio.Context.instance()
    return ipc.pull(ctx, f"{addr}-{me}"), ipc.push(ctx, f"{addr}-{peer}")


async def _sender(args: argparse.Namespace, kind: str, addr: str, results: Any) -> None:
    from runtime.messages import KVDone
    from runtime.transfer import TransferState, make_transfer

    pool = _pool(args, args.src_device, fill=True)
    sender = make_transfer(kind, pool, 0, "prefill")
    inbox, outbox = _links(addr, "prefill", "decode")
    results.put(("sender", "ready", sender.kind))
    sums = {}
    while True:
        msg = await _recv(inbox, "KVDestination")
        if isinstance(msg, str):
            break
        src = _pages(args, msg.rid, seed=1000 + msg.room)
        payload = sender.start(msg.room, src, msg.transfer, len(src) * args.page_size)
        deadline = time.monotonic() + WAIT_S
        while not (state := sender.poll(msg.room)).finished and time.monotonic() < deadline:
            await asyncio.sleep(0)
        sender.release(msg.room)
        ok = state is TransferState.DONE
        await outbox.send(KVDone(msg.room, msg.rid, ok, "" if ok else state.name, 0, None, 0, payload))
        if msg.room % 1000 == 0:  # the first transfer of each order is checksummed
            sums[msg.room] = _checksum(pool, src)
    results.put(("sender", "sums", sums))
    sender.close()


async def _receiver(args: argparse.Namespace, kind: str, addr: str, results: Any) -> None:
    from runtime.messages import KVDestination
    from runtime.transfer import TransferState, make_transfer

    pool = _pool(args, args.dst_device, fill=False)
    receiver = make_transfer(kind, pool, 0, "decode")
    inbox, outbox = _links(addr, "decode", "prefill")
    await asyncio.sleep(0.2)  # both PULL sockets bound
    out: dict[str, Any] = {"kind": receiver.kind, "orders": {}, "sums": {}}
    for oi, order in enumerate(args.orders):
        times = []
        for it in range(args.warmup + args.iters):
            room = oi * 1000 + 1000 + it
            dst = _pages(args, order, seed=room)
            _sync(pool)
            t0 = time.perf_counter()
            transfer = receiver.destination(room, dst)
            await outbox.send(KVDestination(room, order, 0, dst, transfer))
            done = await _recv(inbox, "KVDone")
            if not done.ok:
                raise RuntimeError(f"room {room}: the sender reports {done.error}")
            state = receiver.complete(room, done.payload, len(dst) * args.page_size)
            deadline = time.monotonic() + WAIT_S
            while not state.finished and time.monotonic() < deadline:
                await asyncio.sleep(0)
                state = receiver.poll(room)
            _sync(pool)
            t1 = time.perf_counter()
            receiver.release(room)
            if state is not TransferState.DONE:
                raise RuntimeError(f"room {room}: receiver state {state.name}")
            if it >= args.warmup:
                times.append(t1 - t0)
            if room % 1000 == 0:
                out["sums"][room] = _checksum(pool, dst)
        out["orders"][order] = times
    await outbox.send("stop")
    results.put(("receiver", "result", out))
    await asyncio.sleep(0.5)  # let the stop message leave before the process exits
    receiver.close()


def side_main(side: str, args: argparse.Namespace, kind: str, addr: str, results: Any) -> None:
    try:
        asyncio.run((_sender if side == "sender" else _receiver)(args, kind, addr, results))
    except Exception:  # noqa: BLE001 - reported to the parent
        results.put((side, "error", traceback.format_exc()))


def run_backend(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addr = f"ipc://{tempfile.mkdtemp(prefix='bench-transfer-')}/kv"
    procs = [
        ctx.Process(target=side_main, args=(side, args, kind, addr, results), daemon=True)
        for side in ("sender", "receiver")
    ]
    got: dict[str, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        while "result" not in got or "sums" not in got:
            try:
                who, tag, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{kind}: no result in {args.timeout}s") from None
            if tag == "error":
                raise RuntimeError(f"{kind} {who} failed:\n{value}")
            got[tag] = value
            if tag == "ready" and value != kind:
                raise RuntimeError(f"asked for {kind}, the sender got {value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    out = got["result"]
    out["exact"] = all(got["sums"].get(room) == s for room, s in out["sums"].items())
    return out


def _timed(fn: Any, args: argparse.Namespace) -> float:
    """Median seconds of fn() over args.iters after args.warmup, every CUDA device synced."""
    devs = [torch.device(d) for d in {args.src_device, args.dst_device} if d.startswith("cuda")]
    times = []
    for i in range(args.warmup + args.iters):
        for d in devs:
            torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        fn()
        for d in devs:
            torch.cuda.synchronize(d)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def baselines(args: argparse.Namespace, nbytes: int) -> list[tuple[str, str, float]]:
    """In this one process: a contiguous copy of the same bytes between the two devices
    (the practical ceiling), and the page gather -> copy -> page scatter that a direct
    peer-copy backend would do (random page ids on both sides)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=args.src_device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=args.dst_device)
    out = [("torch copy", "contiguous", _timed(lambda: dst.copy_(src), args))]
    del src, dst
    a, b = _pool(args, args.src_device, fill=True), _pool(args, args.dst_device, fill=False)
    ia = torch.tensor(_pages(args, "random", 1), device=a.kv.device)
    ib = torch.tensor(_pages(args, "random", 2), device=b.kv.device)
    out.append(("torch gather+scatter", "random",
                _timed(lambda: b.kv.index_copy_(0, ib, a.kv.index_select(0, ia).to(b.kv.device)), args)))
    del a, b
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="zmq,nixl")
    ap.add_argument("--src-device", default="cpu")
    ap.add_argument("--dst-device", default="cpu")
    ap.add_argument("--pages", type=int, default=512, help="pages in each pool (plus the reserved page 0)")
    ap.add_argument("--pages-per-transfer", type=int, default=0, help="0: all pages")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--orders", default="ascending,random")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=500.0, help="seconds per backend")
    ap.add_argument("--json", default="bench_transfer.json")
    args = ap.parse_args()
    args.orders = args.orders.split(",")

    from runtime.engine.kv_pool import KVPool

    page_bytes = KVPool.bytes_per_page(args.layers, args.page_size, args.heads, args.head_dim, getattr(torch, args.dtype))
    n = args.pages_per_transfer or args.pages
    nbytes = n * page_bytes
    gib = nbytes / 2**30
    print(f"{args.src_device} -> {args.dst_device}: {n} pages of {page_bytes / 2**20:.2f} MiB "
          f"(one contiguous block each: {args.layers} layers x k/v) = {gib:.3f} GiB per transfer")
    rows: list[dict[str, Any]] = []
    for name, order, sec in baselines(args, nbytes):
        rows.append({"backend": f"{name} (baseline)", "order": order, "median_ms": sec * 1e3,
                     "best_ms": sec * 1e3, "gib_s": gib / sec, "best_gib_s": gib / sec, "exact": True})
    for kind in args.backends.split(","):
        if kind == "nixl":
            from runtime.transfer.nixl import nixl_available

            if not nixl_available():
                rows.append({"backend": kind, "order": "-", "error": "nixl not installed"})
                continue
        try:
            out = run_backend(args, kind)
        except Exception as e:  # noqa: BLE001 - one backend failing should not hide the others
            rows.append({"backend": kind, "order": "-", "error": str(e)})
            continue
        for order, times in out["orders"].items():
            med, best = statistics.median(times), min(times)
            rows.append({"backend": kind, "order": order, "median_ms": med * 1e3, "best_ms": best * 1e3,
                         "gib_s": gib / med, "best_gib_s": gib / best, "exact": out["exact"]})

    print(f"\n{'backend':<32} {'order':<11} {'median ms':>10} {'GiB/s':>8} {'best GiB/s':>11} {'exact':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<32} {r['order']:<11} error: {r['error'].strip().splitlines()[-1]}")
        else:
            print(f"{r['backend']:<32} {r['order']:<11} {r['median_ms']:>10.2f} {r['gib_s']:>8.2f} "
                  f"{r['best_gib_s']:>11.2f} {str(r['exact']):>6}")
    report = {
        "args": vars(args),
        "page_bytes": page_bytes,
        "bytes_per_transfer": nbytes,
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "pid": os.getpid(),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
