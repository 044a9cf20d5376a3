"""DDPM-BS in JAX/Flax: diffusion models that train faster by sampling timesteps where they matter."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ddpm_bs")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
