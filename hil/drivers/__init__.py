"""Rig part drivers: console, SWD, ESP flasher, bench supply, RF attenuator, console hooks."""

import serial

# Simulated boards plug in where real ones do: pyserial resolves hilsim:// URLs through
# hil/sim/protocol_hilsim.py (loaded only when such a URL is opened).
if "hil.sim" not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append("hil.sim")
