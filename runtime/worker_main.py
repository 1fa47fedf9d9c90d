"""Entry point of every child process of `runtime up`:
python -m runtime.worker_main ROLE ID CONFIG_JSON LOG_LEVEL [JOIN_JSON] (ROLE: prefill | decode | gateway;
JOIN_JSON: a JoinConfig, for the local workers of `runtime controller`, which register themselves)."""
from __future__ import annotations

import asyncio
import logging
import sys


def main(argv: list[str]) -> int:
    role, wid, cfg_json, level = argv[0], int(argv[1]), argv[2], argv[3]
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {role}-{wid}: %(message)s",
        stream=sys.stderr,
    )
    from runtime.common.gc_heap import freeze_startup_heap
    from runtime.controller.process import config_from_json

    cfg = config_from_json(cfg_json)
    if role == "gateway":
        from runtime.tokenizer.server import run_gateway

        run_gateway(cfg)
        return 0
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if len(argv) > 4:  # a local worker of `runtime controller`: it joins over tcp:// as remote ones do
        import json

        from runtime.config import JoinConfig
        from runtime.join import run_worker

        return run_worker(cfg, JoinConfig(**json.loads(argv[4])))
    if role == "prefill":
        from runtime.prefill.worker import PrefillWorker as W
    elif role == "decode":
        from runtime.decode.worker import DecodeWorker as W
    else:
        raise SystemExit(f"unknown role {role!r}")

    async def serve() -> None:
        # Sockets are made inside the running loop they will be awaited on.
        worker = W(cfg, wid)
        freeze_startup_heap(f"{role}-{wid}")  # the engine is built: keep GC scans off its objects
        await worker.run()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
