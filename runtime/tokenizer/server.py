"""The gateway process: load the tokenizer, build the app, serve it with uvicorn on uvloop.
SIGTERM/SIGINT: uvicorn stops accepting, gives open streams a few seconds, then the app's
lifespan aborts what is still in flight and closes the ZMQ sockets."""
from __future__ import annotations

import logging
import os
from typing import Any

import uvicorn

from runtime.common.gc_heap import freeze_startup_heap
from runtime.common.model_files import read_model_facts
from runtime.config import ClusterConfig
from runtime.env import ENV
from runtime.tokenizer.app import build_app
from runtime.tokenizer.state import GatewayState

log = logging.getLogger("runtime.gateway")

GRACEFUL_SHUTDOWN_S = 5  # `runtime up` must be down within 10 s of a signal


def load_tokenizer(model_path: str) -> Any:
    """The tokenizer of an HF folder or a .gguf file."""
    from transformers import AutoTokenizer

    if os.path.isfile(model_path):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(model_path)), gguf_file=os.path.basename(model_path))
    return AutoTokenizer.from_pretrained(model_path)


def _model_facts(model_path: str) -> tuple[int | None, int | None]:
    """(vocab size, max position embeddings) from the model's config, if it can be read."""
    try:
        return read_model_facts(model_path)
    except Exception as e:  # the gateway can serve without it: ids are then checked against the tokenizer
        log.warning("could not read the model config of %s (%s); using the tokenizer's vocabulary", model_path, e)
        return None, None


def run_gateway(
    cfg: ClusterConfig,
    model_path: str | None = None,
    served_name: str | None = None,
    max_model_len: int | None = None,
) -> None:
    """Process entry. Arguments left out come from `cfg`, which must be resolved (the default
    model turned into its local folder) first: `runtime.launcher.resolve_model` does it."""
    if model_path is None:
        model_path = cfg.engine.model
        if model_path is None or not os.path.exists(model_path):
            raise ValueError(
                f"the gateway needs a local model folder or .gguf file, got {model_path!r} (the default model's "
                "alias, or a missing path): resolve the config first with runtime.launcher.resolve_model"
            )
    served_name = served_name or cfg.served_model_name or os.path.basename(os.path.normpath(model_path)).removesuffix(".gguf")
    tokenizer = load_tokenizer(model_path)
    vocab_size, max_pos = _model_facts(model_path)
    max_model_len = max_model_len or cfg.engine.max_model_len or max_pos
    if not max_model_len:
        raise ValueError(f"cannot tell the context length of {model_path}; pass --max-model-len")
    state = GatewayState(cfg, tokenizer, served_name, max_model_len, vocab_size=vocab_size)
    level = ENV.log_level.lower()
    config = uvicorn.Config(
        build_app(state),
        host=cfg.host,
        port=cfg.port,
        loop="uvloop",
        http="auto",  # httptools when installed, else h11
        log_level=level,
        access_log=level == "debug",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        timeout_keep_alive=30,
    )
    log.info("gateway for %s (%s, context %d) on http://%s:%d", served_name, model_path, max_model_len, cfg.host, cfg.port)
    server = uvicorn.Server(config)
    freeze_startup_heap("gateway")  # tokenizer and app built: keep GC scans off their objects
    server.run()  # installs SIGINT/SIGTERM handlers: a signal ends serve() and the lifespan
    if not server.started:
        raise SystemExit(f"the gateway could not start on {cfg.host}:{cfg.port} (see the log above)")
