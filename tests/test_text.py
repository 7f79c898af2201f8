"""SD3 text conditioning: tiny local encoders against diffusers' StableDiffusion3Pipeline.encode_prompt,
and the real SD3.5 tokenizers against transformers' own loading."""

import numpy as np
import pytest
import torch

from contentv_jax.text import CLIP_MAX_LENGTH, TextEncoders, build_tiny_text_encoders

PROMPTS = [
    "a red circle moving left on a blue background",
    "",
    "Top-down view of a grey parking lot; a silver car drives through! " * 12,  # > 77 CLIP tokens: truncated
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_text_encoders(tmp_path_factory.mktemp("te") / "tiny", clip_dims=(16, 24), t5_dim=64, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return TextEncoders.from_pretrained(tiny_dir)


def test_tiny_layout_and_widths(tiny_dir, tiny):
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert (tiny_dir / sub).is_dir()
    assert tiny.context_dim == 64 and tiny.pooled_dim == 40
    # CLIP-L pads with <|endoftext|>, bigG with "!" (id 0), T5 with <pad> (0) after </s> (1)
    assert tiny.tokenizer.pad_token == "<|endoftext|>"
    assert tiny.tokenizer_2.pad_token == "!" and tiny.tokenizer_2.pad_token_id == 0
    ids_l, ids_g, ids_t5 = tiny.tokenize(["", "a red circle"], max_sequence_length=16)
    eos = tiny.tokenizer.eos_token_id
    assert ids_l.shape == (2, 77) and ids_t5.shape == (2, 16)
    assert ids_l[0, 0] == tiny.tokenizer.bos_token_id and (ids_l[0, 1:] == eos).all()
    assert ids_g[0, 1] == eos and (ids_g[0, 2:] == 0).all()
    assert ids_t5[0].tolist() == [1] + [0] * 15
    # real words are split into multi-character pieces (the BPE and Unigram models learned merges)
    n_clip = int((ids_l[1] != eos).sum()) - 1  # minus BOS
    n_t5 = int(ids_t5[1].tolist().index(1))  # tokens before </s>
    assert 3 <= n_clip < 10 and 3 <= n_t5 < 10, (n_clip, n_t5)


def test_tokenizers_are_the_same_in_every_process(tiny_dir):
    """The tiny CLIP tokenizers' merges, learned in four fresh processes, equal the fixture's (``tokenizers``'
    own BpeTrainer gave 5 different merge lists in 12 processes: hash-map order among equally frequent
    characters), so every run, host and test builds the same tiny text encoders."""
    import json
    import subprocess
    import sys

    code = ("import json; from contentv_jax.text import _train_clip_bpe, DEFAULT_CORPUS as C; "
            "print(json.dumps(_train_clip_bpe(C, 300)[1]))")
    ours = json.loads((tiny_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["merges"]
    ours = [m.split(" ") if isinstance(m, str) else m for m in ours]
    assert len(ours) > 100
    for _ in range(4):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)  # a failure bound only
        assert json.loads(out.stdout) == ours


def test_rebuild_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_text_encoders(tmp_path / "again", clip_dims=(16, 24), t5_dim=64, seed=0)
    a = TextEncoders.from_pretrained(tiny_dir).encode(PROMPTS[:2], max_sequence_length=8)
    b = TextEncoders.from_pretrained(again).encode(PROMPTS[:2], max_sequence_length=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_matches_diffusers_encode_prompt(tiny, tiny_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer_2=tiny.tokenizer_2,
        text_encoder_3=tiny.text_encoder_3,
        tokenizer_3=tiny.tokenizer_3,
    )
    assert pipe.tokenizer_max_length == CLIP_MAX_LENGTH
    L = 24
    with torch.no_grad():
        ref, neg, ref_pooled, neg_pooled = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=True, negative_prompt=["", "", "blurry"], max_sequence_length=L,
        )
    embeds, pooled = tiny.encode(PROMPTS, max_sequence_length=L)
    assert embeds.shape == (3, 77 + L, 64) and pooled.shape == (3, 40)
    assert embeds.dtype == np.float32 and pooled.dtype == np.float32
    np.testing.assert_allclose(embeds, ref.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), rtol=0, atol=1e-6)
    # the CFG negative (empty prompt) is the same recipe
    e_neg, p_neg = tiny.encode(["", "", "blurry"], max_sequence_length=L)
    np.testing.assert_allclose(e_neg, neg.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(p_neg, neg_pooled.numpy(), rtol=0, atol=1e-6)
    # structure: CLIP features zero-padded past 16 + 24, and the prompts differ
    # (the comparison above is not vacuous: every CLIP token carries features in both encoders' channels,
    # CLIP-L in 0:16 and bigG in 16:40, and every T5 token in all 64)
    assert np.all(embeds[:, :77, 40:] == 0)
    assert np.all(np.abs(embeds[:, :77, :16]).max(-1) > 1e-3) and np.all(np.abs(embeds[:, :77, 16:40]).max(-1) > 1e-3)
    assert np.all(np.abs(embeds[:, 77:]).max(-1) > 1e-3)
    assert np.abs(embeds[0] - embeds[1]).max() > 1e-3


def test_reload_through_same_loader(tiny_dir, tiny):
    # a float64 load gives the same numbers to float32 precision (the dtype argument is honoured)
    e64 = TextEncoders.from_pretrained(tiny_dir, dtype=torch.float64)
    assert e64.text_encoder_3.dtype == torch.float64
    a, pa = tiny.encode(PROMPTS[:1], max_sequence_length=8)
    b, pb = e64.encode(PROMPTS[:1], max_sequence_length=8)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(pa, pb, atol=1e-5)


def test_real_sd35_tokenizers_match_transformers(shared_data):
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    d = shared_data / "tokenizers" / "sd35-large"
    ours = TextEncoders.__new__(TextEncoders)  # tokenizers only: no encoder weights exist here
    ours.tokenizer, ours.tokenizer_2, ours.tokenizer_3 = (AutoTokenizer.from_pretrained(d / s) for s in
                                                           ("tokenizer", "tokenizer_2", "tokenizer_3"))
    prompts = ["A cat wearing sunglasses, 4K, cinematic.", "", "an astronaut riding a horse on the moon " * 40]
    ids_l, ids_g, ids_t5 = ours.tokenize(prompts, max_sequence_length=256)
    ref_l = CLIPTokenizer.from_pretrained(d / "tokenizer")(prompts, padding="max_length", max_length=77,
                                                           truncation=True).input_ids
    ref_g = CLIPTokenizer.from_pretrained(d / "tokenizer_2")(prompts, padding="max_length", max_length=77,
                                                             truncation=True).input_ids
    ref_t5 = T5TokenizerFast.from_pretrained(d / "tokenizer_3")(prompts, padding="max_length", max_length=256,
                                                                truncation=True, add_special_tokens=True).input_ids
    assert ids_l.tolist() == ref_l and ids_g.tolist() == ref_g and ids_t5.tolist() == ref_t5
    # known ids of SD3.5's vocabularies: BOS 49406, EOS 49407; bigG pads with "!" (0); T5 "</s>" 1, pad 0
    assert ids_l[1, :3].tolist() == [49406, 49407, 49407]
    assert ids_g[1, :3].tolist() == [49406, 49407, 0]
    assert ids_t5[1, :2].tolist() == [1, 0]
    assert ids_l[2, -1] == 49407 and ids_t5[2, -1] == 1  # truncated sequences still end with EOS


def test_bad_prompts(tiny, tmp_path):
    with pytest.raises(TypeError, match="list"):
        tiny.encode("a string", max_sequence_length=8)
    with pytest.raises(ValueError, match="empty"):
        tiny.encode([], max_sequence_length=8)
    with pytest.raises(FileNotFoundError, match="text_encoder_3"):
        TextEncoders.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="t5_dim"):
        build_tiny_text_encoders(tmp_path / "x", clip_dims=(48, 48), t5_dim=64)
