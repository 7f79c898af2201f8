"""Import ``open_clip`` (PyPI ``open_clip_torch``) beside this CPU torch, without torchvision.

open_clip imports torchvision at module level only for its image transforms (``open_clip/transform.py``)
and ``FrozenBatchNorm2d`` (``open_clip/utils.py``, ResNet towers); the ViT CLIP model code does not use
it. The PyPI torchvision wheels are CUDA builds that fail to import beside the ``+cpu`` torch (and
installing one makes ``transformers`` fail to import ``CLIPModel``), so when torchvision is not
importable, placeholder modules stand in for it during ``import open_clip`` and are removed right
after; calling anything from them raises. ``transformers`` is imported first, so that its torchvision
probe still sees none.
"""

from __future__ import annotations

import importlib
import sys
import types

_TV = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops", "torchvision.ops.misc")


class _Absent:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return _Absent(f"{self._name}.{attr}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._name}: torchvision is not installed (stand-in used to import open_clip)")

    def __mro_entries__(self, bases):
        return (object,)


class _StandIn(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self.__name__}.{attr}")


def import_open_clip():
    """``open_clip``, imported with torchvision stand-ins if the real torchvision cannot be imported."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    import transformers.modeling_utils  # noqa: F401  (fix transformers' torchvision probe first)

    try:
        importlib.import_module("torchvision")
        return importlib.import_module("open_clip")
    except Exception:
        for n in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[n]
    for n in _TV:
        m = _StandIn(n)
        m.__path__ = []
        sys.modules[n] = m
    try:
        return importlib.import_module("open_clip")
    finally:
        for n in _TV:
            sys.modules.pop(n, None)
