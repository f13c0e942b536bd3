// Per-tensor fake-quantization for float32 CPU tensors in one pass forward and one pass backward.
//
// Built on first use by qatgraph/kernels/fake_quant_cpu_ext.py (torch.utils.cpp_extension) and
// called from qatgraph/ops/fake_quant_cpu.py. ONNX QuantizeLinear's arithmetic (what ONNX Runtime
// computes): q = nearbyint(x / scale) (an IEEE float32 division, round half to even), clamped to
// [qmin - zero_point, qmax - zero_point], times scale; the straight-through mask is 1 where the
// clamp left q unchanged. ATen's fake_quantize_per_tensor_affine multiplies by 1 / scale instead,
// which lands on the other side of a tie for values within an ulp of it. Deviation kept on purpose:
// NaN propagates (ATen maps it to qmin) and gets mask 0, as in qatgraph's torch-op form.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t kGrain = 32768;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QATGRAPH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QATGRAPH_CLONES
#endif

QATGRAPH_CLONES
void forward_chunk(const float* __restrict x, float* __restrict y, uint8_t* __restrict mask, int64_t n,
                   float scale, float low, float high) {
  if (mask != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float code = std::nearbyint(x[i] / scale);
      const float clamped = code < low ? low : (code > high ? high : code);
      y[i] = clamped * scale;
      mask[i] = clamped == code;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float code = std::nearbyint(x[i] / scale);
      const float clamped = code < low ? low : (code > high ? high : code);
      y[i] = clamped * scale;
    }
  }
}

QATGRAPH_CLONES
void backward_chunk(const float* __restrict grad, const uint8_t* __restrict mask, float* __restrict out,
                    int64_t n) {
  // A multiply, as ATen's backward does (a NaN gradient stays NaN even where the mask is 0).
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = grad[i] * static_cast<float>(mask[i]);
}

void check_dense_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
              "qatgraph fake-quant CPU kernel: ", what, " must be a float32 CPU tensor, got ", t.toString());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "qatgraph fake-quant CPU kernel: ", what, " must be dense");
}

}  // namespace

// Returns (output, mask); mask is an empty tensor when need_mask is false (no gradient wanted).
std::tuple<at::Tensor, at::Tensor> fake_quantize_forward(const at::Tensor& x, double scale, double low, double high,
                                                         bool need_mask) {
  check_dense_float(x, "input");
  const float scale_f = static_cast<float>(scale);
  auto y = at::empty_like(x);  // same strides as x (x is dense), so flat indices line up
  at::Tensor mask = need_mask ? at::empty_like(x, x.options().dtype(at::kBool)) : at::empty({0}, x.options().dtype(at::kBool));
  const float* src = x.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  uint8_t* bits = need_mask ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const float low_f = static_cast<float>(low), high_f = static_cast<float>(high);
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    forward_chunk(src + begin, dst + begin, bits ? bits + begin : nullptr, end - begin, scale_f, low_f, high_f);
  });
  return {y, mask};
}

at::Tensor fake_quantize_backward(const at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_non_overlapping_and_dense(),
              "qatgraph fake-quant CPU kernel: mask must be a dense bool tensor");
  TORCH_CHECK(grad.sizes() == mask.sizes(), "qatgraph fake-quant CPU kernel: gradient shape ", grad.sizes(),
              " differs from the input's ", mask.sizes());
  at::Tensor g = grad;
  if (g.scalar_type() != at::kFloat || g.strides() != mask.strides()) {
    g = at::empty_like(mask, mask.options().dtype(at::kFloat));
    g.copy_(grad);
  }
  auto out = at::empty_like(g);
  const float* src = g.data_ptr<float>();
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
    backward_chunk(src + begin, bits + begin, dst + begin, end - begin);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fake_quantize_forward, "fake-quantize per tensor: (output, straight-through mask)");
  m.def("backward", &fake_quantize_backward, "gradient times the straight-through mask");
}
