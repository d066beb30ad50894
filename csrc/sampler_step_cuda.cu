// CUDA kernel of diffae::sampler_step: one elementwise launch per step on the current stream
// (so CUDA graphs capture it), 4-wide vector loads/stores when every pointer allows them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "sampler_step.h"

namespace {

using diffae::SamplerStepParams;

constexpr int kVec = 4;
constexpr int kThreads = 256;

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename OutT>
__global__ void __launch_bounds__(kThreads)
sampler_step_kernel(SamplerStepParams p, const float* __restrict__ x, const OutT* __restrict__ out,
                    const float* __restrict__ prev, const float* __restrict__ noise, float* __restrict__ x_next,
                    float* __restrict__ x0, int64_t n, int64_t n_vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // n_vec chunks of kVec elements (0 when some pointer is misaligned), then the scalar tail.
  for (int64_t v = tid; v < n_vec; v += stride) {
    const int64_t i = v * kVec;
    const auto xv = *reinterpret_cast<const Vec<float>*>(x + i);
    const auto ov = *reinterpret_cast<const Vec<OutT>*>(out + i);
    Vec<float> pv{}, nv{}, xn, x0v;
    if (p.has_prev) pv = *reinterpret_cast<const Vec<float>*>(prev + i);
    if (p.has_noise) nv = *reinterpret_cast<const Vec<float>*>(noise + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      xn.v[k] = diffae::sampler_step_elem</*kReciprocal=*/true>(p, xv.v[k], static_cast<float>(ov.v[k]), pv.v[k],
                                                                nv.v[k], &x0v.v[k]);
    }
    *reinterpret_cast<Vec<float>*>(x_next + i) = xn;
    *reinterpret_cast<Vec<float>*>(x0 + i) = x0v;
  }
  for (int64_t i = n_vec * kVec + tid; i < n; i += stride) {
    const float pv = p.has_prev ? prev[i] : 0.0f;
    const float nv = p.has_noise ? noise[i] : 0.0f;
    x_next[i] = diffae::sampler_step_elem<true>(p, x[i], static_cast<float>(out[i]), pv, nv, &x0[i]);
  }
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x, const at::Tensor& out,
                                                     const c10::optional<at::Tensor>& prev,
                                                     const c10::optional<at::Tensor>& noise, double alpha,
                                                     double sigma, int64_t pred, double clip,
                                                     at::ArrayRef<double> coeffs) {
  const std::vector<double> c(coeffs.begin(), coeffs.end());
  diffae::check_sampler_step_inputs(x, out, prev, noise, alpha, sigma, pred, clip, c, /*check_layout=*/true);
  TORCH_CHECK(x.is_cuda(), "sampler_step: the CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto x_next = at::empty(x.sizes(), x.options());
  auto x0 = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return {x_next, x0};
  const auto p = diffae::make_sampler_step_params(alpha, sigma, pred, clip, c, prev.has_value(), noise.has_value());
  const float* prev_ptr = prev.has_value() ? prev->data_ptr<float>() : nullptr;
  const float* noise_ptr = noise.has_value() ? noise->data_ptr<float>() : nullptr;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "sampler_step_cuda", [&] {
    const float* xp = x.data_ptr<float>();
    const scalar_t* op = out.data_ptr<scalar_t>();
    float* xnp = x_next.data_ptr<float>();
    float* x0p = x0.data_ptr<float>();
    const bool vec_ok = aligned(xp, sizeof(Vec<float>)) && aligned(op, sizeof(Vec<scalar_t>)) &&
                        (!prev_ptr || aligned(prev_ptr, sizeof(Vec<float>))) &&
                        (!noise_ptr || aligned(noise_ptr, sizeof(Vec<float>))) && aligned(xnp, sizeof(Vec<float>)) &&
                        aligned(x0p, sizeof(Vec<float>));
    const int64_t n_vec = vec_ok ? n / kVec : 0;
    const int64_t work = n_vec + (n - n_vec * kVec);  // per-thread items: chunks plus tail elements
    // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
    const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 16);
    sampler_step_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p, xp, op, prev_ptr, noise_ptr, xnp, x0p, n, n_vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_next, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffae, CUDA, m) { m.impl("sampler_step", &sampler_step_cuda); }
