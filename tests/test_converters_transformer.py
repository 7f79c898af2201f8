"""diffusers <-> contentv-jax transformer conversion: byte-identical round trips and every bad-input case.

The diffusers directories are written by the PyTorch reference's ``save_pretrained`` (random weights).
"""

import copy
import json
import logging

import ml_dtypes
import numpy as np
import pytest
import torch

from contentv_jax.checkpoints import is_our_checkpoint
from converters import common
from converters._cli import main as cli_main
from tests import transformer_ref as ref


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{'float32': dir, 'bfloat16': dir} of the tiny torch reference, plus the model itself."""
    root = tmp_path_factory.mktemp("conv")
    model = ref.torch_reference(seed=2)
    model.save_pretrained(root / "f32")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / "bf16")
    return {"float32": root / "f32", "bfloat16": root / "bf16", "model": model, "root": root}


def _tensors(path):
    cfg, lazy = common.open_diffusers_dir(path)
    return cfg, {k: t.load() for k, t in lazy.items()}


def _assert_identical(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_round_trip_cli_subprocess(dirs, tmp_path):
    src = dirs["float32"]
    r = ref.run_cli("from_diffusers", "--component", "transformer", "--src", str(src), "--dst", str(tmp_path / "ours"))
    assert r.returncode == 0, r.stderr
    assert is_our_checkpoint(tmp_path / "ours") and not common.is_diffusers_dir(tmp_path / "ours")
    r = ref.run_cli("to_diffusers", "--component", "transformer", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    _assert_identical(_tensors(src)[1], _tensors(tmp_path / "back")[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_byte_identical_and_sharded(dirs, tmp_path, dtype):
    src = dirs[dtype]
    assert cli_main("from_diffusers", ["--component", "transformer", "--src", str(src), "--dst", str(tmp_path / "ours")]) == 0
    assert json.loads((tmp_path / "ours/config.json").read_text())["param_dtype"] == dtype
    assert cli_main("to_diffusers", ["--component", "transformer", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "one")]) == 0
    assert cli_main("to_diffusers", ["--component", "transformer", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "sharded"),
                                     "--max-shard-size", "40000"]) == 0
    _, orig = _tensors(src)
    if dtype == "bfloat16":
        assert orig["proj_out.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    _assert_identical(orig, _tensors(tmp_path / "one")[1])
    assert len(list((tmp_path / "one").glob("*.safetensors"))) == 1
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded/diffusion_pytorch_model.safetensors.index.json").is_file()
    _assert_identical(orig, _tensors(tmp_path / "sharded")[1])


def test_diffusers_loads_our_sharded_output(dirs, tmp_path):
    """ContentV's PyTorch model loads what to_diffusers wrote (sharded) and computes the same velocity."""
    from torch_npu_backend.transformer import SD3Transformer3DModel

    assert cli_main("from_diffusers", ["--component", "transformer", "--src", str(dirs["float32"]), "--dst", str(tmp_path / "ours")]) == 0
    assert cli_main("to_diffusers", ["--component", "transformer", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "back"),
                                     "--max-shard-size", "100000"]) == 0
    back = SD3Transformer3DModel.from_pretrained(tmp_path / "back").eval()
    x = ref.inputs(batch=1, frames=2, height=4, width=6, channels=4, text_len=3, context_dim=32, pooled_dim=24)
    want = dirs["model"].state_dict()
    got = back.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    np.testing.assert_allclose(ref.torch_velocity(back, x), ref.torch_velocity(dirs["model"], x), rtol=0, atol=1e-5)


def test_sd35_large_layout_drops_2d_table(dirs, tmp_path, caplog):
    cfg, t = _tensors(dirs["float32"])
    cfg["_class_name"] = "SD3Transformer2DModel"
    t["pos_embed.pos_embed"] = np.zeros((1, 64, 64), np.float32)
    common.write_diffusers_dir(tmp_path / "sd35", cfg, t)
    with caplog.at_level(logging.INFO, logger="converters"):
        assert cli_main("from_diffusers", ["--component", "transformer", "--src", str(tmp_path / "sd35"), "--dst", str(tmp_path / "ours")]) == 0
    assert "pos_embed.pos_embed" in caplog.text and "dropping" in caplog.text
    assert cli_main("to_diffusers", ["--component", "transformer", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "back")]) == 0
    del t["pos_embed.pos_embed"]
    _assert_identical(t, _tensors(tmp_path / "back")[1])


def _bad_missing(cfg, t):
    del t["transformer_blocks.1.attn.to_k.weight"]
    return ["missing tensor transformer_blocks.1.attn.to_k.weight: expected shape (64, 64), found none"]


def _bad_unexpected(cfg, t):
    t["transformer_blocks.2.ff_context.net.2.bias"] = np.zeros((64,), np.float32)
    return ["unexpected tensor transformer_blocks.2.ff_context.net.2.bias: expected none, found shape (64,)"]


def _bad_misshaped(cfg, t):
    t["proj_out.weight"] = np.zeros((17, 64), np.float32)
    return ["mis-shaped tensor proj_out.weight: expected shape (16, 64), found (17, 64)"]


def _bad_config(cfg, t):
    cfg["joint_attention_dim"] = 48
    cfg["num_layers"] = 2
    return [
        "mis-shaped tensor context_embedder.weight: expected shape (64, 48), found (64, 32)",
        "unexpected tensor transformer_blocks.2.attn.to_q.weight: expected none, found shape (64, 64)",
        "mis-shaped tensor transformer_blocks.1.norm1_context.linear.weight: expected shape (128, 64), found (384, 64)",
    ]


def _bad_dtype(cfg, t):
    t["context_embedder.bias"] = t["context_embedder.bias"].astype(np.float64)
    return ["unsupported dtype for tensor context_embedder.bias: expected one of ('F32', 'BF16', 'F16'), found F64"]


BAD = {"missing": _bad_missing, "unexpected": _bad_unexpected, "misshaped": _bad_misshaped, "config": _bad_config, "dtype": _bad_dtype}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_named_and_writes_nothing(dirs, tmp_path, capsys, case):
    cfg, t = _tensors(dirs["float32"])
    want = BAD[case](cfg, t)
    common.write_diffusers_dir(tmp_path / "bad", cfg, t)
    dst = tmp_path / "out"
    rc = cli_main("from_diffusers", ["--component", "transformer", "--src", str(tmp_path / "bad"), "--dst", str(dst)])
    err = capsys.readouterr().err
    assert rc != 0
    for line in want:
        assert line in err, (line, err)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # no temporary sibling left behind


def test_bad_input_subprocess_exit_status(dirs, tmp_path):
    cfg, t = _tensors(dirs["float32"])
    want = _bad_missing(cfg, t)[0]
    common.write_diffusers_dir(tmp_path / "bad", cfg, t)
    r = ref.run_cli("from_diffusers", "--component", "transformer", "--src", str(tmp_path / "bad"), "--dst", str(tmp_path / "out"))
    assert r.returncode != 0 and want in r.stderr
    assert not (tmp_path / "out").exists()


def test_to_diffusers_rejects_non_checkpoint(dirs, tmp_path, capsys):
    rc = cli_main("to_diffusers", ["--component", "transformer", "--src", str(dirs["float32"]), "--dst", str(tmp_path / "out")])
    assert rc != 0 and "not a contentv-jax checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_open_diffusers_dir_lazy_bf16(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    common.write_diffusers_dir(tmp_path / "d", {"x": 1}, {"a": a, "b": np.ones(2, np.float16)})
    cfg, lazy = common.open_diffusers_dir(tmp_path / "d")
    assert cfg == {"x": 1}
    assert lazy["a"].shape == (3, 4) and lazy["a"].dtype == np.dtype(ml_dtypes.bfloat16) and lazy["a"].st_dtype == "BF16"
    assert lazy["a"].load().tobytes() == a.tobytes()
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "d/diffusion_pytorch_model.safetensors"))
    assert t["a"].dtype == torch.bfloat16 and t["a"].float().numpy().tolist() == a.astype(np.float32).tolist()
