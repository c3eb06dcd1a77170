"""Pallas kernels for MSA routing and sparse attention (each beside a pure-JAX reference)."""
