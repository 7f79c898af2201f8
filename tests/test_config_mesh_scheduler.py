"""Config overrides, mesh sizing and flow-shift closed forms."""

import dataclasses

import jax
import numpy as np
import pytest

from contentv_jax.config import ConfigError, apply_overrides, from_dict, load_config
from contentv_jax.scheduler import sample_training_sigmas, sampling_sigmas, shift_sigmas
from contentv_jax.sharding.mesh import MeshConfig, create_mesh


@dataclasses.dataclass
class _Opt:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class _Cfg:
    steps: int = 10
    name: str = "tiny"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: _Opt = dataclasses.field(default_factory=_Opt)


def test_overrides_and_unknown_keys(tmp_path):
    cfg = apply_overrides(_Cfg(), ["mesh.data=2", "optimizer.lr=3e-5", "steps=7"])
    assert (cfg.mesh.data, cfg.optimizer.lr, cfg.steps) == (2, 3e-5, 7)
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        apply_overrides(_Cfg(), ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides(_Cfg(), ["steps=abc"])
    p = tmp_path / "c.yaml"
    p.write_text("mesh:\n  sequence: 4\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="mesh.bogus"):
        load_config(_Cfg, p)
    p.write_text("mesh:\n  sequence: 4\n")
    assert load_config(_Cfg, p, ["mesh.fsdp=2"]).mesh == MeshConfig(1, 2, 4)
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(_Cfg, {"nope": 1})


def test_mesh_resolve():
    assert MeshConfig(2, -1, 2).resolve(8) == (2, 2, 2)
    assert MeshConfig().resolve(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="multiply"):
        MeshConfig(2, 2, 3).resolve(8)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(-1, -1, 1).resolve(8)
    mesh = create_mesh(MeshConfig(2, 1, 4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "sequence": 4}


def test_flow_shift_closed_forms():
    s = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(shift_sigmas(s, 3.0), [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(shift_sigmas(s, 1.0), s)
    sig = sampling_sigmas(4, 17.0)
    base = np.array([1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(sig[:-1], 17 * base / (1 + 16 * base), rtol=1e-6)
    assert sig[-1] == 0.0 and sig.shape == (5,)
    t = np.asarray(sample_training_sigmas(jax.random.key(0), 20000))
    # sigmoid of a standard normal has median 0.5 and lies in (0, 1)
    assert 0 < t.min() and t.max() < 1 and abs(np.median(t) - 0.5) < 0.02
    ts = np.asarray(sample_training_sigmas(jax.random.key(0), 20000, shift=3.0))
    np.testing.assert_allclose(ts, 3 * t / (1 + 2 * t), rtol=1e-5)
