"""Shared by every stage: errors, the configs and their options, output dirs, atomic writes, the reuse rule,
the runtime helpers (devices, loading, encoding), torchrun, the encoder-family table, bundled backbones, GLUE tasks
and metrics. It imports no other package of pipeline/ (only itself), so every stage can build on it."""
