// llama_fast._C: op schemas, shape checks and the CPU kernels of the memory-bound ops.
//
// The schemas are declared once here (TORCH_LIBRARY); CPU implementations follow, CUDA ones are
// in kernels.cu (TORCH_LIBRARY_IMPL for the CUDA key). The maths and layouts are those of the
// Triton kernels in kernels/ (see their docstrings): fp32 inside, one rounding at the store.
//
//   rms_norm_fwd(x (M, N), w (N,), eps) -> (y (M, N) in promote(w, x), rstd (M,) fp32)
//   rms_norm_bwd(dy, x, w, rstd)        -> (dx, dw)
//   rope_fwd(q (B, Hq, S, D), k (B, Hk, S, D), cos, sin (B, S, D)) -> (q_embed, k_embed)
//   rope_bwd(dq_embed, dk_embed, cos, sin)                          -> (dq, dk)
//   swiglu_fwd(gate (M, N), up (M, N))  -> out
//   swiglu_bwd(dout, gate, up)          -> (dgate, dup)
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
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"

extern "C" {
// A Python module with no functions: importing it loads this library, whose static
// initialisers register the ops with the dispatcher (the pattern of pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace llama_fast {

// ---------------------------------------------------------------------------------------------
// Shape and dtype checks shared by the CPU and CUDA implementations (declared in checks.h).

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, cols), got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " must have unit stride along its last dim");
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

void check_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w) {
  check_rms_norm(x, w);
  check_rows(dy, "rms_norm", "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == w.scalar_type(),
              "rms_norm: dy must have x's shape and the output's dtype");
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
    TORCH_CHECK(t->stride(-1) == 1, op, ": inputs must have unit stride along head_dim");
  }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels: rows in parallel (at::parallel_for, OpenMP: the extension is compiled with
// -fopenmp, since ATen's parallel_for is inline and runs serially without it), inner loops over
// contiguous columns written so that the compiler vectorises them (#pragma omp simd), maths in float.
//
// RMSNorm's weight has x's dtype or float32; y and dy then have the weight's dtype, which is
// promote_types(weight, x) as in LlamaRMSNorm.

namespace {

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// exp(x) in float from Cephes' expf: x = n·ln2 + r with |r| <= ln2/2, e^r by a degree-6
// polynomial (about 1 ulp), 2^n assembled in the exponent bits. Branch-free arithmetic, so the
// `omp simd` loops vectorise it (with -fno-trapping-math, see setup.py); std::exp stays a scalar
// libm call and made SwiGLU 3-5x slower than eager PyTorch (measured here, 2 cores).
inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln2); t + 128.5 > 0, so truncation is floor(t + 0.5) without a branch
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + 128.5f) - 128;
  const float fn = static_cast<float>(n);
  const float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((n + 127) << 23);
}

// Rows per parallel task: enough elements that the threading overhead (~µs) is amortised.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// RMSNorm's dw is summed over a fixed number of row chunks, so the result does not depend on
// how many threads ran: deterministic.
constexpr int64_t kDwChunks = 64;

template <typename T, typename W>
void rms_norm_fwd_cpu_impl(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y, at::Tensor& rstd) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const T* xp = x.data_ptr<T>();
  const W* wp = w.data_ptr<W>();
  W* yp = y.data_ptr<W>();
  float* rp = rstd.data_ptr<float>();
  const int64_t sx = x.stride(0), sy = y.stride(0);
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * sx;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) {
        const float v = to_f(xr[c]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(cols) + feps);
      rp[r] = inv;
      W* yr = yp + r * sy;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        // LlamaRMSNorm rounds the normalised row to x's dtype before the weight multiply.
        const float xhat = to_f(static_cast<T>(to_f(xr[c]) * inv));
        yr[c] = static_cast<W>(to_f(wp[c]) * xhat);
      }
    }
  });
}

template <typename T, typename W>
void rms_norm_bwd_cpu_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                           at::Tensor& dx, at::Tensor& dw_partial) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t chunks = dw_partial.size(0);
  const W* dyp = dy.data_ptr<W>();
  const T* xp = x.data_ptr<T>();
  const W* wp = w.data_ptr<W>();
  const float* rp = rstd.data_ptr<float>();
  T* dxp = dx.data_ptr<T>();
  float* pp = dw_partial.data_ptr<float>();
  const int64_t sdy = dy.stride(0), sx = x.stride(0), sdx = dx.stride(0);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    for (int64_t chunk = cbegin; chunk < cend; ++chunk) {
      float* acc = pp + chunk * cols;
      std::fill(acc, acc + cols, 0.f);
      const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = xp + r * sx;
        const W* dyr = dyp + r * sdy;
        const float inv = rp[r];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < cols; ++c) {
          dot += to_f(dyr[c]) * to_f(wp[c]) * to_f(xr[c]) * inv;
        }
        const float mean = dot / static_cast<float>(cols);
        T* dxr = dxp + r * sdx;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const float xhat = to_f(xr[c]) * inv;
          const float g = to_f(dyr[c]) * to_f(wp[c]);
          dxr[c] = static_cast<T>(inv * (g - xhat * mean));
          acc[c] += to_f(dyr[c]) * to_f(static_cast<T>(xhat));
        }
      }
    }
  });
}

template <typename T, typename C>
void rope_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                   at::Tensor& q_out, at::Tensor& k_out, bool backward) {
  const int64_t batch = q.size(0), seq = q.size(2), half = q.size(3) / 2;
  const C* cp = cos.data_ptr<C>();
  const C* sp = sin.data_ptr<C>();
  const int64_t scb = cos.stride(0), scs = cos.stride(1);
  at::parallel_for(0, batch * seq, std::max<int64_t>(1, 64 / std::max<int64_t>(q.size(1), 1)), [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / seq, s = token % seq;
      const C* c = cp + b * scb + s * scs;
      const C* sn = sp + b * scb + s * scs;
      for (auto [in, out] : {std::pair<const at::Tensor*, at::Tensor*>{&q, &q_out}, {&k, &k_out}}) {
        const T* ip = in->template data_ptr<T>();
        T* op = out->template data_ptr<T>();
        for (int64_t h = 0; h < in->size(1); ++h) {
          const T* x = ip + b * in->stride(0) + h * in->stride(1) + s * in->stride(2);
          T* y = op + b * out->stride(0) + h * out->stride(1) + s * out->stride(2);
#pragma omp simd
          for (int64_t d = 0; d < half; ++d) {
            const float x1 = to_f(x[d]), x2 = to_f(x[d + half]);
            const float c1 = to_f(c[d]), c2 = to_f(c[d + half]), s1 = to_f(sn[d]), s2 = to_f(sn[d + half]);
            // forward: y = x·cos + rotate_half(x)·sin; backward: its transpose (see kernels/rope.py)
            const float y1 = backward ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
            const float y2 = backward ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
            y[d] = static_cast<T>(y1);
            y[d + half] = static_cast<T>(y2);
          }
        }
      }
    }
  });
}

// The SwiGLU maths on float rows, in functions of plain pointers that GCC vectorises. The exp
// polynomial is slow in baseline SSE2 (6.2 ns an element on this machine's EPYC, single thread)
// and 1.9 ns with AVX2 + FMA, so x86-64 builds carry both clones and pick one at load time.
#if defined(__x86_64__) && defined(__GNUC__)
#define LLAMA_FAST_CLONES __attribute__((noinline, target_clones("arch=x86-64-v3", "default")))
#else
#define LLAMA_FAST_CLONES __attribute__((noinline))
#endif

LLAMA_FAST_CLONES void swiglu_fwd_row(const float* __restrict g, const float* __restrict u,
                                              float* __restrict o, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) o[c] = g[c] / (1.f + exp_f(-g[c])) * u[c];
}

LLAMA_FAST_CLONES void swiglu_bwd_row(const float* __restrict d, const float* __restrict g,
                                              const float* __restrict u, float* __restrict dg,
                                              float* __restrict du, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float sig = 1.f / (1.f + exp_f(-g[c]));
    du[c] = d[c] * g[c] * sig;
    dg[c] = d[c] * u[c] * sig * (1.f + g[c] * (1.f - sig));
  }
}

// bf16 <-> float by bit manipulation, branch-free so that it vectorises (c10::BFloat16's own
// conversions test for NaN with a branch and stay scalar: they made bf16 SwiGLU slower than eager).
LLAMA_FAST_CLONES void bf16_to_float(const uint16_t* __restrict in, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = std::bit_cast<float>(static_cast<uint32_t>(in[c]) << 16);
}

LLAMA_FAST_CLONES void float_to_bf16(const float* __restrict in, uint16_t* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t bits = std::bit_cast<uint32_t>(in[c]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
    out[c] = static_cast<uint16_t>(in[c] != in[c] ? 0x7FC0u : rounded);     // NaN stays NaN
  }
}

// A row as float: the row itself for float tensors, else converted into `buffer`.
template <typename T>
const float* as_float(const T* row, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_to_float(reinterpret_cast<const uint16_t*>(row), buffer, n);
    return buffer;
  } else {
    for (int64_t c = 0; c < n; ++c) buffer[c] = static_cast<float>(row[c]);
    return buffer;
  }
}

template <typename T>
float* out_row(T* row, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    return buffer;
  }
}

template <typename T>
void store_row(const float* values, T* row, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    float_to_bf16(values, reinterpret_cast<uint16_t*>(row), n);
  } else if constexpr (!std::is_same_v<T, float>) {
    for (int64_t c = 0; c < n; ++c) row[c] = static_cast<T>(values[c]);
  }
}

template <typename T>
void swiglu_fwd_cpu_impl(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  const int64_t rows = gate.size(0), cols = gate.size(1);
  const T* gp = gate.data_ptr<T>();
  const T* up_ = up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t sg = gate.stride(0), su = up.stride(0), so = out.stride(0);
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : 3 * cols);
    float* buf = scratch.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* g = as_float(gp + r * sg, cols, buf);
      const float* u = as_float(up_ + r * su, cols, buf + cols);
      float* o = out_row(op + r * so, buf + 2 * cols);
      swiglu_fwd_row(g, u, o, cols);
      store_row(o, op + r * so, cols);
    }
  });
}

template <typename T>
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
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(std::is_same_v<T, float> ? 0 : 5 * cols);
    float* buf = scratch.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* d = as_float(dp + r * sd, cols, buf);
      const float* g = as_float(gp + r * sg, cols, buf + cols);
      const float* u = as_float(up_ + r * su, cols, buf + 2 * cols);
      float* dg = out_row(dgp + r * sdg, buf + 3 * cols);
      float* du = out_row(dup_ + r * sdu, buf + 4 * cols);
      swiglu_bwd_row(d, g, u, dg, du, cols);
      store_row(dg, dgp + r * sdg, cols);
      store_row(du, dup_ + r * sdu, cols);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rms_norm(x, w);
  auto y = at::empty(x.sizes(), x.options().dtype(w.scalar_type()));
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  dispatch_rms(x, w, [&](auto t, auto wt) {
    rms_norm_fwd_cpu_impl<decltype(t), decltype(wt)>(x, w, eps, y, rstd);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& rstd) {
  check_rms_norm_bwd(dy, x, w);
  auto dx = at::empty(x.sizes(), x.options());
  auto partial = at::empty({std::min<int64_t>(kDwChunks, std::max<int64_t>(x.size(0), 1)), x.size(1)},
                           x.options().dtype(at::kFloat));
  dispatch_rms(x, w, [&](auto t, auto wt) {
    rms_norm_bwd_cpu_impl<decltype(t), decltype(wt)>(dy, x, w, rstd, dx, partial);
  });
  return {dx, x.size(0) ? at::sum(partial, 0).to(w.scalar_type()) : at::zeros_like(w)};
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool backward) {
  check_rope(q, k, cos, sin);
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope", [&] {
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

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu(gate, up);
  auto out = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_fwd", [&] {
    swiglu_fwd_cpu_impl<scalar_t>(gate, up, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dout, const at::Tensor& gate,
                                                  const at::Tensor& up) {
  check_swiglu_bwd(dout, gate, up);
  auto dgate = at::empty(gate.sizes(), gate.options());
  auto dup = at::empty(up.sizes(), up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_bwd", [&] {
    swiglu_bwd_cpu_impl<scalar_t>(dout, gate, up, dgate, dup);
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY(llama_fast, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("rope_bwd(Tensor dq_embed, Tensor dk_embed, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
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
