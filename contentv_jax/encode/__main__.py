"""``python -m contentv_jax.encode``: the encode stage alone (videos + captions -> latent records).

Two forms:

- ``python -m contentv_jax.encode --config configs/train/X.yaml [key=value ...]``: exactly what training
  with that config would encode (``contentv_jax.data.prepare.prepare``, the function the trainer calls:
  the same text encoders, VAE, data and cache directory);
- ``python -m contentv_jax.encode --data DIR --out DIR --vae PATH --text-encoders PATH ...``: explicit
  paths and shapes (``contentv_jax.data.encode.main`` lists the flags).

The stage itself lives in ``contentv_jax.data`` (``data/encode.py``, ``data/prepare.py``); this package
holds only its command-line entry point.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None):
    """Dispatch on ``--config``; returns the encode stage's stats (see the two forms above).

    Raises:
      SystemExit(2): bad arguments or a config mistake (one line naming the key).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        from contentv_jax.data.encode import main as encode_main

        return encode_main(argv)
    from contentv_jax.config import ConfigError
    from contentv_jax.data.prepare import prepare
    from contentv_jax.train.config import load_train_config

    p = argparse.ArgumentParser(prog="python -m contentv_jax.encode", description="Encode what a training config trains on.")
    p.add_argument("--config", required=True, help="a training config (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for python -m contentv_jax.train")
    a = p.parse_args(argv)
    try:
        cfg = load_train_config(a.config, a.overrides)
        return prepare(cfg).stats
    except (ConfigError, FileNotFoundError) as e:
        p.error(str(e))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
