"""converters/vae.py: diffusers AutoencoderKLWan <-> our checkpoint.

Round trips are byte-compared; bad checkpoints must fail before anything is written, naming the
tensor with expected vs found shape. The real checkpoint's names and shapes come from
``shared/data/keys/wan21_vae_shapes.json`` (the diffusers-format Wan2.1 VAE).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from contentv_jax.checkpoints import load_vae  # noqa: E402
from contentv_jax.models.vae import get_config  # noqa: E402
from converters import convert  # noqa: E402
from converters import vae as conv  # noqa: E402
from converters._cli import main as cli_main  # noqa: E402
from converters.common import CheckpointError  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny diffusers AutoencoderKLWan saved in float32 and bfloat16."""
    root = tmp_path_factory.mktemp("vae_conv")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan.from_config(get_config("tiny").to_diffusers())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    ref.save_pretrained(root / "f32")
    ref.to(torch.bfloat16).save_pretrained(root / "bf16")
    return root


def test_every_real_checkpoint_name_maps(shared_data):
    found = json.loads((shared_data / "keys" / "wan21_vae_shapes.json").read_text())
    expected = conv.expected_shapes(get_config("wan2.1"))
    assert set(expected) == set(found)
    assert {k: list(v) for k, v in expected.items()} == found
    # and every name lands on a distinct parameter of our model
    paths = [p for p, _ in conv.name_map(get_config("wan2.1")).values()]
    assert len(set(paths)) == len(paths) == len(found)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_round_trip_byte_identical(tiny_dirs, tmp_path, dtype):
    src = tiny_dirs / dtype
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert cli_main("from_diffusers", ["--component", "vae", "--src", str(src), "--dst", str(ours)]) == 0
    assert cli_main("to_diffusers", ["--component", "vae", "--src", str(ours), "--dst", str(back)]) == 0
    assert (back / WEIGHTS).read_bytes() == (src / WEIGHTS).read_bytes()
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_load_vae_both_formats_agree_with_torch_layout(tiny_dirs, tmp_path):
    src = tiny_dirs / "f32"
    convert.from_diffusers("vae", src, tmp_path / "ours")
    a = load_vae(src)
    b = load_vae(tmp_path / "ours")
    sa, sb = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_array_equal(x, y)
    tensors = load_file(str(src / WEIGHTS))
    # layouts (docs/design.md): Conv3d (out, in, kt, kh, kw) -> (kt, kh, kw, in, out), gamma -> (C,)
    np.testing.assert_array_equal(
        a.encoder.conv_in.kernel[...], tensors["encoder.conv_in.weight"].transpose(2, 3, 4, 1, 0)
    )
    np.testing.assert_array_equal(
        a.decoder.up_blocks[0].upsamplers[0].resample.kernel[...],
        tensors["decoder.up_blocks.0.upsamplers.0.resample.1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        a.encoder.mid_block.attentions[0].norm.gamma[...],
        tensors["encoder.mid_block.attentions.0.norm.gamma"].reshape(-1),
    )


def _corrupt(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})


def test_mis_shaped_checkpoint_fails_naming_the_tensor(tiny_dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    name = "decoder.up_blocks.1.resnets.0.conv1.weight"

    def edit(t):
        t[name] = t[name][:, :-1]

    _corrupt(tiny_dirs / "f32", bad, edit)
    expected = conv.expected_shapes(get_config("tiny"))[name]
    found = (expected[0], expected[1] - 1, *expected[2:])
    with pytest.raises(CheckpointError, match=rf"{name}.*{expected[0]}, {expected[1]}.*{found[0]}, {found[1]}"):
        convert.from_diffusers("vae", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    rc = cli_main("from_diffusers", ["--component", "vae", "--src", str(bad), "--dst", str(tmp_path / "out")])
    assert rc == 1 and name in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=name):
        load_vae(bad)


def test_missing_and_unexpected_tensors_fail(tiny_dirs, tmp_path):
    bad = tmp_path / "bad"
    gone = "encoder.mid_block.attentions.0.proj.bias"

    def edit(t):
        del t[gone]
        t["encoder.extra.weight"] = np.zeros((2, 2), np.float32)

    _corrupt(tiny_dirs / "f32", bad, edit)
    with pytest.raises(CheckpointError) as info:
        convert.from_diffusers("vae", bad, tmp_path / "out")
    msg = str(info.value)
    assert f"missing tensor {gone}" in msg and "unexpected tensor encoder.extra.weight" in msg
    assert not (tmp_path / "out").exists()


def test_wan22_config_rejected(tiny_dirs, tmp_path):
    bad = tmp_path / "wan22"
    bad.mkdir()
    cfg = json.loads((tiny_dirs / "f32" / "config.json").read_text())
    cfg["is_residual"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / WEIGHTS).write_bytes((tiny_dirs / "f32" / WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="Wan2.1"):
        convert.from_diffusers("vae", bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
