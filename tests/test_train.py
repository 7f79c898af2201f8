"""End-to-end trainer checks (issue 5 acceptance 2-4) on tiny shapes.

One synthetic dataset is rendered and encoded once per module (``base``); every run reuses its tiny
text encoders, VAE and encoded cache. Acceptance 1 (loss on the real clips) is in
``test_train_real.py``.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contentv_jax.train.config import load_train_config
from contentv_jax.train.metrics import read_metrics
from contentv_jax.train.trainer import TEST_SIGNAL_ENV, Trainer
from conftest import OPT_LEVEL_FLAG  # noqa: E402

pytestmark = pytest.mark.slow  # several end-to-end training runs (CLI subprocesses)


ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "buckets.max_frames=5",
    "buckets.max_height=32",
    "buckets.max_width=32",
    "buckets.batch_video=4",
    "data.num_synthetic=4",
    "data.synthetic_frames=10",
    "logging.progress_bar=false",
    "checkpoint.export=false",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Overrides that point a run at one shared set of tiny assets and one encoded synthetic dataset."""
    from contentv_jax.encode.__main__ import main as encode_main

    run = tmp_path_factory.mktemp("base")
    # `python -m contentv_jax.encode --config` and the trainer's prepare read the same keys (one
    # function, data.prepare): the trainer finds the CLI's cache complete and does not re-encode.
    stats = encode_main(["--config", str(ROOT / "configs" / "train" / "tiny.yaml"), *TINY, f"run_dir={run}"])
    assert stats["records"] > 0, stats
    index = run / "encoded" / "index.json"
    written = index.stat().st_mtime_ns
    cfg = load_train_config(None, TINY + [f"run_dir={run}"])
    Trainer(cfg, devices=jax.devices()[:1]).prepare()
    assert index.stat().st_mtime_ns == written
    return TINY + [
        f"text.path={run / 'assets' / 'text'}",
        f"vae.path={run / 'assets' / 'vae'}",
        f"data.cache_dir={run / 'encoded'}",
    ]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)


def test_mesh_step_matches_single_device(base, tmp_path):
    """Acceptance 3: one step on the (data, fsdp, sequence) = (2, 2, 2) mesh equals the 1-device step."""
    over = base + ["model.dtype=float32", "optimizer.warmup_steps=0", "data.caption_dropout=0.5"]
    one = Trainer(load_train_config(None, over + [f"run_dir={tmp_path / 'one'}", "mesh.fsdp=1"]), devices=jax.devices()[:1])
    eight = Trainer(
        load_train_config(None, over + [f"run_dir={tmp_path / 'eight'}", "mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2"]),
        devices=jax.devices()[:8],
    )
    one.setup()
    eight.setup()
    assert dict(eight.mesh.shape) == {"data": 2, "fsdp": 2, "sequence": 2}
    local = eight.data_iter.batch(0)  # batch size a multiple of data x fsdp = 4
    p0 = jax.tree.map(np.asarray, one.state["params"])
    m1 = one.train_step(one.global_batch(local))
    m8 = eight.train_step(eight.global_batch(local))
    assert m1["finite"] and m8["finite"]
    assert abs(m1["loss"] - m8["loss"]) <= 1e-5 * abs(m1["loss"])
    assert abs(m1["grad_norm"] - m8["grad_norm"]) <= 1e-5 * abs(m1["grad_norm"])
    p1 = jax.tree.map(np.asarray, one.state["params"])
    p8 = jax.tree.map(np.asarray, eight.state["params"])
    # the parameters moved, identically on both layouts
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
    assert moved > 1e-4
    flat1 = np.concatenate([x.ravel() for x in jax.tree.leaves(p1)])
    flat8 = np.concatenate([x.ravel() for x in jax.tree.leaves(p8)])
    print(f"mesh (2,2,2) vs 1 device: loss rel {abs(m1['loss'] - m8['loss']) / abs(m1['loss']):.2e}, "
          f"grad norm rel {abs(m1['grad_norm'] - m8['grad_norm']) / m1['grad_norm']:.2e}, params rel {_rel(flat1, flat8):.2e}")
    assert _rel(flat1, flat8) <= 1e-5
    # a parameter sharded over fsdp really is sharded on the mesh
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(eight.state["params"])}
    assert any("fsdp" in s for s in specs), specs


def _cli(args, env_extra=None):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {OPT_LEVEL_FLAG}", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return [sys.executable, "-m", "contentv_jax.train", *args], env


def _run(cmd, env, timeout=900):
    """Run a CLI subprocess; a hang fails the test (the timeout only guards against a lost process)."""
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd[:3])} did not finish within {timeout} s:\n{(e.stderr or b'')[-3000:]!r}")


def _last_per_step(run_dir):
    rows = {}
    for r in read_metrics(run_dir):
        if "loss" in r:
            rows[r["step"]] = r["loss"]
    return rows


def _saved_state(run_dir, step):
    path = Path(run_dir) / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as c:
        return c.restore(path)


def test_resume_after_sigkill_is_exact(base, tmp_path):
    """Acceptance 2: 20 steps straight == 10 steps, SIGKILL after the step-10 commit, 10 resumed steps.

    The kill is deterministic: the trainer's test-only hook (``CONTENTV_TEST_SIGNAL_AFTER_STEP=10:SIGKILL``)
    makes the run SIGKILL itself right after checkpoint 10 is committed; no polling, no race with later saves."""
    common = base + ["checkpoint.every=10", "checkpoint.keep=5", "logging.tensorboard=false", "data.caption_dropout=0.3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    out = _run(*_cli(["--run-dir", str(straight), *common, "steps=20"]))
    assert out.returncode == 0, out.stderr[-3000:]
    killed = _run(*_cli(["--run-dir", str(resumed), *common, "steps=20"], {TEST_SIGNAL_ENV: "10:SIGKILL"}))
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert sorted(int(d.name) for d in (resumed / "checkpoints").iterdir() if d.name.isdigit()) == [10]
    assert max(_last_per_step(resumed)) == 10  # it died right after step 10
    out = _run(*_cli(["--run-dir", str(resumed), *common, "steps=20"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps 10 -> 20" in out.stdout, out.stdout

    a, b = _last_per_step(straight), _last_per_step(resumed)
    assert sorted(a) == list(range(1, 21)) and set(range(1, 21)) <= set(b)
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]  # bitwise-equal losses
    sa, sb = _saved_state(straight, 20), _saved_state(resumed, 20)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        np.testing.assert_array_equal(np.asarray(sa[k]), np.asarray(sb[k]), err_msg=k)
    assert a[20] != a[1]


def test_bad_files_are_skipped_and_named(base, tmp_path, shared_data):
    """Acceptance 4: a corrupt file and a zero-byte file: the run completes and names both."""
    data = tmp_path / "videos"
    data.mkdir()
    src = shared_data / "videos"
    good = "intel_bottle_hand_6s.mp4"
    (data / good).symlink_to(src / good)
    (data / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4096))
    (data / "empty.mp4").write_bytes(b"")
    with open(data / "captions.jsonl", "w") as f:
        for name in (good, "corrupt.mp4", "empty.mp4"):
            f.write(json.dumps({"file": name, "caption": f"a clip named {name}"}) + "\n")
    over = TINY + [f"run_dir={tmp_path / 'run'}", f"data.dir={data}", "steps=2", "buckets.batch_video=1",
                   "checkpoint.export=true"]
    over += [b for b in base if b.startswith(("text.path", "vae.path"))]
    trainer = Trainer(load_train_config(None, over), devices=jax.devices()[:1])
    summary = trainer.setup().run()
    assert summary["status"] == "completed" and summary["final_step"] == 2
    skipped = {s["file"]: s["reason"] for s in summary["skipped_files"]}
    assert set(skipped) == {"corrupt.mp4", "empty.mp4"}, skipped
    assert summary["records"] >= 1
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {s["file"] for s in saved["skipped_files"]} == {"corrupt.mp4", "empty.mp4"}
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    # the exported weights initialise a new run (model.init=<our transformer checkpoint>)
    again = Trainer(
        load_train_config(None, over + [f"run_dir={tmp_path / 'run2'}", f"model.init={tmp_path / 'run' / 'transformer'}",
                                        f"data.cache_dir={tmp_path / 'run' / 'encoded'}"]),
        devices=jax.devices()[:1],
    ).setup()
    assert again.model_source == "ours" and again.start_step == 0
    for x, y in zip(jax.tree.leaves(trainer.state["params"]), jax.tree.leaves(again.state["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_stops_cleanly(base, tmp_path, monkeypatch):
    """SIGTERM during training (sent by the trainer's test-only hook after step 3, off the checkpoint
    interval): the step in flight finishes, a checkpoint of step 3 is committed, run() returns."""
    run = tmp_path / "run"
    trainer = Trainer(
        load_train_config(None, base + [f"run_dir={run}", "steps=20", "checkpoint.every=1000", "logging.tensorboard=false"]),
        devices=jax.devices()[:1],
    ).setup()
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv(TEST_SIGNAL_ENV, "3:SIGTERM")
    summary = trainer.run()
    assert summary["status"].startswith("interrupted by SIGTERM"), summary["status"]
    assert summary["final_step"] == 3
    assert sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit()) == [3]
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_metrics_are_read_only_on_logging_steps(base, tmp_path):
    """With ``logging.every=5`` the host reads no metrics between logging steps: the reads of steps 1-5
    come after step 6 is dispatched (one step behind), those of 6-10 after step 11, and the last
    steps' at the end; every step's loss still reaches the summary, and the log holds steps 5, 10, 12."""
    run = tmp_path / "run"
    trainer = Trainer(
        load_train_config(None, base + [f"run_dir={run}", "steps=12", "logging.every=5", "checkpoint.every=1000",
                                        "logging.tensorboard=false"]),
        devices=jax.devices()[:1],
    ).setup()
    events = []
    dispatch, read = trainer._dispatch, trainer._read_metrics

    def traced_dispatch(batch):
        events.append("D")
        return dispatch(batch)

    def traced_read(metrics):
        events.append("R")
        return read(metrics)

    trainer._dispatch, trainer._read_metrics = traced_dispatch, traced_read
    summary = trainer.run()
    assert summary["final_step"] == 12 and len(summary["losses"]) == 12
    assert "".join(events) == "D" * 6 + "R" * 5 + "D" * 5 + "R" * 5 + "D" + "R" * 2, "".join(events)
    logged = read_metrics(run)
    assert [r["step"] for r in logged if "loss" in r] == [5, 10, 12]
    assert [r["loss"] for r in logged if "loss" in r] == [summary["losses"][i] for i in (4, 9, 11)]
    assert np.isfinite(summary["losses"]).all()
