"""Encoders and the trainers that learn them. Imports `vdsh.data` and `vdsh.index` (codes, metrics) only."""
