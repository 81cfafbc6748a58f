// havoc::quant_linear's CPU kernel in C++ on torch's stable ABI (quant_kernel.py builds it with
// quant_kernel.c): a compiled decode step calls HAVOC's products with no Python between the
// dispatcher and the C code (havoc-small int4 step 3.5-3.9 -> 3.0-3.2 ms; docs/LOG.md). The stable
// headers keep the build to ~2 s. Where it cannot be built, the Python kernel (ctypes) runs instead.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <vector>

extern "C" int havoc_int4_linear(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                                 void* y, int y_bf16, int threads);
extern "C" int havoc_int8_linear(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* w,
                                 const float* scale, int64_t N, void* y, int y_bf16, int threads);

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// As Kernel.linear: x [..., K] (fp32 or bf16; other dtypes in fp32) times the matrix: [..., n].
Tensor quant_linear(Tensor x, Tensor packed, std::optional<Tensor> scale, int64_t n) {
  if (x.scalar_type() != ScalarType::Float && x.scalar_type() != ScalarType::BFloat16)
    x = torch::stable::to(x, ScalarType::Float);
  x = torch::stable::contiguous(x);
  const auto sizes = x.sizes();
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  const int64_t k = shape.back();
  shape.back() = n;
  Tensor y = torch::stable::new_empty(x, torch::headeronly::IntHeaderOnlyArrayRef(shape.data(), shape.size()));
  const int half = x.scalar_type() == ScalarType::BFloat16, threads = (int)torch::stable::get_num_threads();
  const int64_t rows = k ? x.numel() / k : 0;
  const uint8_t* w = (const uint8_t*)packed.data_ptr();
  const int failed = scale.has_value()
      ? havoc_int8_linear(x.data_ptr(), half, rows, k, w, (const float*)scale->data_ptr(), n, y.data_ptr(), half,
                          threads)
      : havoc_int4_linear(x.data_ptr(), half, rows, k, w, n, y.data_ptr(), half, threads);
  STD_TORCH_CHECK(!failed, "quant_kernel: no memory for ", rows, " rows of ", k, " activations");
  return y;
}

STABLE_TORCH_LIBRARY_IMPL(havoc, CPU, m) { m.impl("quant_linear", TORCH_BOX(&quant_linear)); }
