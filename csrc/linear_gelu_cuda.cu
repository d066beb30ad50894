// CUDA implementations of diffae::linear_gelu and diffae::linear_dgelu (module.cpp has the schemas,
// linear_gelu.cpp the composite reference): one cuBLASLt matmul each, the GELU (forward) or its
// gradient (backward) computed in the GEMM's epilogue, sparing the MLP's hidden activations a pass
// through memory each.  Host code only: it lives in a .cu file so that
// CPU-only builds leave it out.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <dlfcn.h>
#include <torch/extension.h>

#include "linear_gelu.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>

namespace {

// cuBLASLt's entry points, taken from the copy torch has already loaded: the extension gets no
// link-time dependency on a library whose path differs between toolkits and wheels, and a missing
// library fails these two ops with a clear error instead of failing the extension's import.
struct LtApi {
  decltype(&cublasLtMatmulDescCreate) desc_create;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set;
  decltype(&cublasLtMatrixLayoutCreate) layout_create;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic;
  decltype(&cublasLtMatmul) matmul;
};

const LtApi& lt() {
  static const LtApi api = [] {
    const std::string soname = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen(soname.c_str(), RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "diffae: cannot load ", soname, " (", dlerror(), ")");
    auto sym = [&](auto& fn, const char* name) {
      void* p = dlsym(lib, name);
      TORCH_CHECK(p != nullptr, "diffae: ", soname, " has no ", name);
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    LtApi a{};
    sym(a.desc_create, "cublasLtMatmulDescCreate");
    sym(a.desc_destroy, "cublasLtMatmulDescDestroy");
    sym(a.desc_set, "cublasLtMatmulDescSetAttribute");
    sym(a.layout_create, "cublasLtMatrixLayoutCreate");
    sym(a.layout_destroy, "cublasLtMatrixLayoutDestroy");
    sym(a.pref_create, "cublasLtMatmulPreferenceCreate");
    sym(a.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    sym(a.pref_set, "cublasLtMatmulPreferenceSetAttribute");
    sym(a.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    sym(a.matmul, "cublasLtMatmul");
    return a;
  }();
  return api;
}

void check(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "diffae: cuBLASLt ", what, " failed with status ",
              static_cast<int>(status));
}

constexpr size_t kWorkspaceBytes = 32 << 20;  // cuBLAS's recommendation for Hopper

// Largest power of two (up to 256) dividing the address: cuBLASLt picks kernels by alignment.
uint32_t alignment(const void* p) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) a /= 2;
  return a;
}

constexpr int kCandidates = 8;  // of the heuristic's ranking, timed at a problem's first call
constexpr int kTimedRuns = 3;

// Index of the fastest of cuBLASLt's candidate kernels, timed on `stream` (milliseconds, once per
// problem): with an epilogue its first choice is often not the fastest.  -1 while the stream is
// capturing a CUDA graph, where nothing can be timed.  DIFFAE_LT_AUTOTUNE=0 takes the heuristic's
// first choice; =verbose prints each candidate's time.
template <class Matmul>
int fastest(const cublasLtMatmulHeuristicResult_t* results, int found, const Matmul& matmul, cudaStream_t stream) {
  cudaStreamCaptureStatus capture;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return -1;
  const char* env = std::getenv("DIFFAE_LT_AUTOTUNE");
  const std::string mode = env == nullptr ? "1" : env;
  if (found == 1 || mode == "0") return 0;
  cudaEvent_t start, end;
  C10_CUDA_CHECK(cudaEventCreate(&start));
  C10_CUDA_CHECK(cudaEventCreate(&end));
  int best = 0;
  float best_ms = std::numeric_limits<float>::infinity();
  for (int i = 0; i < found; ++i) {
    if (matmul(results[i].algo) != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; one that cannot run is skipped
    C10_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int r = 0; r < kTimedRuns; ++r) matmul(results[i].algo);
    C10_CUDA_CHECK(cudaEventRecord(end, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(end));
    float ms = 0;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start, end));
    if (mode == "verbose") std::fprintf(stderr, "diffae cuBLASLt candidate %d: %.4f ms\n", i, ms / kTimedRuns);
    if (ms < best_ms) best_ms = ms, best = i;
  }
  C10_CUDA_CHECK(cudaEventDestroy(start));
  C10_CUDA_CHECK(cudaEventDestroy(end));
  return best;
}

// D (m x n, column-major, leading dimension m) = op(A) (m x k) * B (k x n), plus `epilogue`, which
// reads or writes `aux` (m x n, leading dimension m) and `bias` (m).  Row-major PyTorch matrices
// are the transposes of column-major ones, which is how the callers below map their products.
struct Gemm {
  bool transa;
  int64_t m, n, k, lda, ldb;
  cublasLtEpilogue_t epilogue;
  const void *a, *b;
  void *d, *aux, *bias;
};

void run(const Gemm& g, at::ScalarType dtype) {
  const LtApi& api = lt();
  const cudaDataType_t type = dtype == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  cublasLtMatmulDesc_t desc;
  check(api.desc_create(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  const cublasOperation_t opa = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N, opb = CUBLAS_OP_N;
  const int64_t aux_ld = g.m;
  check(api.desc_set(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)), "set TRANSA");
  check(api.desc_set(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)), "set TRANSB");
  check(api.desc_set(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)), "set EPILOGUE");
  check(api.desc_set(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)), "set BIAS_POINTER");
  check(api.desc_set(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)), "set AUX_POINTER");
  check(api.desc_set(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)), "set AUX_LD");

  cublasLtMatrixLayout_t la, lb, ld;
  check(g.transa ? api.layout_create(&la, type, g.k, g.m, g.lda) : api.layout_create(&la, type, g.m, g.k, g.lda),
        "MatrixLayoutCreate A");
  check(api.layout_create(&lb, type, g.k, g.n, g.ldb), "MatrixLayoutCreate B");
  check(api.layout_create(&ld, type, g.m, g.n, g.m), "MatrixLayoutCreate D");

  // The heuristic query and the timing of its candidates: once per problem and alignment.
  using Key = std::tuple<int, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int, uint32_t, uint32_t, uint32_t,
                         uint32_t, uint32_t>;
  static std::map<Key, cublasLtMatmulAlgo_t> algos;
  static std::mutex mutex;
  const uint32_t al_a = alignment(g.a), al_b = alignment(g.b), al_d = alignment(g.d);
  const Key key{c10::cuda::current_device(), g.transa, g.m, g.n, g.k, g.lda, g.ldb, static_cast<int>(g.epilogue) * 4 +
                (dtype == at::kBFloat16), al_a, al_b, al_d, alignment(g.aux), alignment(g.bias)};
  // From the caching allocator, on the current stream: safe under CUDA-graph capture.
  auto workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)},
                             at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const float alpha = 1.0f, beta = 0.0f;
  auto matmul = [&](const cublasLtMatmulAlgo_t& algo) {
    return api.matmul(handle, desc, &alpha, g.a, la, g.b, lb, &beta, g.d, ld, g.d, ld, &algo, workspace.data_ptr(),
                      kWorkspaceBytes, stream);
  };

  cublasLtMatmulAlgo_t algo;
  bool cached;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = algos.find(key);
    cached = it != algos.end();
    if (cached) algo = it->second;
  }
  if (!cached) {
    cublasLtMatmulPreference_t pref;
    check(api.pref_create(&pref), "MatmulPreferenceCreate");
    const uint64_t ws = kWorkspaceBytes;
    check(api.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), "set workspace");
    check(api.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)), "set align A");
    check(api.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)), "set align B");
    check(api.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, sizeof(al_d)), "set align C");
    check(api.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d)), "set align D");
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    int found = 0;
    const cublasStatus_t status = api.heuristic(handle, desc, la, lb, ld, ld, pref, kCandidates, results, &found);
    api.pref_destroy(pref);
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS && found > 0, "diffae: cuBLASLt has no kernel for a ", g.m, "x", g.n,
                "x", g.k, " GEMM with epilogue ", static_cast<int>(g.epilogue), " (status ",
                static_cast<int>(status), ")");
    const int best = fastest(results, found, matmul, stream);
    algo = results[best < 0 ? 0 : best].algo;
    if (best >= 0) {  // while a CUDA graph is captured nothing can be timed: that call runs uncached
      std::lock_guard<std::mutex> lock(mutex);
      algos.emplace(key, algo);
    }
  }
  const cublasStatus_t status = matmul(algo);
  api.layout_destroy(la);
  api.layout_destroy(lb);
  api.layout_destroy(ld);
  api.desc_destroy(desc);
  check(status, "Matmul");
}

void check_inputs(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  TORCH_CHECK(first.scalar_type() == at::kBFloat16 || first.scalar_type() == at::kHalf, op,
              ": needs bfloat16 or float16 tensors, got ", first.scalar_type());
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == first.device(), op, ": ", name, " is on ", t->device(), ", expected ",
                first.device());
    TORCH_CHECK(t->scalar_type() == first.scalar_type(), op, ": ", name, " is ", t->scalar_type(), ", expected ",
                first.scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
}

// h = gelu_tanh(x w^T + b) and pre = x w^T + b, for x (M, K), w (N, K), b (N); N and K multiples of 8.
std::tuple<at::Tensor, at::Tensor> linear_gelu_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  check_inputs("linear_gelu", {{"x", &x}, {"weight", &w}, {"bias", &b}});
  diffae::check_linear_gelu_shapes(x, w, b);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(N % 8 == 0 && K % 8 == 0, "linear_gelu: N = ", N, " and K = ", K, " must be multiples of 8");
  const c10::cuda::CUDAGuard guard(x.device());
  auto h = at::empty({M, N}, x.options());
  auto pre = at::empty({M, N}, x.options());
  if (M == 0) return {h, pre};
  // column-major: h^T (N x M) = w (N x K, stored as w^T) * x^T (K x M)
  run({true, N, M, K, K, K, CUBLASLT_EPILOGUE_GELU_AUX_BIAS, w.data_ptr(), x.data_ptr(), h.data_ptr(),
       pre.data_ptr(), b.data_ptr()},
      x.scalar_type());
  return {h, pre};
}

// dpre = (g w) * gelu_tanh'(pre) for g (M, C), w (C, N), pre (M, N): the backward of
// y = linear_gelu(x, w1, b1)[0] w^T through the second GEMM's input gradient.  The first bias's
// gradient is left to a separate sum: cuBLASLt's DGELU_BGRAD, which would reduce it here, ran at
// 179 TFLOP/s on an H100 (every candidate) against 610 for the plain GEMM, and BGRADB in the weight
// gradient's GEMM at 498 against 679 (0.62 ms against 0.57 for the plain GEMM and the sum).
at::Tensor linear_dgelu_cuda(const at::Tensor& g, const at::Tensor& w, const at::Tensor& pre) {
  check_inputs("linear_dgelu", {{"grad", &g}, {"weight", &w}, {"pre", &pre}});
  diffae::check_linear_dgelu_shapes(g, w, pre);
  const int64_t M = g.size(0), C = g.size(1), N = w.size(1);
  TORCH_CHECK(N % 8 == 0 && C % 8 == 0, "linear_dgelu: N = ", N, " and C = ", C, " must be multiples of 8");
  const c10::cuda::CUDAGuard guard(g.device());
  auto dpre = at::empty({M, N}, g.options());
  if (M == 0) return dpre;
  // column-major: dpre^T (N x M) = w^T (N x C, stored as is) * g^T (C x M)
  run({false, N, M, C, N, C, CUBLASLT_EPILOGUE_DGELU, w.data_ptr(), g.data_ptr(), dpre.data_ptr(), pre.data_ptr(),
       nullptr},
      g.scalar_type());
  return dpre;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffae, CUDA, m) {
  m.impl("linear_gelu", &linear_gelu_cuda);
  m.impl("linear_dgelu", &linear_dgelu_cuda);
}
