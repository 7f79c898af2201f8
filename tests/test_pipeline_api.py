"""The diffusers-style Python API (``from contentv_jax import ContentVPipeline, export_to_video``) and the CLI
as a thin layer over it: the same frames for the same seed, ``callback_on_step_end`` once per step with that
step's latents (against the official PyTorch loop), noise from ``seed`` / ``generator`` as diffusers'
``randn_tensor``, negative-prompt embeddings encoded once per pipeline, bfloat16 text encoders, the progress
bar switch, ``export_to_video`` read back with PyAV, and bad input refused before any compute."""

import numpy as np
import pytest
import torch

from contentv_jax import ContentVPipeline, export_to_video
from contentv_jax import pipeline as pl
from contentv_jax.sample import main
from tests.official_sampling import official_denoise
from tests.sample_fixtures import build_tiny_model_dir, load_reference

SIZE = dict(num_frames=9, height=32, width=48)
STEPS, GUIDANCE, SEED = 4, 6.0, 7
PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_api") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir):
    p = ContentVPipeline.from_pretrained(model_dir)  # float32 transformer, float32 text encoders on the CPU
    p.set_progress_bar_config(disable=True)
    return p


def test_pipe_and_cli_give_identical_frames(pipe, model_dir, tmp_path):
    out = pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED, **SIZE)
    frames = out.frames
    assert frames.shape == (1, 9, 32, 48, 3) and frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01
    npy = tmp_path / "frames.npy"
    assert main(["--model", str(model_dir), "--prompt", PROMPT, "--steps", str(STEPS), "--guidance-scale", "6",
                 "--seed", str(SEED), "--num-frames", "9", "--height", "32", "--width", "48", "--dtype", "float32",
                 "--output-type", "frames", "--out", str(npy), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(npy), frames)
    # a torch generator seeded alike is the same noise, hence the same video
    gen = torch.Generator().manual_seed(SEED)
    again = pipe(PROMPT, num_inference_steps=STEPS, generator=gen, output_type="np", return_dict=False, **SIZE)[0]
    np.testing.assert_array_equal(again, frames)


def test_callback_on_step_end_sees_each_official_step(pipe, model_dir):
    rng = np.random.default_rng(0)
    embeds = pl.PromptEmbeds(*(rng.normal(size=s).astype(np.float32) for s in [(1, 12, 64), (1, 32), (1, 12, 64), (1, 32)]))
    latents = pl.initial_noise(3, pl.latent_shape(1, 9, 32, 48))
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, t, kwargs["latents"].copy()))
        return {}

    final = pipe(**embeds.as_kwargs(), latents=latents, num_inference_steps=STEPS, output_type="latent",
                 callback_on_step_end=callback, **SIZE).frames
    transformer, _, scheduler = load_reference(model_dir)
    ref = []
    official_denoise(
        transformer, scheduler, torch.from_numpy(latents).permute(0, 4, 1, 2, 3),
        *(torch.from_numpy(a) for a in (embeds.prompt_embeds, embeds.pooled_prompt_embeds,
                                          embeds.negative_prompt_embeds, embeds.negative_pooled_prompt_embeds)),
        STEPS, GUIDANCE, on_step=lambda i, t, x: ref.append((i, t, x.permute(0, 2, 3, 4, 1).numpy())),
    )
    assert [s[0] for s in seen] == list(range(STEPS))
    np.testing.assert_allclose([s[1] for s in seen], [r[1] for r in ref], rtol=1e-6)  # timestep = 1000 sigma
    for (i, _, ours), (_, _, want) in zip(seen, ref):
        err = float(np.abs(ours - want).max() / np.abs(want).max())
        print(f"step {i}: latents max abs err / max abs = {err:.2e}")
        assert err < 1e-4
    np.testing.assert_array_equal(final, seen[-1][2])
    # the fused loop (no callback) agrees with the stepped one
    fused = pipe(**embeds.as_kwargs(), latents=latents, num_inference_steps=STEPS, output_type="latent", **SIZE).frames
    np.testing.assert_allclose(fused, final, rtol=0, atol=1e-5 * np.abs(final).max())
    # latents returned by the callback replace the step's
    zeros = pipe(**embeds.as_kwargs(), latents=latents, num_inference_steps=2, output_type="latent",
                 callback_on_step_end=lambda p, i, t, kw: {"latents": np.zeros_like(kw["latents"])} if i == 1 else None,
                 **SIZE).frames
    assert not zeros.any()


def test_noise_from_seed_and_generators_is_diffusers_randn_tensor():
    shape = pl.latent_shape(2, 9, 32, 48)
    want = torch.randn((2, 16, 3, 4, 6), generator=torch.Generator().manual_seed(5)).permute(0, 2, 3, 4, 1).numpy()
    np.testing.assert_array_equal(pl.initial_noise(5, shape), want)
    np.testing.assert_array_equal(pl._torch_noise(shape, torch.Generator().manual_seed(5)), want)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    per_video = pl._torch_noise(shape, gens)
    for k, s in enumerate((1, 2)):
        one = torch.randn((1, 16, 3, 4, 6), generator=torch.Generator().manual_seed(s)).permute(0, 2, 3, 4, 1).numpy()
        np.testing.assert_array_equal(per_video[k : k + 1], one)


def test_negative_prompt_is_encoded_once_per_pipeline(pipe, monkeypatch):
    calls = []
    real = pipe.text_encoders.encode
    monkeypatch.setattr(pipe.text_encoders, "encode", lambda prompts, **kw: calls.append(list(prompts)) or real(prompts, **kw))
    pipe._negative_cache.clear()
    kw = dict(num_inference_steps=1, output_type="latent", seed=0, **SIZE)
    a = pipe(prompt=["a cat", "a dog"], negative_prompt="blurry", **kw).frames
    pipe(prompt="a bird", negative_prompt="blurry", **kw)
    pipe(prompt="a bird", negative_prompt="", **kw)
    pipe(prompt="a fish", negative_prompt="", **kw)
    assert calls == [["a cat", "a dog"], ["blurry"], ["a bird"], ["a bird"], [""], ["a fish"]]
    # the cached negative equals encoding the pair directly
    pe, pp = real(["a cat", "a dog"], max_sequence_length=256)
    ne, npool = real(["blurry", "blurry"], max_sequence_length=256)
    direct = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                  negative_pooled_prompt_embeds=npool, **kw).frames
    np.testing.assert_allclose(a, direct, rtol=0, atol=1e-5 * np.abs(direct).max())


def test_text_encoders_in_bfloat16_match_float32(model_dir):
    from contentv_jax.text import TextEncoders

    f32 = TextEncoders.from_pretrained(model_dir)
    bf16 = TextEncoders.from_pretrained(model_dir, dtype="bfloat16", device="cpu")
    assert bf16.text_encoder_3.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.bfloat16
    (pe, pp), (pe16, pp16) = f32.encode([PROMPT], 32), bf16.encode([PROMPT], 32)
    assert pe16.dtype == np.float32
    for ours, want in ((pe16, pe), (pp16, pp)):
        err = float(np.abs(ours - want).max() / np.abs(want).max())
        print(f"bfloat16 text encoders: max abs err / max abs = {err:.2e}")
        assert 0 < err < 0.05  # bfloat16 has 8 mantissa bits: ~1e-2 after a few layers
    with pytest.raises(ValueError, match="text encoder dtype 'int8' is not one of"):
        TextEncoders.from_pretrained(model_dir, dtype="int8")


def test_progress_bar_on_by_default_and_switched_off(model_dir, capsys):
    p = ContentVPipeline.from_pretrained(model_dir, load_vae=False)
    kw = dict(prompt="a cat", num_inference_steps=2, output_type="latent", seed=0, **SIZE)
    p(**kw)
    assert "denoising" in capsys.readouterr().err
    p.set_progress_bar_config(disable=True)
    p(**kw)
    assert "denoising" not in capsys.readouterr().err


def test_export_to_video_reads_back(tmp_path):
    from contentv_jax.data.video import read_video

    rng = np.random.default_rng(0)
    frames = np.repeat(np.repeat(rng.uniform(size=(1, 9, 4, 6, 3)), 8, axis=2), 8, axis=3).astype(np.float32)
    path = export_to_video(frames[0], tmp_path / "v.mp4", fps=24)
    got, fps = read_video(path)
    assert path == str(tmp_path / "v.mp4") and fps == pytest.approx(24.0)
    assert got.shape == (9, 32, 48, 3)
    assert np.abs(got / 255.0 - frames[0]).mean() < 0.05  # lossy H.264 of flat 8x8 blocks
    assert export_to_video(frames, tmp_path / "w.mp4") == str(tmp_path / "w.mp4")  # a batch of one
    with pytest.raises(ValueError, match="writes one video"):
        export_to_video(np.concatenate([frames, frames]), tmp_path / "x.mp4")


def test_bad_input_is_refused_before_any_compute(pipe):
    kw = dict(num_inference_steps=1, **SIZE)
    e = np.zeros((1, 5, 64), np.float32)
    cases = [
        (dict(prompt="a", prompt_embeds=e), "give prompt or prompt_embeds, not both"),
        (dict(), "give prompt or prompt_embeds"),
        (dict(prompt_embeds=e), "needs pooled_prompt_embeds"),
        (dict(prompt="a", output_type="pil"), "output_type must be one of"),
        (dict(prompt="a", seed=1, generator=torch.Generator()), "seed or generator, not both"),
        (dict(prompt="a", height=40), "height must be a positive multiple of 16"),
        (dict(prompt="a", num_inference_steps=0), "num_inference_steps must be >= 1"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt has 1 entries for 2 prompts"),
        (dict(prompt="a", latents=np.zeros((1, 3, 4, 5, 16))), r"latents must have shape \(1, 3, 4, 6, 16\)"),
        (dict(prompt="a", callback_on_step_end_tensor_inputs=["noise_pred"]), "are not among"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**{**kw, **extra})
