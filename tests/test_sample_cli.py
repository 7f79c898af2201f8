"""``python -m contentv_jax.sample``: bad input fails before any compute, the CLI wiring (text encoders,
official negative prompt, seed noise) equals the pipeline composed by hand, and acceptance 3 of issue 6
(``--prompts-file`` with VBench's scene prompts writes playable mp4 files)."""

import importlib.util
import json

import numpy as np
import pytest

from contentv_jax import pipeline as pl
from contentv_jax.sample import main, vbench_name
from tests.sample_fixtures import build_tiny_model_dir

HAVE_VAE = importlib.util.find_spec("contentv_jax.models.vae") is not None
SMALL = ["--num-frames", "9", "--height", "32", "--width", "48", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_cli") / "model")


@pytest.fixture
def fake_dir(tmp_path):
    """Sub-folders and a transformer config but no weights: anything that tried to load would fail."""
    for sub in ("transformer", "vae", *pl.TEXT_SUBFOLDERS):
        (tmp_path / sub).mkdir()
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"in_channels": 16, "joint_attention_dim": 64, "pooled_projection_dim": 32})
    )
    return tmp_path


def test_bad_input_is_refused_before_any_compute(fake_dir, tmp_path, capsys):
    assert main(["--model", str(fake_dir), "--prompt", "a cat", "--height", "440"]) == 2
    assert "height must be a positive multiple of 16" in capsys.readouterr().err
    assert main(["--model", str(fake_dir), "--prompt", "a cat", "--width", "100"]) == 2
    assert "width must be" in capsys.readouterr().err
    (fake_dir / "tokenizer_3").rmdir()
    (fake_dir / "vae").rmdir()
    assert main(["--model", str(fake_dir), "--prompt", "a cat"]) == 2
    assert "lacks sub-folder(s) ['vae', 'tokenizer_3']" in capsys.readouterr().err
    (fake_dir / "vae").mkdir()
    z = np.zeros
    np.savez(tmp_path / "e.npz", prompt_embeds=z((1, 5, 48)), pooled_prompt_embeds=z((1, 32)),
             negative_prompt_embeds=z((1, 5, 48)), negative_pooled_prompt_embeds=z((1, 32)))
    assert main(["--model", str(fake_dir), "--prompt-embeds", str(tmp_path / "e.npz")]) == 2
    assert "prompt_embeds must have shape (B, L, 64), got (1, 5, 48)" in capsys.readouterr().err
    np.savez(tmp_path / "e.npz", prompt_embeds=z((1, 5, 64)), pooled_prompt_embeds=z((1, 32)),
             negative_prompt_embeds=z((1, 5, 64)), negative_pooled_prompt_embeds=z((1, 32)))
    np.save(tmp_path / "noise.npy", z((1, 3, 4, 5, 16)))
    assert main(["--model", str(fake_dir), "--prompt-embeds", str(tmp_path / "e.npz"), "--latents",
                 str(tmp_path / "noise.npy"), *SMALL]) == 2
    assert "must have shape (1, 3, 4, 6, 16)" in capsys.readouterr().err
    assert main(["--model", str(fake_dir), "--prompt", "a cat", "--attention-kernel", "flash3"]) == 2
    assert "--attention-kernel 'flash3' is not one of" in capsys.readouterr().err
    assert main(["--model", str(fake_dir), "--prompt", "a cat", "mesh.pipeline=2"]) == 2
    assert "unknown config key 'mesh.pipeline'" in capsys.readouterr().err


def test_cli_equals_the_pipeline_composed_by_hand(model_dir, tmp_path):
    from contentv_jax.checkpoints import load_transformer
    from contentv_jax.text import TextEncoders

    out = tmp_path / "latents.npy"
    assert main(["--model", str(model_dir), "--prompt", "a red car in the rain", "--steps", "2", "--seed", "5",
                 "--output-type", "latent", "--out", str(out), *SMALL]) == 0
    got = np.load(out)
    text = TextEncoders.from_pretrained(model_dir)
    pe, pp = text.encode(["a red car in the rain"], max_sequence_length=256)
    ne, npool = text.encode([pl.DEFAULT_NEGATIVE_PROMPT], max_sequence_length=256)
    embeds = pl.PromptEmbeds(*(np.asarray(a, np.float32) for a in (pe, pp, ne, npool)))
    noise = pl.initial_noise(5, pl.latent_shape(1, 9, 32, 48))
    want = pl.denoise(load_transformer(model_dir / "transformer"), noise, embeds, pl.flow.sampling_sigmas(2, 3.0), 6.0)
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-5 * np.abs(want).max())
    # the same through --prompt-embeds and --latents, with the chunked (online-softmax) attention kernel
    np.savez(tmp_path / "e.npz", **{k: getattr(embeds, k) for k in pl.PromptEmbeds.KEYS})
    np.save(tmp_path / "noise.npy", noise)
    out2 = tmp_path / "latents2.npy"
    assert main(["--model", str(model_dir), "--prompt-embeds", str(tmp_path / "e.npz"), "--latents",
                 str(tmp_path / "noise.npy"), "--steps", "2", "--output-type", "latent", "--out", str(out2), "--chunked-attention",
                 *SMALL]) == 0
    np.testing.assert_allclose(np.load(out2), got, rtol=0, atol=1e-5 * np.abs(got).max())


@pytest.mark.skipif(not HAVE_VAE, reason="the JAX VAE has not landed")
def test_prompts_file_writes_vbench_named_playable_mp4s(model_dir, shared_data, tmp_path):
    from contentv_jax.data.video import probe_video, read_video

    scene = shared_data / "prompts/vbench/prompts/prompts_per_dimension/scene.txt"
    prompts = [line.strip() for line in scene.read_text().splitlines() if line.strip()][:5]
    out_dir = tmp_path / "videos"
    assert main(["--model", str(model_dir), "--prompts-file", str(scene), "--max-prompts", "5", "--steps", "2",
                 "--videos-per-prompt", "2", "--fps", "8", "--out", str(out_dir), "--num-frames", "10",
                 "--height", "32", "--width", "48", "--dtype", "float32", "--no-progress"]) == 0
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == sorted(vbench_name(p, k) for p in prompts for k in range(2))
    for name in files:
        frames, fps = read_video(out_dir / name)
        assert frames.shape == (9, 32, 48, 3)  # 10 frames rounded to 4k+1 = 9
        assert fps == pytest.approx(8.0)
        assert probe_video(out_dir / name).num_frames == 9
        assert frames.std() > 1.0  # not a blank video
