"""joinproxyd: a BRSKI join proxy for Linux border routers."""

__version__ = "0.1.0"
