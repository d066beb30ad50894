"""diffae: diffusion autoencoders on Triton and C++/CUDA kernels."""
__version__ = "0.1.0"
