"""Workers that join over tcp:// (`runtime worker`, and the local workers of `runtime
controller`): admission, ids, drain and leave. The controller owns the table of workers;
the registry adds and removes the entries of joined ones.

Admission compares the worker's fingerprint with the controller's (the model, context length,
page size, load format: runtime/fingerprint.py), its KV transfer backend with the
controller's, and its KV layout (which includes the dtype it resolved on its device) with the
layout of the workers already admitted. A refused worker hears why (Refused) and exits.
Ids are never reused, so a late message of a worker that left cannot be taken for another's.
"""
from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

from runtime import ipc
from runtime.controller.process import RemoteProcess
from runtime.controller.routing import Load
from runtime.fingerprint import mismatch
from runtime.messages import Deregister, Drain, DrainAck, Refused, Register, Registered

if TYPE_CHECKING:
    from runtime.controller.controller import Controller, WorkerState

log = logging.getLogger("runtime.controller")
READY_GRACE_S = 60.0  # Registered -> Ready: the worker loaded its model before registering


class Registry:
    def __init__(self, ctl: Controller, fingerprint: dict[str, Any], transfer: str) -> None:
        self.ctl = ctl
        self.fingerprint = fingerprint
        self.transfer = transfer  # the backend every joined worker must have built
        self.layout: dict[str, Any] | None = None  # of the admitted workers; reset when none is left
        self._ids = {"prefill": itertools.count(), "decode": itertools.count()}
        self._nonces: dict[str, tuple[str, int]] = {}  # Register.nonce -> (role, id)
        self.refused = 0
        ctl.handlers.update({Register: self.on_register, Drain: self.on_drain, Deregister: self.on_deregister})

    def why_not(self, r: Register) -> str:
        """'' to admit `r`, else the reason to refuse it."""
        if r.role not in ("prefill", "decode"):
            return f"unknown role {r.role!r}"
        diff = mismatch(self.fingerprint, r.fingerprint)
        if diff:
            return f"the model does not match the controller's ({diff}); start the worker with the controller's " \
                   f"--model, --max-model-len, --page-size and --load-format"
        if r.transfer != self.transfer:
            return f"the worker's KV transfer backend is {r.transfer!r}, the cluster's {self.transfer!r}; " \
                   f"start every worker with --transfer {self.transfer}"
        if self.layout is not None and r.kv_layout != self.layout:
            return f"its KV layout {r.kv_layout} differs from the cluster's {self.layout} (another --dtype or " \
                   f"device type?); KV pages could not move between them"
        return ""

    async def on_register(self, r: Register) -> None:
        ctl = self.ctl
        known = self._nonces.get(r.nonce)
        if known is not None and known in ctl.workers:  # our Registered crossed its repeat
            await ctl.out[known].send(Registered(known[1]))
            return
        why = self.why_not(r)
        if why:
            self.refused += 1
            log.error("refused %s worker pid %d on %s (%s): %s", r.role, r.pid, r.host, r.addr, why)
            q = ipc.push(ctl.ctx, r.addr, guard=ctl.guard)
            await q.send(Refused(why))
            q.sock.close(linger=2000)  # the answer still goes out
            return
        from runtime.controller.controller import WorkerState

        wid = next(self._ids[r.role])
        key = (r.role, wid)
        self._nonces[r.nonce] = key
        ctl.out[key] = ipc.push(ctl.ctx, r.addr, guard=ctl.guard)
        ctl.workers[key] = WorkerState(r.role, wid, RemoteProcess(r.role, wid, r.pid, r.host), load=Load(wid),
                                       addr=r.addr, device=r.device)
        self.layout = self.layout or r.kv_layout
        log.info("%s worker %d joined from %s (pid %d, %s, %s, %d KV pages)",
                 r.role, wid, r.host, r.pid, r.device, r.addr, r.kv_total_pages)
        await ctl.out[key].send(Registered(wid))

    async def on_drain(self, d: Drain) -> None:
        w = self._joined(d.role, d.id, d.pid)
        if w is None:
            return
        w.draining = True
        log.info("%s worker %d (pid %d) is draining: no new requests go to it", d.role, d.id, d.pid)
        await self.ctl.out[(d.role, d.id)].send(DrainAck())

    async def on_deregister(self, d: Deregister) -> None:
        w = self._joined(d.role, d.id, d.pid)
        if w is None:
            return
        log.info("%s worker %d (pid %d) left the cluster", d.role, d.id, d.pid)
        w.alive = False
        await self.ctl.recover(w)
        self.forget(w)

    def _joined(self, role: str, wid: int, pid: int) -> WorkerState | None:
        w = self.ctl.workers.get((role, wid))
        return w if w is not None and isinstance(w.proc, RemoteProcess) and w.proc.pid == pid else None

    def forget(self, w: WorkerState) -> None:
        """Drop a joined worker that died or left (its requests already recovered)."""
        key = (w.role, w.id)
        self.ctl.workers.pop(key, None)
        q = self.ctl.out.pop(key, None)
        if q is not None:
            q.close()
        self._nonces = {n: k for n, k in self._nonces.items() if k != key}
        if not any(isinstance(x.proc, RemoteProcess) for x in self.ctl.workers.values()):
            self.layout = None  # an empty cluster may take a new layout (all workers replaced)

    def sweep(self, now: float) -> None:
        """Joined workers that registered but never reported Ready: gone."""
        for w in list(self.ctl.workers.values()):
            if isinstance(w.proc, RemoteProcess) and not w.ever_ready and now - w.spawned_at > READY_GRACE_S:
                log.error("%s worker %d registered but was not ready within %.0f s; forgetting it",
                          w.role, w.id, READY_GRACE_S)
                self.forget(w)

    def is_joined(self, w: WorkerState) -> bool:
        return isinstance(w.proc, RemoteProcess)
