"""``python -m contentv_jax.train`` across two processes (gloo, 4 CPU devices each) on the (2, 2, 2) mesh.

One set of jobs serves both tests of this module, on one encoded cache (``data.cache_dir``; the synthetic
data is encoded once, in-process, through the trainer's own prepare stage, with a tiny VAE checkpoint whose
random weights are drawn with numpy: no per-layer init compiles):

- the reference: one process with 8 simulated devices;
- ``two``: two processes joined by the ``--coordinator`` / ``--num-processes`` / ``--process-id`` flags,
  started together with the reference (the three overlap their start-up and compiles). It must log the
  reference's losses and write one checkpoint and one export equal to the reference's (issue 4,
  acceptance 3);
- ``cut``: two processes given no distributed flags, only ``CONTENTV_COORDINATOR`` /
  ``CONTENTV_NUM_PROCESSES`` / ``CONTENTV_PROCESS_ID`` (they must form one job: the (2, 2, 2) mesh needs both
  processes' devices), whose process 1 alone gets SIGTERM after step 2 (the trainer's
  ``CONTENTV_TEST_SIGTERM_AT_STEP`` hook: the signal goes at a known step, no timing). Both processes must
  stop at the same step, commit one checkpoint and exit 0; the resumed job (the same variables) then logs
  the reference's losses, and exactly (bitwise) those of ``two``, which ran the same program uninterrupted.

Kept lean: 5 tiny steps on 4 short clips; the run's text encoders and VAE are the prepared ones
(``text.path`` / ``vae.path``), so no job builds its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contentv_jax.train.config import load_train_config
from contentv_jax.train.metrics import read_metrics
from contentv_jax.train.trainer import TEST_SIGTERM_ENV, Trainer
from tests._procs import run_group
from conftest import OPT_LEVEL_FLAG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
TIMEOUT = 900
ARGS = [
    f"steps={STEPS}", "checkpoint.every=100", "mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2", "model.dtype=float32",
    "data.num_synthetic=4", "data.synthetic_frames=9", "data.num_threads=1", "optimizer.warmup_steps=0",
    "logging.tensorboard=false", "logging.progress_bar=false",
]


def _tiny_vae_checkpoint(dst: Path) -> Path:
    """The tiny Wan VAE in our checkpoint format (as the trainer writes it), fan-in scaled normal kernels."""
    from flax import nnx

    from contentv_jax.models.vae import abstract_vae, get_config
    from contentv_jax.checkpoints import save_checkpoint

    config = get_config("tiny")
    state = nnx.state(abstract_vae(config), nnx.Param)
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "'gamma'" in name:
            return np.ones(x.shape, np.float32)
        if "'bias'" in name:
            return np.zeros(x.shape, np.float32)
        return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(np.float32)

    save_checkpoint(dst, jax.tree.map_with_path(draw, state), config.to_diffusers())
    return dst


def _spawn(run_dir: Path, devices: int, extra: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTENTV_")} | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {OPT_LEVEL_FLAG}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        **(env_extra or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "contentv_jax.train", "--run-dir", str(run_dir), *ARGS, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _run(spawn) -> dict[str, str]:
    """``spawn(port) -> {name: Popen}``, waited for (``run_group``: a lost coordinator port is retried); every
    process must exit 0. Returns their logs."""
    procs, logs = run_group(spawn, timeout=TIMEOUT)
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{logs[name][-4000:]}"
    return logs


def _env_job(run_dir: Path, extra: list[str], port: int, hook: str | None = None) -> dict[str, subprocess.Popen]:
    """A two-process job configured by the ``CONTENTV_*`` variables alone (``hook``: the SIGTERM test hook)."""
    procs = {}
    for i in range(2):
        env = {"CONTENTV_COORDINATOR": f"127.0.0.1:{port}", "CONTENTV_NUM_PROCESSES": "2", "CONTENTV_PROCESS_ID": str(i)}
        if hook:
            env[TEST_SIGTERM_ENV] = hook
        procs[f"{run_dir.name}/{i}"] = _spawn(run_dir, 4, extra, env)
    return procs


def _rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run_dir)}


def _saved_arrays(path: Path) -> list[np.ndarray]:
    """The leaves of an Orbax pytree checkpoint, restored to host numpy arrays (whatever devices wrote them)."""
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        leaves = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return jax.tree.leaves(leaves)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The encoded cache, then the 8-device reference (``one``) and the flag-joined two-process job (``two``),
    run together. Returns ``(tmp, cache overrides, logs)``."""
    tmp = tmp_path_factory.mktemp("multihost_train")
    base = tmp / "base"
    vae = _tiny_vae_checkpoint(tmp / "vae")
    over = [f"run_dir={base}", f"vae.path={vae}", "mesh.data=1", "mesh.fsdp=1", "mesh.sequence=1"]
    Trainer(load_train_config(None, ARGS + over), devices=jax.devices()[:1]).prepare()
    cache = [f"data.cache_dir={base / 'encoded'}", f"text.path={base / 'assets' / 'text'}", f"vae.path={vae}"]
    one, two = tmp / "one", tmp / "two"

    def spawn(port):
        procs = {"one": _spawn(one, 8, cache)}
        for i in range(2):
            procs[f"two/{i}"] = _spawn(
                two, 4, cache + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            )
        return procs

    return tmp, cache, _run(spawn)


@pytest.mark.slow
def test_train_cli_two_processes_log_the_single_process_losses(jobs):
    tmp, _, logs = jobs
    one, two = tmp / "one", tmp / "two"
    ref, got = _rows(one), _rows(two)
    # process 0 alone logged: one row per step (process 1 appending would double them)
    assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        a, b = np.array([r[key] for r in ref]), np.array([r[key] for r in got])
        print(f"{key}: 1 process x 8 devices {a.tolist()}, 2 processes x 4 devices {b.tolist()}, "
              f"max rel {np.max(np.abs(a - b) / np.abs(a)):.2e}")
        np.testing.assert_allclose(b, a, rtol=1e-5)
    assert len(set(r["loss"] for r in ref)) == STEPS  # the steps trained on different batches
    # the run's reports and exported weights come from process 0 only
    assert f"completed: steps 0 -> {STEPS}" in logs["two/0"] and "completed" not in logs["two/1"]
    assert json.loads((two / "summary.json").read_text())["final_step"] == STEPS
    assert (two / "config.yaml").is_file() and (two / "transformer" / "config.json").is_file()
    assert not list(two.glob(".*tmp*")) and not list((two / "checkpoints").glob("*tmp*"))
    # both processes wrote their shards of one checkpoint and one export: both equal the reference's
    # (checkpoints land on multiples of checkpoint.every and at the end; no extra first-step save)
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [STEPS]
    for path in (Path("checkpoints") / str(STEPS) / "state", Path("transformer") / "state"):
        # every leaf (parameters, Adam's first and second moments of ~1e-8, the step count) with its own
        # relative tolerance: max |b - a| <= 1e-5 max |a| of that leaf
        for i, (a, b) in enumerate(zip(_saved_arrays(one / path), _saved_arrays(two / path), strict=True)):
            scale = float(np.max(np.abs(a))) if a.size else 0.0
            err = float(np.max(np.abs(np.asarray(b, np.float64) - a))) if a.size else 0.0
            assert err <= 1e-5 * scale, (str(path), i, a.shape, err, scale)
    assert (two / "transformer" / "config.json").read_text() == (one / "transformer" / "config.json").read_text()
    # the saved data position does not depend on the host layout
    data = [json.loads((r / "checkpoints" / str(STEPS) / "data" / "metadata").read_text()) for r in (one, two)]
    assert data[0] == data[1] and data[0]["json"]["grain"]["next_index"] == STEPS


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_at_one_step_and_env_alone_makes_one_job(jobs):
    tmp, cache, _ = jobs
    ref, full = _losses(tmp / "one"), _losses(tmp / "two")
    cut = tmp / "cut"
    logs = _run(lambda port: _env_job(cut, cache, port, hook="2:1"))

    # both processes stopped at the same step, one checkpoint, exit 0 (checked by _run)
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

    # the resumed job continues with the uninterrupted job's losses, bitwise
    logs = _run(lambda port: _env_job(cut, cache, port))
    assert f"completed: steps {stop} -> {STEPS}" in logs["cut/0"], logs["cut/0"][-2000:]
    resumed = _losses(cut)
    assert sorted(resumed) == sorted(ref) == list(range(1, STEPS + 1))
    for s in range(stop + 1, STEPS + 1):
        assert resumed[s] == full[s], (s, resumed[s], full[s])
    assert (cut / "transformer" / "config.json").is_file()

    # the variables alone made one two-process job with the one-process losses (a single-process job per
    # process could not even build the (2, 2, 2) mesh)
    a, b = np.array([ref[s] for s in sorted(ref)]), np.array([resumed[s] for s in sorted(resumed)])
    print(f"losses: 1 process x 8 devices {a.tolist()}, 2 processes (env only, interrupted and resumed) {b.tolist()}")
    np.testing.assert_allclose(b, a, rtol=1e-5)
