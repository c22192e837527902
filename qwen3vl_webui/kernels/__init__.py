"""Kernels: decode attention, the GEMV, int8 weight-only, fused projections, vision attention. A leaf: it imports
nothing of the app's but kernels (tests/test_layers.py)."""
