"""Emulated ``nccl._extensions`` (nccl-extensions 0.1.0 internals): version and the generated bindings."""
