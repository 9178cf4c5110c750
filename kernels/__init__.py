"""Fused linear -> log-prob kernels."""
