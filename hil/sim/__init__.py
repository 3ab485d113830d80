"""Simulated rigs behind the real drivers: boards (ESP32, nRF52832, GD32F103), their firmware,
their instruments, and the bench that brings one rig's parts up (``hil.sim.bench``)."""
