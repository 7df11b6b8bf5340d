"""Decode-attention kernels: the plain-torch reference (``reference``), the CUDA fast paths
(``triton_decode``; ``gluon_decode`` for the 4-bit history at larger batches) and the decode
step's small float32 row products (``rows``)."""
