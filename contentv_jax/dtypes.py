"""The one table of dtype names the configs, loaders and CLIs accept.

``DTYPES`` maps a name (``float32``, ``bfloat16``, ``float16``) to its ``jax.numpy`` dtype. Everywhere
in this package ``dtype`` is the compute dtype and ``param_dtype`` the dtype parameters are stored in.
"""

from __future__ import annotations

import jax.numpy as jnp

from contentv_jax.config import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NAMES = tuple(DTYPES)


def to_dtype(name, key: str = "dtype"):
    """The ``jax.numpy`` dtype named ``name`` (a dtype passes through unchanged).

    Raises:
      ConfigError: ``name`` is not one of :data:`NAMES` (the message names ``key``).
    """
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in DTYPES:
        raise ConfigError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
