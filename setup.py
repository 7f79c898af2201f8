"""Build script. Everything is declared in pyproject.toml except what TOML cannot say with package discovery:
the top-level ``configs/`` directory (where the configs live in the repository) ships inside the wheel as
the package data of ``contentv_jax.configs``, so an installed package finds its configs from any directory."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["contentv_jax*", "converters*", "torch_npu_backend*"]) + ["contentv_jax.configs"],
    package_dir={"contentv_jax.configs": "configs"},
    package_data={"contentv_jax.configs": ["*/*.yaml"]},
)
