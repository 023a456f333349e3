// exo's CPU decode kernel: y = x W^T for mlx-lm's affine-quantized layout, as an MLX primitive.
//
// MLX's CPU backend computes a quantized product by dequantizing in the scales' dtype and has no
// fast path for few rows; decode is few rows times a large weight, so it is bound by reading the
// weight, and the packed weight is ~1/7 of float32's bytes. This primitive reads the packed words
// directly, inside MLX's graph (no synchronisation per layer).
//
// Layout (mlx-lm, mode "affine"): W is (out, in*bits/32) uint32, each word holding 32/bits values,
// lowest bits first; per group of `group_size` inputs a scale s and bias b (bfloat16, float16 or
// float32) give w = s*q + b. x is (..., in) float32; y is (..., out) float32.
//
// AVX2 path: a 256-bit load is 8 words (a "block"); value j of each word pairs with
// x[block + V*word + j] (V = 32/bits), so x is first permuted per block into xp[j][word] and
// summed per word (xw). Value j is isolated by a mask without a shift (q * 2^(bits*j), exact in
// float), and xp[j] carries the 2^-(bits*j) (exact). Per lane: y += s*(q.x) + b*sum(x); lanes
// are summed once per output. Each block is unpacked once for up to 8 rows of x.
#include <immintrin.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mx = mlx::core;
namespace nb = nanobind;

#include "pool.h"
#include "sgemv.h"

namespace {

enum ScaleType { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Problem {
  const float* x;       // (rows, in)
  const float* xp;      // (rows, in) permuted, pre-scaled per value position
  const float* xw;      // (rows, in / V) sums of x per word
  const uint32_t* w;    // (out, in / V)
  const void* scales;   // (out, in / group_size)
  const void* biases;
  float* y;             // (rows, out)
  int rows, in, out, group_size, bits;
  ScaleType stype;
};

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  // Portable IEEE half -> float (the scalar fallback; the AVX2 path uses F16C).
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      int e = -1;
      do {
        e++;
        mant <<= 1;
      } while (!(mant & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | mant << 13;
  } else {
    bits = sign | (exp + 112) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float load_scale(const void* p, long i, ScaleType t) {
  switch (t) {
    case kFloat32:
      return static_cast<const float*>(p)[i];
    case kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return f16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

// Reference path for any x86-64 / ARM CPU: the same sum, s*(q.x) + b*sum(x) per group.
void gemv_scalar(const Problem& p, int o0, int o1) {
  const int per_word = 32 / p.bits, groups = p.in / p.group_size;
  const uint32_t mask = (1u << p.bits) - 1;
  const long words = p.in / per_word;
  for (int o = o0; o < o1; o++) {
    const uint32_t* row = p.w + long(o) * words;
    for (int r = 0; r < p.rows; r++) {
      const float* xr = p.x + long(r) * p.in;
      float acc = 0.0f;
      for (int g = 0; g < groups; g++) {
        float dot = 0.0f, sum = 0.0f;
        for (int k = g * p.group_size; k < (g + 1) * p.group_size; k++) {
          const uint32_t q = (row[k / per_word] >> (p.bits * (k % per_word))) & mask;
          dot += float(q) * xr[k];
          sum += xr[k];
        }
        const long si = long(o) * groups + g;
        acc += load_scale(p.scales, si, p.stype) * dot + load_scale(p.biases, si, p.stype) * sum;
      }
      p.y[long(r) * p.out + o] = acc;
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) inline float scale_at(const void* base, long i,
                                                               ScaleType t) {
  switch (t) {
    case kFloat32:
      return static_cast<const float*>(base)[i];
    case kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default:
      return _cvtsh_ss(static_cast<const uint16_t*>(base)[i]);
  }
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 scale_lanes(
    const void* base, long g0, int lanes_per_group, ScaleType t) {
  // The 8 lanes' scales (or biases): one group for all lanes, or two (4 lanes each) when a group
  // is 4 words (4-bit, group size 32).
  if (lanes_per_group >= 8) return _mm256_set1_ps(scale_at(base, g0, t));
  return _mm256_set_m128(_mm_set1_ps(scale_at(base, g0 + 1, t)), _mm_set1_ps(scale_at(base, g0, t)));
}

template <int BITS, int R>
__attribute__((target("avx2,fma,f16c"))) void gemv_avx2_rows(const Problem& p, int r0, int o0,
                                                             int o1) {
  constexpr int V = 32 / BITS;  // values per word
  const long words = p.in / V, blocks = words / 8;
  const int lanes_per_group = p.group_size / V, groups = p.in / p.group_size;
  const __m256i low = _mm256_set1_epi32((1u << BITS) - 1);
  const float* xp = p.xp + long(r0) * p.in;
  const float* xw = p.xw + long(r0) * words;
  for (int o = o0; o < o1; o++) {
    const uint32_t* row = p.w + long(o) * words;
    const long sbase = long(o) * groups;
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (long b = 0; b < blocks; b++) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 8));
      __m256 q[V];
      for (int j = 0; j < V - 1; j++)
        q[j] = _mm256_cvtepi32_ps(_mm256_and_si256(packed, _mm256_slli_epi32(low, BITS * j)));
      q[V - 1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(packed, BITS * (V - 1)));
      const long g0 = (b * 8) / lanes_per_group;
      const __m256 s = scale_lanes(p.scales, sbase + g0, lanes_per_group, p.stype);
      const __m256 bias = scale_lanes(p.biases, sbase + g0, lanes_per_group, p.stype);
      for (int r = 0; r < R; r++) {
        const float* xg = xp + long(r) * p.in + b * 8 * V;
        __m256 dot = _mm256_mul_ps(q[0], _mm256_loadu_ps(xg));
        for (int j = 1; j < V; j++) dot = _mm256_fmadd_ps(q[j], _mm256_loadu_ps(xg + 8 * j), dot);
        acc[r] = _mm256_fmadd_ps(s, dot, acc[r]);
        acc[r] = _mm256_fmadd_ps(bias, _mm256_loadu_ps(xw + long(r) * words + b * 8), acc[r]);
      }
    }
    for (int r = 0; r < R; r++) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      p.y[long(r0 + r) * p.out + o] = _mm_cvtss_f32(h);
    }
  }
}

template <int BITS>
void gemv_avx2(const Problem& p, int o0, int o1) {
  // Rows of x in chunks of up to 8 (their accumulators stay in registers); the weight row of
  // each output is re-read from L1 for the next chunk.
  for (int r0 = 0; r0 < p.rows; r0 += 8) {
    switch (std::min(8, p.rows - r0)) {
      case 1: gemv_avx2_rows<BITS, 1>(p, r0, o0, o1); break;
      case 2: gemv_avx2_rows<BITS, 2>(p, r0, o0, o1); break;
      case 3: gemv_avx2_rows<BITS, 3>(p, r0, o0, o1); break;
      case 4: gemv_avx2_rows<BITS, 4>(p, r0, o0, o1); break;
      case 5: gemv_avx2_rows<BITS, 5>(p, r0, o0, o1); break;
      case 6: gemv_avx2_rows<BITS, 6>(p, r0, o0, o1); break;
      case 7: gemv_avx2_rows<BITS, 7>(p, r0, o0, o1); break;
      default: gemv_avx2_rows<BITS, 8>(p, r0, o0, o1); break;
    }
  }
}

bool has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool force_scalar() {
  const char* v = std::getenv("EXO_KERNEL_ISA");
  return v != nullptr && std::string(v) == "scalar";
}

void run(Problem p) {
  const bool vector = has_avx2() && !force_scalar();
  thread_local std::vector<float> work;
  if (vector) {
    const int per_word = 32 / p.bits;
    const long words = p.in / per_word;
    work.resize(size_t(p.rows) * p.in + size_t(p.rows) * words);
    float* xp = work.data();
    float* xw = xp + size_t(p.rows) * p.in;
    // 2^-(bits*j) per value position (exact powers of two: x*2^-k rounds as std::ldexp, which
    // cost ~30 us a call at 2816 inputs, a few % of a decode token over ~60 products).
    float shift[8];
    for (int j = 0; j < per_word; j++) shift[j] = std::ldexp(1.0f, -p.bits * j);
    for (int r = 0; r < p.rows; r++) {
      const float* src = p.x + long(r) * p.in;
      float* dst = xp + long(r) * p.in;
      for (long word = 0; word < words; word++) {
        const long block = word / 8, lane = word % 8;
        float sum = 0.0f;
        for (int j = 0; j < per_word; j++) {
          const float v = src[word * per_word + j];
          sum += v;
          // The last value is shifted down, the others masked in place (see gemv_avx2_rows).
          dst[block * 8 * per_word + j * 8 + lane] =
              j == per_word - 1 ? v : v * shift[j];
        }
        xw[long(r) * words + word] = sum;
      }
    }
    p.xp = xp;
    p.xw = xw;
  }
  auto part = [&](int o0, int o1) {
    if (!vector)
      gemv_scalar(p, o0, o1);
    else if (p.bits == 4)
      gemv_avx2<4>(p, o0, o1);
    else
      gemv_avx2<8>(p, o0, o1);
  };
  exo_pool::split_outputs(p.out, 256, part);
}

// The whole weight as float32 (s*q + b, as mx.dequantize with float32 scales), for prefill-sized
// inputs: above a few dozen rows a float32 matmul (MKL) beats the kernel's per-row FMAs, and
// mx.dequantize on the CPU is ~10x slower than this loop.
template <int BITS>
void dequantize_rows(const Problem& p, int o0, int o1) {
  constexpr int V = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  const long words = p.in / V;
  const int groups = p.in / p.group_size;
  for (int o = o0; o < o1; o++) {
    const uint32_t* row = p.w + long(o) * words;
    float* dst = p.y + long(o) * p.in;
    for (int g = 0; g < groups; g++) {
      const float s = load_scale(p.scales, long(o) * groups + g, p.stype);
      const float b = load_scale(p.biases, long(o) * groups + g, p.stype);
      for (long wi = long(g) * p.group_size / V; wi < long(g + 1) * p.group_size / V; wi++) {
        const uint32_t word = row[wi];
        for (int j = 0; j < V; j++) dst[wi * V + j] = s * float((word >> (BITS * j)) & mask) + b;
      }
    }
  }
}

void run_dequantize(const Problem& p) {
  auto part = [&](int o0, int o1) {
    if (p.bits == 4)
      dequantize_rows<4>(p, o0, o1);
    else
      dequantize_rows<8>(p, o0, o1);
  };
  exo_pool::split_outputs(p.out, 256, part);
}

class QuantizedGemv : public mx::UnaryPrimitive {
 public:
  // dequantize: inputs are (w, scales, biases) and the output the float32 weight; else
  // (x, w, scales, biases) and the output x @ weight.T.
  QuantizedGemv(mx::Stream stream, int group_size, int bits, bool dequantize)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits), dequantize_(dequantize) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    if (dequantize_) return eval_dequantize(inputs, out);
    const auto &x = inputs[0], &w = inputs[1], &scales = inputs[2], &biases = inputs[3];
    for (const auto& a : inputs)
      if (!a.flags().row_contiguous)
        throw std::runtime_error("exo quantized_gemv: inputs must be row contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    Problem p{};
    p.in = int(x.shape(-1));
    p.rows = int(x.size() / p.in);
    p.out = int(w.shape(0));
    p.group_size = group_size_;
    p.bits = bits_;
    p.stype = scales.dtype() == mx::float32   ? kFloat32
              : scales.dtype() == mx::bfloat16 ? kBFloat16
                                               : kFloat16;
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([p, x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                      s = mx::array::unsafe_weak_copy(scales),
                      b = mx::array::unsafe_weak_copy(biases),
                      y = mx::array::unsafe_weak_copy(out)]() mutable {
      p.x = x.data<float>();
      p.w = w.data<uint32_t>();
      p.scales = s.data<void>();
      p.biases = b.data<void>();
      p.y = y.data<float>();
      run(p);
    });
  }

  void eval_dequantize(const std::vector<mx::array>& inputs, mx::array& out) {
    const auto &w = inputs[0], &scales = inputs[1], &biases = inputs[2];
    for (const auto& a : inputs)
      if (!a.flags().row_contiguous)
        throw std::runtime_error("exo dequantize: inputs must be row contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    Problem p{};
    p.out = int(out.shape(0));
    p.in = int(out.shape(1));
    p.group_size = group_size_;
    p.bits = bits_;
    p.stype = scales.dtype() == mx::float32   ? kFloat32
              : scales.dtype() == mx::bfloat16 ? kBFloat16
                                               : kFloat16;
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([p, w = mx::array::unsafe_weak_copy(w), s = mx::array::unsafe_weak_copy(scales),
                      b = mx::array::unsafe_weak_copy(biases),
                      y = mx::array::unsafe_weak_copy(out)]() mutable {
      p.w = w.data<uint32_t>();
      p.scales = s.data<void>();
      p.biases = b.data<void>();
      p.y = y.data<float>();
      run_dequantize(p);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("exo quantized_gemv runs on the CPU stream only");
  }

  const char* name() const override { return "ExoQuantizedGemv"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedGemv&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && dequantize_ == o.dequantize_;
  }

 private:
  int group_size_, bits_;
  bool dequantize_;
};

std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < a.shape().size(); i++) s << (i ? ", " : "") << a.shape()[i];
  s << ")";
  return s.str();
}

void check_weight(const mx::array& w, const mx::array& scales, const mx::array& biases,
                  int group_size, int bits, const std::string& op) {
  auto fail = [&](const std::string& why) { throw std::invalid_argument(op + ": " + why); };
  if (bits != 4 && bits != 8) fail("bits must be 4 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  if (w.dtype() != mx::uint32 || w.ndim() != 2) fail("w must be a 2-D uint32 array, got " + shape_str(w));
  const auto st = scales.dtype();
  if (st != mx::float32 && st != mx::bfloat16 && st != mx::float16)
    fail("scales must be float32, bfloat16 or float16");
  if (biases.dtype() != st) fail("biases must have the scales' dtype");
  const long in = long(w.shape(1)) * (32 / bits), out = w.shape(0);
  if (in % group_size != 0) fail("the input size is not a multiple of group_size");
  if (scales.ndim() != 2 || scales.shape(0) != out || scales.shape(1) != in / group_size)
    fail("scales have shape " + shape_str(scales) + ", expected (" + std::to_string(out) + ", " +
         std::to_string(in / group_size) + ")");
  if (biases.shape() != scales.shape()) fail("biases must have the scales' shape");
  if (in % (8 * (32 / bits)) != 0)
    fail("the input size must be a multiple of " + std::to_string(8 * (32 / bits)));
}

mx::Stream cpu_stream() { return mx::to_stream(std::monostate{}, mx::Device::cpu); }

mx::array quantized_gemv(const mx::array& x, const mx::array& w, const mx::array& scales,
                         const mx::array& biases, int group_size, int bits) {
  auto fail = [](const std::string& why) { throw std::invalid_argument("quantized_gemv: " + why); };
  if (x.dtype() != mx::float32) fail("x must be float32");
  if (x.ndim() < 1) fail("x must have at least one dimension");
  check_weight(w, scales, biases, group_size, bits, "quantized_gemv");
  const long in = long(w.shape(1)) * (32 / bits), out = w.shape(0);
  if (x.shape(-1) != in)
    fail("x has " + std::to_string(x.shape(-1)) + " inputs, the weight " + std::to_string(in));
  if (x.size() == 0) fail("x is empty");
  auto stream = cpu_stream();
  auto shape = x.shape();
  shape.back() = int(out);
  std::vector<mx::array> inputs = {mx::contiguous(x, false, stream), mx::contiguous(w, false, stream),
                                   mx::contiguous(scales, false, stream),
                                   mx::contiguous(biases, false, stream)};
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantizedGemv>(stream, group_size, bits, false), inputs);
}

mx::array dequantize_f32(const mx::array& w, const mx::array& scales, const mx::array& biases,
                         int group_size, int bits) {
  check_weight(w, scales, biases, group_size, bits, "dequantize");
  auto stream = cpu_stream();
  const int in = int(w.shape(1)) * (32 / bits), out = int(w.shape(0));
  std::vector<mx::array> inputs = {mx::contiguous(w, false, stream),
                                   mx::contiguous(scales, false, stream),
                                   mx::contiguous(biases, false, stream)};
  return mx::array({out, in}, mx::float32,
                   std::make_shared<QuantizedGemv>(stream, group_size, bits, true), inputs);
}

}  // namespace

NB_MODULE(_exo_qgemv, m) {
  m.doc() = "exo's CPU decode kernel for mlx-lm's affine-quantized weights";
  m.def("quantized_gemv", &quantized_gemv, nb::arg("x"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("group_size"), nb::arg("bits"),
        "y = x @ dequantize(w, scales, biases).T in float32, for few rows of x (decode).");
  m.def("dequantize", &dequantize_f32, nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::arg("bits"),
        "The float32 weight s*q + b (prefill-sized inputs multiply it with a float32 matmul).");
  m.def(
      "float_gemv",
      [](const mx::array& x, const mx::array& w) {
        return exo_sgemv::float_gemv(x, w, has_avx2() && !force_scalar());
      },
      nb::arg("x"), nb::arg("w"),
      "y = x @ w.T for float32 x and w, over every core, for few rows of x (decode).");
  m.def("isa", []() -> std::string { return has_avx2() && !force_scalar() ? "avx2" : "scalar"; });
}
