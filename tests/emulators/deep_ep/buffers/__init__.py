"""Emulated ``deep_ep.buffers`` (CPU TEST DOUBLE): one module per buffer class, as DeepEP lays them out."""
