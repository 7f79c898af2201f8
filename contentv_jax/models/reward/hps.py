"""HPSv2 / HPSv2.1 (Human Preference Score v2, github tgxs002/HPSv2) in Flax NNX.

HPSv2 is open_clip's ``ViT-H-14`` CLIP fine-tuned on human preferences; its checkpoints
(``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) hold ``{"state_dict": <open_clip CLIP state dict>}``
with open_clip key names (``visual.transformer.resblocks.{i}.attn.in_proj_weight``, ...; the name table
is in ``converters/reward.py``). The score is HPSv2's ``score.py``: the diagonal of
``image_features @ text_features.T`` with L2-normalised features, i.e. ``cos(image, text)`` without the
logit scale (typical values 0.2-0.35). Preprocessing is open_clip's validation transform (short-side
bicubic resize to 224, center crop, OpenAI mean/std), here the differentiable :func:`clip_preprocess`.

Layouts: ``frames (B, H, W, 3)`` float in ``[0, 1]`` channels-last, ``input_ids (B|1, 77)`` int
(open_clip's tokenizer: ``<start_of_text> ... <end_of_text>`` then zeros; pooled at the argmax id).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contentv_jax.models.reward.clip import CLIPConfig, CLIPModel, _normalize

# open_clip/model_configs/ViT-H-14.json, as data.
VIT_H_14_OPEN_CLIP = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


class HPSModel(CLIPModel):
    """The HPSv2 reward: a :class:`CLIPModel` scoring ``cos(image, text)`` ``(B,)`` float32 (no logit scale)."""

    def score(self, pixels: jax.Array, input_ids: jax.Array) -> jax.Array:
        img = _normalize(self.get_image_features(pixels))
        txt = _normalize(self.get_text_features(input_ids))
        return jnp.sum(img * txt, axis=-1)


def hps_config(open_clip_cfg=VIT_H_14_OPEN_CLIP) -> CLIPConfig:
    """Our :class:`CLIPConfig` for an open_clip model config (default ``ViT-H-14``)."""
    return CLIPConfig.from_open_clip(open_clip_cfg)
