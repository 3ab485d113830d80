"""Rig part drivers: console, SWD, ESP flasher, bench supply, RF attenuator, console hooks."""
