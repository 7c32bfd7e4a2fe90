"""The version of latent-lab (one place; runs record it)."""
__version__ = "0.1.0"
