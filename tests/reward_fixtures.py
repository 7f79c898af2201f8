"""Shared pieces of the reward-model tests: tiny HF CLIP configs, a tiny CLIP tokenizer, and CLIP's
preprocessing written in torch (independently of the JAX one) for the gradient checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_LEN = 16


def tiny_hf_clip_config(eos_token_id: int = 2, act: str = "gelu"):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=TEXT_LEN, hidden_act=act, eos_token_id=eos_token_id, bos_token_id=97,
                         pad_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                           patch_size=6, hidden_act=act),
        projection_dim=24,
    )


def tiny_hf_clip(seed: int = 0, **kw):
    """A random ``transformers.CLIPModel`` with non-trivial LayerNorm and bias parameters, float32, eval."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_hf_clip_config(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n or "layrnorm" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(2.0)
    return model


def torch_preprocess(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, H, W, 3)`` in [0, 1] -> ``(B, 3, size, size)``: short side to ``size`` (bicubic, antialias), center crop, mean/std."""
    x = frames.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    oh, ow = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)
    top, left = (oh - size) // 2, (ow - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def random_ids(rng: np.random.Generator, batch: int, vocab: int = 99, eos: int = 98, length: int = TEXT_LEN) -> np.ndarray:
    """Token ids ``(batch, length)``: bos 97, random words in [3, 90), ``eos``, then padding 1.

    With the default ``eos=98`` the eos is the largest id, so argmax pooling (HF legacy, open_clip) picks it."""
    ids = np.ones((batch, length), np.int64)
    for b in range(batch):
        n = int(rng.integers(3, length - 2))
        ids[b, 0] = 97
        ids[b, 1:n] = rng.integers(3, 90, n - 1)
        ids[b, n] = eos
    return ids


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m converters.reward ARGS`` (fails the test on timeout rather than hanging)."""
    return subprocess.run([sys.executable, "-m", "converters.reward", *args], capture_output=True, text=True, timeout=timeout)


def tiny_tokenizer(dst: Path):
    """A tiny ``transformers.CLIPTokenizer`` (a handful of BPE tokens) saved to ``dst`` and loaded back."""
    from transformers import CLIPTokenizer

    dst.mkdir(parents=True, exist_ok=True)
    words = ["a", "cat", "dog", "red", "blue", "light", "color", "style", "face", "hands", "on", "the", "mat"]
    chars = sorted(set("".join(words)) | set("!,.bfgijknpqsvwxyz"))
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in words:
        # merge the word left to right: ((a b) c)... ending with </w>
        cur = w[0]
        for c in w[1:-1]:
            merges.append(f"{cur} {c}")
            cur += c
            vocab.setdefault(cur, len(vocab))
        if len(w) > 1:
            merges.append(f"{cur} {w[-1]}</w>")
            vocab.setdefault(w + "</w>", len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(dst / "vocab.json"), str(dst / "merges.txt"), pad_token="<|endoftext|>")
    tok.save_pretrained(str(dst))
    return tok


def jitted(model):
    """``(score(frames, ids) -> (B,), grad(frames, ids) -> d sum(score) / d frames)``, both jitted (eager
    op-by-op dispatch of the unrolled towers is what makes an un-jitted test slow)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    def score(state, frames, ids):
        return nnx.merge(graphdef, state)(frames, ids)

    s = jax.jit(score)
    g = jax.jit(jax.grad(lambda st, f, i: score(st, f, i).sum(), argnums=1))
    return (lambda f, i: s(state, f, i)), (lambda f, i: g(state, f, i))
