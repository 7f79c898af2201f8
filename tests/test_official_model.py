"""Our torch backend and our JAX MM-DiT against ByteDance's ContentV transformer (tests/contentv_official.py).

The official module shares no code with ``torch_npu_backend`` or ``contentv_jax``: a token-order, patch-embed or
unpatchify bug common to both of ours fails here. Random weights, float32, T > 1 and H != W so that any swap of
the (t, h, w) token axes or the (p, q, c) patch axes changes the output.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from contentv_jax.checkpoints import load_transformer
from tests import transformer_ref as ref
from tests.contentv_official import OfficialSD3Transformer3DModel

SHAPE = dict(batch=2, frames=3, height=6, width=10, channels=4, text_len=7, context_dim=32, pooled_dim=24)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(our torch backend, the official module with the same weights, our converted JAX checkpoint dir)."""
    ours = ref.torch_reference(seed=5)
    c = ref.TINY_DIFFUSERS
    official = OfficialSD3Transformer3DModel(
        in_channels=c["in_channels"], out_channels=c["out_channels"], patch_size=c["patch_size"],
        num_layers=c["num_layers"], num_attention_heads=c["num_attention_heads"],
        attention_head_dim=c["attention_head_dim"], joint_attention_dim=c["joint_attention_dim"],
        pooled_projection_dim=c["pooled_projection_dim"]).eval()
    missing, unexpected = official.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    root = tmp_path_factory.mktemp("official")
    ours.save_pretrained(root / "diffusers")
    res = ref.run_cli("from_diffusers", "--component", "transformer", "--src", str(root / "diffusers"), "--dst", str(root / "jax"))
    assert res.returncode == 0, res.stderr
    return ours, official, root / "jax"


def _official_velocity(model, x):
    with torch.no_grad():
        out = model(torch.from_numpy(x["latents"]).permute(0, 4, 1, 2, 3), torch.from_numpy(x["context"]),
                    torch.from_numpy(x["pooled"]), torch.from_numpy(x["timestep"]))
    return out.permute(0, 2, 3, 4, 1).numpy()


def test_patch_embed_tokens_match_official(models):
    """The token sequences after the patch embedding (the (t, h, w) order and the table) are the same."""
    ours, official, _ = models
    x = torch.from_numpy(ref.inputs(**SHAPE, seed=1)["latents"]).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        a, b = ours.pos_embed(x), official.pos_embed(x)
    assert a.shape == b.shape == (2, 3 * 3 * 5, 64)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)


def test_backend_matches_official(models):
    ours, official, _ = models
    x = ref.inputs(**SHAPE, seed=2)
    want = _official_velocity(official, x)
    got = ref.torch_velocity(ours, x)
    assert got.shape == want.shape == (2, 3, 6, 10, 4)
    err = ref.rel_err(got, want)
    assert err <= 1e-6, err


def test_jax_matches_official(models):
    _, official, jax_dir = models
    x = ref.inputs(**SHAPE, seed=3)
    want = _official_velocity(official, x)
    model = load_transformer(jax_dir)
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *(jnp.asarray(x[k]) for k in ("latents", "timestep", "context", "pooled"))))
    assert got.shape == want.shape
    err = ref.rel_err(got, want)
    assert err <= 1e-5, err
