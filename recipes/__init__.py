"""Bundled tqpatch recipes (``<model>.safetensors``), shipped as package data."""
