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
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffae C++/CUDA ops, registered under torch.ops.diffae";
}
