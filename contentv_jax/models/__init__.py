"""Models: the 3D MM-DiT and the Wan2.1 VAE (channels-last, Flax NNX)."""
