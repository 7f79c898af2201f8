"""``python -m contentv_jax.encode``: the command-line entry point of the encode stage (``__main__.py``).

The stage itself is ``contentv_jax.data.encode`` (and ``contentv_jax.data.prepare`` for ``--config``).
"""
