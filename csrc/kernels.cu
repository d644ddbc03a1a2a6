// CUDA implementations of llama_fast's memory-bound ops (schemas in ops.cpp).
//
// fp32, fp16 and bf16 with fp32 maths; launched on the current stream under a device guard.
// Every kernel has a 128-bit path (VEC elements per load: 4 floats or 8 halves) taken when the
// base pointers and row strides are 16-byte aligned and the row length is a multiple of VEC, and
// a scalar path (VEC = 1) otherwise, so odd shapes and views are still right.
//
// RMSNorm backward runs as two kernels: dx one row per block, then dw as a column-parallel sum
// over fixed row chunks (deterministic, no atomics). That reads x and dy twice, ~1.7x the bytes
// of the fused Triton backward; the Triton kernels remain the fast path on GPUs.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "checks.h"

namespace llama_fast {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch is reused by the next call
  return v;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The 128-bit path needs every tensor 16-byte aligned, every row stride a multiple of VEC and
// the row length a multiple of VEC.
template <typename T>
int vec_for(int64_t cols, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int kVec = 16 / sizeof(T);
  if (cols % kVec) return 1;
  for (const at::Tensor* t : tensors) {
    if (!aligned16(*t)) return 1;
    for (int64_t d = 0; d + 1 < t->dim(); ++d) {
      if (t->stride(d) % kVec) return 1;
    }
  }
  return kVec;
}

int threads_for(int64_t packs) {
  int threads = 32;
  while (threads < 1024 && threads < packs) threads *= 2;
  return std::max(threads, 64);
}

// ----------------------------------------------------------------------------- RMSNorm

// Offset: Gemma's norm, y = x·rstd·(1 + w) unrounded, y and dy in x's dtype (Y); else Y is W.
template <typename T, typename W, int VEC, bool Offset, typename Y = std::conditional_t<Offset, T, W>>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, Y* __restrict__ y,
                                    float* __restrict__ rstd, int64_t cols, int64_t stride_x, int64_t stride_y,
                                    float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  Y* yr = y + row * stride_y;
  float ss = 0.f;
  for (int64_t c = threadIdx.x * VEC; c < cols; c += int64_t(blockDim.x) * VEC) {
    float v[VEC];
    load<T, VEC>(xr + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ss += v[i] * v[i];
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
  if (threadIdx.x == 0) rstd[row] = inv;
  for (int64_t c = threadIdx.x * VEC; c < cols; c += int64_t(blockDim.x) * VEC) {
    float v[VEC], wv[VEC], out[VEC];
    load<T, VEC>(xr + c, v);
    load<W, VEC>(w + c, wv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      out[i] = Offset ? v[i] * inv * (1.f + wv[i]) : wv[i] * static_cast<float>(static_cast<T>(v[i] * inv));
    }
    store<Y, VEC>(yr + c, out);
  }
}

template <typename T, typename W, int VEC, bool Offset, typename Y = std::conditional_t<Offset, T, W>>
__global__ void rms_norm_dx_kernel(const Y* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                                   const float* __restrict__ rstd, T* __restrict__ dx, int64_t cols,
                                   int64_t stride_dy, int64_t stride_x, int64_t stride_dx) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const Y* dyr = dy + row * stride_dy;
  const T* xr = x + row * stride_x;
  T* dxr = dx + row * stride_dx;
  const float inv = rstd[row];
  float dot = 0.f;
  for (int64_t c = threadIdx.x * VEC; c < cols; c += int64_t(blockDim.x) * VEC) {
    float d[VEC], v[VEC], wv[VEC];
    load<Y, VEC>(dyr + c, d);
    load<T, VEC>(xr + c, v);
    load<W, VEC>(w + c, wv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dot += d[i] * (Offset ? 1.f + wv[i] : wv[i]) * v[i] * inv;
  }
  const float mean = block_sum(dot, scratch) / cols;
  for (int64_t c = threadIdx.x * VEC; c < cols; c += int64_t(blockDim.x) * VEC) {
    float d[VEC], v[VEC], wv[VEC], out[VEC];
    load<Y, VEC>(dyr + c, d);
    load<T, VEC>(xr + c, v);
    load<W, VEC>(w + c, wv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = inv * (d[i] * (Offset ? 1.f + wv[i] : wv[i]) - v[i] * inv * mean);
    store<T, VEC>(dxr + c, out);
  }
}

// dw_partial[chunk, c] = Σ over the chunk's rows of dy · round_to(T, x · rstd) (Offset: unrounded)
template <typename T, typename W, int VEC, bool Offset, typename Y = std::conditional_t<Offset, T, W>>
__global__ void rms_norm_dw_kernel(const Y* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ rstd,
                                   float* __restrict__ partial, int64_t rows, int64_t cols, int64_t stride_dy,
                                   int64_t stride_x) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols) return;
  const int64_t chunk = blockIdx.y, chunks = gridDim.y;
  const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
  float acc[VEC] = {};
  for (int64_t r = r0; r < r1; ++r) {
    float d[VEC], v[VEC];
    load<Y, VEC>(dy + r * stride_dy + c, d);
    load<T, VEC>(x + r * stride_x + c, v);
    const float inv = rstd[r];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[i] += d[i] * (Offset ? v[i] * inv : static_cast<float>(static_cast<T>(v[i] * inv)));
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) partial[chunk * cols + c + i] = acc[i];
}

constexpr int64_t kDwChunks = 64;

template <bool Offset>
void launch_rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y, at::Tensor& rstd) {
  const int64_t rows = x.size(0), cols = x.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_rms(x, w, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    using Y = std::conditional_t<Offset, T, W>;
    // one vector width for both: the 128-bit path when x and the weight share a dtype
    const bool wide = vec_for<T>(cols, {&x, &y, &w}) > 1 && sizeof(T) == sizeof(W);
    const int threads = threads_for(cols / (wide ? 16 / sizeof(T) : 1));
    if (wide) {
      constexpr int V = 16 / sizeof(T);
      rms_norm_fwd_kernel<T, W, V, Offset><<<rows, threads, 0, stream>>>(
          x.data_ptr<T>(), w.data_ptr<W>(), y.data_ptr<Y>(), rstd.data_ptr<float>(), cols, x.stride(0), y.stride(0),
          static_cast<float>(eps));
    } else {
      rms_norm_fwd_kernel<T, W, 1, Offset><<<rows, threads, 0, stream>>>(
          x.data_ptr<T>(), w.data_ptr<W>(), y.data_ptr<Y>(), rstd.data_ptr<float>(), cols, x.stride(0), y.stride(0),
          static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& w, double eps,
                                                     bool unit_offset) {
  check_rms_norm(x, w);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty(x.sizes(), x.options().dtype(rms_norm_output_dtype(x, w, unit_offset)));
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  const int64_t rows = x.size(0), cols = x.size(1);
  if (x.size(0) == 0) return {y, rstd};
  if (unit_offset) launch_rms_norm_fwd<true>(x, w, eps, y, rstd);
  else launch_rms_norm_fwd<false>(x, w, eps, y, rstd);
  return {y, rstd};
}

template <bool Offset>
void launch_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                         at::Tensor& dx, at::Tensor& partial) {
  const int64_t rows = x.size(0), cols = x.size(1), chunks = partial.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_rms(x, w, [&](auto t, auto wt) {
    using T = decltype(t);
    using W = decltype(wt);
    using Y = std::conditional_t<Offset, T, W>;
    const bool wide = vec_for<T>(cols, {&x, &dx, &dy, &w}) > 1 && sizeof(T) == sizeof(W);
    const int threads = threads_for(cols / (wide ? 16 / sizeof(T) : 1));
    const dim3 dw_grid((cols + 255) / 256, chunks);
    if (wide) {
      constexpr int V = 16 / sizeof(T);
      rms_norm_dx_kernel<T, W, V, Offset><<<rows, threads, 0, stream>>>(
          dy.data_ptr<Y>(), x.data_ptr<T>(), w.data_ptr<W>(), rstd.data_ptr<float>(), dx.data_ptr<T>(), cols,
          dy.stride(0), x.stride(0), dx.stride(0));
      rms_norm_dw_kernel<T, W, V, Offset><<<dim3((cols / V + 255) / 256, chunks), 256, 0, stream>>>(
          dy.data_ptr<Y>(), x.data_ptr<T>(), rstd.data_ptr<float>(), partial.data_ptr<float>(), rows, cols,
          dy.stride(0), x.stride(0));
    } else {
      rms_norm_dx_kernel<T, W, 1, Offset><<<rows, threads, 0, stream>>>(
          dy.data_ptr<Y>(), x.data_ptr<T>(), w.data_ptr<W>(), rstd.data_ptr<float>(), dx.data_ptr<T>(), cols,
          dy.stride(0), x.stride(0), dx.stride(0));
      rms_norm_dw_kernel<T, W, 1, Offset><<<dw_grid, 256, 0, stream>>>(
          dy.data_ptr<Y>(), x.data_ptr<T>(), rstd.data_ptr<float>(), partial.data_ptr<float>(), rows, cols,
          dy.stride(0), x.stride(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor& rstd, bool unit_offset) {
  check_rms_norm_bwd(dy, x, w, unit_offset);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  auto dx = at::empty(x.sizes(), x.options());
  if (rows == 0) return {dx, at::zeros_like(w)};
  auto partial = at::empty({std::min(kDwChunks, rows), cols}, x.options().dtype(at::kFloat));
  if (unit_offset) launch_rms_norm_bwd<true>(dy, x, w, rstd, dx, partial);
  else launch_rms_norm_bwd<false>(dy, x, w, rstd, dx, partial);
  return {dx, at::sum(partial, 0).to(w.scalar_type())};
}

// ----------------------------------------------------------------------------- RoPE

// One block per token (b, s): every (head, column pack) of q, then of k. BACKWARD applies the
// transpose of the rotation (see kernels/rope.py for the maths).
template <typename T, typename C, int VEC, bool BACKWARD>
__device__ __forceinline__ void rotate_heads(const T* in, T* out, int64_t heads, int64_t stride_in_h,
                                             int64_t stride_out_h, const C* cos, const C* sin, int64_t half) {
  const int64_t packs = half / VEC;
  for (int64_t p = threadIdx.x; p < heads * packs; p += blockDim.x) {
    const int64_t h = p / packs, d = (p % packs) * VEC;
    float x1[VEC], x2[VEC], y1[VEC], y2[VEC];
    load<T, VEC>(in + h * stride_in_h + d, x1);
    load<T, VEC>(in + h * stride_in_h + d + half, x2);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float c1 = static_cast<float>(cos[d + i]), c2 = static_cast<float>(cos[d + half + i]);
      const float s1 = static_cast<float>(sin[d + i]), s2 = static_cast<float>(sin[d + half + i]);
      y1[i] = BACKWARD ? x1[i] * c1 + x2[i] * s2 : x1[i] * c1 - x2[i] * s1;
      y2[i] = BACKWARD ? x2[i] * c2 - x1[i] * s1 : x2[i] * c2 + x1[i] * s2;
    }
    store<T, VEC>(out + h * stride_out_h + d, y1);
    store<T, VEC>(out + h * stride_out_h + d + half, y2);
  }
}

struct RopeStrides {
  int64_t b, h, s;
};

template <typename T, typename C, int VEC, bool BACKWARD>
__global__ void rope_kernel(const T* __restrict__ q, const T* __restrict__ k, const C* __restrict__ cos,
                            const C* __restrict__ sin, T* __restrict__ q_out, T* __restrict__ k_out, int64_t seq,
                            int64_t q_heads, int64_t k_heads, int64_t half, RopeStrides sq, RopeStrides sk,
                            RopeStrides sqo, RopeStrides sko, int64_t stride_cs_b, int64_t stride_cs_s) {
  const int64_t token = blockIdx.x, b = token / seq, s = token % seq;
  const C* c = cos + b * stride_cs_b + s * stride_cs_s;
  const C* sn = sin + b * stride_cs_b + s * stride_cs_s;
  rotate_heads<T, C, VEC, BACKWARD>(q + b * sq.b + s * sq.s, q_out + b * sqo.b + s * sqo.s, q_heads, sq.h, sqo.h, c,
                                    sn, half);
  rotate_heads<T, C, VEC, BACKWARD>(k + b * sk.b + s * sk.s, k_out + b * sko.b + s * sko.s, k_heads, sk.h, sko.h, c,
                                    sn, half);
}

RopeStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T, typename C, int VEC, bool BACKWARD>
void launch_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                 at::Tensor& q_out, at::Tensor& k_out, cudaStream_t stream) {
  const int64_t half = q.size(3) / 2;
  const int threads = threads_for((q.size(1) + k.size(1)) * half / VEC);
  rope_kernel<T, C, VEC, BACKWARD><<<q.size(0) * q.size(2), std::min(threads, 256), 0, stream>>>(
      q.data_ptr<T>(), k.data_ptr<T>(), cos.data_ptr<C>(), sin.data_ptr<C>(), q_out.data_ptr<T>(), k_out.data_ptr<T>(),
      q.size(2), q.size(1), k.size(1), half, strides_of(q), strides_of(k), strides_of(q_out), strides_of(k_out),
      cos.stride(0), cos.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, bool backward) {
  check_rope(q, k, cos, sin);
  c10::cuda::CUDAGuard guard(q.device());
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLAMA_FAST_DISPATCH(q.scalar_type(), "rope", [&] {
    using T = scalar_t;
    // halves of a head are VEC-aligned when head_dim / 2 and every stride are multiples of VEC
    const bool wide = vec_for<T>(q.size(3) / 2, {&q, &k, &q_out, &k_out}) > 1;
    auto go = [&](auto c_tag) {
      using C = decltype(c_tag);
      constexpr int V = 16 / sizeof(T);
      if (wide && backward) launch_rope<T, C, V, true>(q, k, cos, sin, q_out, k_out, stream);
      else if (wide) launch_rope<T, C, V, false>(q, k, cos, sin, q_out, k_out, stream);
      else if (backward) launch_rope<T, C, 1, true>(q, k, cos, sin, q_out, k_out, stream);
      else launch_rope<T, C, 1, false>(q, k, cos, sin, q_out, k_out, stream);
    };
    if (cos.scalar_type() == q.scalar_type()) go(T{});
    else go(float{});
  });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                 const at::Tensor& sin) {
  return rope_cuda(q, k, cos, sin, false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd_cuda(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& cos,
                                                 const at::Tensor& sin) {
  return rope_cuda(dq, dk, cos, sin, true);
}

// ----------------------------------------------------------------------------- SwiGLU

// GeGLU (Gelu): gelu_tanh(g) = g·σ(2z), z = √(2/π)(g + 0.044715 g³) (kernels/swiglu.py has the derivative).
__device__ inline float fast_sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

__device__ inline float gelu_gate(float g) { return fast_sigmoid(2.f * kSqrt2OverPi * (g + kGeluCubic * g * g * g)); }

template <typename T, int VEC, bool Gelu>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                  int64_t cols, int64_t stride_gate, int64_t stride_up, int64_t stride_out) {
  const int64_t row = blockIdx.y, c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols) return;
  float g[VEC], u[VEC], o[VEC];
  load<T, VEC>(gate + row * stride_gate + c, g);
  load<T, VEC>(up + row * stride_up + c, u);
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = g[i] * (Gelu ? gelu_gate(g[i]) : fast_sigmoid(g[i])) * u[i];
  store<T, VEC>(out + row * stride_out + c, o);
}

template <typename T, int VEC, bool Gelu>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ gate, const T* __restrict__ up,
                                  T* __restrict__ dgate, T* __restrict__ dup, int64_t cols, int64_t stride_dout,
                                  int64_t stride_gate, int64_t stride_up, int64_t stride_dgate, int64_t stride_dup) {
  const int64_t row = blockIdx.y, c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= cols) return;
  float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
  load<T, VEC>(dout + row * stride_dout + c, d);
  load<T, VEC>(gate + row * stride_gate + c, g);
  load<T, VEC>(up + row * stride_up + c, u);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (Gelu) {
      const float x = 2.f * kSqrt2OverPi * (g[i] + kGeluCubic * g[i] * g[i] * g[i]);
      const float s = fast_sigmoid(x);
      du[i] = d[i] * g[i] * s;
      // 1 - s as sigmoid(-x), which does not cancel where s is near 1 (kernels/swiglu.py)
      const float dz = kSqrt2OverPi * (1.f + 3.f * kGeluCubic * g[i] * g[i]);
      dg[i] = d[i] * u[i] * (s + g[i] * 2.f * s * fast_sigmoid(-x) * dz);
    } else {
      const float sig = fast_sigmoid(g[i]);
      du[i] = d[i] * g[i] * sig;
      dg[i] = d[i] * u[i] * sig * (1.f + g[i] * (1.f - sig));
    }
  }
  store<T, VEC>(dgate + row * stride_dgate + c, dg);
  store<T, VEC>(dup + row * stride_dup + c, du);
}

// Rows go on grid.y (at most 65535 per launch), so long inputs are launched in row slabs.
constexpr int64_t kMaxGridY = 65535;

template <bool Gelu>
void launch_swiglu_fwd(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  const int64_t rows = gate.size(0), cols = gate.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLAMA_FAST_DISPATCH(gate.scalar_type(), "swiglu_fwd", [&] {
    using T = scalar_t;
    const int vec = vec_for<T>(cols, {&gate, &up, &out});
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxGridY) {
      const dim3 grid((cols / vec + 255) / 256, std::min(kMaxGridY, rows - r0));
      const T* g = gate.data_ptr<T>() + r0 * gate.stride(0);
      const T* u = up.data_ptr<T>() + r0 * up.stride(0);
      T* o = out.data_ptr<T>() + r0 * out.stride(0);
      if (vec > 1) {
        swiglu_fwd_kernel<T, 16 / sizeof(T), Gelu><<<grid, 256, 0, stream>>>(g, u, o, cols, gate.stride(0),
                                                                             up.stride(0), out.stride(0));
      } else {
        swiglu_fwd_kernel<T, 1, Gelu><<<grid, 256, 0, stream>>>(g, u, o, cols, gate.stride(0), up.stride(0),
                                                                out.stride(0));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  check_swiglu(gate, up);
  const bool gelu = is_gelu(activation);
  c10::cuda::CUDAGuard guard(gate.device());
  auto out = at::empty(gate.sizes(), gate.options());
  if (out.numel() == 0) return out;  // a zero-width row would make an empty grid, a launch error
  if (gelu) launch_swiglu_fwd<true>(gate, up, out);
  else launch_swiglu_fwd<false>(gate, up, out);
  return out;
}

template <bool Gelu>
void launch_swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, at::Tensor& dgate,
                       at::Tensor& dup) {
  const int64_t rows = gate.size(0), cols = gate.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  LLAMA_FAST_DISPATCH(gate.scalar_type(), "swiglu_bwd", [&] {
    using T = scalar_t;
    const int vec = vec_for<T>(cols, {&dout, &gate, &up, &dgate, &dup});
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxGridY) {
      const dim3 grid((cols / vec + 255) / 256, std::min(kMaxGridY, rows - r0));
      const T* d = dout.data_ptr<T>() + r0 * dout.stride(0);
      const T* g = gate.data_ptr<T>() + r0 * gate.stride(0);
      const T* u = up.data_ptr<T>() + r0 * up.stride(0);
      T* dg = dgate.data_ptr<T>() + r0 * dgate.stride(0);
      T* du = dup.data_ptr<T>() + r0 * dup.stride(0);
      if (vec > 1) {
        swiglu_bwd_kernel<T, 16 / sizeof(T), Gelu><<<grid, 256, 0, stream>>>(
            d, g, u, dg, du, cols, dout.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0));
      } else {
        swiglu_bwd_kernel<T, 1, Gelu><<<grid, 256, 0, stream>>>(d, g, u, dg, du, cols, dout.stride(0),
                                                                gate.stride(0), up.stride(0), dgate.stride(0),
                                                                dup.stride(0));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dout, const at::Tensor& gate,
                                                   const at::Tensor& up, c10::string_view activation) {
  check_swiglu_bwd(dout, gate, up);
  const bool gelu = is_gelu(activation);
  c10::cuda::CUDAGuard guard(gate.device());
  auto dgate = at::empty(gate.sizes(), gate.options());
  auto dup = at::empty(up.sizes(), up.options());
  if (dup.numel() == 0) return {dgate, dup};
  if (gelu) launch_swiglu_bwd<true>(dout, gate, up, dgate, dup);
  else launch_swiglu_bwd<false>(dout, gate, up, dgate, dup);
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
  m.impl("rope_fwd", &rope_fwd_cuda);
  m.impl("rope_bwd", &rope_bwd_cuda);
  m.impl("swiglu_fwd", &swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda);
}

}  // namespace llama_fast
