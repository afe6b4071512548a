"""Emulated ``nccl._extensions.bindings`` (only ``nccl_ep``)."""
