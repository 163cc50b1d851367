"""Measurement: latency, size, FLOPs/params, fidelity."""
