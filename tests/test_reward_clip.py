"""Flax CLIP (the clip / PickScore reward) against ``transformers.CLIPModel``: a tiny random model saved
with ``save_pretrained``, converted by ``python -m converters.reward``, loaded by ``load_reward``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.reward_fixtures import jitted, random_ids, run_cli, tiny_hf_clip, tiny_tokenizer, torch_preprocess


def _hf_features(hf, pixels, ids):
    img = hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output)
    txt = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
    return img, txt


def _hf_score(hf, frames_t, ids_t):
    img, txt = _hf_features(hf, torch_preprocess(frames_t, hf.config.vision_config.image_size), ids_t)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return hf.logit_scale.exp() * (img * txt).sum(-1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(HF model, our Reward) through the CLI (HF dir with a tokenizer -> our checkpoint -> load_reward)."""
    from contentv_jax.rewards_io import load_reward

    root = tmp_path_factory.mktemp("clip")
    hf = tiny_hf_clip(seed=0)
    hf.save_pretrained(root / "hf")
    tiny_tokenizer(root / "hf")
    r = run_cli(["--name", "pickscore", "--src", str(root / "hf"), "--dst", str(root / "ours")])
    assert r.returncode == 0, r.stderr
    reward = load_reward("pickscore", root / "ours", tokenizer=root / "hf")
    return hf, reward


@pytest.mark.parametrize("hw", [(40, 52)])
def test_clip_matches_transformers(converted, hw):
    hf, reward = converted
    model = reward.model
    rng = np.random.default_rng(1)
    frames = rng.random((3, *hw, 3), dtype=np.float32)
    ids = random_ids(rng, 3)
    frames_t = torch.tensor(frames, requires_grad=True)
    ids_t = torch.tensor(ids)

    # embeddings on identical (torch-preprocessed) pixels: isolates the towers
    px = torch_preprocess(frames_t, 30)
    with torch.no_grad():
        img_ref, txt_ref = _hf_features(hf, px, ids_t)
    ours_px = np.asarray(model.pixels(jnp.asarray(frames)))
    np.testing.assert_allclose(ours_px, px.detach().permute(0, 2, 3, 1).numpy(), atol=2e-5, rtol=0)
    img = nnx.jit(lambda m, p: m.get_image_features(p))(model, jnp.asarray(px.detach().permute(0, 2, 3, 1).numpy()))
    txt = nnx.jit(lambda m, i: m.get_text_features(i))(model, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(img), img_ref.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(txt), txt_ref.numpy(), atol=1e-5, rtol=0)

    # the reward end to end (our preprocessing) and its gradient w.r.t. the frames
    ref = _hf_score(hf, frames_t, ids_t)
    ref.sum().backward()
    score_fn, grad_fn = jitted(model)
    grad = grad_fn(jnp.asarray(frames), jnp.asarray(ids))
    per = score_fn(jnp.asarray(frames), jnp.asarray(ids))
    assert per.shape == (3,) and per.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(per), ref.detach().numpy(), atol=1e-5, rtol=0)
    g_ref = frames_t.grad.numpy()
    assert np.abs(g_ref).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(np.asarray(grad), g_ref, atol=1e-4 * max(1.0, np.abs(g_ref).max()), rtol=0)
    print(f"{hw}: max |score - ref| {np.abs(np.asarray(per) - ref.detach().numpy()).max():.2e}, "
          f"max |grad - ref| {np.abs(np.asarray(grad) - g_ref).max():.2e} (max |grad| {np.abs(g_ref).max():.2e})")


def test_reward_accepts_strings_and_broadcasts_one_prompt(converted):
    hf, reward = converted
    frames = np.random.default_rng(2).random((2, 45, 38, 3), dtype=np.float32)
    prompts = ["a red cat on the mat", "blue dog"]
    ids = reward.tokenize(prompts)
    assert ids.shape == (2, 16) and ids.dtype == np.int32
    with torch.no_grad():
        ref = _hf_score(hf, torch.tensor(frames), torch.tensor(ids, dtype=torch.long))
    np.testing.assert_allclose(np.asarray(reward(frames, prompts)), ref.numpy(), atol=1e-5, rtol=0)
    one = np.asarray(jitted(reward.model)[0](frames, ids[:1]))
    with torch.no_grad():
        ref1 = _hf_score(hf, torch.tensor(frames), torch.tensor(np.repeat(ids[:1], 2, 0), dtype=torch.long))
    np.testing.assert_allclose(one, ref1.numpy(), atol=1e-5, rtol=0)


def test_eos_pooling_matches_transformers(tmp_path):
    """HF pools at the first ``eos_token_id`` when it is not 2 (ours: ``pool="eos"``)."""
    from contentv_jax.rewards_io import load_reward

    hf = tiny_hf_clip(seed=3, eos_token_id=50, act="quick_gelu")
    hf.save_pretrained(tmp_path / "hf")
    reward = load_reward("clip", tmp_path / "hf")  # straight from the HF directory
    assert reward.model.config.text_config.pool == "eos"
    rng = np.random.default_rng(4)
    ids = random_ids(rng, 2, eos=50)
    ids[:, -1] = 95  # a larger id after the eos: argmax pooling would pick it
    frames = rng.random((2, 30, 34, 3), dtype=np.float32)
    with torch.no_grad():
        ref = _hf_score(hf, torch.tensor(frames), torch.tensor(ids))
    np.testing.assert_allclose(np.asarray(jitted(reward.model)[0](frames, ids)), ref.numpy(), atol=1e-5, rtol=0)


def test_bad_inputs(converted):
    _, reward = converted
    with pytest.raises(ValueError, match="frames: expected"):
        reward.model(jnp.zeros((2, 30, 30)), jnp.zeros((2, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(2, 16\)"):
        reward.model(jnp.zeros((2, 30, 30, 3)), jnp.zeros((3, 16), jnp.int32))
    with pytest.raises(ValueError, match="prompts"):
        reward.tokenize([])
