"""Sweep files: ``python -m launch.sweep --sweep=configs/sweeps/NAME.py[:smoke]``."""
