"""Triton kernels, one module per kernel family (GPU; on CPU only under TRITON_INTERPRET=1)."""
