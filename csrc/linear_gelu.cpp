// diffae::linear_gelu and diffae::linear_dgelu on the CPU, the composite reference that
// linear_gelu_cuda.cu fuses into cuBLASLt epilogues (same contract, checked by the same tests), and
// their Meta kernels: output shapes only, which is what torch.compile traces with.
#include <torch/extension.h>

namespace {

std::tuple<at::Tensor, at::Tensor> linear_gelu_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && b.dim() == 1 && w.size(1) == x.size(1) && b.size(0) == w.size(0),
              "linear_gelu: expected x (M, K), weight (N, K), bias (N), got ", x.sizes(), ", ", w.sizes(), ", ",
              b.sizes());
  auto pre = at::addmm(b, x, w.t());
  return {at::gelu(pre, "tanh"), pre};
}

std::tuple<at::Tensor, at::Tensor> linear_dgelu_cpu(const at::Tensor& g, const at::Tensor& w, const at::Tensor& pre) {
  TORCH_CHECK(g.dim() == 2 && w.dim() == 2 && pre.dim() == 2 && w.size(0) == g.size(1) && pre.size(0) == g.size(0) &&
                  pre.size(1) == w.size(1),
              "linear_dgelu: expected grad (M, C), weight (C, N), pre (M, N), got ", g.sizes(), ", ", w.sizes(), ", ",
              pre.sizes());
  // in fp32, rounded once at the end, as the fused epilogue does
  auto dpre = at::gelu_backward(at::mm(g, w).to(at::kFloat), pre.to(at::kFloat), "tanh");
  return {dpre.to(g.scalar_type()), dpre.sum(0).to(g.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor&) {
  auto h = at::empty_symint({x.sym_size(0), w.sym_size(0)}, x.options());
  return {h, at::empty_like(h)};
}

std::tuple<at::Tensor, at::Tensor> linear_dgelu_meta(const at::Tensor& g, const at::Tensor& w, const at::Tensor&) {
  return {at::empty_symint({g.sym_size(0), w.sym_size(1)}, g.options()), at::empty_symint({w.sym_size(1)}, g.options())};
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
