"""SFT through the trainer (ContentV report section 6.1): the frozen reference model, caption draws on
real clips with a short and a long caption each, and the regulariser measured doing its job.

One tiny model is pre-trained on the synthetic shapes once per module; the SFT runs start from its export.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contentv_jax.config import ConfigError
from contentv_jax.train.config import load_train_config
from contentv_jax.train.trainer import Trainer

TINY = [
    "buckets.max_frames=5",
    "buckets.max_height=32",
    "buckets.max_width=32",
    "buckets.batch_video=4",
    "data.num_synthetic=8",
    "data.synthetic_frames=10",
    "logging.progress_bar=false",
    "model.dtype=float32",
    "optimizer.warmup_steps=0",
    "logging.sample_every=0",  # no previews (the default run makes them every 100 steps)
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny model pre-trained on the synthetic shapes (80 steps), exported; its assets reused by every run."""
    run = tmp_path_factory.mktemp("pretrain")
    cfg = load_train_config(None, TINY + [f"run_dir={run}", "steps=80", "optimizer.lr=3e-3", "checkpoint.every=1000"])
    summary = Trainer(cfg, devices=jax.devices()[:1]).setup().run()
    assert summary["status"] == "completed"
    assets = [f"text.path={run / 'assets' / 'text'}", f"vae.path={run / 'assets' / 'vae'}"]
    return {"run": run, "init": run / "transformer", "assets": assets, "synthetic": run / "encoded"}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_random_init_with_kl_weight_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.kl_weight.*model\.init"):
        load_train_config(None, [f"run_dir={tmp_path}", "sft.kl_weight=1.0"])


def test_reference_frozen_not_saved_and_resume_exact(pretrained, tmp_path):
    """Acceptance 1 through the trainer: with the regulariser on, the reference parameters are bitwise
    unchanged after 10 steps, the checkpoints hold no copy of them (no bfloat16 array, same leaf count as
    a run without the regulariser), the two loss terms are logged, and a resumed run continues bitwise."""
    over = TINY + pretrained["assets"] + [
        f"model.init={pretrained['init']}", f"data.cache_dir={pretrained['synthetic']}", "sft.kl_weight=1.0",
        "optimizer.lr=1e-3", "checkpoint.every=5", "checkpoint.keep=5", "checkpoint.export=false",
    ]
    full = Trainer(load_train_config(None, over + [f"run_dir={tmp_path / 'full'}", "steps=10"]), devices=jax.devices()[:1]).setup()
    ref_before = _leaves(full.ref_params)
    assert all(x.dtype == jnp.bfloat16 for x in ref_before)
    trained_before = _leaves(full.state["params"])
    s_full = full.run()
    ref_after = _leaves(full.ref_params)
    assert len(ref_before) == len(ref_after) and all(a.tobytes() == b.tobytes() for a, b in zip(ref_before, ref_after))
    # the trained weights moved, and the reference equals their starting point in bfloat16
    assert any(not np.array_equal(a, b) for a, b in zip(trained_before, _leaves(full.state["params"])))
    for r, p in zip(ref_before, trained_before):
        assert r.tobytes() == p.astype(jnp.bfloat16).tobytes()
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss_fm" in r]
    assert len(logged) == 10 and all(r["loss_kl"] > 0 for r in logged[1:])
    np.testing.assert_allclose([r["loss"] for r in logged], [r["loss_fm"] + r["loss_kl"] for r in logged], rtol=1e-5)
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["sft_reference"]["path"] == str(pretrained["init"])

    # checkpoints: the train state only (step, rng, params, opt_state); no reference copy
    meta = ocp.StandardCheckpointer().metadata(tmp_path / "full" / "checkpoints" / "10" / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    dtypes = [str(getattr(m, "dtype", "")) for m in jax.tree.leaves(tree)]
    n_params = len(trained_before)
    assert "bfloat16" not in dtypes
    # params + AdamW mu + nu (+ counts/step/rng scalars): never a second params-sized block
    assert len(dtypes) < 4 * n_params, (len(dtypes), n_params)

    # resume: 5 steps, then a new trainer to 10 continues with the uninterrupted run's losses, bitwise
    part = tmp_path / "part"
    Trainer(load_train_config(None, over + [f"run_dir={part}", "steps=5"]), devices=jax.devices()[:1]).setup().run()
    resumed = Trainer(load_train_config(None, over + [f"run_dir={part}", "steps=10"]), devices=jax.devices()[:1]).setup()
    assert resumed.start_step == 5
    s_res = resumed.run()
    assert np.asarray(s_res["losses"], np.float32).tobytes() == np.asarray(s_full["losses"][5:], np.float32).tobytes()
    for a, b in zip(_leaves(resumed.state["params"]), _leaves(full.state["params"])):
        assert a.tobytes() == b.tobytes()


def test_zero_weight_builds_no_reference_and_matches_plain(pretrained, tmp_path):
    """sft.kl_weight=0: no reference model, and the run is bitwise the plain fine-tuning run."""
    over = TINY + pretrained["assets"] + [
        f"model.init={pretrained['init']}", f"data.cache_dir={pretrained['synthetic']}", "steps=3",
        "checkpoint.export=false",
    ]
    zero = Trainer(load_train_config(None, over + [f"run_dir={tmp_path / 'z'}", "sft.kl_weight=0"]), devices=jax.devices()[:1]).setup()
    assert zero.ref_params is None
    plain = Trainer(load_train_config(None, over + [f"run_dir={tmp_path / 'p'}"]), devices=jax.devices()[:1]).setup()
    assert np.asarray(zero.run()["losses"]).tobytes() == np.asarray(plain.run()["losses"]).tobytes()


def _two_caption_clips(shared_data, dst):
    """The real clips, each with a short and a long caption (the long one: the shared caption; the short
    one: its first clause)."""
    dst.mkdir()
    lines = []
    for line in (shared_data / "videos" / "captions.jsonl").read_text().splitlines():
        obj = json.loads(line)
        (dst / obj["file"]).symlink_to(shared_data / "videos" / obj["file"])
        short = obj["caption"].split(";")[0].split(",")[0]
        lines.append(json.dumps({"file": obj["file"], "short_caption": short, "long_caption": obj["caption"]}))
    (dst / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def test_caption_draws_on_real_clips_mesh_and_resume(pretrained, shared_data, tmp_path):
    """Acceptance 2: over 2,000 draws each kind's share is within 3 % of its weight; the drawn sequence is
    the same on a (2, 2, 2) mesh and on one device, and after resume."""
    data = _two_caption_clips(shared_data, tmp_path / "clips")
    over = TINY + pretrained["assets"] + [
        f"data.dir={data}", f"data.cache_dir={tmp_path / 'enc'}", "data.caption_weights={short: 0.3, long: 0.7}",
        "data.fps=8", "buckets.max_frames=5",
    ]
    one = Trainer(load_train_config(None, over + [f"run_dir={tmp_path / 'one'}", "mesh.fsdp=1"]), devices=jax.devices()[:1])
    one.prepare()
    eight = Trainer(load_train_config(None, over + [f"run_dir={tmp_path / 'eight'}", "mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2"]))
    enc = one.prepare()[2]
    it1, it8 = one._batches(enc), eight._batches(enc)

    def draws(it, n):
        out = []
        for _ in range(n):
            b = next(it)
            out.append((b["step"], b["bucket"], tuple(b["caption_kind"]), b["prompt_embeds"].tobytes()))
        return out

    d1 = draws(it1, 500)
    kinds = [k for _, _, ks, _ in d1 for k in ks]
    assert len(kinds) >= 2000
    share = {k: kinds.count(k) / len(kinds) for k in ("short", "long")}
    print(f"caption draws over {len(kinds)} samples: {share} (weights short 0.3, long 0.7)")
    assert abs(share["short"] - 0.3) <= 0.03 and abs(share["long"] - 0.7) <= 0.03
    d8 = draws(it8, 500)
    assert [x[:3] for x in d8] == [x[:3] for x in d1]
    assert all(a[3] == b[3] for a, b in zip(d1, d8))
    # resume: a fresh iterator restored from the state at step 250 continues with the same draws
    it_a = one._batches(enc)
    draws(it_a, 250)
    state = it_a.get_state()
    it_b = one._batches(enc)
    it_b.set_state(json.loads(json.dumps(state)))
    assert [x[:3] for x in draws(it_b, 250)] == [x[:3] for x in d1[250:]]


def _velocity_distance(init_dir, cand_dir, encoded, n=8):
    """Mean squared velocity difference between two exported tiny models on held-out synthetic inputs."""
    from contentv_jax.checkpoints import load_transformer
    from contentv_jax.data.loader import TrainBatches

    ref = load_transformer(init_dir, dtype="float32")
    cand = load_transformer(cand_dir, dtype="float32")
    it = TrainBatches(encoded, seed=123, video_batch_size=4)
    key = jax.random.key(99)
    tot = []
    for i in range(n):
        b = next(it)
        x0 = jnp.asarray(b["latents"])
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        sigma = jax.random.uniform(k1, (x0.shape[0],), minval=0.05, maxval=0.95)
        noise = jax.random.normal(k2, x0.shape)
        s = sigma[:, None, None, None, None]
        xs = (1 - s) * x0 + s * noise
        args = (xs, sigma * 1000.0, jnp.asarray(b["prompt_embeds"]), jnp.asarray(b["pooled"]))
        tot.append(float(jnp.mean(jnp.square(cand(*args) - ref(*args)))))
    return float(np.mean(tot))


@pytest.mark.slow
def test_regulariser_keeps_the_model_close(pretrained, shared_data, tmp_path):
    """Acceptance 3: 100 SFT steps on the real clips from the synthetic-pretrained model, kl_weight 0 and 1:
    with 1 the velocity distance to the reference on held-out synthetic inputs is <= 0.5x the distance with 0,
    and the SFT loss on the real clips still falls (mean of the last 20 steps <= 0.9x the first 20's).
    Measured at 100 steps: distance ratio 0.29, loss ratio 0.76 with kl_weight 1."""
    data = _two_caption_clips(shared_data, tmp_path / "clips")
    common = TINY + pretrained["assets"] + [
        f"model.init={pretrained['init']}", f"data.dir={data}", f"data.cache_dir={tmp_path / 'enc'}",
        "data.caption_weights={short: 0.5, long: 0.5}", "steps=100", "optimizer.lr=1e-3",
        "checkpoint.every=1000", "data.caption_dropout=0.0",
    ]
    results = {}
    for lam in (0.0, 1.0):
        run = tmp_path / f"kl{lam:g}"
        s = Trainer(load_train_config(None, common + [f"run_dir={run}", f"sft.kl_weight={lam}"]), devices=jax.devices()[:1]).setup().run()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        fm_losses = np.array([r.get("loss_fm", r.get("loss")) for r in rows if "loss" in r])
        dist = _velocity_distance(pretrained["init"], run / "transformer", pretrained["synthetic"])
        results[lam] = (dist, fm_losses[:20].mean(), fm_losses[-20:].mean())
        assert s["status"] == "completed"
    (d0, f0, l0), (d1, f1, l1) = results[0.0], results[1.0]
    print(f"velocity distance to the reference on held-out synthetic inputs: kl 0 -> {d0:.5f}, kl 1 -> {d1:.5f} "
          f"(ratio {d1 / d0:.3f}); SFT flow-matching loss first/last 20: kl 0 {f0:.4f} -> {l0:.4f}, "
          f"kl 1 {f1:.4f} -> {l1:.4f} (ratio {l1 / f1:.3f})")
    assert d1 <= 0.5 * d0
    assert l1 <= 0.9 * f1
