// llama_fast._C: op schemas, shape checks and the CPU kernels of the memory-bound ops.
//
// The schemas are declared once here (TORCH_LIBRARY); CPU implementations follow, CUDA ones are
// in kernels.cu (TORCH_LIBRARY_IMPL for the CUDA key). The maths and layouts are those of the
// Triton kernels in kernels/ (see their docstrings): fp32 inside, one rounding at the store.
//
//   rms_norm_fwd(x (M, N), w (N,), eps, unit_offset) -> (y (M, N) in promote(w, x), rstd (M,) fp32)
//   rms_norm_bwd(dy, x, w, rstd, unit_offset)        -> (dx, dw)
//     unit_offset: Gemma's RMSNorm, y = x·rstd·(1 + w) in fp32, y and dy in x's dtype
//   rope_fwd(q (B, Hq, S, D), k (B, Hk, S, D), cos, sin (B, S, D)) -> (q_embed, k_embed)
//   rope_bwd(dq_embed, dk_embed, cos, sin)                          -> (dq, dk)
//   swiglu_fwd(gate (M, N), up (M, N), activation)  -> out = act(gate) · up
//   swiglu_bwd(dout, gate, up, activation)          -> (dgate, dup)
//     activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gelu(gate, approximate="tanh"))
//
// Rows may be strided (row stride arbitrary); the last dimension must have unit stride.

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "checks.h"

namespace llama_fast {
const char* swiglu_cpu_path();  // "avx2" or "portable": which SwiGLU loop the CPU kernels run
}

extern "C" {
static PyObject* swiglu_cpu_path(PyObject*, PyObject*) {
  return PyUnicode_FromString(llama_fast::swiglu_cpu_path());
}

// A Python module whose import loads this library, whose static initialisers register the ops
// with the dispatcher (the pattern of pytorch/extension-cpp); its one function is a diagnostic.
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"swiglu_cpu_path", swiglu_cpu_path, METH_NOARGS, "'avx2' or 'portable': the CPU SwiGLU loop in use"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

namespace llama_fast {

// ---------------------------------------------------------------------------------------------
// Shape and dtype checks shared by the CPU and CUDA implementations (declared in checks.h).

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, cols), got ", t.dim(), "-D");
  // An empty tensor is never read, and autograd hands empty ones over with any strides (an expanded
  // zero-row gradient has stride 0), so only a tensor with elements must have unit stride.
  TORCH_CHECK(t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have unit stride along its last dim");
  check_float(t, op, name);
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name, " has dtype ", s,
              "; supported are float32, float16 and bfloat16");
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), op, ": inputs must be on one device, got ", an, " on ", a.device(), ", ",
              bn, " on ", b.device());
}

void check_rms_norm(const at::Tensor& x, const at::Tensor& w) {
  check_rows(x, "rms_norm", "x");
  check_float(w, "rms_norm", "weight");
  check_same_device(x, w, "rms_norm", "x", "weight");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "rms_norm: weight must have shape (", x.size(1),
              ",) to match x's last dim, got ", w.sizes());
  TORCH_CHECK(w.stride(0) == 1 || w.size(0) <= 1, "rms_norm: weight must be contiguous");
}

void check_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "swiglu", "gate");
  check_rows(up, "swiglu", "up");
  check_same_device(gate, up, "swiglu", "gate", "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu: gate and up must have one shape, got ", gate.sizes(), " and ",
              up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "swiglu: inputs must share one dtype, got gate ",
              gate.scalar_type(), ", up ", up.scalar_type());
}

void check_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, bool unit_offset) {
  check_rms_norm(x, w);
  check_rows(dy, "rms_norm", "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == rms_norm_output_dtype(x, w, unit_offset),
              "rms_norm: dy must have x's shape and the output's dtype");
}

at::ScalarType rms_norm_output_dtype(const at::Tensor& x, const at::Tensor& w, bool unit_offset) {
  return unit_offset ? x.scalar_type() : w.scalar_type();
}

bool is_gelu(c10::string_view activation) {
  TORCH_CHECK(activation == "silu" || activation == "gelu_tanh", "swiglu: activation must be \"silu\" or ",
              "\"gelu_tanh\", got \"", std::string(activation), "\"");
  return activation == "gelu_tanh";
}

void check_swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up);
  check_rows(dout, "swiglu", "dout");
  TORCH_CHECK(dout.sizes() == gate.sizes() && dout.scalar_type() == gate.scalar_type(),
              "swiglu: dout must have gate's shape and dtype");
}

void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "apply_rotary_pos_emb";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q and k must be 4-D (batch, heads, seq, head_dim)");
  check_float(q, op, "q");
  check_float(k, op, "k");
  check_float(cos, op, "cos");
  check_float(sin, op, "sin");
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, cos, op, "q", "cos");
  check_same_device(q, sin, op, "q", "sin");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k must share one dtype");
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), op, ": cos and sin must share one dtype");
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat, op,
              ": the extension takes cos/sin in q's dtype or float32");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op, ": q ", q.sizes(),
              " and k ", k.sizes(), " differ in batch, seq or head_dim");
  TORCH_CHECK(q.size(3) % 2 == 0, op, ": head_dim must be even for the rotate_half layout, got ", q.size(3));
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) &&
                  cos.size(1) == q.size(2) && cos.size(2) == q.size(3),
              op, ": cos and sin must be (batch, seq, head_dim) = (", q.size(0), ", ", q.size(2), ", ", q.size(3),
              ") (a stride of 0 along batch broadcasts), got ", cos.sizes());
  for (const at::Tensor* t : {&q, &k, &cos, &sin}) {
    TORCH_CHECK(t->numel() == 0 || t->stride(-1) == 1, op, ": inputs must have unit stride along head_dim");
  }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels: rows in parallel (at::parallel_for, OpenMP: the extension is compiled with
// -fopenmp, since ATen's parallel_for is inline and runs serially without it). The maths is in
// functions of float rows whose inner loops over contiguous columns the compiler vectorises
// (#pragma omp simd); fp16 and bf16 rows are staged through per-thread float buffers (see
// stage), so each kernel is written once, on floats, and rounds once at the store. SwiGLU alone
// reads bf16 rows directly (see swiglu_fwd_row).
//
// The row functions are compiled twice (target_clones): for x86-64-v3 (AVX2 + FMA, 8 floats a
// vector) and for the baseline the build targets (SSE2 on x86-64), and the loader picks one for
// the CPU it runs on. AVX2 is what made these kernels beat eager PyTorch, whose own kernels are
// built per CPU: on this machine's 2-core AMD EPYC, RMSNorm's forward took 0.8 ns an element (one
// thread) compiled for SSE2, SwiGLU's 1.9 ns.
//
// RMSNorm's weight has x's dtype or float32; y and dy then have the weight's dtype, which is
// promote_types(weight, x) as in LlamaRMSNorm.

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define LLAMA_FAST_CLONES __attribute__((noinline, target_clones("arch=x86-64-v3", "default")))
#else
#define LLAMA_FAST_CLONES __attribute__((noinline))
#endif

// Conversions to and from float, written by bit manipulation and branch-free so that loops over
// 16-bit values vectorise: c10's conversions stay scalar in GCC 12 (c10::BFloat16 tests for NaN
// with a branch; c10::Half's code goes through memcpy and a conditional assignment; and GCC cannot
// vectorise _Float16 conversions even with F16C). With c10's, bf16 SwiGLU was slower than eager
// and fp16 RoPE 3.7x slower (measured here, 2 cores). The fp16 ones stage rows on CPUs without
// F16C and convert the few values past a multiple of 8 on those with it.
inline float bf16_to_f(uint16_t h) { return c10::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

inline uint16_t f_to_bf16(float v) {
  const uint32_t bits = c10::bit_cast<uint32_t>(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
  return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);                // NaN stays NaN
}

// IEEE half -> float without a subnormal float intermediate: a normal half (or inf/NaN) is its
// exponent and mantissa moved into a float's fields with the exponent bias raised by 224, then
// scaled by 2^-112 (15 + 224 - 112 = 127); a subnormal half h·2^-24 is made exact by placing h in
// the mantissa of 0.5 (2^-1 · (1 + h·2^-23) with the exponent adjusted) and subtracting 0.5.
inline float half_to_f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t no_sign = static_cast<uint32_t>(h) << 17;  // exponent at the top
  const float normal = c10::bit_cast<float>((no_sign >> 4) + (224u << 23)) * 0x1.0p-112f;
  const float subnormal = c10::bit_cast<float>((no_sign >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = c10::bit_cast<uint32_t>(no_sign < (1u << 27) ? subnormal : normal);
  return c10::bit_cast<float>(sign | magnitude);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN kept: |v| is scaled by 2^2
// (2^112 first, so anything beyond half's range becomes inf), then added to a power of two chosen
// from v's exponent so that the float add itself rounds the mantissa to half's 10 bits (its
// subnormal spacing below 2^-14); the half's fields are then read off the sum's bits.
inline uint16_t f_to_half(float v) {
  float base = (std::abs(v) * 0x1.0p112f) * 0x1.0p-110f;
  const uint32_t w = c10::bit_cast<uint32_t>(v);
  const uint32_t twice = w + w;  // sign dropped
  const uint32_t bias = std::max(twice & 0xFF000000u, 0x71000000u);
  base = c10::bit_cast<float>((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = c10::bit_cast<uint32_t>(base);
  const uint32_t fields = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return static_cast<uint16_t>(((w >> 16) & 0x8000u) | (twice > 0xFF000000u ? 0x7E00u : fields));
}

// Element access for the loops that read float or bf16 values directly (SwiGLU's, round_as);
// fp16 rows never reach them: they are staged (stage) or converted in registers (avx2::).
template <typename T>
inline float to_f(T v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16_to_f(v.x);
  } else {
    return v;
  }
}

template <typename T>
inline T from_f(float v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return T(f_to_bf16(v), T::from_bits());
  } else {
    return v;
  }
}

// e^x for x <= 0, in float, from Cephes' expf: x = n·ln2 + r with |r| <= ln2/2, e^r by a
// degree-7 polynomial (about 1 ulp), 2^n assembled in the exponent bits, and results below
// float's normal range (x < -87.3) flushed to 0. Branch-free arithmetic, so the `omp simd` loops
// vectorise it (with -fno-trapping-math, see setup.py); std::exp stays a scalar libm call and
// made SwiGLU 3-5x slower than eager PyTorch (measured here, 2 cores).
inline float exp_nonpositive(float x) {
  x = x < -100.f ? -100.f : x;  // keeps the range reduction finite for x = -inf
  // n = round(x / ln2) by the 1.5·2^23 trick: the float add rounds to an integer, whose bits are
  // n plus a constant (cheaper than a float->int conversion: 1.8 vs 2.3 ns an element in an
  // earlier form of SwiGLU's loop, one thread).
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float fn = shifted - 12582912.0f;
  const int32_t n = c10::bit_cast<int32_t>(shifted) - c10::bit_cast<int32_t>(12582912.0f);
  const float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * c10::bit_cast<float>(std::max(n + 127, 0) << 23);
}

// 1/d for d in [1, 2] without a division, which this CPU's vector unit does slowly (dividing
// took SwiGLU's loop from about 1 to 1.9 ns an element, one thread). A first guess from the bits (within 5.1%), then
// Newton steps r·(2 - d·r), each squaring the relative error; the last written r + r·(1 - d·r),
// which with FMA rounds to within 6e-8 of 1/d (1.2e-7 without FMA).
inline float recip(float d) {
  float r = c10::bit_cast<float>(0x7EF311C3 - c10::bit_cast<int32_t>(d));
  r = r * (2.f - d * r);
  r = r * (2.f - d * r);
  return r + r * (1.f - d * r);
}

// 1/(1 + e^-x) through e = e^-|x| <= 1, so that 1 + e stays in [1, 2] and no intermediate is
// tiny: an earlier form that clamped x and let e^-x range up to e^87 ran 1.8x slower on random
// inputs, because the compiler evaluated the clamped lanes' constant result x·1/(1 + e^87) for
// every lane and each subnormal product cost a microcode assist.
inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::abs(x));
  const float s = recip(1.f + e);
  return x >= 0.f ? s : e * s;
}

// fp16 rows to float and back 8 at a time with F16C (vcvtph2ps / vcvtps2ph, round to nearest
// even) where the CPU has it: the portable conversions above cost 0.3 and 0.5 ns an element
// here, as much again as SwiGLU's maths, and left every fp16 forward slower than eager.
#if defined(__x86_64__) && defined(__GNUC__)
#define LLAMA_FAST_F16C 1
__attribute__((target("avx,f16c"))) void halves_to_floats_f16c(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  for (; i < n; ++i) out[i] = half_to_f(in[i]);
}

__attribute__((target("avx,f16c"))) void floats_to_halves_f16c(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = f_to_half(in[i]);
}

bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

// out[i] = Convert(in[i]) for n values, vectorised (the conversions above are branch-free).
template <typename From, typename To, To (*Convert)(From)>
LLAMA_FAST_CLONES void convert_row(const From* __restrict in, To* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = Convert(in[i]);
}

// A row of n values as floats: a float row itself, a 16-bit one converted into `buffer`.
template <typename T>
const float* stage(const T* row, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    convert_row<uint16_t, float, bf16_to_f>(reinterpret_cast<const uint16_t*>(row), buffer, n);
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
#ifdef LLAMA_FAST_F16C
    if (has_f16c()) {
      halves_to_floats_f16c(reinterpret_cast<const uint16_t*>(row), buffer, n);
      return buffer;
    }
#endif
    convert_row<uint16_t, float, half_to_f>(reinterpret_cast<const uint16_t*>(row), buffer, n);
  }
  return buffer;
}

// Where a kernel writes a row of T: the row itself for float, else `buffer` (then unstage).
template <typename T>
float* staging(T* row, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    return buffer;
  }
}

// Stores the floats a kernel wrote for a 16-bit row, rounding to nearest even.
template <typename T>
void unstage(const float* values, T* row, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    convert_row<float, uint16_t, f_to_bf16>(values, reinterpret_cast<uint16_t*>(row), n);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef LLAMA_FAST_F16C
    if (has_f16c()) {
      floats_to_halves_f16c(values, reinterpret_cast<uint16_t*>(row), n);
      return;
    }
#endif
    convert_row<float, uint16_t, f_to_half>(values, reinterpret_cast<uint16_t*>(row), n);
  }
}

// A float buffer per parallel task for staging: `rows` rows of n floats, none for float T.
template <typename T>
std::vector<float> staging_buffer(int64_t rows, int64_t n) {
  return std::vector<float>(std::is_same_v<T, float> ? 0 : rows * n);
}

// v rounded to fp16 (to nearest even) and back, in float arithmetic: adding s = 1.5·2^(e+13),
// e = v's exponent (at least -14, half's subnormal spacing), makes the float add round v to half's
// 11 significant bits; subtracting s again is exact. About 8 operations where f_to_half then
// half_to_f take 25 (RMSNorm's fp16 forward was no faster than eager with those). Checked against
// them on all 2^32 floats: equal, zeros' signs included.
inline float round_to_half(float v) {
  const uint32_t biased = std::min(std::max((c10::bit_cast<uint32_t>(v) >> 23) & 0xFFu, 113u), 142u);
  const float s = c10::bit_cast<float>(((biased + 13u) << 23) | 0x400000u);
  const float r = (v + s) - s;
  return std::copysign(std::abs(r) > 65504.f ? std::numeric_limits<float>::infinity() : r, v);
}

// v rounded to T and back: LlamaRMSNorm rounds its normalised row to x's dtype.
template <typename T>
inline float round_as(float v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return round_to_half(v);
  } else {
    return to_f(from_f<T>(v));
  }
}

// Rows per parallel task: enough elements that the threading overhead (~µs) is amortised.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// RMSNorm's dw is summed over a fixed number of row chunks, so the result does not depend on
// how many threads ran: deterministic.
constexpr int64_t kDwChunks = 64;

// One row: y = w · round_as<T>(x · rstd), rstd = 1/sqrt(mean(x²) + eps), returned. Offset (Gemma's
// norm): y = x · rstd · (1 + w), nothing rounded before the store.
template <typename T, bool Offset>
LLAMA_FAST_CLONES float rms_norm_fwd_row(const float* __restrict x, const float* __restrict w, float* __restrict y,
                                         int64_t cols, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < cols; ++c) ss += x[c] * x[c];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(cols) + eps);
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) y[c] = Offset ? x[c] * inv * (1.f + w[c]) : w[c] * round_as<T>(x[c] * inv);
  return inv;
}

// One row's dx, and its dw term added into acc.
template <typename T, bool Offset>
LLAMA_FAST_CLONES void rms_norm_bwd_row(const float* __restrict dy, const float* __restrict x,
                                        const float* __restrict w, float inv, float* __restrict dx,
                                        float* __restrict acc, int64_t cols) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < cols; ++c) dot += dy[c] * (Offset ? 1.f + w[c] : w[c]) * x[c] * inv;
  const float mean = dot / static_cast<float>(cols);
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const float xhat = x[c] * inv;
    dx[c] = inv * (dy[c] * (Offset ? 1.f + w[c] : w[c]) - xhat * mean);
    acc[c] += dy[c] * (Offset ? xhat : round_as<T>(xhat));
  }
}

// One token's heads, each a row of 2·half floats (heads rows of stride 2·half):
// forward y = x·cos + rotate_half(x)·sin; backward its transpose (see kernels/rope.py). Backward
// is a template parameter: a runtime flag's select in the loop kept GCC from vectorising it.
template <bool Backward>
LLAMA_FAST_CLONES void rope_row(const float* __restrict x, float* __restrict y, int64_t heads,
                                const float* __restrict c, const float* __restrict sn, int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * 2 * half;
    float* yh = y + h * 2 * half;
#pragma omp simd
    for (int64_t d = 0; d < half; ++d) {
      const float x1 = xh[d], x2 = xh[d + half];
      yh[d] = Backward ? x1 * c[d] + x2 * sn[d + half] : x1 * c[d] - x2 * sn[d];
      yh[d + half] = Backward ? x2 * c[d + half] - x1 * sn[d] : x2 * c[d + half] + x1 * sn[d + half];
    }
  }
}

// SwiGLU reads float or bf16 rows directly, converting in the loop (bf16 is a shift): its bf16
// forward measured 1.04-1.35x eager so, 0.97-0.99x with bf16 staged through float buffers (separate
// runs at 256 and 2048 tokens, 2 cores). fp16 rows are staged.
// GeGLU (Gelu) shares the loops: gelu_tanh(g) = g · σ(2z), z = √(2/π)(g + 0.044715 g³), as (1 + tanh z)/2 =
// σ(2z), and sigmoid() above vectorises where std::tanh does not (kernels/swiglu.py has the derivative).
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

inline float gelu_gate(float g) { return sigmoid(2.f * kSqrt2OverPi * (g + kGeluCubic * g * g * g)); }

template <typename T, bool Gelu>
LLAMA_FAST_CLONES void swiglu_fwd_row(const T* __restrict g, const T* __restrict u, T* __restrict o, int64_t cols) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const float gf = to_f(g[c]);
    o[c] = from_f<T>(gf * (Gelu ? gelu_gate(gf) : sigmoid(gf)) * to_f(u[c]));
  }
}

template <typename T, bool Gelu>
LLAMA_FAST_CLONES void swiglu_bwd_row(const T* __restrict d, const T* __restrict g, const T* __restrict u,
                                      T* __restrict dg, T* __restrict du, int64_t cols) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const float df = to_f(d[c]), gf = to_f(g[c]), uf = to_f(u[c]);
    if constexpr (Gelu) {
      const float x = 2.f * kSqrt2OverPi * (gf + kGeluCubic * gf * gf * gf);
      const float s = sigmoid(x);
      du[c] = from_f<T>(df * gf * s);
      // 1 - s as sigmoid(-x), which does not cancel where s is near 1 (kernels/swiglu.py)
      const float slope = s + gf * 2.f * s * sigmoid(-x) * kSqrt2OverPi * (1.f + 3.f * kGeluCubic * gf * gf);
      dg[c] = from_f<T>(df * uf * slope);
    } else {
      const float sig = sigmoid(gf);
      du[c] = from_f<T>(df * gf * sig);
      dg[c] = from_f<T>(df * uf * sig * (1.f + gf * (1.f - sig)));
    }
  }
}

#ifdef LLAMA_FAST_F16C
// SwiGLU with AVX2 + FMA + F16C intrinsics, where the CPU has them (x86-64-v3): the same maths as
// sigmoid() above but for the reciprocal's first guess, _mm256_rcp_ps (within 3.7e-4, so two
// Newton steps instead of three; one left sigmoid 1 ulp short of 1 for large x, which the
// backward's g·(1 - sigmoid) magnified to 0.1% at g = 1e4), and fp16/bf16 converted 8 at a time
// inside the loop. SwiGLU
// is the one op whose CPU cost is arithmetic (the exp) rather than memory: forward at 256 tokens,
// the portable loop measured 1.18x eager in fp32 and 0.95x in fp16 (staged), this one 1.21x and
// 1.19x (bench/results/cpu-2026-11-28 and its no-avx2/, 2 cores).
// The last cols % 8 values go through the same vector code on a zero-padded copy, so every
// column gets the same arithmetic. LLAMA_FAST_NO_AVX2=1 turns this path off (the tests run the
// portable one that way).
namespace avx2 {

#define LLAMA_FAST_AVX2 __attribute__((target("avx2,fma,f16c")))

bool usable() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && std::getenv("LLAMA_FAST_NO_AVX2") == nullptr;
  return yes;
}

LLAMA_FAST_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

LLAMA_FAST_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

LLAMA_FAST_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

LLAMA_FAST_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// Round to nearest even as f_to_bf16 does, NaN kept; then 8 x 32 -> 8 x 16 bits (packus works
// within 128-bit lanes, so the permute brings the two halves together).
LLAMA_FAST_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

LLAMA_FAST_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// exp_nonpositive() on 8 lanes (max(-100, x) keeps NaN: MAXPS returns its second operand then).
LLAMA_FAST_AVX2 inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-100.f), x);
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 fn = _mm256_sub_ps(shifted, magic);
  const __m256i n = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(magic));
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(fn, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i biased = _mm256_max_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), _mm256_setzero_si256());
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}

LLAMA_FAST_AVX2 inline __m256 sigmoid8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 e = exp_nonpositive8(_mm256_or_ps(x, sign));  // e^-|x|
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), e);
  __m256 s = _mm256_rcp_ps(d);                                                  // within 3.7e-4
  s = _mm256_mul_ps(s, _mm256_fnmadd_ps(d, s, _mm256_set1_ps(2.0f)));             // within 1.4e-7
  s = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(d, s, _mm256_set1_ps(1.0f)), s);        // as recip()'s last step
  return _mm256_blendv_ps(s, _mm256_mul_ps(e, s), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

// Calls body(offset, loads, store) for each 8 columns; the tail runs on zero-padded copies.
template <typename T, int In, int Out, typename Body>
LLAMA_FAST_AVX2 inline void by_eights(const T* const (&in)[In], T* const (&out)[Out], int64_t cols, Body&& body) {
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    __m256 x[In], y[Out];
    for (int i = 0; i < In; ++i) x[i] = load8(in[i] + c);
    body(x, y);
    for (int i = 0; i < Out; ++i) store8(out[i] + c, y[i]);
  }
  if (c == cols) return;
  T pad_in[In][8] = {}, pad_out[Out][8];
  __m256 x[In], y[Out];
  for (int i = 0; i < In; ++i) {
    std::copy(in[i] + c, in[i] + cols, pad_in[i]);
    x[i] = load8(pad_in[i]);
  }
  body(x, y);
  for (int i = 0; i < Out; ++i) {
    store8(pad_out[i], y[i]);
    std::copy(pad_out[i], pad_out[i] + (cols - c), out[i] + c);
  }
}

template <typename T>
LLAMA_FAST_AVX2 void swiglu_fwd_row(const T* g, const T* u, T* o, int64_t cols) {
  by_eights<T, 2, 1>({g, u}, {o}, cols, [](const __m256* x, __m256* y) LLAMA_FAST_AVX2 {
    y[0] = _mm256_mul_ps(_mm256_mul_ps(x[0], sigmoid8(x[0])), x[1]);
  });
}

template <typename T>
LLAMA_FAST_AVX2 void swiglu_bwd_row(const T* d, const T* g, const T* u, T* dg, T* du, int64_t cols) {
  by_eights<T, 3, 2>({d, g, u}, {dg, du}, cols, [](const __m256* x, __m256* y) LLAMA_FAST_AVX2 {
    const __m256 sig = sigmoid8(x[1]);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 d_sig = _mm256_mul_ps(x[0], sig);
    y[1] = _mm256_mul_ps(d_sig, x[1]);
    const __m256 slope = _mm256_fmadd_ps(x[1], _mm256_sub_ps(one, sig), one);  // 1 + g·(1 - sig)
    y[0] = _mm256_mul_ps(_mm256_mul_ps(d_sig, x[2]), slope);
  });
}

}  // namespace avx2
#endif

}  // namespace

const char* swiglu_cpu_path() {
#ifdef LLAMA_FAST_F16C
  if (avx2::usable()) return "avx2";
#endif
  return "portable";
}

namespace {

// Y, the dtype of y and dy: W (promote(w, x)), or Gemma's (Offset) x's own.
template <typename T, typename W, bool Offset>
void rms_norm_fwd_cpu_impl(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y, at::Tensor& rstd) {
  using Y = std::conditional_t<Offset, T, W>;
  const int64_t rows = x.size(0), cols = x.size(1);
  const T* xp = x.data_ptr<T>();
  const W* wp = w.data_ptr<W>();
  Y* yp = y.data_ptr<Y>();
  float* rp = rstd.data_ptr<float>();
  const int64_t sx = x.stride(0), sy = y.stride(0);
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer = staging_buffer<T>(2, cols);  // x, y
    std::vector<float> weight = staging_buffer<W>(1, cols);
    const float* wf = stage(wp, cols, weight.data());
    for (int64_t r = begin; r < end; ++r) {
      const float* xf = stage(xp + r * sx, cols, buffer.data());
      float* yf = staging(yp + r * sy, buffer.data() + cols);
      rp[r] = rms_norm_fwd_row<T, Offset>(xf, wf, yf, cols, static_cast<float>(eps));
      unstage(yf, yp + r * sy, cols);
    }
  });
}

template <typename T, typename W, bool Offset>
void rms_norm_bwd_cpu_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                           at::Tensor& dx, at::Tensor& dw_partial) {
  using Y = std::conditional_t<Offset, T, W>;
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t chunks = dw_partial.size(0);
  const Y* dyp = dy.data_ptr<Y>();
  const T* xp = x.data_ptr<T>();
  const W* wp = w.data_ptr<W>();
  const float* rp = rstd.data_ptr<float>();
  T* dxp = dx.data_ptr<T>();
  float* pp = dw_partial.data_ptr<float>();
  const int64_t sdy = dy.stride(0), sx = x.stride(0), sdx = dx.stride(0);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> buffer = staging_buffer<T>(3, cols);  // x, dy (W is T when T is 16-bit), dx
    std::vector<float> weight = staging_buffer<W>(1, cols);
    const float* wf = stage(wp, cols, weight.data());
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      float* acc = pp + chunk * cols;
      std::fill(acc, acc + cols, 0.f);
      for (int64_t r = rows * chunk / chunks; r < rows * (chunk + 1) / chunks; ++r) {
        const float* xf = stage(xp + r * sx, cols, buffer.data());
        const float* dyf = stage(dyp + r * sdy, cols, buffer.data() + cols);
        float* dxf = staging(dxp + r * sdx, buffer.data() + 2 * cols);
        rms_norm_bwd_row<T, Offset>(dyf, xf, wf, rp[r], dxf, acc, cols);
        unstage(dxf, dxp + r * sdx, cols);
      }
    }
  });
}

template <typename T, typename C>
void rope_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                   at::Tensor& q_out, at::Tensor& k_out, bool backward) {
  const int64_t seq = q.size(2), dim = q.size(3);
  const C* cp = cos.data_ptr<C>();
  const C* sp = sin.data_ptr<C>();
  const int64_t scb = cos.stride(0), scs = cos.stride(1);
  const int64_t max_heads = std::max(q.size(1), k.size(1));
  const auto rotate = backward ? rope_row<true> : rope_row<false>;
  at::parallel_for(0, q.size(0) * seq, std::max<int64_t>(1, 64 / max_heads), [&](int64_t begin, int64_t end) {
    // 16-bit heads are staged together (in, then out), and 16-bit cos and sin rows.
    std::vector<float> buffer = staging_buffer<T>(2 * max_heads, dim);
    std::vector<float> tables = staging_buffer<C>(2, dim);
    float* in = buffer.data();
    float* out = in + max_heads * dim;
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / seq, s = token % seq;
      const float* c = stage(cp + b * scb + s * scs, dim, tables.data());
      const float* sn = stage(sp + b * scb + s * scs, dim, tables.data() + dim);
      for (auto [src, dst] : {std::pair<const at::Tensor*, at::Tensor*>{&q, &q_out}, {&k, &k_out}}) {
        const int64_t heads = src->size(1);
        const T* x = src->template data_ptr<T>() + b * src->stride(0) + s * src->stride(2);
        T* y = dst->template data_ptr<T>() + b * dst->stride(0) + s * dst->stride(2);
        const int64_t sxh = src->stride(1), syh = dst->stride(1);
        if constexpr (std::is_same_v<T, float>) {
          if (sxh == dim && syh == dim) {  // heads adjacent, as in transformers' layout: one call
            rotate(x, y, heads, c, sn, dim / 2);
          } else {
            for (int64_t h = 0; h < heads; ++h) rotate(x + h * sxh, y + h * syh, 1, c, sn, dim / 2);
          }
        } else {
          for (int64_t h = 0; h < heads; ++h) stage(x + h * sxh, dim, in + h * dim);
          rotate(in, out, heads, c, sn, dim / 2);
          for (int64_t h = 0; h < heads; ++h) unstage(out + h * dim, y + h * syh, dim);
        }
      }
    }
  });
}

template <typename T, bool Gelu>
void swiglu_fwd_cpu_impl(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  const int64_t rows = gate.size(0), cols = gate.size(1);
  const T* gp = gate.data_ptr<T>();
  const T* up_ = up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t sg = gate.stride(0), su = up.stride(0), so = out.stride(0);
#ifdef LLAMA_FAST_F16C
  if (!Gelu && avx2::usable()) {  // SiLU's intrinsics loop; GeGLU runs the portable one
    at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) avx2::swiglu_fwd_row<T>(gp + r * sg, up_ + r * su, op + r * so, cols);
    });
    return;
  }
#endif
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer = staging_buffer<T>(std::is_same_v<T, c10::Half> ? 3 : 0, cols);
    float* buf = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<T, c10::Half>) {
        swiglu_fwd_row<float, Gelu>(stage(gp + r * sg, cols, buf), stage(up_ + r * su, cols, buf + cols),
                                    buf + 2 * cols, cols);
        unstage(buf + 2 * cols, op + r * so, cols);
      } else {
        swiglu_fwd_row<T, Gelu>(gp + r * sg, up_ + r * su, op + r * so, cols);
      }
    }
  });
}

template <typename T, bool Gelu>
void swiglu_bwd_cpu_impl(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, at::Tensor& dgate,
                         at::Tensor& dup) {
  const int64_t rows = gate.size(0), cols = gate.size(1);
  const T* dp = dout.data_ptr<T>();
  const T* gp = gate.data_ptr<T>();
  const T* up_ = up.data_ptr<T>();
  T* dgp = dgate.data_ptr<T>();
  T* dup_ = dup.data_ptr<T>();
  const int64_t sd = dout.stride(0), sg = gate.stride(0), su = up.stride(0);
  const int64_t sdg = dgate.stride(0), sdu = dup.stride(0);
#ifdef LLAMA_FAST_F16C
  if (!Gelu && avx2::usable()) {
    at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        avx2::swiglu_bwd_row<T>(dp + r * sd, gp + r * sg, up_ + r * su, dgp + r * sdg, dup_ + r * sdu, cols);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer = staging_buffer<T>(std::is_same_v<T, c10::Half> ? 5 : 0, cols);
    float* buf = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<T, c10::Half>) {
        swiglu_bwd_row<float, Gelu>(stage(dp + r * sd, cols, buf), stage(gp + r * sg, cols, buf + cols),
                              stage(up_ + r * su, cols, buf + 2 * cols), buf + 3 * cols, buf + 4 * cols, cols);
        unstage(buf + 3 * cols, dgp + r * sdg, cols);
        unstage(buf + 4 * cols, dup_ + r * sdu, cols);
      } else {
        swiglu_bwd_row<T, Gelu>(dp + r * sd, gp + r * sg, up_ + r * su, dgp + r * sdg, dup_ + r * sdu, cols);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w, double eps,
                                                    bool unit_offset) {
  check_rms_norm(x, w);
  auto y = at::empty(x.sizes(), x.options().dtype(rms_norm_output_dtype(x, w, unit_offset)));
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  dispatch_rms(x, w, [&](auto t, auto wt) {
    if (unit_offset) rms_norm_fwd_cpu_impl<decltype(t), decltype(wt), true>(x, w, eps, y, rstd);
    else rms_norm_fwd_cpu_impl<decltype(t), decltype(wt), false>(x, w, eps, y, rstd);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& rstd, bool unit_offset) {
  check_rms_norm_bwd(dy, x, w, unit_offset);
  auto dx = at::empty(x.sizes(), x.options());
  auto partial = at::empty({std::min<int64_t>(kDwChunks, std::max<int64_t>(x.size(0), 1)), x.size(1)},
                           x.options().dtype(at::kFloat));
  dispatch_rms(x, w, [&](auto t, auto wt) {
    if (unit_offset) rms_norm_bwd_cpu_impl<decltype(t), decltype(wt), true>(dy, x, w, rstd, dx, partial);
    else rms_norm_bwd_cpu_impl<decltype(t), decltype(wt), false>(dy, x, w, rstd, dx, partial);
  });
  return {dx, x.size(0) ? at::sum(partial, 0).to(w.scalar_type()) : at::zeros_like(w)};
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool backward) {
  check_rope(q, k, cos, sin);
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  LLAMA_FAST_DISPATCH(q.scalar_type(), "rope", [&] {
    if (cos.scalar_type() == q.scalar_type()) {
      rope_cpu_impl<scalar_t, scalar_t>(q, k, cos, sin, q_out, k_out, backward);
    } else {
      rope_cpu_impl<scalar_t, float>(q, k, cos, sin, q_out, k_out, backward);
    }
  });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                const at::Tensor& sin) {
  return rope_cpu(q, k, cos, sin, false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd_cpu(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& cos,
                                                const at::Tensor& sin) {
  return rope_cpu(dq, dk, cos, sin, true);
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  check_swiglu(gate, up);
  const bool gelu = is_gelu(activation);
  auto out = at::empty(gate.sizes(), gate.options());
  LLAMA_FAST_DISPATCH(gate.scalar_type(), "swiglu_fwd", [&] {
    if (gelu) swiglu_fwd_cpu_impl<scalar_t, true>(gate, up, out);
    else swiglu_fwd_cpu_impl<scalar_t, false>(gate, up, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dout, const at::Tensor& gate,
                                                  const at::Tensor& up, c10::string_view activation) {
  check_swiglu_bwd(dout, gate, up);
  const bool gelu = is_gelu(activation);
  auto dgate = at::empty(gate.sizes(), gate.options());
  auto dup = at::empty(up.sizes(), up.options());
  LLAMA_FAST_DISPATCH(gate.scalar_type(), "swiglu_bwd", [&] {
    if (gelu) swiglu_bwd_cpu_impl<scalar_t, true>(dout, gate, up, dgate, dup);
    else swiglu_bwd_cpu_impl<scalar_t, false>(dout, gate, up, dgate, dup);
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY(llama_fast, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps, bool unit_offset=False) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, bool unit_offset=False) -> (Tensor, Tensor)");
  m.def("rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("rope_bwd(Tensor dq_embed, Tensor dk_embed, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor gate, Tensor up, str activation=\"silu\") -> Tensor");
  m.def("swiglu_bwd(Tensor dout, Tensor gate, Tensor up, str activation=\"silu\") -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("rope_fwd", &rope_fwd_cpu);
  m.impl("rope_bwd", &rope_bwd_cpu);
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
}

}  // namespace llama_fast
