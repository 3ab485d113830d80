"""hil: prove that a firmware build updates itself over the air, on real and simulated rigs."""

__version__ = "0.1.0"
