"""SD3 text conditioning in PyTorch (CLIP-L + OpenCLIP bigG + T5), exactly diffusers' recipe.

Mirrors ``diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``
(``_get_clip_prompt_embeds``, ``_get_t5_prompt_embeds``, ``encode_prompt``; ContentV report
(arXiv 2506.05343), section 4.1: ContentV keeps SD3.5 Large's text encoders):

- CLIP-L and bigG: 77 tokens (``padding="max_length"``, truncation; CLIP-L pads with ``<|endoftext|>``,
  bigG with ``!``), no attention mask, the penultimate hidden state ``hidden_states[-2]``
  (B, 77, 768 / 1280) and the projected ``text_embeds`` (B, 768 / 1280).
- T5: ``max_sequence_length`` tokens (256 for ContentV), no attention mask, last hidden state (B, L, 4096).
- context = concat([pad(concat([clip_l, bigG], -1), to T5 width), t5], axis=1): (B, 77 + L, 4096);
  pooled = concat([clip_l text_embeds, bigG text_embeds], -1): (B, 2048).

The model directory has the diffusers layout: ``tokenizer``, ``tokenizer_2``, ``tokenizer_3``,
``text_encoder`` (CLIPTextModelWithProjection), ``text_encoder_2`` (CLIPTextModelWithProjection),
``text_encoder_3`` (T5EncoderModel).

API:
  ``enc = TextEncoders.from_pretrained(model_dir, dtype="bfloat16", device="cuda")`` (default float32, CPU)
  ``prompt_embeds, pooled = enc.encode(prompts, max_sequence_length=256)`` -> float32 numpy
  ``(B, 77 + L, Dctx)``, ``(B, Dpool)``; ``""`` is a valid prompt (CFG negative / caption dropout).
  ``build_tiny_text_encoders(dst_dir, clip_dims=(16, 16), t5_dim=64, seed=0)`` writes a tiny,
  randomly initialised model directory with locally trained tokenizers (no network), loadable by
  ``TextEncoders.from_pretrained``: context width ``t5_dim``, pooled width ``sum(clip_dims)``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contentv_jax.atomic import atomic_dir

__all__ = ["TextEncoders", "build_tiny_text_encoders", "torch_dtype", "torch_device", "CLIP_MAX_LENGTH", "SUBFOLDERS",
           "DEFAULT_CORPUS"]

CLIP_MAX_LENGTH = 77
SUBFOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3")


class TextEncoders:
    """The three SD3 tokenizers and text encoders (PyTorch, eval mode, on ``device``)."""

    def __init__(self, tokenizers, encoders, *, device="cpu"):
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizers
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = encoders
        self.device = torch_device(device)
        for m in encoders:
            m.eval().requires_grad_(False).to(self.device)
        clip_width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if clip_width > self.context_dim:
            raise ValueError(
                f"CLIP widths {self.text_encoder.config.hidden_size} + {self.text_encoder_2.config.hidden_size}"
                f" exceed the T5 width {self.context_dim}; SD3 zero-pads CLIP features to the T5 width"
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, dtype=None, device="cpu") -> "TextEncoders":
        """Load from a diffusers-layout directory (see module docstring).

        Args:
          dtype: weights and compute dtype of the three encoders: a ``torch.dtype`` or its name
            (``"bfloat16"``, as the official demo runs them; ``"float16"``, ``"float32"``); None: float32.
            The embeddings come back as float32 whatever the dtype.
          device: a torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"npu"``, ...); ``"auto"`` or None
            picks the Ascend NPU when ``USE_ASCEND_NPU`` / detection says so, else CUDA when available,
            else the CPU (``torch_npu_backend.device.select_device``).
        Raises:
          FileNotFoundError: naming every missing sub-folder. ValueError: an unknown dtype or device.
        """
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        dtype = torch_dtype(dtype)
        model_dir = Path(model_dir)
        missing = [s for s in SUBFOLDERS if not (model_dir / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"text encoders {model_dir}: missing sub-folder(s) {', '.join(missing)}")
        toks = tuple(AutoTokenizer.from_pretrained(model_dir / s) for s in SUBFOLDERS[:3])
        encs = (
            CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder", dtype=dtype),
            CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2", dtype=dtype),
            T5EncoderModel.from_pretrained(model_dir / "text_encoder_3", dtype=dtype),
        )
        return cls(toks, encs, device=device)

    @property
    def context_dim(self) -> int:
        """Width of ``prompt_embeds`` (the T5 width: 4096 for SD3.5 / ContentV)."""
        return int(self.text_encoder_3.config.d_model)

    @property
    def pooled_dim(self) -> int:
        """Width of ``pooled`` (CLIP-L + bigG projection widths: 2048 for SD3.5 / ContentV)."""
        return int(self.text_encoder.config.projection_dim + self.text_encoder_2.config.projection_dim)

    def tokenize(self, prompts: Sequence[str], max_sequence_length: int = 256):
        """Token ids as the SD3 pipeline makes them: ``(ids_clip_l (B, 77), ids_bigg (B, 77), ids_t5 (B, L))``."""
        import torch

        prompts = _check_prompts(prompts)
        kw = dict(padding="max_length", truncation=True, return_tensors="pt")
        ids = (
            self.tokenizer(prompts, max_length=CLIP_MAX_LENGTH, **kw).input_ids,
            self.tokenizer_2(prompts, max_length=CLIP_MAX_LENGTH, **kw).input_ids,
            self.tokenizer_3(prompts, max_length=max_sequence_length, add_special_tokens=True, **kw).input_ids,
        )
        return tuple(t.to(torch.long) for t in ids)

    def encode(self, prompts: Sequence[str], max_sequence_length: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Encode ``prompts`` to ``(prompt_embeds float32 (B, 77 + L, Dctx), pooled float32 (B, Dpool))``.

        Mirrors diffusers ``StableDiffusion3Pipeline.encode_prompt`` (one prompt for all three
        encoders, ``clip_skip=None``, ``num_images_per_prompt=1``).
        """
        import torch

        ids_l, ids_g, ids_t5 = self.tokenize(prompts, max_sequence_length)
        with torch.inference_mode():
            out_l = self.text_encoder(ids_l.to(self.device), output_hidden_states=True)
            out_g = self.text_encoder_2(ids_g.to(self.device), output_hidden_states=True)
            t5 = self.text_encoder_3(ids_t5.to(self.device))[0].float()
            clip = torch.cat([out_l.hidden_states[-2].float(), out_g.hidden_states[-2].float()], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            prompt_embeds = torch.cat([clip, t5], dim=-2)
            pooled = torch.cat([out_l[0].float(), out_g[0].float()], dim=-1)
        return prompt_embeds.cpu().numpy(), pooled.cpu().numpy()


TORCH_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(dtype):
    """``dtype`` (None, a ``torch.dtype`` or one of :data:`TORCH_DTYPES`) as a ``torch.dtype`` (None: float32).

    Raises ValueError naming an unknown dtype.
    """
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise ValueError(f"text encoder dtype {dtype!r} is not one of {TORCH_DTYPES}")
    return getattr(torch, name)


def torch_device(device):
    """``device`` (a ``torch.device``, a device string, or ``"auto"`` / None) as a ``torch.device``.

    ``"npu"`` and ``"auto"`` go through ``torch_npu_backend.device.select_device`` (which imports torch_npu only
    when the NPU is chosen). Raises ValueError for a malformed device string.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    from torch_npu_backend.device import select_device

    return select_device(None if device in (None, "auto") else device)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string (wrap it in a list)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[0]!r}")
    return prompts


# ---------------------------------------------------------------------------------------------
# Tiny local text encoders (random weights, locally trained tokenizers)

DEFAULT_CORPUS = tuple(
    f"a {size}{color} {shape} moving {direction} on a {bg} background"
    for size, color, shape, direction, bg in [
        ("", "red", "circle", "left", "blue"),
        ("small ", "green", "square", "right", "black"),
        ("large ", "blue", "triangle", "up", "white"),
        ("", "yellow", "circle", "down", "purple"),
        ("", "white", "square", "left", "grey"),
        ("small ", "orange", "triangle", "right", "green"),
        ("", "purple", "circle", "up", "yellow"),
        ("", "black", "square", "down", "orange"),
        ("", "cyan", "triangle", "left", "red"),
        ("", "pink", "circle", "right", "cyan"),
    ]
) + (
    "A person walks across a bright room with a wooden floor and white walls.",
    "Top-down view of a grey asphalt parking lot; a silver car and a red car drive through.",
    "A hand places bottles on a table, close-up, indoor light, 4K, high quality.",
    "Black-and-white silent-film footage of a man in a bowler hat walking in a garden.",
    "An animated meadow with a tree, a rabbit and butterflies under a blue sky at sunrise.",
    "The camera pans slowly over a city at night; cars, lights, people, water, mountains!",
    "blurry, low quality, distorted, worst quality, watermark, text, static, 0123456789",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (printable bytes keep their character)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
    for b in range(256):
        if b not in keep:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _train_clip_bpe(corpus: Sequence[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE (``</w>`` word ends) learned from ``corpus``, deterministically.

    Words come from the ``tokenizers`` library's normaliser and pre-tokeniser set up as CLIP's (NFC, whitespace
    folding, lower case; CLIP's split pattern; byte-level characters). The merges are learned here, not by
    ``tokenizers.trainers.BpeTrainer``: that trainer numbers characters of equal frequency in hash-map order, so
    its merges changed from one process to the next (5 different merge lists in 12 runs of this corpus), and so did
    the tiny text encoders' embeddings. Each round merges the most frequent adjacent pair (counted over words
    weighted by their frequency), ties going to the smallest pair in string order, until ``num_merges`` merges or
    no pair is left.

    Vocabulary order follows CLIP's: 256 byte characters (``!`` first, id 0), the same with ``</w>``,
    one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts = Counter(w for line in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in sorted(counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def _train_t5_unigram(corpus: Sequence[str], vocab_size: int) -> bytes:
    """A sentencepiece Unigram model (T5's ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no BOS)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_tiny_text_encoders(
    dst_dir: str | os.PathLike,
    *,
    clip_dims: tuple[int, int] = (16, 16),
    t5_dim: int = 64,
    seed: int = 0,
    corpus: Sequence[str] = DEFAULT_CORPUS,
    num_layers: int = 2,
    num_heads: int = 2,
    clip_merges: int = 300,
    t5_vocab_size: int = 200,
) -> Path:
    """Write tiny random CLIP-L-like, bigG-like and T5-like encoders and local tokenizers to ``dst_dir``.

    Tokenizers are trained on ``corpus`` (CLIP: byte-level BPE with CLIP's normaliser and splitting,
    ``clip_merges`` merges; T5: sentencepiece Unigram of about ``t5_vocab_size`` pieces plus T5's
    100 sentinels). CLIP-L pads with ``<|endoftext|>``, bigG with ``!`` (id 0), as SD3.5's. Encoders:
    CLIP hidden = projection = ``clip_dims[i]`` (quick_gelu, 77 positions), T5 v1.1 (gated-gelu)
    ``d_model = t5_dim``; ``num_layers`` layers and ``num_heads`` heads each; weights from torch's
    default init under ``torch.manual_seed(seed)``. Everything is saved with ``save_pretrained`` into
    the diffusers sub-folder layout, through a temporary sibling directory then ``os.replace``.

    A transformer conditioned on these uses ``joint_attention_dim = t5_dim`` and
    ``pooled_projection_dim = sum(clip_dims)``. Raises ValueError if ``sum(clip_dims) > t5_dim`` or a
    width is not divisible by ``num_heads``. Returns ``Path(dst_dir)``.
    """
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    if sum(clip_dims) > t5_dim:
        raise ValueError(f"sum(clip_dims)={sum(clip_dims)} must be <= t5_dim={t5_dim} (CLIP is zero-padded to T5)")
    for d in (*clip_dims, t5_dim):
        if d % num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={num_heads}")
    dst = Path(dst_dir)
    with atomic_dir(dst) as tmp:
        vocab, merges = _train_clip_bpe(corpus, clip_merges)
        for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
            tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77)
            tok.save_pretrained(tmp / sub)
        sp_dir = tmp / "tokenizer_3"
        sp_dir.mkdir()
        (sp_dir / "spiece.model").write_bytes(_train_t5_unigram(corpus, t5_vocab_size))
        t5_tok = T5Tokenizer.from_pretrained(sp_dir)
        t5_tok.model_max_length = 512
        t5_tok.save_pretrained(sp_dir)

        torch.manual_seed(seed)
        bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        for sub, width, pad in (("text_encoder", clip_dims[0], eos), ("text_encoder_2", clip_dims[1], vocab["!"])):
            cfg = CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=width,
                projection_dim=width,
                intermediate_size=4 * width,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                max_position_embeddings=CLIP_MAX_LENGTH,
                hidden_act="quick_gelu",
                bos_token_id=bos,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            CLIPTextModelWithProjection(cfg).eval().save_pretrained(tmp / sub)
        t5_cfg = T5Config(
            vocab_size=len(t5_tok),
            d_model=t5_dim,
            d_kv=t5_dim // num_heads,
            d_ff=2 * t5_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            dropout_rate=0.0,
            tie_word_embeddings=False,
        )
        T5EncoderModel(t5_cfg).eval().save_pretrained(tmp / "text_encoder_3")
    return dst
