"""The BRSKI-family protocol library: every wire format joinproxyd, the registrar and the
pledge simulator speak, as pure sans-IO code (no sockets, no hidden clock, no randomness that
is not passed in). Command-line front ends live in ``brski.cli`` and are the only modules here
that touch files or the clock."""
