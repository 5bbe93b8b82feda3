"""The relay mode registry: a start without a mode cleans only the modes that leave kernel
state, so that list must name every mode that overrides clean_leftovers."""

from joinproxyd.relays import RelayMode, mode_class, mode_names, modes_with_kernel_state


def test_every_mode_that_cleans_leftovers_is_listed() -> None:
    cleaning = {name for name in mode_names()
                if mode_class(name).clean_leftovers.__func__
                is not RelayMode.clean_leftovers.__func__}  # type: ignore[attr-defined]
    assert cleaning == set(modes_with_kernel_state())
    assert cleaning  # nat66 and ipip do leave kernel state
