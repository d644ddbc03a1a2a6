// Input checks shared by the CPU (ops.cpp) and CUDA (kernels.cu) implementations: each raises
// with a message that names the problem, as the Python ops do.
#pragma once

#include <ATen/core/Tensor.h>

namespace llama_fast {

void check_float(const at::Tensor& t, const char* op, const char* name);
void check_rows(const at::Tensor& t, const char* op, const char* name);
void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an, const char* bn);
void check_rms_norm(const at::Tensor& x, const at::Tensor& w);
void check_swiglu(const at::Tensor& gate, const at::Tensor& up);
void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace llama_fast
