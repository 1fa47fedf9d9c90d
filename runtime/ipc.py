"""Typed ZeroMQ queues and the one msgpack codec every link uses (never pickle).

A message is a dataclass registered with `@message`; on the wire it is the msgpack array
[tag, field values...] in declaration order. Nested registered messages and plain
msgpack types (int, float, str, bytes, bool, None, list, dict) are allowed as fields;
`bytes` fields carry raw tensor data without copying through Python lists.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, TypeVar

import msgpack
import zmq
import zmq.asyncio

from runtime.security import Guard, is_tcp

T = TypeVar("T")
_REGISTRY: dict[str, type] = {}
_EXT_MESSAGE = 1


def message(cls: type[T]) -> type[T]:
    """Register a dataclass as a wire message under its class name."""
    cls = dataclasses.dataclass(cls)  # type: ignore[assignment]
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"message type {name} registered twice")
    _REGISTRY[name] = cls
    cls._fields = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[attr-defined]
    return cls


class UnknownMessage(ValueError):
    pass


def _default(obj: Any) -> Any:
    fields = getattr(type(obj), "_fields", None)
    if fields is not None:
        body = msgpack.packb([type(obj).__name__, *(getattr(obj, f) for f in fields)], default=_default, use_bin_type=True)
        return msgpack.ExtType(_EXT_MESSAGE, body)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} on a socket")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _EXT_MESSAGE:
        raise UnknownMessage(f"unknown msgpack extension {code}")
    return _build(msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False))


def _build(arr: list) -> Any:
    name, *values = arr
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnknownMessage(f"unknown message type {name!r}")
    return cls(*values)


def encode(msg: Any) -> bytes:
    return msgpack.packb(msg, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


class Queue:
    """One ZMQ socket carrying typed messages. PUSH/PULL for one-way links (many
    producers may connect to one binding consumer)."""

    def __init__(self, ctx: zmq.asyncio.Context, kind: int, addr: str, bind: bool, hwm: int = 0,
                 guard: Guard | None = None) -> None:
        self.sock = ctx.socket(kind)
        # hwm 0 = unbounded: a producer must never block on a consumer that is busy
        # sending to it (the deadlock CONVENTIONS.md warns about); memory is the limit.
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.addr = addr
        # tcp:// links (other hosts) are CURVE-encrypted and authenticated when the process
        # has keys; ipc:// links stay within one host's file permissions.
        if guard is not None and is_tcp(addr):
            guard.keys.apply(self.sock, bind)
        if bind:
            self.sock.bind(addr)
            # tcp://HOST:* binds a free port: the address peers must use is the one bound.
            self.addr = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if guard is not None and is_tcp(addr):
                guard.watch(self.sock, self.addr)
        else:
            self.sock.connect(addr)

    async def send(self, msg: Any) -> None:
        await self.sock.send(encode(msg), copy=False)

    async def recv(self) -> Any:
        return decode(await self.sock.recv(copy=True))

    async def recv_nowait(self) -> Any | None:
        """The next message if one is already queued, else None."""
        try:
            data = await self.sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return decode(data)

    async def recv_timeout(self, timeout: float) -> Any | None:
        # poll, then a non-blocking recv: cancelling a pending recv (asyncio.wait_for) can
        # drop a message that arrived as the timeout fired.
        if not await self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return await self.recv_nowait()

    def close(self) -> None:
        self.sock.close(0)


def push(ctx: zmq.asyncio.Context, addr: str, bind: bool = False, guard: Guard | None = None) -> Queue:
    return Queue(ctx, zmq.PUSH, addr, bind, guard=guard)


def pull(ctx: zmq.asyncio.Context, addr: str, bind: bool = True, guard: Guard | None = None) -> Queue:
    return Queue(ctx, zmq.PULL, addr, bind, guard=guard)


class Actor:
    """A process loop: receive -> dispatch by type -> handlers send. Subclasses register
    handlers in `handlers` (type -> bound method); an unknown type is an error."""

    def __init__(self) -> None:
        self.handlers: dict[type, Any] = {}

    async def dispatch(self, msg: Any) -> None:
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise UnknownMessage(f"{type(self).__name__} has no handler for {type(msg).__name__}")
        result = handler(msg)
        if asyncio.iscoroutine(result):
            await result
