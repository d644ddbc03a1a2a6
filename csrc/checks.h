// Input checks and dtype dispatch shared by the CPU (ops.cpp) and CUDA (kernels.cu)
// implementations: each check raises with a message that names the problem, as the Python ops do.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace llama_fast {

void check_float(const at::Tensor& t, const char* op, const char* name);
void check_rows(const at::Tensor& t, const char* op, const char* name);
void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an, const char* bn);
void check_rms_norm(const at::Tensor& x, const at::Tensor& w);
void check_swiglu(const at::Tensor& gate, const at::Tensor& up);
void check_rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, bool unit_offset);
// y's and dy's dtype: the weight's (promote(w, x), as the dispatch below allows), or Gemma's x's own
at::ScalarType rms_norm_output_dtype(const at::Tensor& x, const at::Tensor& w, bool unit_offset);
// "silu" -> false, "gelu_tanh" -> true, anything else an error
bool is_gelu(c10::string_view activation);
void check_swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up);
void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);

// The dtypes the kernels take (check_float): float32, float16, bfloat16; scalar_t in the body.
// ATen's AT_DISPATCH_FLOATING_TYPES_AND2 would add float64, which the checks reject, and compile
// every kernel once more for it.
#define LLAMA_FAST_DISPATCH(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// RMSNorm's dtype dispatch: fn(T{}, W{}) with T x's dtype and W the weight's, which must be x's
// own or float32 (y and dy then have W, which is promote_types(weight, x) as in LlamaRMSNorm).
template <typename Fn>
void dispatch_rms(const at::Tensor& x, const at::Tensor& w, Fn&& fn) {
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat,
              "rms_norm: the extension takes a weight in x's dtype or float32, got x ", x.scalar_type(), ", weight ",
              w.scalar_type());
  LLAMA_FAST_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    if (w.scalar_type() == x.scalar_type()) {
      fn(scalar_t{}, scalar_t{});
    } else {
      fn(scalar_t{}, float{});
    }
  });
}

}  // namespace llama_fast
