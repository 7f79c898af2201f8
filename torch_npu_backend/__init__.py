"""A thin PyTorch backend that mirrors contentv-jax kernels, for Ascend (torch_npu) deployment.

torch_npu is imported lazily, never at module import time.
"""
