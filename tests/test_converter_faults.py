"""Damaged safetensors through the converter CLI: one line naming the file, exit status 2, no destination.

A tiny diffusers ``AutoencoderKLWan`` (saved by diffusers itself) is damaged two ways: its weights file
replaced by random bytes (which used to raise MemoryError: the first 8 bytes read as a header length
of exabytes) and truncated (which used to surface the safetensors library's raw SafetensorError).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from contentv_jax.models.vae import get_config

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_faults")
    torch.manual_seed(0)
    AutoencoderKLWan.from_config(get_config("tiny").to_diffusers()).save_pretrained(root / "good")
    return root / "good"


def _damage(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / WEIGHTS
    data = f.read_bytes()
    if how == "garbage":
        f.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    else:  # truncated: the header is whole, the data stops at half
        f.write_bytes(data[: len(data) // 2])
    return f


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_converter_cli_refuses_damaged_safetensors(tiny_vae_dir, tmp_path, how):
    bad = _damage(tiny_vae_dir, tmp_path / "src", how)
    dst = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, "-m", "converters.from_diffusers", "--component", "vae", "--src", str(bad.parent), "--dst", str(dst)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr and "SafetensorError" not in p.stderr
    assert not dst.exists() and not list(tmp_path.glob(".out*"))
