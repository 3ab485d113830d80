"""Rig descriptions (YAML -> typed, frozen, validated objects), rig parts, rig leasing."""
