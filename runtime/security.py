"""ZeroMQ CURVE on every tcp:// link: keys, socket options, and the ZAP handler that refuses
(and logs) peers without the cluster's client key. ipc:// links on one host carry no CURVE.

Keys (`runtime keys --out DIR`, the four files zmq.auth writes):
  server.key / server.key_secret  the cluster's server keypair. Every socket that binds a
                                  tcp:// address (the controller's and the gateway's inboxes,
                                  each worker's inbox) presents it; every connecting socket
                                  checks the server by its public half.
  client.key / client.key_secret  the shared client keypair every process connects with.
The ZAP handler admits a client whose public key is one of DIR/client*.key, so a per-host
client key can be added later (`runtime keys --out DIR --client NAME`) without a new format.
Every process of the cluster binds (workers take KV and tasks on their own inbox), so each
holds the server secret: the Secret is the cluster's membership, and whoever lacks it is
refused; rotate by generating a new directory and restarting the pods.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("runtime.security")
ZAP_DOMAIN = "runtime"
REFUSAL_LOG_EVERY_S = 30.0  # a refused peer reconnects every 100 ms: one log line per peer per this
# An auth failure is the ZAP handler's to log (with the peer's address). A peer without CURVE
# shows as a protocol failure (mechanism mismatch) or, when it noticed first and hung up, as a
# failure with no detail (an errno): both are logged.
_WHY = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer does not use CURVE (no --curve-keys?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its CURVE handshake does not decrypt (it expects another server key)",
}


def is_tcp(addr: str) -> bool:
    return addr.startswith("tcp://")


def create_keys(out: str, client: str = "client") -> list[str]:
    """Write the server keypair (unless DIR has one) and the client keypair `client`; the
    secret files are readable by their owner only. Returns the paths written."""
    os.makedirs(out, exist_ok=True)
    names = ([] if os.path.exists(os.path.join(out, "server.key_secret")) else ["server"]) + [client]
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(out, name)
        os.chmod(secret, 0o600)
        written += [public, secret]
    return written


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    authorized: frozenset[bytes]  # z85 client public keys the ZAP handler admits

    @classmethod
    def load(cls, directory: str) -> CurveKeys:
        def pair(name: str) -> tuple[bytes, bytes]:
            path = os.path.join(directory, f"{name}.key_secret")
            if not os.path.exists(path):
                raise ValueError(f"--curve-keys {directory}: no {name}.key_secret there; "
                                 f"create the keys with `runtime keys --out {directory}`")
            public, secret = zmq.auth.load_certificate(path)
            if not secret:
                raise ValueError(f"{path} holds no secret key")
            return public, secret

        sp, ss = pair("server")
        cp, cs = pair("client")
        authorized = {zmq.auth.load_certificate(p)[0] for p in glob.glob(os.path.join(directory, "client*.key"))}
        return cls(sp, ss, cp, cs, frozenset(authorized))

    def apply(self, sock: zmq.Socket, bind: bool) -> None:
        """CURVE options on a socket, before it binds (server) or connects (client)."""
        if bind:
            sock.curve_publickey, sock.curve_secretkey = self.server_public, self.server_secret
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
        else:
            sock.curve_serverkey = self.server_public
            sock.curve_publickey, sock.curve_secretkey = self.client_public, self.client_secret


class _RefusingAuthenticator(ThreadAuthenticator):
    """zmq.auth's ZAP handler, with every refusal logged as a warning (pyzmq logs at debug)
    naming the peer's address, at most once per peer per REFUSAL_LOG_EVERY_S."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys, what: str) -> None:
        super().__init__(ctx, log=logging.getLogger("runtime.security.zap"))
        self.keys, self.what = keys, what
        self._peer = ""
        self._last: dict[str, float] = {}
        self.refused = 0

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous") -> None:
        if status_code != b"200":
            self.refused += 1
            refuse_log(self._last, self._peer, f"{self.what}: refused a peer at {self._peer}: "
                       f"{status_text.decode(errors='replace')} (its client key is not among the cluster's "
                       f"--curve-keys)")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


def refuse_log(last: dict[str, float], key: str, text: str) -> None:
    now = time.monotonic()
    if now - last.get(key, -1e9) >= REFUSAL_LOG_EVERY_S:
        last[key] = now
        log.warning("%s", text)


class Guard:
    """The ZAP handler of one ZMQ context, plus a watcher per bound CURVE socket that logs
    failed handshakes ZAP never sees: a peer without CURVE at all, or one that expects
    another server key. stop() before the context is terminated."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys, what: str) -> None:
        self.keys, self.what = keys, what
        self.ctx = ctx
        self.auth = _RefusingAuthenticator(ctx, keys, what)
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, self)
        self._stop = threading.Event()
        self._watchers: list[tuple[zmq.Socket, threading.Thread]] = []
        self._last: dict[str, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:  # zmq.auth's credentials provider
        return key in self.keys.authorized

    @property
    def refused(self) -> int:
        return self.auth.refused

    def watch(self, sock: zmq.Socket, addr: str) -> None:
        endpoint = f"inproc://runtime-monitor-{id(sock)}"
        sock.monitor(endpoint, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        t = threading.Thread(target=self._watch, args=(endpoint, addr), name="curve-monitor", daemon=True)
        t.start()
        self._watchers.append((sock, t))

    def _watch(self, endpoint: str, addr: str) -> None:
        # A sync shadow of the (maybe asyncio) context: inproc needs the same libzmq context.
        ctx = zmq.Context.shadow(self.ctx.underlying)
        pair = ctx.socket(zmq.PAIR)
        pair.linger = 0
        pair.connect(endpoint)
        try:
            while not self._stop.is_set():
                if not pair.poll(200):
                    continue
                event: dict[str, Any] = parse_monitor_message(pair.recv_multipart())
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    why = f"the peer hung up during the CURVE handshake (errno {event['value']}): no CURVE, or other keys?"
                else:
                    why = _WHY.get(event["value"], f"the handshake failed (ZMTP protocol error {event['value']:#x})")
                refuse_log(self._last, str(event["value"]), f"{self.what}: refused a peer on {addr}: {why}")
        finally:
            pair.close(0)

    def stop(self) -> None:
        self._stop.set()
        for sock, t in self._watchers:
            t.join(1.0)
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self._watchers.clear()
        self.auth.stop()


def guard_for(ctx: zmq.Context, keys: CurveKeys | None, what: str) -> Guard | None:
    return Guard(ctx, keys, what) if keys is not None else None
