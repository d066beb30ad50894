// diffae::linear_gelu and diffae::linear_dgelu on the CPU, the composite reference that
// linear_gelu_cuda.cu fuses into cuBLASLt epilogues (same contract, checked by the same tests), and
// their Meta kernels: output shapes only, which is what torch.compile traces with.
#include <torch/extension.h>

#include "linear_gelu.h"

namespace {

std::tuple<at::Tensor, at::Tensor> linear_gelu_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  diffae::check_linear_gelu_shapes(x, w, b);
  auto pre = at::addmm(b, x, w.t());
  return {at::gelu(pre, "tanh"), pre};
}

at::Tensor linear_dgelu_cpu(const at::Tensor& g, const at::Tensor& w, const at::Tensor& pre) {
  diffae::check_linear_dgelu_shapes(g, w, pre);
  // in fp32, rounded once, as the DGELU epilogue does
  return at::gelu_backward(at::mm(g, w).to(at::kFloat), pre.to(at::kFloat), "tanh").to(g.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor&) {
  auto h = at::empty_symint({x.sym_size(0), w.sym_size(0)}, x.options());
  return {h, at::empty_like(h)};
}

at::Tensor linear_dgelu_meta(const at::Tensor& g, const at::Tensor& w, const at::Tensor&) {
  return at::empty_symint({g.sym_size(0), w.sym_size(1)}, g.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(diffae, CPU, m) {
  m.impl("linear_gelu", &linear_gelu_cpu);
  m.impl("linear_dgelu", &linear_dgelu_cpu);
}

TORCH_LIBRARY_IMPL(diffae, Meta, m) {
  m.impl("linear_gelu", &linear_gelu_meta);
  m.impl("linear_dgelu", &linear_dgelu_meta);
}
