"""The version of latent-lab (one place; runs record it with the versions of what it runs on)."""
from functools import lru_cache

__version__ = "0.1.0"


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:  # copied by callers: the cached dict stays as it is
    """latent-lab's version and its numerical dependencies' (a run's provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"latent-lab": __version__}
    for name in ("torch", "diffusers", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
