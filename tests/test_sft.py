"""SFT pieces against closed forms: the velocity regulariser, its blended-target identity, the caption
draw's shares and determinism, and the curated-subset filter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contentv_jax.config import ConfigError
from contentv_jax.data.curation import draw_caption, filter_records, validate_filter
from contentv_jax.train.sft import blended_target, regularised_loss


def _arrays(seed=0, shape=(2, 3, 4, 4, 5)):
    k = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(x, shape, jnp.float32) for x in k]


def test_regulariser_is_the_closed_form():
    v, u, vr = _arrays()
    lam = 0.7
    loss, parts = regularised_loss(v, u, vr, lam)
    fm = np.mean((np.asarray(v) - np.asarray(u)) ** 2)
    kl = np.mean((np.asarray(v) - np.asarray(vr)) ** 2)
    np.testing.assert_allclose(float(parts["loss_fm"]), fm, rtol=1e-6)
    np.testing.assert_allclose(float(parts["loss_kl"]), kl, rtol=1e-6)
    np.testing.assert_allclose(float(loss), fm + lam * kl, rtol=1e-6)


def test_blended_target_identity_and_gradients():
    """L = (1 + lam) * mean((v - (u + lam v_ref) / (1 + lam))^2) + const: same value up to a constant that
    does not depend on v, hence the same gradient with respect to v."""
    v, u, vr = _arrays(1)
    for lam in (0.0, 0.3, 1.0, 4.0):
        def reg(v):
            return regularised_loss(v, u, vr, lam)[0]

        def blended(v):
            return (1 + lam) * jnp.mean(jnp.square(v - blended_target(u, vr, lam)))

        const = lam / (1 + lam) * np.mean((np.asarray(u, np.float64) - np.asarray(vr, np.float64)) ** 2)
        np.testing.assert_allclose(float(reg(v)), float(blended(v)) + const, rtol=1e-6, atol=1e-6)
        g1, g2 = jax.grad(reg)(v), jax.grad(blended)(v)
        scale = float(jnp.max(jnp.abs(g1)))
        assert float(jnp.max(jnp.abs(g1 - g2))) <= 1e-6 * scale


def test_zero_weight_is_bitwise_plain_flow_matching():
    v, u, vr = _arrays(2)
    plain = jnp.mean(jnp.square(v - u))
    loss, parts = jax.jit(lambda v: regularised_loss(v, u, None, 0.0))(v)
    assert np.asarray(loss).tobytes() == np.asarray(jax.jit(lambda v: jnp.mean(jnp.square(v - u)))(v)).tobytes()
    assert float(parts["loss_kl"]) == 0.0
    g = jax.grad(lambda v: regularised_loss(v, u, vr, 0.0)[0])(v)
    gp = jax.grad(lambda v: jnp.mean(jnp.square(v - u)))(v)
    assert np.asarray(g).tobytes() == np.asarray(gp).tobytes()
    del plain


def test_reference_gets_no_gradient():
    v, u, vr = _arrays(3)
    g = jax.grad(lambda r: regularised_loss(v, u, r, 1.0)[0])(vr)
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_caption_draw_shares_and_determinism():
    kinds = ["short", "long"]
    w = {"short": 0.3, "long": 0.7}
    draws = [draw_caption(7, step, row, kinds, w) for step in range(500) for row in range(4)]
    share_long = np.mean(draws)
    assert abs(share_long - 0.7) <= 0.03, share_long
    assert draws == [draw_caption(7, step, row, kinds, w) for step in range(500) for row in range(4)]
    other = [draw_caption(8, step, row, kinds, w) for step in range(500) for row in range(4)]
    assert draws != other  # the seed matters
    # kinds without weight are never drawn; a single caption is always index 0
    assert {draw_caption(0, s, 0, ["caption", "short", "long"], {"long": 1.0}) for s in range(50)} == {2}
    assert draw_caption(0, 3, 1, ["caption"], w) == 0
    # no weighted kind present: uniform over the captions
    d = [draw_caption(0, s, 0, ["caption", "caption", "caption"], w) for s in range(600)]
    assert set(d) == {0, 1, 2}
    with pytest.raises(ValueError):
        draw_caption(0, 0, 0, [], w)


def test_filter_top_fraction_on_two_fields_is_exact():
    rng = np.random.default_rng(0)
    n = 1000
    aesthetic, motion = rng.normal(5, 1, n), rng.gamma(2.0, 1.0, n)
    rules = validate_filter({"aesthetic": {"top": 0.1}, "motion": {"top": 0.1}})
    keep = filter_records({"aesthetic": aesthetic.tolist(), "motion": motion.tolist()}, rules)
    # independent: the 100 largest of each by threshold on the sorted values, intersected
    top_a = set(np.flatnonzero(aesthetic >= np.sort(aesthetic)[-100]))
    top_m = set(np.flatnonzero(motion >= np.sort(motion)[-100]))
    assert len(top_a) == len(top_m) == 100
    assert set(np.flatnonzero(keep)) == top_a & top_m
    assert 0 < keep.sum() < 100


def test_filter_thresholds_and_missing_values():
    vals = [1.0, None, 3.0, 4.0, float("nan"), 6.0]
    keep = filter_records({"a": vals}, validate_filter({"a": {"min": 3.0, "max": 5.0}}))
    assert keep.tolist() == [False, False, True, True, False, False]
    keep = filter_records({"a": vals}, validate_filter({"a": {"bottom": 0.5}}))  # 2 of the 4 valued records
    assert keep.tolist() == [True, False, True, False, False, False]


def test_filter_bad_config():
    with pytest.raises(ConfigError, match="data.filter.motion"):
        filter_records({"aesthetic": [1.0]}, validate_filter({"motion": {"top": 0.1}}))
    with pytest.raises(ConfigError, match="data.filter.a.top"):
        validate_filter({"a": {"top": 1.5}})
    with pytest.raises(ConfigError, match="data.filter.a.above"):
        validate_filter({"a": {"above": 1}})
