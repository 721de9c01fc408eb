"""Pallas kernels for the dropless path (grouped matmul, fused dispatch/combine).

The kernels plug into moejax's `sorted` engine as grouped-matmul backends.
"""
