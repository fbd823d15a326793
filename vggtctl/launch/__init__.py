"""`vggtctl train`: profiles, topology, torchrun commands, preflight, probe and the child runner.

Kept import-light (no torch here): `python -m vggtctl.launch.netif` runs inside launch scripts.
"""
