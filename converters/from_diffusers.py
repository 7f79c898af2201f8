"""Convert a diffusers-format checkpoint directory to ours (Orbax + config.json).

Usage: ``python -m converters.from_diffusers --component transformer|vae --src DIR --dst DIR``.
Dispatches to ``converters.convert.from_diffusers(component, src, dst)``. Exits non-zero with the error message
(every offending tensor with expected vs found shape) and writes nothing on bad input.
"""

import sys

from converters._cli import main

if __name__ == "__main__":
    sys.exit(main("from_diffusers"))
