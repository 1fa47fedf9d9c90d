"""Hosts on one machine: Linux network namespaces joined by a bridge (itself in a namespace
of its own, so no packet touches the machine's network), one address each, plus one
point-to-point link from this namespace to the first host, so the test can reach the
gateway's HTTP port. Used by tests/e2e/test_multihost.py and benchmarks/bench_multihost.py.

Everything is named with a random tag, so runs never collide, and `close()` removes every
process and namespace it made, whatever happened before.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(("netns", "exec", ns, "ip") if ns else ()), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def netns_unavailable() -> str:
    """'' when namespaces, veth pairs and bridges can be made here, else why not."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    name = f"rtprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", "br0", "type", "bridge", ns=name)
    except RuntimeError as e:
        return f"cannot create a network namespace with a bridge: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


class Proc:
    """A process in a namespace, its output in a file, in its own process group."""

    def __init__(self, ns: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "w")
        env = dict(os.environ, **(env or {}), PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, cwd=str(REPO))
        self.pid = self.proc.pid  # `ip netns exec` execs the command: this is its pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{needle!r} not seen in {self.log_path.name} (exit {self.proc.poll()}):\n"
                                   + self.text()[-4000:])
            time.sleep(0.2)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()


class Hosts:
    """`n` namespaces, host i at 10.A.B.(i+1)/24 on one bridge; host 0 also at `client_ip`'s
    peer on a /30 link to this namespace."""

    def __init__(self, n: int, workdir: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.workdir = workdir
        a, b = secrets.randbelow(200) + 20, secrets.randbelow(250) + 1
        self.lan = f"rtlan{self.tag}"
        self.names = [f"rth{i}{self.tag}" for i in range(n)]
        self.ips = [f"10.{a}.{b}.{i + 1}" for i in range(n)]
        self.procs: list[Proc] = []
        self._made: list[str] = []
        self._link = f"rtc{self.tag}"
        c = secrets.randbelow(250) + 1
        self.client_ip, self.host0_ip = f"10.{a + 1}.{c}.1", f"10.{a + 1}.{c}.2"
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.lan)
        self._made.append(self.lan)
        _ip("link", "add", "br0", "type", "bridge", ns=self.lan)
        _ip("link", "set", "br0", "up", ns=self.lan)
        for i, (name, ip) in enumerate(zip(self.names, self.ips)):
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("link", "set", "lo", "up", ns=name)
            port, peer = f"rtp{i}{self.tag}", f"rtq{i}{self.tag}"
            _ip("link", "add", port, "type", "veth", "peer", "name", peer)
            _ip("link", "set", port, "netns", self.lan)
            _ip("link", "set", port, "master", "br0", ns=self.lan)
            _ip("link", "set", port, "up", ns=self.lan)
            _ip("link", "set", peer, "netns", name)
            _ip("link", "set", peer, "name", "eth0", ns=name)
            _ip("addr", "add", f"{ip}/24", "dev", "eth0", ns=name)
            _ip("link", "set", "eth0", "up", ns=name)
        # This namespace <-> host 0 only: the HTTP client's way in, not a way between hosts.
        _ip("link", "add", self._link, "type", "veth", "peer", "name", f"rtd{self.tag}")
        _ip("link", "set", f"rtd{self.tag}", "netns", self.names[0])
        _ip("addr", "add", f"{self.host0_ip}/30", "dev", f"rtd{self.tag}", ns=self.names[0])
        _ip("link", "set", f"rtd{self.tag}", "up", ns=self.names[0])
        _ip("addr", "add", f"{self.client_ip}/30", "dev", self._link)
        _ip("link", "set", self._link, "up")

    def start(self, host: int, args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        p = Proc(self.names[host], args, self.workdir / f"{name}.log", env)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for p in self.procs:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            p.stop(0.1)
        for ns in self._made:
            # Whatever still runs in it (a grandchild) goes with it.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self._link], capture_output=True)
        self._made.clear()
