"""joinproxyd: a BRSKI join proxy for Linux border routers."""

from brski import __version__  # the project's one version

__all__ = ["__version__"]
