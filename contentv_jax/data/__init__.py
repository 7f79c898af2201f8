"""The data path, from video files to training batches.

``video`` (PyAV reading / writing, clip frame indices, resizing), ``buckets`` (aspect-ratio x duration
buckets), ``synthetic`` (the moving-shapes dataset), ``encode`` (videos + captions -> ArrayRecord latent
records: the encode stage), ``loader`` (the grain pipeline of bucketed training batches) and
``prepare`` (``prepare(cfg)``: a training config to an encoded cache; the trainer and
``python -m contentv_jax.encode --config`` both call it). Imports models, text, sharding and
``contentv_jax.checkpoints`` (to load a VAE); never ``train`` or the sampling pipeline.
"""
