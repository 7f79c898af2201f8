"""From a wheel to a video: build a wheel, install it into a fresh virtual environment without the source tree on
the path, run the default training for a few steps from a temporary working directory, then sample the run with
the installed console script (the final weights and an intermediate checkpoint), and open the run's
``pipeline/`` directory with diffusers and transformers' own loaders.

Also checked on the way: the previews (``logging.sample_every``) leave mp4s under ``runs/tiny/samples/STEP/`` and
image summaries TensorBoard's own event reader reads back; TensorBoard gets model TFLOP/s per device next to
tokens/s; bad ``--model`` / ``--checkpoint`` values fail with exit status 2 and say what was looked for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import OPT_LEVEL_FLAG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAMPLE_EVERY = 4, 2
PROMPT = "a red circle moving right"


def _run(cmd, *, cwd, timeout, env=None, check=True):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-8000:]}")
    return res


def _copy_source(dst: Path) -> None:
    """The files a fresh clone has (git's tracked and untracked-but-not-ignored files), without build outputs."""
    try:
        listed = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, timeout=60).stdout.split("\0")
    except (AssertionError, FileNotFoundError):
        listed = None
    if listed is None:
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__"))
        return
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin dir, a clean environment): the wheel installed into a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, wheels, venv = tmp / "src", tmp / "wheels", tmp / "venv"
    src.mkdir()
    _copy_source(src)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
         cwd=tmp, timeout=600)
    (wheel,) = wheels.glob("contentv_jax-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp, timeout=300)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp, timeout=600)
    # a user's shell: no PYTHONPATH (the checkout), one CPU device (no simulated devices from conftest)
    # (XLA_FLAGS keeps only the suite's cheap-compile flag, which changes no results: see conftest)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "PYTHONHOME")}
    env["XLA_FLAGS"] = OPT_LEVEL_FLAG
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return python, venv / "bin", env


@pytest.fixture(scope="module")
def trained(installed, tmp_path_factory):
    """The default training run (``runs/tiny`` in a temporary working directory), a few steps, from the wheel."""
    python, bindir, env = installed
    work = tmp_path_factory.mktemp("work")
    where = _run([str(python), "-I", "-c", "import contentv_jax, sys; print(contentv_jax.__file__)"], cwd=work, env=env,
                 timeout=120).stdout.strip()
    assert Path(where).is_relative_to(python.parent.parent), f"contentv_jax imported from {where}, not the venv"
    # the shipped default config, found by the installed package from another directory
    shipped = _run([str(python), "-I", "-c", "from contentv_jax.config import find_config; print(find_config('tiny'))"],
                   cwd=work, env=env, timeout=120).stdout.strip()
    assert Path(shipped).is_relative_to(python.parent.parent) and Path(shipped).name == "tiny.yaml"
    res = _run([str(bindir / "contentv-train"), f"steps={STEPS}", f"logging.sample_every={SAMPLE_EVERY}",
                "checkpoint.every=2", "checkpoint.keep=3", "sampling.steps=2", "logging.progress_bar=false"],
               cwd=work, env=env, timeout=1500)
    assert "completed" in res.stdout, res.stdout
    return work / "runs" / "tiny", installed, work


def test_default_run_leaves_samples_tensorboard_and_a_pipeline(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = trained
    for step in range(SAMPLE_EVERY, STEPS + 1, SAMPLE_EVERY):
        mp4s = sorted((run / "samples" / str(step)).glob("*.mp4"))
        assert len(mp4s) == 2, mp4s  # the two default preview prompts
        assert json.loads((run / "samples" / str(step) / "prompts.json").read_text())[mp4s[0].name].startswith("a red")
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert "samples/grid" in acc.Tags()["images"] and "samples/clip_0" in acc.Tags()["images"]
    grids = acc.Images("samples/grid")
    assert [e.step for e in grids] == list(range(SAMPLE_EVERY, STEPS + 1, SAMPLE_EVERY))
    assert grids[0].height == 2 * 64 and grids[0].width == 5 * 64  # a row per prompt, 5 frames each
    assert acc.Images("samples/clip_0")[0].encoded_image_string[:6] == b"GIF89a"
    tflops = [e.value for e in acc.Scalars("train/model_tflops_per_device")]
    tokens = [e.value for e in acc.Scalars("train/tokens_per_s")]
    assert len(tflops) == len(tokens) == STEPS and all(t > 0 for t in tflops)
    # the pipeline directory, in diffusers' layout
    pipe = run / "pipeline"
    index = json.loads((pipe / "model_index.json").read_text())
    assert index["_class_name"] == "ContentVPipeline" and index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert sorted(k for k in index if not k.startswith("_")) == sorted(
        ["scheduler", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
         "tokenizer_3"])
    assert (pipe / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (pipe / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # nothing half-written left behind


def test_pipeline_opens_with_diffusers_and_transformers(trained):
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    from contentv_jax.checkpoints import load_transformer
    from torch_npu_backend.transformer import SD3Transformer3DModel

    run, _, _ = trained
    pipe = run / "pipeline"
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pipe, subfolder="scheduler")
    assert scheduler.config.shift == 17.0  # the run's sampling shift (sampling.shift's default)
    vae = AutoencoderKLWan.from_pretrained(pipe, subfolder="vae")
    transformer = SD3Transformer3DModel.from_pretrained(pipe, subfolder="transformer")
    CLIPTextModelWithProjection.from_pretrained(pipe, subfolder="text_encoder_2")
    T5EncoderModel.from_pretrained(pipe, subfolder="text_encoder_3")
    AutoTokenizer.from_pretrained(pipe / "tokenizer_3")
    assert vae.config.z_dim == transformer.config.in_channels == 16
    # the safetensors transformer holds the exported weights
    ours = load_transformer(run / "transformer")
    kernel = np.asarray(ours.proj_out.kernel[...])  # (in, out); torch Linear is (out, in)
    np.testing.assert_array_equal(transformer.proj_out.weight.detach().numpy().T, kernel)
    assert torch.isfinite(transformer.proj_out.weight).all()


def test_sample_the_run_and_an_intermediate_checkpoint(trained, tmp_path):
    from contentv_jax.data.video import read_video

    run, (python, bindir, env), work = trained
    base = [str(bindir / "contentv-sample"), "--model", "runs/tiny", "--prompt", PROMPT, "--num-frames", "9",
            "--height", "64", "--width", "64", "--steps", "8", "--no-progress"]
    _run([*base, "--out", "a.mp4"], cwd=work, env=env, timeout=900)
    frames, fps = read_video(work / "a.mp4")
    assert frames.shape == (9, 64, 64, 3) and fps == pytest.approx(24.0)
    _run([*base, "--checkpoint", "2", "--out", "b.mp4"], cwd=work, env=env, timeout=900)
    early, _ = read_video(work / "b.mp4")
    assert early.shape == (9, 64, 64, 3)
    assert not np.array_equal(early, frames)  # step 2's weights, not the final ones
    # bad input: exit status 2, one line saying what exists / what was looked for
    res = _run([*base, "--checkpoint", "3", "--out", "c.mp4"], cwd=work, env=env, timeout=300, check=False)
    assert res.returncode == 2 and "has no checkpoint 3; its checkpoints: [2, 4]" in res.stderr, res.stderr
    (work / "empty").mkdir()
    res = _run([*base[:2], "empty", *base[3:], "--out", "d.mp4"], cwd=work, env=env, timeout=300, check=False)
    assert res.returncode == 2 and "looked for" in res.stderr and "config.yaml" in res.stderr, res.stderr
    assert not (work / "c.mp4").exists() and not (work / "d.mp4").exists()
