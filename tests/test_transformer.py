"""The Flax NNX 3D MM-DiT against the PyTorch ContentV reference (diffusers SD3 + 3D patch embed).

Reference: ``torch_npu_backend.transformer.SD3Transformer3DModel`` with random weights, ``save_pretrained``,
converted by ``python -m converters.from_diffusers`` and loaded with ``load_transformer``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from contentv_jax.models.transformer import (
    REMAT_POLICIES,
    JointTransformerBlock,
    TransformerConfig,
    get_config,
    sincos_pos_embed_3d,
)
from contentv_jax.checkpoints import load_transformer
from converters import transformer as conv
from tests import transformer_ref as ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch reference, our converted checkpoint dir, diffusers dir)."""
    root = tmp_path_factory.mktemp("tiny")
    model = ref.torch_reference(seed=1)
    model.save_pretrained(root / "diffusers")
    res = ref.run_cli("from_diffusers", "--component", "transformer", "--src", str(root / "diffusers"), "--dst", str(root / "ours"))
    assert res.returncode == 0, res.stderr
    return model, root / "ours", root / "diffusers"


_forward = nnx.jit(lambda m, a, b, c, d: m(a, b, c, d))


def _velocity(model, x):
    return np.asarray(_forward(model, *(jnp.asarray(x[k]) for k in ("latents", "timestep", "context", "pooled"))), np.float32)


def test_sincos_table_matches_diffusers():
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    d, t, h, w = 64, 3, 3, 5
    want = get_3d_sincos_pos_embed(d, spatial_size=(w, h), temporal_size=t, spatial_interpolation_scale=0.5,
                                   temporal_interpolation_scale=1.0, output_type="pt").flatten(0, 1).float().numpy()
    np.testing.assert_allclose(sincos_pos_embed_3d(d, t, h, w), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 3])
def test_tiny_parity_float32(tiny, frames):
    torch_model, ours_dir, _ = tiny
    x = ref.inputs(batch=2, frames=frames, height=6, width=10, channels=4, text_len=7, context_dim=32, pooled_dim=24, seed=frames)
    want = ref.torch_velocity(torch_model, x)
    model = load_transformer(ours_dir)
    got = _velocity(model, x)
    assert got.shape == want.shape == (2, frames, 6, 10, 4)
    err = ref.rel_err(got, want)
    assert err <= 1e-5, err


def test_tiny_parity_bfloat16_compute(tiny):
    torch_model, ours_dir, _ = tiny
    x = ref.inputs(batch=2, frames=3, height=6, width=10, channels=4, text_len=7, context_dim=32, pooled_dim=24, seed=7)
    want = ref.torch_velocity(torch_model, x)
    got = _velocity(load_transformer(ours_dir, dtype="bfloat16"), x)
    err = ref.rel_err(got, want)
    assert 0 < err <= 2e-2, err


def test_load_diffusers_dir_directly_and_remat_grad(tiny):
    """``load_transformer`` on the diffusers dir equals the converted one; gradients agree across remat policies."""
    _, ours_dir, diff_dir = tiny
    x = ref.inputs(batch=1, frames=2, height=4, width=6, channels=4, text_len=5, context_dim=32, pooled_dim=24, seed=3)
    a = load_transformer(ours_dir)
    b = load_transformer(diff_dir)
    np.testing.assert_array_equal(_velocity(a, x), _velocity(b, x))

    args = [jnp.asarray(x[k]) for k in ("latents", "timestep", "context", "pooled")]

    def grads(policy):
        m = nnx.clone(a)
        m.cfg = a.cfg.replace(remat_policy=policy)
        loss = lambda m: jnp.mean(m(*args) ** 2)  # noqa: E731
        return nnx.jit(nnx.grad(loss))(m)

    g_none, g_full = grads("none"), grads("full")
    for u, v in zip(jax.tree.leaves(g_none), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_none))


@pytest.mark.slow
@pytest.mark.parametrize("context_pre_only", [False, True])
def test_full_width_block_parity(context_pre_only):
    """One full-width joint block (2432 = 38 x 64, FFN 9728): diffusers' JointTransformerBlock vs ours, weights
    mapped by the converter's name/layout functions; tiny sequences. float32 and bfloat16 compute."""
    from diffusers.models.attention import JointTransformerBlock as TorchBlock

    seed = 11 + context_pre_only
    torch.manual_seed(seed)
    tb = ref.randomize_(TorchBlock(dim=2432, num_attention_heads=38, attention_head_dim=64,
                                   context_pre_only=context_pre_only, qk_norm="rms_norm"), seed).eval()
    sd = {k: v.detach().numpy() for k, v in tb.state_dict().items()}
    entries = conv._block_entries("b", (), None, context_pre_only=context_pre_only, qk_norm=True)
    assert sorted(e.diffusers[2:] for e in entries) == sorted(sd), "mapping does not cover the torch block exactly"

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 12, 2432), dtype=np.float32)
    c = rng.standard_normal((2, 5, 2432), dtype=np.float32)
    temb = rng.standard_normal((2, 2432), dtype=np.float32)
    with torch.no_grad():
        tc, tx = tb(torch.from_numpy(x), torch.from_numpy(c), torch.from_numpy(temb))
    del tb

    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        cfg = get_config("contentv-8b", num_layers=1, param_dtype="float32", dtype=dtype)
        with nnx.use_eager_sharding(False):
            block = nnx.eval_shape(lambda: JointTransformerBlock(cfg, context_pre_only=context_pre_only, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(block)
        pure = nnx.to_pure_dict(state)
        for e in entries:
            conv._set(pure, e.ours, jnp.asarray(conv.to_ours_layout(e.kind, sd[e.diffusers[2:]])))
        nnx.replace_by_pure_dict(state, pure)
        block = nnx.merge(graphdef, state)
        ox, oc = nnx.jit(lambda m, a, b, t: m(a, b, t))(block, jnp.asarray(x), jnp.asarray(c), jnp.asarray(temb))
        errs = [ref.rel_err(np.asarray(ox.astype(jnp.float32)), tx.numpy())]
        if context_pre_only:
            assert tc is None and oc is None
        else:
            errs.append(ref.rel_err(np.asarray(oc.astype(jnp.float32)), tc.numpy()))
        assert 0 < max(errs) <= tol, (dtype, errs)


def _names_of(tree_state):
    out = {}
    for path, v in jax.tree_util.tree_leaves_with_path(tree_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        out[".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)] = v
    return out


def test_contentv8b_shapes_and_logical_axes(shared_data):
    """Every checkpoint tensor maps to a parameter of ours with its shape; nothing of ours is unmapped (eval_shape)."""
    cfg = get_config("contentv-8b")
    expected = conv.expected_diffusers_shapes(cfg)  # raises if a parameter of ours is unmapped
    cv = {k: tuple(v) for k, v in json.loads((shared_data / "keys/contentv8b_transformer_shapes.json").read_text()).items()}
    sd = {k: tuple(v) for k, v in json.loads((shared_data / "keys/sd35large_transformer_shapes.json").read_text()).items()}
    assert expected == cv
    assert sd.pop(conv.SD3_2D_POS_TABLE) == (1, 192 * 192, 2432)
    assert expected == sd
    ours = conv.abstract_pure_state(cfg)
    assert sum(int(np.prod(v.shape)) for v in ours.values()) == sum(int(np.prod(s)) for s in cv.values())

    from contentv_jax.models.transformer import abstract_model

    names = {k: v.get_metadata()["out_sharding"] for k, v in _names_of(nnx.state(abstract_model(cfg), nnx.Param)).items()}
    allowed = {None, "layers", "embed", "heads", "mlp", "modulation", "head_dim", "context_in", "pooled_in", "time_in", "patch_in", "patch_out"}
    for k, v in names.items():
        assert set(v) <= allowed, (k, v)
        assert (v[0] == "layers") == k.startswith("transformer_blocks."), (k, v)
    assert names["transformer_blocks.attn.to_q.kernel"] == ("layers", "embed", "heads")
    assert names["transformer_blocks.ff.proj_in.kernel"] == ("layers", "embed", "mlp")
    assert names["final_block.norm1_context.linear.kernel"] == ("embed", "modulation")


def test_config_round_trip_and_errors():
    cfg = get_config("tiny")
    assert TransformerConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="dual_attention_layers"):
        TransformerConfig.from_diffusers_config({**cfg.to_diffusers_config(), "dual_attention_layers": [0]})
    with pytest.raises(ValueError, match="remat_policy"):
        get_config("tiny", remat_policy="bogus")
    with pytest.raises(KeyError):
        get_config("nope")
    assert set(REMAT_POLICIES) >= {"none", "full", "dots_saveable"}
    for name in ("contentv-8b", "sd35-large", "tiny"):
        assert get_config(str(ref.ROOT / f"configs/model/{name}.yaml")) == get_config(name)


def test_bad_inputs_named():
    from contentv_jax.models.transformer import abstract_model

    m = abstract_model(get_config("tiny"))
    good = dict(latents=jnp.zeros((1, 1, 4, 4, 4)), timestep=jnp.zeros((1,)), context=jnp.zeros((1, 3, 32)), pooled=jnp.zeros((1, 24)))
    with pytest.raises(ValueError, match="latents"):
        m(**{**good, "latents": jnp.zeros((1, 1, 5, 4, 4))})
    with pytest.raises(ValueError, match="context"):
        m(**{**good, "context": jnp.zeros((1, 3, 31))})
    with pytest.raises(ValueError, match="timestep"):
        m(**{**good, "timestep": jnp.zeros(())})
