"""Access samplers: one module per kernel signal behind the interface in tiermem.samplers.base."""
