// exo's float32 decode product: y = x W^T for few rows of x, as an MLX primitive.
//
// MLX's CPU matmul calls the BLAS (MKL here), whose GEMV/GEMM for 1-8 rows of x times a
// (1024 x 2816) weight runs on one core: measured 14 GB/s of weight reads with 2 threads, where
// llama.cpp's F32 reads 27 (docs/benchmarks.md). Decode is bound by reading the weight once a
// token, so this product streams it over every core the process may use (the pool of pool.h),
// each thread a contiguous range of output rows, with x kept in L1/L2. Included by qgemv.cpp
// (one translation unit) after MLX's headers.
#pragma once

#include "pool.h"

namespace exo_sgemv {

struct Problem {
  const float* x;  // (rows, in)
  const float* w;  // (out, in)
  float* y;        // (rows, out)
  int rows, in, out;
};

inline void rows_scalar(const Problem& p, int o0, int o1) {
  for (int o = o0; o < o1; o++) {
    const float* wr = p.w + long(o) * p.in;
    for (int r = 0; r < p.rows; r++) {
      const float* xr = p.x + long(r) * p.in;
      float acc = 0.0f;
      for (int k = 0; k < p.in; k++) acc += wr[k] * xr[k];
      p.y[long(r) * p.out + o] = acc;
    }
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// R rows of x from r0, outputs [o0, o1): per output row of W, U 8-float vectors a step, R*U
// accumulators (U = 2 up to 4 rows: two FMA chains hide the FMA latency; 1 above, within the 16
// registers); the tail of `in` (not a multiple of 8*U) is summed in scalar.
template <int R>
__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int r0, int o0, int o1) {
  constexpr int U = R <= 4 ? 2 : 1;
  const long in = p.in, step = 8 * U, body = in / step * step;
  const float* x = p.x + long(r0) * in;
  for (int o = o0; o < o1; o++) {
    const float* wr = p.w + long(o) * in;
    _mm_prefetch(reinterpret_cast<const char*>(wr + in), _MM_HINT_T0);
    __m256 acc[R][U];
    for (int r = 0; r < R; r++)
      for (int u = 0; u < U; u++) acc[r][u] = _mm256_setzero_ps();
    for (long k = 0; k < body; k += step) {
      __m256 w[U];
      for (int u = 0; u < U; u++) w[u] = _mm256_loadu_ps(wr + k + 8 * u);
      for (int r = 0; r < R; r++)
        for (int u = 0; u < U; u++)
          acc[r][u] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(x + r * in + k + 8 * u), acc[r][u]);
    }
    for (int r = 0; r < R; r++) {
      __m256 total = acc[r][0];
      for (int u = 1; u < U; u++) total = _mm256_add_ps(total, acc[r][u]);
      float sum = hsum(total);
      for (long k = body; k < in; k++) sum += wr[k] * x[r * in + k];
      p.y[long(r0 + r) * p.out + o] = sum;
    }
  }
}

inline void rows_vector(const Problem& p, int o0, int o1) {
  // Rows of x in chunks of up to 8, each chunk reading the range of W once (from L2 after the
  // first: a thread's range of a (1024 x 2816) weight is 5.5 MiB, so more rows re-read memory).
  for (int r0 = 0; r0 < p.rows; r0 += 8) {
    switch (std::min(8, p.rows - r0)) {
      case 1: rows_avx2<1>(p, r0, o0, o1); break;
      case 2: rows_avx2<2>(p, r0, o0, o1); break;
      case 3: rows_avx2<3>(p, r0, o0, o1); break;
      case 4: rows_avx2<4>(p, r0, o0, o1); break;
      case 5: rows_avx2<5>(p, r0, o0, o1); break;
      case 6: rows_avx2<6>(p, r0, o0, o1); break;
      case 7: rows_avx2<7>(p, r0, o0, o1); break;
      default: rows_avx2<8>(p, r0, o0, o1); break;
    }
  }
}

inline void run(const Problem& p, bool vector) {
  // 64 output rows a part at least (a part of a 1024-input weight is then 256 KiB of reads).
  exo_pool::split_outputs(p.out, 64, [&](int o0, int o1) {
    if (vector)
      rows_vector(p, o0, o1);
    else
      rows_scalar(p, o0, o1);
  });
}

class FloatGemv : public mx::UnaryPrimitive {
 public:
  FloatGemv(mx::Stream stream, bool vector) : mx::UnaryPrimitive(stream), vector_(vector) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &x = inputs[0], &w = inputs[1];
    for (const auto& a : inputs)
      if (!a.flags().row_contiguous)
        throw std::runtime_error("exo float_gemv: inputs must be row contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    Problem p{};
    p.in = int(x.shape(-1));
    p.rows = int(x.size() / p.in);
    p.out = int(w.shape(0));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([p, vector = vector_, x = mx::array::unsafe_weak_copy(x),
                      w = mx::array::unsafe_weak_copy(w),
                      y = mx::array::unsafe_weak_copy(out)]() mutable {
      p.x = x.data<float>();
      p.w = w.data<float>();
      p.y = y.data<float>();
      run(p, vector);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("exo float_gemv runs on the CPU stream only");
  }

  const char* name() const override { return "ExoFloatGemv"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return vector_ == static_cast<const FloatGemv&>(other).vector_;
  }

 private:
  bool vector_;
};

// y = x @ w.T (x (..., in) float32, w (out, in) float32), refused with the reason otherwise.
inline mx::array float_gemv(const mx::array& x, const mx::array& w, bool vector) {
  auto fail = [](const std::string& why) { throw std::invalid_argument("float_gemv: " + why); };
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32) fail("x and w must be float32");
  if (x.ndim() < 1) fail("x must have at least one dimension");
  if (w.ndim() != 2) fail("w must be 2-D, got " + std::to_string(w.ndim()) + " dimensions");
  if (x.shape(-1) != w.shape(1))
    fail("x has " + std::to_string(x.shape(-1)) + " inputs, the weight " + std::to_string(w.shape(1)));
  if (x.size() == 0 || w.size() == 0) fail("x and w must not be empty");
  auto stream = mx::to_stream(std::monostate{}, mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  std::vector<mx::array> inputs = {mx::contiguous(x, false, stream), mx::contiguous(w, false, stream)};
  return mx::array(shape, mx::float32, std::make_shared<FloatGemv>(stream, vector), inputs);
}

}  // namespace exo_sgemv
