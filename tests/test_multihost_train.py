"""``python -m contentv_jax.train`` in two processes (gloo, 4 CPU devices each) on the (2, 2, 2) mesh logs
the losses one process with 8 simulated devices logs (issue 4, acceptance 3).

The synthetic data is encoded once here (in-process, through the trainer's own prepare stage, with a
tiny VAE checkpoint whose random weights are drawn with numpy: no per-layer init compiles); then the
8-device reference and the two processes of the distributed run start together, all reading that cache
(``data.cache_dir``), so both runs train on the same records. Kept lean: a 3-step tiny run on 4 short
clips, and the three processes overlap their start-up and compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contentv_jax.train.config import load_train_config
from contentv_jax.train.metrics import read_metrics
from contentv_jax.train.trainer import Trainer
from tests._procs import run_group

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
ARGS = [
    f"steps={STEPS}", "mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2", "model.dtype=float32",
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


def _spawn(run_dir: Path, devices: int, extra: list[str]) -> subprocess.Popen:
    env = os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "contentv_jax.train", "--run-dir", str(run_dir), *ARGS, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _saved_arrays(path: Path) -> list[np.ndarray]:
    """The leaves of an Orbax pytree checkpoint, restored to host numpy arrays (whatever devices wrote them)."""
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        leaves = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return jax.tree.leaves(leaves)


@pytest.mark.slow
def test_train_cli_two_processes_log_the_single_process_losses(tmp_path):
    base = tmp_path / "base"
    vae = _tiny_vae_checkpoint(tmp_path / "vae")
    over = [f"run_dir={base}", f"vae.path={vae}", "mesh.data=1", "mesh.fsdp=1", "mesh.sequence=1"]
    Trainer(load_train_config(None, ARGS + over), devices=jax.devices()[:1]).prepare()
    cache = [f"data.cache_dir={base / 'encoded'}"]

    one, two = tmp_path / "one", tmp_path / "two"

    def spawn(port):
        procs = {"one": _spawn(one, 8, cache)}
        for i in range(2):
            procs[f"two/{i}"] = _spawn(
                two, 4, cache + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            )
        return procs

    procs, logs = run_group(spawn, timeout=900)
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"

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
    assert "completed: steps 0 -> 3" in logs["two/0"] and "completed" not in logs["two/1"]
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
