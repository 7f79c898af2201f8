"""Issue 5 acceptance 1: training the tiny model on the real clips of ``../shared/data/videos`` lowers
the loss (mean of the last 20 steps <= 0.8 x the mean of the first 20, fixed seed)."""

import jax
import numpy as np
import pytest

from contentv_jax.train.config import load_train_config
from contentv_jax.train.metrics import read_metrics
from contentv_jax.train.trainer import Trainer


pytestmark = pytest.mark.slow  # training on the real clips


def test_tiny_model_learns_on_real_clips(shared_data, tmp_path):
    over = [
        f"run_dir={tmp_path}",
        f"data.dir={shared_data / 'videos'}",
        "steps=60",
        "seed=0",
        "logging.progress_bar=false",
        "checkpoint.export=false",
    ]
    summary = Trainer(load_train_config(None, over), devices=jax.devices()[:1]).setup().run()
    assert summary["status"] == "completed" and summary["skipped_files"] == []
    losses = np.array(summary["losses"])
    assert losses.shape == (60,) and np.isfinite(losses).all()
    first, last = losses[:20].mean(), losses[-20:].mean()
    print(f"real clips: mean loss first 20 = {first:.4f}, last 20 = {last:.4f}, ratio {last / first:.3f}")
    assert last <= 0.8 * first
    logged = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    np.testing.assert_allclose(logged, losses, rtol=1e-6)
