"""The BRSKI-family protocol library: every wire format of the project, as sans-IO code.

Every format joinproxyd, the registrar and the pledge simulator speak, pure (no sockets, no
hidden clock, no randomness that is not passed in). Command-line front ends live in
``brski.cli`` and are the only modules here that touch files or the clock."""

# The one version of every program of the project (pyproject.toml's; a test keeps them equal).
__version__ = "0.1.0"
