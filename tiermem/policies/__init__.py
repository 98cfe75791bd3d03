"""Tiering policies: one module per policy behind the interface in tiermem.policies.base."""
