"""Two processes on 127.0.0.1 (gloo CPU collectives), 4 CPU devices each, on the (2, 2, 2) mesh, equal one
process with 8 devices (issue 4, acceptance 3).

``_step`` builds the tiny MM-DiT sharded (``create_sharded``, each process initialising only its own
shards), assembles the global batch from each process's rows (``distributed.local_batch_slice`` /
``global_batch``) and runs one jitted forward + gradient with Ulysses (sequence = 2). The test runs it
in-process on the 8 simulated devices and in two subprocesses joined by ``distributed.initialize``
(the second with the data axis across the processes, ``dcn_data=2``), and compares.

Run as a script it is the worker: ``python tests/test_multihost.py --coordinator H:P --num-processes 2
--process-id I --out FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # the worker: 4 CPU devices, before JAX loads
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from contentv_jax.sharding import distributed  # noqa: E402
from contentv_jax.sharding.init import create_sharded  # noqa: E402
from contentv_jax.sharding.logical import activation_sharding  # noqa: E402
from contentv_jax.sharding.mesh import MeshConfig, create_mesh  # noqa: E402
from tests._procs import run_group  # noqa: E402

pytestmark = pytest.mark.slow  # three compiling JAX processes


B = 4


def _cfg():
    from contentv_jax.models.transformer import get_config

    return get_config("tiny", num_attention_heads=6, attention_head_dim=8, caption_projection_dim=48)


def _step(mesh_cfg: MeshConfig) -> dict:
    """One forward + gradient of the tiny MM-DiT on the mesh; scalar summaries every process can read."""
    from contentv_jax.models.transformer import MMDiT

    cfg = _cfg()
    mesh = create_mesh(mesh_cfg)
    model = create_sharded(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)

    rng = np.random.default_rng(0)  # the same global batch on every process; each keeps its own rows
    full = {
        "latents": rng.standard_normal((B, 3, 6, 6, cfg.in_channels), np.float32),
        "timestep": rng.uniform(0, 1000, (B,)).astype(np.float32),
        "context": rng.standard_normal((B, 7, cfg.joint_attention_dim), np.float32),
        "pooled": rng.standard_normal((B, cfg.pooled_projection_dim), np.float32),
        "target": rng.standard_normal((B, 3, 6, 6, cfg.in_channels), np.float32),
    }
    spec = P(("data", "fsdp"))
    rows = distributed.local_batch_slice(B, mesh, spec)
    batch = distributed.global_batch({k: v[rows] for k, v in full.items()}, mesh, spec)

    def loss(st, b):
        out = nnx.merge(graphdef, st)(b["latents"], b["timestep"], b["context"], b["pooled"])
        return jnp.mean((out - b["target"]) ** 2)

    def fwd_grad(st, b):
        with activation_sharding(mesh):
            value, grads = jax.value_and_grad(loss)(st, b)
        leaves = jax.tree.leaves(grads)
        return {
            "loss": value,
            "grad_norm": jnp.sqrt(sum(jnp.sum(g * g) for g in leaves)),
            # per leaf: its squared norm and its projection on a fixed non-periodic direction w
            "grad_sq": jnp.stack([jnp.sum(g * g) for g in leaves]),
            "grad_proj": jnp.stack([jnp.sum(g * _direction(g.shape)) for g in leaves]),
        }

    compiled = jax.jit(fwd_grad).lower(state, batch).compile()
    distributed.barrier("fwd_grad")  # processes meet after compiling: gloo's first collective waits 30 s at most
    out = compiled(state, batch)
    w_sq = [float(jnp.sum(_direction(x.shape) ** 2)) for x in jax.tree.leaves(state)]
    return {k: np.asarray(jax.device_get(v)).tolist() for k, v in out.items()} | {"w_sq": w_sq,
        "rows": [rows.start, rows.stop], "processes": jax.process_count(), "devices": jax.device_count()}


def _direction(shape) -> jax.Array:
    """A fixed direction with no period and no zero entries: cos(0.7 i + 0.3)."""
    n = int(np.prod(shape))
    return jnp.cos(0.7 * jnp.arange(n, dtype=jnp.float32) + 0.3).reshape(shape)


def test_two_processes_equal_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}

    def spawn(port):
        return {
            f"worker {i}": subprocess.Popen(
                [sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(i), "--out", str(tmp_path / f"p{i}.json")],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for i in range(2)
        }

    procs, logs = run_group(spawn, timeout=900)
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
    ref = _step(MeshConfig(2, 2, 2))  # one process, 8 devices
    got = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [g["processes"] for g in got] == [2, 2] and [g["devices"] for g in got] == [8, 8]
    assert [g["rows"] for g in got] == [[0, 2], [2, 4]]  # each process holds its half of the batch
    assert ref["processes"] == 1
    assert [g["stage_seen"] for g in got] == ["done", "done"]
    assert got[0]["stage_error"] == "ValueError: boom"
    assert got[1]["stage_error"] == "RuntimeError: process 0 failed in the failing stage (see its log); stopping this process too"
    sq_ref = np.asarray(ref["grad_sq"], np.float64)
    # zero-initialised layers (AdaLN-zero modulation) have exactly zero gradient at the first step; the
    # per-leaf comparisons below then require exact zeros on both sides
    assert (sq_ref > 0).mean() > 0.8, "most parameters have a gradient"
    for g in got:
        assert abs(g["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
        assert abs(g["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"]
        # every gradient leaf with its own relative tolerance: its norm, and its projection on a fixed
        # direction to within 1e-5 of the largest value the projection can take (|g| |w|, Cauchy-Schwarz)
        sq = np.asarray(g["grad_sq"], np.float64)
        np.testing.assert_allclose(sq, sq_ref, rtol=2e-5, atol=0)
        w_norm = np.sqrt(np.asarray(ref["w_sq"], np.float64))
        bound = 1e-5 * np.sqrt(sq_ref) * w_norm
        diff = np.abs(np.asarray(g["grad_proj"], np.float64) - np.asarray(ref["grad_proj"], np.float64))
        assert np.all(diff <= bound), (np.flatnonzero(diff > bound), diff / bound)


if __name__ == "__main__":
    parser = distributed.add_distributed_args(argparse.ArgumentParser())
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert distributed.initialize_from_args(args)
    result = _step(MeshConfig(data=2, fsdp=2, sequence=2, dcn_data=2))
    # run_on_main_then_all: the others return only after process 0's stage finished (its file is there) ...
    marker = Path(args.out).parent / "stage.txt"  # written by process 0 alone
    distributed.run_on_main_then_all("write", (lambda: marker.write_text("done")) if args.process_id == 0 else None)
    result["stage_seen"] = marker.read_text() if marker.exists() else ""

    def fail():
        raise ValueError("boom")

    try:  # ... and a failure on process 0 stops every process, naming the stage
        distributed.run_on_main_then_all("failing", fail if args.process_id == 0 else None)
        result["stage_error"] = ""
    except (ValueError, RuntimeError) as e:
        result["stage_error"] = f"{type(e).__name__}: {e}"
    Path(args.out).write_text(json.dumps(result))
    jax.distributed.shutdown()
