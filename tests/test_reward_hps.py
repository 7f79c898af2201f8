"""HPSv2 reward: an open_clip-named state dict from a tiny ``open_clip.model.CLIP`` (PyPI open_clip_torch),
saved as HPSv2 ships it (``{"state_dict": ...}``), loaded by ``load_reward("hps", ...)``, scored like
open_clip's ``encode_image`` / ``encode_text`` cosine (HPSv2 ``score.py``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from tests.open_clip_import import import_open_clip
from tests.reward_fixtures import TEXT_LEN, jitted, random_ids, torch_preprocess

OC_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 30, "layers": 2, "width": 48, "head_width": 12, "patch_size": 6},
    "text_cfg": {"context_length": TEXT_LEN, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2},
}


def test_hps_matches_open_clip(tmp_path):
    from contentv_jax.rewards_io import load_reward

    open_clip = import_open_clip()
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**OC_CFG).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "ln" in n or n.endswith("bias") or "embedding" in n or "proj" in n:
                p.add_(0.1 * torch.randn_like(p))
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "HPS_tiny.pt")
    reward = load_reward("hps", tmp_path / "HPS_tiny.pt", config=OC_CFG)

    rng = np.random.default_rng(0)
    frames = rng.random((3, 40, 33, 3), dtype=np.float32)
    ids = random_ids(rng, 3)
    frames_t = torch.tensor(frames, requires_grad=True)
    img = ref.encode_image(torch_preprocess(frames_t, 30), normalize=True)
    txt = ref.encode_text(torch.tensor(ids), normalize=True)
    want = (img * txt).sum(-1)
    want.sum().backward()
    score_fn, grad_fn = jitted(reward.model)
    got = np.asarray(score_fn(jnp.asarray(frames), jnp.asarray(ids)))
    grad = np.asarray(grad_fn(jnp.asarray(frames), jnp.asarray(ids)))
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5, rtol=0)
    g_ref = frames_t.grad.numpy()
    assert np.abs(g_ref).max() > 1e-4
    np.testing.assert_allclose(grad, g_ref, atol=1e-4 * max(1.0, np.abs(g_ref).max()), rtol=0)
    print(f"HPS: max |score - open_clip| {np.abs(got - want.detach().numpy()).max():.2e}, "
          f"max |grad - torch| {np.abs(grad - g_ref).max():.2e} (max |grad| {np.abs(g_ref).max():.2e})")
