"""Child processes of the benchmark: start, wait for readiness, sample memory, stop."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ReadinessError",
    "RssSampler",
    "Service",
    "free_port",
    "get",
    "process_tree",
    "rss_mb",
    "start_service",
    "wait_idle",
    "wait_ready",
]


class ReadinessError(RuntimeError):
    """A service died or did not answer as expected in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A started child process (in its own session) and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate, then kill whatever is left of the process group."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_service(
    name: str,
    argv: Sequence[str],
    *,
    logdir: Path,
    cpu: int | None = None,
    env: Mapping[str, str] | None = None,
    stdout_path: Path | None = None,
) -> Service:
    """Start `argv` in a new session, optionally pinned to one CPU with taskset."""
    command = [*(["taskset", "-c", str(cpu)] if cpu is not None else []), *argv]
    stderr_path = logdir / f"{name}.stderr.log"
    out_path = stdout_path or logdir / f"{name}.stdout.log"
    with open(out_path, "ab") as out, open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    return Service(name=name, proc=proc, stderr_path=stderr_path)


def get(
    port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One GET to 127.0.0.1 (never through an environment proxy): status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(
    service: Service,
    port: int,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Poll `GET path` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not service.alive():
            raise ReadinessError(
                f"{service.name} exited with {service.proc.returncode}:\n{service.tail()}"
            )
        try:
            status, body = get(port, path, headers, timeout=2.0)
        except OSError as exc:
            last = repr(exc)
        else:
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.05)
    raise ReadinessError(f"{service.name} not ready on :{port}{path} ({last}):\n{service.tail()}")


def _cpu_ticks(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(field) for field in line.split()[1:]]
                idle = ticks[3] + ticks[4]  # idle and iowait
                return sum(ticks) - idle, sum(ticks)
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def wait_idle(cpu: int, *, busy_below: float = 0.1, timeout_s: float = 3.0) -> float:
    """Wait until `cpu` is idle over a 0.1 s window (a server still working off the previous
    run's backlog would otherwise take CPU from the next); return the seconds waited."""
    started = time.monotonic()
    before = _cpu_ticks(cpu)
    while time.monotonic() - started < timeout_s:
        time.sleep(0.1)
        after = _cpu_ticks(cpu)
        busy, total = after[0] - before[0], after[1] - before[1]
        if total and busy / total < busy_below:
            break
        before = after
    return time.monotonic() - started


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (for wrappers such as a shell around the proxy)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_pid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _vm_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def rss_mb(pids: Sequence[int]) -> float:
    """Summed VmRSS of `pids` in MiB."""
    return sum(_vm_rss_kb(pid) for pid in pids) / 1024


class RssSampler:
    """Samples the RSS of a set of processes every `interval_s` on a background thread."""

    def __init__(self, pids: Sequence[int], interval_s: float = 0.05) -> None:
        self._pids = list(pids)
        self._interval_s = interval_s
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._samples.append(rss_mb(self._pids))
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._samples.append(rss_mb(self._pids))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._samples.append(rss_mb(self._pids))

    @property
    def baseline_mb(self) -> float:
        return self._samples[0]

    @property
    def peak_mb(self) -> float:
        return max(self._samples)

    @property
    def count(self) -> int:
        return len(self._samples)
