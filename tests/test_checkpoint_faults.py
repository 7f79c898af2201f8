"""Checkpoint integrity: a flipped byte, a missing file and a truncated file, in an exported
transformer (loading fails naming the file) and in the latest training checkpoint (resume falls back
to the previous intact checkpoint and logs which one and why). The checksums are an independent
sha256 of the bytes written (``manifest.json``), so each damage is detected whatever Orbax would do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import pytest
from flax import nnx

from contentv_jax.checkpoints import CheckpointError, load_transformer, save_checkpoint
from contentv_jax.models.transformer import get_config, init_model
from contentv_jax.train.config import load_train_config
from contentv_jax.train.metrics import read_metrics
from contentv_jax.train.trainer import Trainer

DAMAGES = ("flip", "missing", "truncate")


def _largest_data_file(ckpt: Path) -> Path:
    files = [f for f in (ckpt / "state").rglob("*") if f.is_file() and "/d/" in f.as_posix()]
    return max(files, key=lambda f: f.stat().st_size)


def _damage(f: Path, how: str) -> None:
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "missing":
        f.unlink()
    else:
        f.write_bytes(bytes(data[: len(data) // 2]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = get_config("tiny")
    save_checkpoint(root / "good", nnx.state(init_model(cfg)), cfg.to_dict())
    return root / "good"


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_export_fails_naming_the_file(exported, tmp_path, how):
    load_transformer(exported)  # intact: verified and loaded
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    f = _largest_data_file(bad)
    _damage(f, how)
    rel = f.relative_to(bad).as_posix()
    with pytest.raises(CheckpointError, match=rf"file {rel} is (missing|truncated|damaged)"):
        load_transformer(bad)
    if how == "flip":  # the opt-out really skips the check (same size: Orbax itself cannot tell)
        load_transformer(bad, verify=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("train") / "run"
    over = ["buckets.max_frames=5", "buckets.max_height=32", "buckets.max_width=32", "buckets.batch_video=4",
            "data.num_synthetic=4", "data.synthetic_frames=10", "logging.progress_bar=false", "checkpoint.export=false",
            "logging.tensorboard=false", "steps=4", "checkpoint.every=2", "checkpoint.keep=3", f"run_dir={run}"]
    Trainer(load_train_config(None, over), devices=jax.devices()[:1]).setup().run()
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    return run, over


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_skips_a_damaged_latest_checkpoint(trained, tmp_path, how, capsys):
    run, over = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    f = _largest_data_file(copy / "checkpoints" / "4")
    _damage(f, how)
    rel = f.relative_to(copy / "checkpoints" / "4").as_posix()
    cfg = load_train_config(None, [o for o in over if not o.startswith(("run_dir=", "steps="))]
                            + [f"run_dir={copy}", "steps=5", f"data.cache_dir={run / 'encoded'}"])
    trainer = Trainer(cfg, devices=jax.devices()[:1]).setup()
    assert trainer.start_step == 2
    assert [d["step"] for d in trainer.resume_skipped] == [4] and rel in trainer.resume_skipped[0]["reason"]
    err = capsys.readouterr().err
    assert "resumed from step 2" in err and rel in err
    if how == "flip":  # the run logs it in metrics.jsonl too, and continues from step 2
        summary = trainer.run()
        assert summary["start_step"] == 2 and summary["final_step"] == 5
        events = [r for r in read_metrics(copy) if r.get("event") == "damaged_checkpoint_skipped"]
        assert events and events[-1]["damaged_step"] == 4 and events[-1]["resumed_from"] == 2
        assert rel in events[-1]["reason"]
