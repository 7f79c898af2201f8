"""A thin PyTorch backend that mirrors contentv-jax's kernels, to run our checkpoints on Ascend NPUs.

* :mod:`torch_npu_backend.device`: device selection (``USE_ASCEND_NPU=1`` as the official ContentV demo,
  or auto-detection); ``torch_npu`` is imported lazily, never at module import, and a missing torch_npu or
  CANN raises one :class:`NPUUnavailableError` naming what is missing.
* :mod:`torch_npu_backend.kernels`: joint attention (``npu_fusion_attention``, layout BNSD, scale
  1/sqrt(head_dim) on an NPU; ``scaled_dot_product_attention`` elsewhere) and RMSNorm (``npu_rms_norm`` /
  plain PyTorch).
* :mod:`torch_npu_backend.processor`: :class:`ContentVJointAttnProcessor`, installed on diffusers' SD3
  joint attention.
* :mod:`torch_npu_backend.transformer`: the ContentV transformer in PyTorch (diffusers SD3 + 3D patch
  embed / unpatchify), loading what ``python -m converters.to_diffusers --component transformer`` writes.
* :func:`load_contentv_transformer`: load that checkpoint, install the processor, move it to the device.

The package imports and runs on CPU without torch_npu; nothing here reads or sets
``TORCH_DEVICE_BACKEND_AUTOLOAD``. Public names are imported lazily (diffusers is only loaded when the
processor or the model is used).

On an Ascend host::

    pip install 'contentv-jax[npu]'                      # torch-npu==2.13.0, matching torch 2.13.0
    source /usr/local/Ascend/ascend-toolkit/set_env.sh   # CANN
    python -m converters.to_diffusers --component transformer --src CKPT --dst EXPORT
    USE_ASCEND_NPU=1 python -c "import torch, torch_npu_backend as b; \\
        m = b.load_contentv_transformer('EXPORT', dtype=torch.bfloat16)"
"""

from __future__ import annotations

import importlib

_LAZY = {
    "NPUUnavailableError": "device",
    "select_device": "device",
    "require_torch_npu": "device",
    "npu_available": "device",
    "dot_product_attention": "kernels",
    "joint_attention": "kernels",
    "rms_norm": "kernels",
    "ContentVJointAttnProcessor": "processor",
    "install_attention_processor": "processor",
}

__all__ = sorted([*_LAZY, "load_contentv_transformer"])


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_contentv_transformer(path, device=None, dtype=None, backend: str | None = None):
    """Loads a ContentV transformer checkpoint in diffusers format for inference on ``device``.

    Args:
      path: a diffusers-format directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
        shards), e.g. the output of ``python -m converters.to_diffusers --component transformer``, or its
        parent holding a ``transformer/`` subfolder.
      device: ``"npu"``, ``"npu:1"``, ``"cuda"``, ``"cpu"``, a ``torch.device``, or None for
        :func:`torch_npu_backend.device.select_device`'s choice (``USE_ASCEND_NPU`` / auto-detection).
      dtype: parameter dtype (default ``torch.float32``; the official pipeline serves in bfloat16).
      backend: the kernel backend of the installed :class:`ContentVJointAttnProcessor` (None: by device).
    Returns:
      the model in eval mode on ``device`` with a :class:`ContentVJointAttnProcessor` on every attention
      layer. Call it as diffusers' SD3 model: ``model(hidden_states (B, C, T, H, W),
      encoder_hidden_states (B, S_txt, 4096), pooled_projections (B, 2048), timestep (B,) = sigma * 1000)``.
    Raises:
      FileNotFoundError: ``path`` holds no ``config.json`` (nor ``transformer/config.json``).
      NPUUnavailableError: the NPU was asked for and torch_npu / CANN / a device is missing.
    """
    from pathlib import Path

    import torch

    from torch_npu_backend.device import select_device
    from torch_npu_backend.processor import install_attention_processor
    from torch_npu_backend.transformer import SD3Transformer3DModel

    path = Path(path)
    if not (path / "config.json").is_file():
        if (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        else:
            raise FileNotFoundError(f"no diffusers transformer checkpoint (config.json) at {path} or {path / 'transformer'}")
    target = select_device(device)
    model = SD3Transformer3DModel.from_pretrained(str(path), torch_dtype=dtype or torch.float32)
    install_attention_processor(model, backend=backend)
    return model.to(target).eval()
