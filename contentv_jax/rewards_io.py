"""Loading reward models: ``load_reward(name, path)`` -> :class:`~contentv_jax.models.reward.Reward`.

Kept outside ``contentv_jax.models`` (the models never import ``converters``); the name tables and the
checkpoint readers are ``converters/reward.py``.

Accepted checkpoints per name:

- ``clip`` / ``pickscore``: an HF ``CLIPModel`` directory (``save_pretrained``: ``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``), e.g. ``yuvalkirstain/PickScore_v1``;
- ``mps``: the MPS state dict (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, or
  ``.safetensors``; keys ``model.*`` + ``cross_model.*``), with ``config`` the HF ``CLIPConfig`` dict of
  its backbone (default: laion CLIP-ViT-H-14, :data:`VIT_H_14_HF`) and a tokenizer for the condition;
- ``hps``: an HPSv2 / v2.1 file (``{"state_dict": ...}`` with open_clip names), ``config`` the open_clip
  model config (default ``ViT-H-14``);
- any of them: our checkpoint written by ``python -m converters.reward`` (``config.json`` + ``state/``);
- ``analytic``: no path; ``config`` an :class:`AnalyticConfig` or its dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from contentv_jax.models.reward import (
    CONDITION_OVERALL, VIT_H_14_OPEN_CLIP, AnalyticConfig, AnalyticReward, CLIPConfig, CLIPModel, HPSModel,
    MPSConfig, MPSModel, Reward, canonical_name, condition_ids, config_from_dict,
)

# HF CLIPConfig fields of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the MPS backbone; PickScore_v1's shapes).
VIT_H_14_HF = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "eos_token_id": 2},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                      "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
}


def load_tokenizer(tokenizer: Any):
    """A tokenizer object as given, or ``transformers.AutoTokenizer.from_pretrained(path)`` for a path; ``None`` stays ``None``."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))


def _tokenizer_in(path: Path):
    """The tokenizer saved beside an HF model (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``), else ``None``."""
    if path.is_dir() and ((path / "vocab.json").is_file() or (path / "tokenizer.json").is_file()):
        return load_tokenizer(path)
    return None


def load_reward(name: str, path: str | os.PathLike | None = None, *, config: Any = None, tokenizer: Any = None,
                condition: str = CONDITION_OVERALL) -> Reward:
    """Load reward model ``name`` from ``path``; parameters float32 unless the config says otherwise.

    Args:
      name: ``clip``, ``pickscore``, ``mps``, ``hps`` or ``analytic``.
      path: the checkpoint (see the module docstring); ``None`` only for ``analytic``.
      config: the model config where the checkpoint has none (mps: HF ``CLIPConfig`` dict of the
        backbone, or an :class:`MPSConfig`; hps: open_clip model config dict, or a :class:`CLIPConfig`;
        analytic: :class:`AnalyticConfig` or dict).
      tokenizer: a ``transformers`` CLIP tokenizer or its directory; default: the one saved in ``path``
        (HF directories), else none (the :class:`Reward` then accepts token ids only). MPS needs one to
        tokenize ``condition`` unless ``config`` is an :class:`MPSConfig` with ``condition_ids``.
      condition: the MPS condition string (default: the "overall" condition).
    Returns:
      a :class:`Reward` (``.model`` the ``nnx.Module``, ``.tokenizer``).
    Raises:
      ValueError: unknown name, a missing path or tokenizer.
      converters.common.CheckpointError: an unreadable, unsafe or non-matching checkpoint (every
        offending tensor named, with expected and found shape); nothing is loaded.
    """
    from converters import reward as conv

    name = canonical_name(name)
    if name == "analytic":
        if isinstance(config, dict):
            config = config_from_dict("analytic", config)
        return Reward("analytic", AnalyticReward(config or AnalyticConfig()))
    if path is None:
        raise ValueError(f"reward {name!r}: a checkpoint path is required")
    path = Path(path)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else _tokenizer_in(path)
    from contentv_jax import checkpoints

    if checkpoints.is_our_checkpoint(path):
        _, model = conv.load_our_reward(path, name)
        return Reward(name, model, tok)

    hf_config, tensors = conv.read_tensors(path)
    what = str(path)
    if name == "clip":
        if hf_config is None and config is None:
            raise ValueError(f"{path}: a CLIP checkpoint needs its config.json (an HF CLIPModel directory) or config=")
        cfg = config if isinstance(config, CLIPConfig) else CLIPConfig.from_dict(config or hf_config)
        entries, buffers = conv.clip_hf_table(cfg)
        model = conv.load_params(lambda: CLIPModel(cfg, rngs=_rngs()), entries, buffers, tensors, what=what)
    elif name == "hps":
        cfg = config if isinstance(config, CLIPConfig) else CLIPConfig.from_open_clip(config or VIT_H_14_OPEN_CLIP)
        entries, buffers = conv.clip_open_clip_table(cfg)
        model = conv.load_params(lambda: HPSModel(cfg, rngs=_rngs()), entries, buffers, tensors, what=what)
    else:  # mps
        if isinstance(config, MPSConfig):
            cfg = config
        else:
            cfg = MPSConfig(clip=CLIPConfig.from_dict(config or hf_config or VIT_H_14_HF))
        if not cfg.condition_ids:
            if tok is None:
                raise ValueError("reward 'mps': a tokenizer is needed to tokenize the condition string (tokenizer=)")
            import dataclasses

            cfg = dataclasses.replace(cfg, condition_ids=condition_ids(tok, condition, cfg.clip.text_config.max_position_embeddings))
        entries, buffers = conv.mps_table(cfg)
        model = conv.load_params(lambda: MPSModel(cfg, rngs=_rngs()), entries, buffers, tensors, what=what)
    return Reward(name, model, tok)


def _rngs():
    from flax import nnx

    return nnx.Rngs(0)
