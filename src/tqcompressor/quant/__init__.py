"""Quantization: int8/int4 formats (pure math), the quantized modules, and ``quantize_``."""
