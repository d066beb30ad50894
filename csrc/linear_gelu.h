// The shapes diffae::linear_gelu and diffae::linear_dgelu accept, checked alike by their CPU
// (linear_gelu.cpp) and CUDA (linear_gelu_cuda.cu) kernels.
#pragma once
#include <torch/extension.h>

namespace diffae {

// x (M, K), weight (N, K), bias (N)
inline void check_linear_gelu_shapes(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && b.dim() == 1 && w.size(1) == x.size(1) && b.size(0) == w.size(0),
              "linear_gelu: expected x (M, K), weight (N, K), bias (N), got ", x.sizes(), ", ", w.sizes(), ", ",
              b.sizes());
}

// grad (M, C), weight (C, N), pre (M, N)
inline void check_linear_dgelu_shapes(const at::Tensor& g, const at::Tensor& w, const at::Tensor& pre) {
  TORCH_CHECK(g.dim() == 2 && w.dim() == 2 && pre.dim() == 2 && w.size(0) == g.size(1) && pre.size(0) == g.size(0) &&
                  pre.size(1) == w.size(1),
              "linear_dgelu: expected grad (M, C), weight (C, N), pre (M, N), got ", g.sizes(), ", ", w.sizes(), ", ",
              pre.sizes());
}

}  // namespace diffae
