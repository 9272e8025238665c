"""Triton kernels of clp_fast; their pure-PyTorch twins live in :mod:`clp_fast.reference`.

Importing this package does not import Triton: each kernel family is its own module
(``clp_fast.kernels.fused_heads``, ``clp_fast.kernels.kv_commit``), imported on first use by
:mod:`clp_fast.backend`.
"""
