// CPU kernel of diffae::sampler_step (one parallel elementwise pass), its Meta kernel for
// torch.compile / fake tensors, and the Autograd entry that says the op has no backward.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "sampler_step.h"

namespace {

using diffae::SamplerStepParams;

template <typename OutT>
void sampler_step_cpu_loop(const SamplerStepParams& p, const float* x, const OutT* out, const float* prev,
                           const float* noise, float* x_next, float* x0, int64_t n) {
  // ~2k elements per task: big enough to amortise the task, small enough to spread a 32x32 batch.
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float pv = p.has_prev ? prev[i] : 0.0f;
      const float nv = p.has_noise ? noise[i] : 0.0f;
      x_next[i] = diffae::sampler_step_elem</*kReciprocal=*/false>(p, x[i], static_cast<float>(out[i]), pv, nv,
                                                                   &x0[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x, const at::Tensor& out,
                                                    const c10::optional<at::Tensor>& prev,
                                                    const c10::optional<at::Tensor>& noise, double alpha,
                                                    double sigma, int64_t pred, double clip,
                                                    at::ArrayRef<double> coeffs) {
  const std::vector<double> c(coeffs.begin(), coeffs.end());
  diffae::check_sampler_step_inputs(x, out, prev, noise, alpha, sigma, pred, clip, c, /*check_layout=*/true);
  TORCH_CHECK(x.device().is_cpu(), "sampler_step: the CPU kernel got a tensor on ", x.device());
  auto x_next = at::empty(x.sizes(), x.options());
  auto x0 = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return {x_next, x0};
  const auto p = diffae::make_sampler_step_params(alpha, sigma, pred, clip, c, prev.has_value(), noise.has_value());
  const float* prev_ptr = prev.has_value() ? prev->data_ptr<float>() : nullptr;
  const float* noise_ptr = noise.has_value() ? noise->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "sampler_step_cpu", [&] {
    sampler_step_cpu_loop<scalar_t>(p, x.data_ptr<float>(), out.data_ptr<scalar_t>(), prev_ptr, noise_ptr,
                                    x_next.data_ptr<float>(), x0.data_ptr<float>(), n);
  });
  return {x_next, x0};
}

// Shapes and dtypes only: lets FakeTensor/torch.compile trace the op (dynamic shapes included).
std::tuple<at::Tensor, at::Tensor> sampler_step_meta(const at::Tensor& x, const at::Tensor& out,
                                                     const c10::optional<at::Tensor>& prev,
                                                     const c10::optional<at::Tensor>& noise, double alpha,
                                                     double sigma, int64_t pred, double clip,
                                                     at::ArrayRef<double> coeffs) {
  const std::vector<double> c(coeffs.begin(), coeffs.end());
  diffae::check_sampler_step_inputs(x, out, prev, noise, alpha, sigma, pred, clip, c, /*check_layout=*/false);
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(x.sym_sizes(), x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffae, CPU, m) { m.impl("sampler_step", &sampler_step_cpu); }
TORCH_LIBRARY_IMPL(diffae, Meta, m) { m.impl("sampler_step", &sampler_step_meta); }
// Sampling is inference-only: a backward through the step raises a clear "not implemented" error.
TORCH_LIBRARY_IMPL(diffae, Autograd, m) {
  m.impl("sampler_step", torch::autograd::autogradNotImplementedFallback());
}
