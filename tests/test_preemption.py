"""Preemption across hosts and start-up from the ``CONTENTV_*`` variables alone (two processes, gloo).

Three jobs on one encoded cache (``data.cache_dir``): a one-process reference on 8 devices and an
uninterrupted two-process job (together), then a two-process job whose process 1 alone gets SIGTERM
after step 2 (the trainer's ``CONTENTV_TEST_SIGTERM_AT_STEP`` hook: the signal goes at a known step,
no timing). The two-process jobs get no distributed flags, only ``CONTENTV_COORDINATOR`` /
``CONTENTV_NUM_PROCESSES`` / ``CONTENTV_PROCESS_ID``: they must be one job (the (2, 2, 2) mesh needs
both processes' devices; two single-process jobs would fail to build it). The interrupted job must
stop on both processes at the same step, commit one checkpoint, exit 0; a resumed two-process job
then logs exactly (bitwise) the losses of the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_multihost_train import ARGS as BASE_ARGS
from test_multihost_train import _tiny_vae_checkpoint

from contentv_jax.train.config import load_train_config
from contentv_jax.train.metrics import read_metrics
from contentv_jax.train.trainer import TEST_SIGTERM_ENV, Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
ARGS = [a for a in BASE_ARGS if not a.startswith("steps=")] + [f"steps={STEPS}", "checkpoint.every=100"]
TIMEOUT = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(run_dir: Path, devices: int, extra: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTENTV_")}
    env |= {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "contentv_jax.train", "--run-dir", str(run_dir), *ARGS, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _two(run_dir: Path, extra: list[str], hook: str | None = None) -> dict:
    port = _free_port()
    procs = {}
    for i in range(2):
        env = {"CONTENTV_COORDINATOR": f"127.0.0.1:{port}", "CONTENTV_NUM_PROCESSES": "2", "CONTENTV_PROCESS_ID": str(i)}
        if hook:
            env[TEST_SIGTERM_ENV] = hook
        procs[f"{run_dir.name}/{i}"] = _spawn(run_dir, 4, extra, env)
    return procs


def _finish(procs: dict) -> dict:
    logs = {}
    try:
        for name, p in procs.items():
            logs[name], _ = p.communicate(timeout=TIMEOUT)  # TimeoutExpired fails the test
    finally:
        for p in procs.values():
            p.kill()
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{logs[name][-4000:]}"
    return logs


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_at_one_step_and_env_alone_makes_one_job(tmp_path):
    base = tmp_path / "base"
    vae = _tiny_vae_checkpoint(tmp_path / "vae")
    over = [f"run_dir={base}", f"vae.path={vae}", "mesh.data=1", "mesh.fsdp=1", "mesh.sequence=1"]
    Trainer(load_train_config(None, ARGS + over), devices=jax.devices()[:1]).prepare()
    cache = [f"data.cache_dir={base / 'encoded'}"]

    one, full, cut = tmp_path / "one", tmp_path / "full", tmp_path / "cut"
    # the reference jobs first, then the interrupted one: it compiles the uninterrupted job's program, so
    # it (and the resume) read the step from the persistent compilation cache
    logs = _finish({"one": _spawn(one, 8, cache)} | _two(full, cache))
    logs |= _finish(_two(cut, cache, hook="2:1"))

    # acceptance 4: the variables alone made one two-process job with the one-process losses
    ref, got = _losses(one), _losses(full)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    a, b = np.array([ref[s] for s in sorted(ref)]), np.array([got[s] for s in sorted(got)])
    print(f"losses: 1 process x 8 devices {a.tolist()}, 2 processes (env only) {b.tolist()}")
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert "completed: steps 0 -> 5" in logs["full/0"]

    # acceptance 3: both processes stopped at the same step, one checkpoint, exit 0 (checked above)
    m0 = re.search(r"interrupted by SIGTERM \(checkpoint saved\): steps 0 -> (\d+)", logs["cut/0"])
    m1 = re.search(r"process 1: interrupted by SIGTERM \(checkpoint saved\) at step (\d+)", logs["cut/1"])
    assert m0 and m1, (logs["cut/0"][-2000:], logs["cut/1"][-2000:])
    stop = int(m0.group(1))
    print(f"SIGTERM to process 1 after step 2: process 0 stopped at step {stop}, process 1 at {m1.group(1)}")
    assert int(m1.group(1)) == stop and 2 <= stop < STEPS
    steps = sorted(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [stop], steps
    assert not list((cut / "checkpoints").glob("*tmp*"))
    assert not (cut / "transformer").exists()  # an interrupted run does not export
    assert json.loads((cut / "summary.json").read_text())["final_step"] == stop

    # the resumed two-process job continues with the uninterrupted job's losses, bitwise
    _finish(_two(cut, cache))
    resumed = _losses(cut)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in range(stop + 1, STEPS + 1):
        assert resumed[s] == got[s], (s, resumed[s], got[s])
    assert (cut / "transformer" / "config.json").is_file()
