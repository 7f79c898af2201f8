"""Device selection for the PyTorch backend: Ascend NPU (torch_npu), CUDA or CPU.

Mirrors the official ContentV ``demo.py`` switch: ``USE_ASCEND_NPU=1`` asks for the NPU. Unlike the
official demo, ``torch_npu`` is imported lazily (only when the NPU is asked for or auto-detected), so this
package imports and runs on CPU without ``torch_npu`` or CANN installed. Nothing here reads or sets
``TORCH_DEVICE_BACKEND_AUTOLOAD``.

``USE_ASCEND_NPU``:
  * ``1`` / ``true`` / ``yes``: the NPU is required; :func:`select_device` raises
    :class:`NPUUnavailableError` when it cannot be used.
  * ``0`` / ``false`` / ``no``: never the NPU (CUDA if available, else CPU).
  * unset or empty: auto-detection (NPU if ``torch_npu`` imports and sees a device, else CUDA, else CPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import torch

ENV_VAR = "USE_ASCEND_NPU"
TORCH_NPU_REQUIREMENT = "torch-npu==2.13.0"  # pinned to the installed torch (2.13.0); the `npu` extra
# Environment variables exported by CANN's `set_env.sh`, and its default install location.
CANN_ENV_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
CANN_DEFAULT_HOME = Path("/usr/local/Ascend/ascend-toolkit/latest")
CANN_HINT = (
    "install the Ascend CANN toolkit and run `source /usr/local/Ascend/ascend-toolkit/set_env.sh` "
    f"(which exports {' / '.join(CANN_ENV_VARS)})"
)
TORCH_NPU_HINT = f"pip install 'contentv-jax[npu]' (which pins {TORCH_NPU_REQUIREMENT}, matching torch 2.13.0)"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class NPUUnavailableError(RuntimeError):
    """The Ascend NPU was asked for but cannot be used; the message names what is missing."""


def npu_requested(env: Mapping[str, str] | None = None) -> bool | None:
    """Reads ``USE_ASCEND_NPU``: True (asked for), False (refused) or None (unset: auto-detect).

    Raises:
      ValueError: when the variable holds something other than 1/0/true/false/yes/no/on/off.
    """
    env = os.environ if env is None else env
    value = env.get(ENV_VAR, "").strip().lower()
    if value == "":
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV_VAR}={env[ENV_VAR]!r}: expected 1 or 0 (or true/false, yes/no, on/off)")


def cann_home(env: Mapping[str, str] | None = None) -> Path | None:
    """The CANN toolkit directory, from ``ASCEND_TOOLKIT_HOME`` / ``ASCEND_HOME_PATH`` or the default
    ``/usr/local/Ascend/ascend-toolkit/latest``; None when none of them is an existing directory."""
    env = os.environ if env is None else env
    for name in CANN_ENV_VARS:
        value = env.get(name)
        if value and Path(value).is_dir():
            return Path(value)
    return CANN_DEFAULT_HOME if CANN_DEFAULT_HOME.is_dir() else None


def _torch_npu_installed() -> bool:
    if "torch_npu" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        return False


def require_torch_npu(env: Mapping[str, str] | None = None) -> ModuleType:
    """Imports and returns ``torch_npu``.

    A module already in ``sys.modules["torch_npu"]`` is returned as is (this is also how tests inject a
    stand-in). Otherwise the package is located first, then imported.

    Raises:
      NPUUnavailableError: one error naming exactly what is missing: the ``torch_npu`` package, the CANN
        toolkit, or both; or, when both are present, why ``import torch_npu`` failed.
    """
    module = sys.modules.get("torch_npu")
    if module is not None:
        return module
    have_torch_npu = _torch_npu_installed()
    have_cann = cann_home(env) is not None
    if not have_torch_npu:
        missing = [f"the torch_npu package is not installed ({TORCH_NPU_HINT})"]
        if not have_cann:
            missing.append(f"the Ascend CANN toolkit was not found ({CANN_HINT})")
        raise NPUUnavailableError("Ascend NPU requested but " + "; and ".join(missing) + ".")
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, OSError) as err:
        if not have_cann:
            raise NPUUnavailableError(
                f"Ascend NPU requested but the Ascend CANN toolkit was not found ({CANN_HINT}); "
                f"torch_npu is installed but `import torch_npu` failed: {err}"
            ) from err
        raise NPUUnavailableError(
            f"Ascend NPU requested; torch_npu and CANN ({cann_home(env)}) are installed but "
            f"`import torch_npu` failed: {err}. Check that torch_npu matches torch {torch.__version__} "
            f"({TORCH_NPU_REQUIREMENT}) and that the CANN version supports it."
        ) from err


def npu_available(env: Mapping[str, str] | None = None) -> bool:
    """True when ``torch_npu`` imports and reports at least one NPU. Never raises; never imports
    ``torch_npu`` when it is not installed."""
    if not _torch_npu_installed():
        return False
    try:
        torch_npu = require_torch_npu(env)
        return bool(torch_npu.npu.is_available())
    except Exception:  # noqa: BLE001  (auto-detection: any failure means "no NPU")
        return False


def _npu_device(index: int | None, env: Mapping[str, str] | None) -> torch.device:
    torch_npu = require_torch_npu(env)
    if not torch_npu.npu.is_available():
        raise NPUUnavailableError(
            "Ascend NPU requested; torch_npu and CANN are installed but torch_npu.npu.is_available() is False "
            "(no NPU visible: check the driver with `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)."
        )
    # As the official demo: keep tensors in the ND format (no private NPU formats).
    torch_npu.npu.config.allow_internal_format = False
    return torch.device("npu", 0 if index is None else index)


def select_device(device: str | torch.device | None = None, env: Mapping[str, str] | None = None) -> torch.device:
    """The device to run the backend on.

    Args:
      device: an explicit device (``"npu"``, ``"npu:1"``, ``"cuda"``, ``"cpu"``, ...), or None to follow
        ``USE_ASCEND_NPU`` (see the module docstring) and auto-detection.
      env: the environment to read (default ``os.environ``).
    Returns:
      a ``torch.device``. Choosing the NPU imports ``torch_npu`` and sets
      ``torch.npu.config.allow_internal_format = False`` as the official demo does.
    Raises:
      NPUUnavailableError: the NPU was asked for (``device="npu"`` or ``USE_ASCEND_NPU=1``) but
        torch_npu, CANN or a visible NPU is missing; the message says which.
      ValueError: a malformed ``USE_ASCEND_NPU`` or ``device``.
    """
    if device is not None:
        # torch only knows the "npu" device type once torch_npu has registered it: parse it ourselves.
        text = str(device)
        match = re.fullmatch(r"npu(?::(\d+))?", text)
        if match:
            return _npu_device(None if match.group(1) is None else int(match.group(1)), env)
        try:
            return torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device {device!r} is not a torch device string: {err}") from err
    wanted = npu_requested(env)
    if wanted is True or (wanted is None and npu_available(env)):
        return _npu_device(None, env)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_npu_tensor(x: torch.Tensor) -> bool:
    """True for a tensor that lives on an Ascend NPU."""
    return x.device.type == "npu"
