"""Simulated boards and instruments behind the real drivers; for now the device-side OTA agent."""
