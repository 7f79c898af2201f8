"""Subprocess helpers for the multi-process tests: every wait has a timeout that fails the test, and a
coordinator port lost to another process between choosing and binding it is retried with a new one."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

# what JAX's coordination service (gRPC) prints when process 0 cannot bind the coordinator port
BIND_FAILURE = re.compile(r"address already in use|failed to add port|could not bind|bind.*failed", re.IGNORECASE)


def free_port() -> int:
    """A port the OS had free just now (it can be taken before the coordinator binds it: see run_group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    """Wait for every process (each gets ``timeout`` seconds); returns their combined stdout+stderr.

    A process still running after its timeout fails the test (all are killed first)."""
    logs = {}
    try:
        for name, p in procs.items():
            try:
                logs[name], _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {name} did not finish within {timeout:.0f} s", pytrace=False)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return logs


def run_group(spawn, timeout: float, attempts: int = 3) -> tuple[dict[str, subprocess.Popen], dict[str, str]]:
    """``spawn(port) -> {name: Popen}`` (stdout piped, stderr merged) for a group joined at 127.0.0.1:port.

    Retried with a new port when a log reports a bind failure of the coordinator (another process took the
    port); any other outcome is returned as is. Returns (processes, logs)."""
    for _ in range(attempts):
        procs = spawn(free_port())
        logs = wait_all(procs, timeout)
        if not any(p.returncode != 0 and BIND_FAILURE.search(logs[n] or "") for n, p in procs.items()):
            return procs, logs
    pytest.fail(f"the coordinator could not bind a port in {attempts} attempts:\n{next(iter(logs.values()))[-2000:]}")
