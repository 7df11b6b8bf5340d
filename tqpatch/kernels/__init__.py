"""Decode-attention kernels: the plain-torch reference and the CUDA (Triton) fast path."""
