"""Reward checkpoint loading: full-size ViT-H-14 name/shape coverage from abstract shapes (nothing
allocated), and the loader's refusals (missing / extra / mis-shaped tensors, dtypes, buffers, unsafe files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests.open_clip_import import import_open_clip
from tests.reward_fixtures import tiny_hf_clip


def _meta_state(module_factory) -> dict[str, tuple]:
    with torch.device("meta"):
        m = module_factory()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _check_full_size(entries, buffers, torch_shapes, ours):
    from converters import reward as conv

    table = {e.src: tuple(e.src_shape) for e in entries}
    buf = {b.src: tuple(b.shape) for b in buffers}
    extra = {k: v for k, v in torch_shapes.items() if k not in table}
    assert all(k in buf and buf[k] == v for k, v in extra.items()), f"torch tensors not in the table: {extra}"
    assert {k: torch_shapes.get(k) for k in table} == table  # every table source exists in torch, same shape
    conv.check_table(entries, ours, what="full size")  # every parameter of ours is mapped, with its shape


def test_full_size_vit_h_14_hf_and_open_clip():
    """open_clip's bundled ViT-H-14 config and the HF CLIPConfig of the same shapes: every torch tensor
    (built on the meta device) maps to one of our parameters (``nnx.eval_shape``) with the right shape."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel as HFModel

    from contentv_jax.models.reward import CLIPConfig, CLIPModel, MPSConfig
    from contentv_jax.models.reward.mps import CrossModel
    from contentv_jax.rewards_io import VIT_H_14_HF
    from converters import reward as conv
    from flax import nnx

    open_clip = import_open_clip()
    oc_cfg = open_clip.get_model_config("ViT-H-14")  # open_clip's bundled model_configs/ViT-H-14.json
    ours_oc = CLIPConfig.from_open_clip(oc_cfg)
    hf_cfg = HFConfig(text_config=VIT_H_14_HF["text_config"], vision_config=VIT_H_14_HF["vision_config"], projection_dim=1024)
    ours_hf = CLIPConfig.from_dict(hf_cfg.to_dict())
    # same shapes (HPSModel is a CLIPModel with another score), so one abstract model serves both tables
    assert ours_hf.text_config == ours_oc.text_config and ours_hf.vision_config == ours_oc.vision_config
    _, ours = conv.abstract_params(lambda: CLIPModel(ours_hf, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in ours.values())
    assert 980_000_000 < n < 990_000_000, n  # ViT-H-14: 986M parameters

    e, b = conv.clip_open_clip_table(ours_oc)
    _check_full_size(e, b, _meta_state(lambda: open_clip.model.CLIP(**oc_cfg)), ours)
    e, b = conv.clip_hf_table(ours_hf)
    hf_shapes = _meta_state(lambda: HFModel(hf_cfg))
    _check_full_size(e, b, hf_shapes, ours)

    # MPS: the HF backbone under "model." plus Cross_model(dim=1024, layer_num=4, heads=16)
    cfg = MPSConfig(clip=ours_hf)
    _, head = conv.abstract_params(lambda: CrossModel(1024, 4, 16, 64, 4, rngs=nnx.Rngs(0)))
    mps_ours = {**{f"clip.{k}": v for k, v in ours.items()}, **{f"cross_model.{k}": v for k, v in head.items()}}
    e, b = conv.mps_table(cfg)
    conv.check_table(e, mps_ours, what="MPS full size")
    assert {x.src: x.src_shape for x in e if x.src.startswith("model.")} == {f"model.{k}": v for k, v in hf_shapes.items()
                                                                            if not k.endswith("position_ids")}
    # per layer: to_q, to_kv, to_out, ff in/out, fused (1024 + 2 * 64 + 2 * 4096), attn_out, ff_out, 2 norm scales
    per = (1024 * 1024 + 1024 * 128 + 1024 * 1024 + 1024 * 8192 + 4096 * 1024 + 1024 * (1024 + 128 + 8192)
           + 1024 * 1024 + 4096 * 1024 + 2048)
    assert sum(int(np.prod(v.shape)) for v in head.values()) == 4 * per


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfclip")
    tiny_hf_clip(seed=0).save_pretrained(root / "hf")
    return root / "hf"


def _write_variant(src, dst, edit):
    from safetensors.numpy import load_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def test_every_offending_tensor_is_listed(hf_dir, tmp_path):
    from converters.common import CheckpointError
    from contentv_jax.rewards_io import load_reward

    def edit(sd):
        del sd["text_model.final_layer_norm.bias"]
        sd["vision_model.extra.weight"] = np.zeros((3, 2), np.float32)
        sd["visual_projection.weight"] = np.zeros((24, 47), np.float32)
        sd["text_projection.weight"] = np.zeros((25, 32), np.float32)

    bad = _write_variant(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        load_reward("clip", bad)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "missing tensor text_model.final_layer_norm.bias: expected shape (32,), found none" in msg
    assert "unexpected tensor vision_model.extra.weight: expected none, found shape (3, 2)" in msg
    assert "mis-shaped tensor visual_projection.weight: expected shape (24, 48), found (24, 47)" in msg
    assert "mis-shaped tensor text_projection.weight: expected shape (24, 32), found (25, 32)" in msg


def test_nothing_is_loaded_when_a_check_fails(hf_dir):
    from converters import reward as conv
    from converters.common import CheckpointError
    from contentv_jax.models.reward import CLIPConfig, CLIPModel
    from flax import nnx

    cfg_dict, tensors = conv.read_tensors(hf_dir)
    loads = []
    for t in tensors.values():
        t._load = (lambda f: lambda: loads.append(1) or f())(t._load)
    tensors["extra"] = conv._Tensor("extra", (1,), "float32", lambda: np.zeros(1, np.float32))
    cfg = CLIPConfig.from_dict(cfg_dict)
    e, b = conv.clip_hf_table(cfg)
    with pytest.raises(CheckpointError, match="unexpected tensor extra"):
        conv.load_params(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)), e, b, tensors, what="x")
    assert loads == []


def test_dtype_and_buffer_errors(hf_dir, tmp_path):
    from converters.common import CheckpointError
    from contentv_jax.rewards_io import load_reward

    def ints(sd):
        sd["logit_scale"] = np.asarray(2, np.int64)

    with pytest.raises(CheckpointError, match="tensor logit_scale: expected a floating dtype, found int64"):
        load_reward("clip", _write_variant(hf_dir, tmp_path / "ints", ints))

    def pos(sd):
        sd["text_model.embeddings.position_ids"] = np.arange(16)[None][:, ::-1].copy()

    with pytest.raises(CheckpointError, match="buffer text_model.embeddings.position_ids: expected its fixed value"):
        load_reward("clip", _write_variant(hf_dir, tmp_path / "pos", pos))

    def good_pos(sd):
        sd["text_model.embeddings.position_ids"] = np.arange(16)[None]

    load_reward("clip", _write_variant(hf_dir, tmp_path / "goodpos", good_pos))  # the old-transformers buffer is accepted


def test_unsafe_and_malformed_files(tmp_path):
    from converters.common import CheckpointError
    from converters import reward as conv

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle it: it is not a plain state dict"):
        conv.read_tensors(tmp_path / "module.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict .* found a list"):
        conv.read_tensors(tmp_path / "list.pt")
    torch.save({"a": torch.zeros(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"non-tensor entries: 'step' \(int\)"):
        conv.read_tensors(tmp_path / "mixed.pt")
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint type '.npz'"):
        conv.read_tensors(tmp_path / "x.npz")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        conv.read_tensors(tmp_path / "absent.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        conv.read_tensors(tmp_path / "junk.safetensors")
    # {"state_dict": ...} (HPSv2's files) is unwrapped
    torch.save({"state_dict": {"w": torch.ones(2, 3)}}, tmp_path / "wrapped.pt")
    assert conv.read_tensors(tmp_path / "wrapped.pt")[1]["w"].shape == (2, 3)


def test_cli_exit_statuses(hf_dir, tmp_path, capsys):
    from converters.reward import __main__ as conv

    with pytest.raises(SystemExit) as e:
        conv.main(["--name", "nope", "--src", str(hf_dir), "--dst", str(tmp_path / "o")])
    assert e.value.code == 2
    capsys.readouterr()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file({"logit_scale": np.zeros((), np.float32)}, bad / "model.safetensors")
    assert conv.main(["--name", "clip", "--src", str(bad), "--dst", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing tensor text_model.embeddings.token_embedding.weight" in err
    assert not (tmp_path / "o").exists() and list(tmp_path.glob(".o.tmp-*")) == []


def test_load_reward_argument_errors(tmp_path):
    from contentv_jax.rewards_io import load_reward

    with pytest.raises(ValueError, match="reward name: expected one of"):
        load_reward("imagereward", tmp_path)
    with pytest.raises(ValueError, match="a checkpoint path is required"):
        load_reward("mps")
    torch.save({"w": torch.zeros(1)}, tmp_path / "mps.pt")
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        load_reward("mps", tmp_path / "mps.pt")
    assert load_reward("analytic", config={"target": [0.0, 1.0, 0.0]}).model.config.target == (0.0, 1.0, 0.0)


def test_models_do_not_import_converters():
    import subprocess
    import sys

    code = ("import sys, contentv_jax.models.reward as r; r.build_reward('analytic'); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('converters', 'torch')); print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
