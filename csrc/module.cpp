// diffae._C: op schemas (TORCH_LIBRARY) and the Python module that loading registers them with.
// CPU kernels live in *_cpu.cpp, CUDA kernels in *.cu; each registers itself with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>

TORCH_LIBRARY(diffae, m) {
  // x + alpha * y; the first, trivial op that proves a build loads and dispatches.
  m.def("scale_add(Tensor x, Tensor y, float alpha) -> Tensor");
  // One fused sampler update (diffae/ops/sampler_step.py is the spec): pred 0 eps, 1 v, 2 x0;
  // coeffs (cx, cd, ce, cp, cn); returns (x_next, x0), both float32.
  m.def("sampler_step(Tensor x, Tensor out, Tensor? prev, Tensor? noise, float alpha, float sigma, int pred, "
        "float clip, float[] coeffs) -> (Tensor, Tensor)");
  // An MLP's first GEMM with its tanh GELU: x (M, K), weight (N, K), bias (N) -> (gelu(pre), pre),
  // pre = x weight^T + bias, kept for the backward.
  m.def("linear_gelu(Tensor x, Tensor weight, Tensor bias) -> (Tensor, Tensor)");
  // The backward through that GELU from the second GEMM's output gradient: grad (M, C), weight (C, N),
  // pre (M, N) -> dpre = (grad weight) * gelu'(pre).
  m.def("linear_dgelu(Tensor grad, Tensor weight, Tensor pre) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffae C++/CUDA ops, registered under torch.ops.diffae";
}
