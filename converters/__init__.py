"""Checkpoint converters between diffusers-format safetensors and contentv-jax parameters."""
