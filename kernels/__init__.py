"""Triton kernels, installed as diffae.kernels.  Importing this package requires triton."""
import triton  # noqa: F401  (an ImportError here tells diffae.ops the Triton backend is missing)
