// The fused sampler update shared by the CPU and CUDA kernels; the spec is
// diffae/ops/sampler_step.py:sampler_step_reference.
//
// The arithmetic follows the reference op by op, each product/sum rounded to fp32 on its own,
// so that the kernels agree with eager PyTorch to the last bit where they can: on the device
// the *_rn intrinsics stop nvcc from contracting a*b+c into an FMA (which --use_fast_math allows),
// and scalar divisions become multiplications by an fp32 reciprocal on CUDA (what PyTorch's CUDA
// `tensor / python_float` does) but stay true divisions on the CPU (what PyTorch's CPU kernel does).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <vector>

#if defined(__CUDACC__)
#define DIFFAE_HD __host__ __device__ __forceinline__
#else
#define DIFFAE_HD inline
#endif

namespace diffae {

enum SamplerPred : int { kPredEps = 0, kPredV = 1, kPredX0 = 2 };

// Scalars of one step, converted to fp32 once on the host (PyTorch casts a Python float to the
// fp32 opmath type the same way).
struct SamplerStepParams {
  float alpha, sigma;
  float inv_alpha, inv_sigma, inv_norm;  // 1/alpha, 1/sigma, 1/(alpha^2 + sigma^2): fp32 reciprocals
  float norm;                            // alpha^2 + sigma^2 (in double, then fp32, like the reference)
  float clip;
  float cx, cd, ce, cp, cn;
  int pred;
  bool has_clip, has_sigma, has_prev, has_noise;
};

inline SamplerStepParams make_sampler_step_params(double alpha, double sigma, int64_t pred, double clip,
                                                  const std::vector<double>& c, bool has_prev, bool has_noise) {
  SamplerStepParams p;
  p.alpha = static_cast<float>(alpha);
  p.sigma = static_cast<float>(sigma);
  p.norm = static_cast<float>(alpha * alpha + sigma * sigma);
  p.inv_alpha = 1.0f / p.alpha;
  p.inv_sigma = sigma > 0 ? 1.0f / p.sigma : 0.0f;
  p.inv_norm = 1.0f / p.norm;
  p.clip = static_cast<float>(clip);
  p.cx = static_cast<float>(c[0]);
  p.cd = static_cast<float>(c[1]);
  p.ce = static_cast<float>(c[2]);
  p.cp = static_cast<float>(c[3]);
  p.cn = static_cast<float>(c[4]);
  p.pred = static_cast<int>(pred);
  p.has_clip = clip > 0;
  p.has_sigma = sigma > 0;
  p.has_prev = has_prev;
  p.has_noise = has_noise;
  return p;
}

// fp32 add/sub/mul with round-to-nearest and no contraction.
DIFFAE_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DIFFAE_HD float f_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DIFFAE_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a / s for a scalar s whose fp32 reciprocal is inv_s.
template <bool kReciprocal>
DIFFAE_HD float f_div(float a, float s, float inv_s) {
  if constexpr (kReciprocal) {
    return f_mul(a, inv_s);
  } else {
    return a / s;
  }
}

// One element: returns x_next and writes x0. prev/noise are read only when present.
template <bool kReciprocal>
DIFFAE_HD float sampler_step_elem(const SamplerStepParams& p, float x, float out, float prev, float noise,
                                  float* x0_out) {
  float x0;
  if (p.pred == kPredEps) {
    x0 = f_div<kReciprocal>(f_sub(x, f_mul(p.sigma, out)), p.alpha, p.inv_alpha);
  } else if (p.pred == kPredV) {
    x0 = f_div<kReciprocal>(f_sub(f_mul(p.alpha, x), f_mul(p.sigma, out)), p.norm, p.inv_norm);
  } else {
    x0 = out;
  }
  if (p.has_clip) {
    // Comparisons (not fminf/fmaxf) so that NaN propagates like torch.clamp.
    x0 = x0 < -p.clip ? -p.clip : (x0 > p.clip ? p.clip : x0);
  }
  const float eps = p.has_sigma ? f_div<kReciprocal>(f_sub(x, f_mul(p.alpha, x0)), p.sigma, p.inv_sigma) : 0.0f;
  float xn = f_add(f_add(f_mul(p.cx, x), f_mul(p.cd, x0)), f_mul(p.ce, eps));
  if (p.has_prev) xn = f_add(xn, f_mul(p.cp, prev));
  if (p.has_noise) xn = f_add(xn, f_mul(p.cn, noise));
  *x0_out = x0;
  return xn;
}

// Input checks shared by the CPU, CUDA and Meta kernels.  Shapes are compared as SymInts so the
// Meta kernel also works when torch.compile traces with dynamic shapes; layout (contiguity) is
// checked only where real memory is touched.
inline void check_sampler_step_inputs(const at::Tensor& x, const at::Tensor& out, const c10::optional<at::Tensor>& prev,
                                      const c10::optional<at::Tensor>& noise, double alpha, double sigma,
                                      int64_t pred, double clip, const std::vector<double>& coeffs,
                                      bool check_layout) {
  TORCH_CHECK(pred >= 0 && pred <= 2, "sampler_step: pred must be 0 (eps), 1 (v) or 2 (x0), got ", pred);
  TORCH_CHECK(coeffs.size() == 5, "sampler_step: coeffs must have 5 entries (cx, cd, ce, cp, cn), got ",
              coeffs.size());
  TORCH_CHECK(alpha > 0, "sampler_step: alpha must be > 0, got ", alpha);
  TORCH_CHECK(sigma >= 0, "sampler_step: sigma must be >= 0, got ", sigma);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "sampler_step: the state x must be float32, got ", x.scalar_type());
  const auto ot = out.scalar_type();
  TORCH_CHECK(ot == at::kFloat || ot == at::kBFloat16 || ot == at::kHalf,
              "sampler_step: the model output must be float32, bfloat16 or float16, got ", ot);
  TORCH_CHECK(out.device() == x.device(), "sampler_step: model output is on ", out.device(), " but x is on ",
              x.device());
  TORCH_CHECK(out.sym_sizes() == x.sym_sizes(), "sampler_step: model output shape ", out.sym_sizes(),
              " != state shape ", x.sym_sizes());
  if (check_layout) {
    TORCH_CHECK(x.is_contiguous(), "sampler_step: the state x must be contiguous");
    TORCH_CHECK(out.is_contiguous(), "sampler_step: the model output must be contiguous");
  }
  const char* names[2] = {"prev", "noise"};
  const c10::optional<at::Tensor>* opts[2] = {&prev, &noise};
  for (const auto i : c10::irange(2)) {
    const auto& t = *opts[i];
    if (!t.has_value()) {
      TORCH_CHECK(coeffs[3 + i] == 0.0, "sampler_step: coefficient for ", names[i], " is ", coeffs[3 + i],
                  " but ", names[i], " is None");
      continue;
    }
    TORCH_CHECK(t->device() == x.device(), "sampler_step: ", names[i], " is on ", t->device(), " but x is on ",
                x.device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "sampler_step: ", names[i], " must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->sym_sizes() == x.sym_sizes(), "sampler_step: ", names[i], " shape ", t->sym_sizes(),
                " != state shape ", x.sym_sizes());
    if (check_layout) TORCH_CHECK(t->is_contiguous(), "sampler_step: ", names[i], " must be contiguous");
  }
}

}  // namespace diffae
