// diffae::lt_linear: y = x W^T + b (optionally through the tanh GELU) with one chosen cuBLASLt
// algorithm, for few-token inference GEMMs.
//
// torch's own GEMMs run cuBLASLt's first heuristic choice.  At 256 tokens that choice is often a
// tile that leaves most SMs idle (fc2 of DiT-B: 48 CTAs on 132 SMs, 24 K steps each); the other
// candidates cuBLASLt proposes (split-K, smaller tiles) can be faster.  This op exposes the
// candidates by index: diffae/ops/linear.py times them once per shape and keeps the fastest.
//
// Layout: row-major x (M, K) and W (N, K) (nn.Linear's) are column-major K x M and K x N, so
// y^T (N x M, column-major = row-major y) = op_T(W) x.  bf16 or fp16 in and out, fp32 accumulation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/extension.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace {

constexpr int kMaxAlgos = 16;
constexpr int64_t kWorkspaceBytes = 16 << 20;  // enough for split-K partials at few-token shapes

void check_lt(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "diffae::lt_linear: ", what, " failed (cuBLAS status ",
              static_cast<int>(status), ")");
}

// Descriptors of one problem; destroyed with it.
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  ~Problem() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

void check_inputs(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "diffae::lt_linear: x and w must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "diffae::lt_linear: x must be (M, K) and w (N, K), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "diffae::lt_linear: x and w must both be bfloat16 or both float16, got ", x.scalar_type(), " and ",
              w.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 && w.is_contiguous() && x.stride(0) % 8 == 0 && x.size(1) % 8 == 0,
              "diffae::lt_linear: x needs unit stride along K and a row stride that is a multiple of 8, "
              "w must be contiguous, K a multiple of 8");
  if (bias) {
    TORCH_CHECK(bias->is_cuda() && bias->dim() == 1 && bias->size(0) == w.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "diffae::lt_linear: bias must be a contiguous (N,) tensor of x's dtype");
  }
}

void describe(Problem& p, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
              bool gelu) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const cudaDataType_t dt = x.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  check_lt(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)), "TRANSA");
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)), "TRANSB");
  cublasLtEpilogue_t epilogue = bias ? (gelu ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS)
                                     : (gelu ? CUBLASLT_EPILOGUE_GELU : CUBLASLT_EPILOGUE_DEFAULT);
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
           "EPILOGUE");
  if (bias) {
    const void* ptr = bias->data_ptr();
    check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr, sizeof(ptr)), "BIAS");
    check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &dt, sizeof(dt)),
             "BIAS_DATA_TYPE");
  }
  check_lt(cublasLtMatrixLayoutCreate(&p.a, dt, K, N, K), "layout of w");
  check_lt(cublasLtMatrixLayoutCreate(&p.b, dt, K, M, x.stride(0)), "layout of x");
  check_lt(cublasLtMatrixLayoutCreate(&p.d, dt, N, M, N), "layout of y");
}

// The largest power of two (up to 256) dividing a pointer: cuBLASLt's candidates assume the
// alignments they are told, 256 bytes if they are told none.
uint32_t alignment(const void* ptr) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(ptr) % a) a /= 2;
  return a;
}

// M N K ldx bias gelu dtype device, alignment of x w y
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, int, int, uint32_t, uint32_t, uint32_t>;

// cuBLASLt's candidates per problem, in its own order (index 0 is what torch would run).
// Heuristics depend on the shapes, not on the data, so they are queried once per problem.
const std::vector<cublasLtMatmulHeuristicResult_t>& candidates(const at::Tensor& x, const at::Tensor& w,
                                                               const c10::optional<at::Tensor>& bias, bool gelu,
                                                               const void* y, Problem& p) {
  static std::mutex mutex;
  static std::map<Key, std::vector<cublasLtMatmulHeuristicResult_t>> cache;
  const uint32_t align_x = alignment(x.data_ptr()), align_w = alignment(w.data_ptr()), align_y = alignment(y);
  const Key key{x.size(0), w.size(0), x.size(1), x.stride(0), bias.has_value(), gelu,
                static_cast<int>(x.scalar_type()), x.get_device(), align_x, align_w, align_y};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cublasLtMatmulPreference_t pref = nullptr;
  check_lt(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = kWorkspaceBytes;
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
           "MAX_WORKSPACE_BYTES");
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_w,
                                                sizeof(align_w)), "MIN_ALIGNMENT_A_BYTES");
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_x,
                                                sizeof(align_x)), "MIN_ALIGNMENT_B_BYTES");
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    check_lt(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align_y, sizeof(align_y)), "MIN_ALIGNMENT_C/D_BYTES");
  }
  std::vector<cublasLtMatmulHeuristicResult_t> found(kMaxAlgos);
  int returned = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.op, p.a,
                                                               p.b, p.d, p.d, pref, kMaxAlgos, found.data(),
                                                               &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  check_lt(status, "cublasLtMatmulAlgoGetHeuristic");
  found.resize(returned);
  TORCH_CHECK(returned > 0, "diffae::lt_linear: cuBLASLt has no algorithm for this problem");
  return cache.emplace(key, std::move(found)).first->second;
}

at::Tensor lt_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, bool gelu,
                     int64_t algo) {
  check_inputs(x, w, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  Problem p;
  describe(p, x, w, bias, gelu);
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  const auto& algos = candidates(x, w, bias, gelu, y.data_ptr(), p);
  TORCH_CHECK(algo >= 0 && algo < static_cast<int64_t>(algos.size()), "diffae::lt_linear: algorithm index ", algo,
              " out of range (", algos.size(), " candidates)");
  // from the caching allocator on the current stream: inside a CUDA-graph capture it comes from the graph's pool
  auto workspace = at::empty({std::max<int64_t>(algos[algo].workspaceSize, 1)}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  check_lt(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), p.op, &alpha, w.data_ptr(), p.a, x.data_ptr(),
                          p.b, &beta, y.data_ptr(), p.d, y.data_ptr(), p.d, &algos[algo].algo,
                          workspace.data_ptr(), algos[algo].workspaceSize, at::cuda::getCurrentCUDAStream()),
           "cublasLtMatmul");
  return y;
}

int64_t lt_linear_candidates(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                             bool gelu) {
  check_inputs(x, w, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  Problem p;
  describe(p, x, w, bias, gelu);
  const auto y = at::empty({x.size(0), w.size(0)}, x.options());  // the alignment lt_linear's output will have
  return static_cast<int64_t>(candidates(x, w, bias, gelu, y.data_ptr(), p).size());
}

}  // namespace

// Defined here, not in module.cpp: the op exists only in builds that found cublasLt.h.
TORCH_LIBRARY_FRAGMENT(diffae, m) {
  m.def("lt_linear(Tensor x, Tensor w, Tensor? bias, bool gelu, int algo) -> Tensor");
  m.def("lt_linear_candidates(Tensor x, Tensor w, Tensor? bias, bool gelu) -> int");
}

TORCH_LIBRARY_IMPL(diffae, CUDA, m) {
  m.impl("lt_linear", &lt_linear);
  m.impl("lt_linear_candidates", &lt_linear_candidates);
}
