// Gather-dot of two embedding tables, the logits of matrix factorisation:
//
//     x[n] = <P[rows[n]], Q[cols[n]]>,
//
// and its embedding backward dP[u] = sum_{n: rows[n] = u} g[n] Q[cols[n]] (dQ likewise).  The
// schema is declared once, in gather_dot.cpp; the CPU kernels live in cpu/gather_dot_kernel.cpp
// and the CUDA kernels in cuda/gather_dot_kernel.cu.  The pure-PyTorch reference they must
// equal is estimators/gather.py: gather_dot_reference.
#pragma once

#include <ATen/core/Tensor.h>

namespace cvr::ops {

// Checks shared by the CPU and CUDA kernels.  P and Q: 2-D, one floating dtype, one device,
// one embedding dimension; rows and cols: 1-D int64 of one length on that device.  The index
// ranges are checked by the kernels, which read the indices anyway.  Failures raise Python's
// ValueError naming the argument (the Python wrapper checks the same before calling).
void check_gather_dot(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& rows, const at::Tensor& cols);
// The same, and `grad` (the gradient of x) of the shape of rows and the dtype and device of P.
void check_gather_dot_backward(const at::Tensor& grad, const at::Tensor& P, const at::Tensor& Q,
                               const at::Tensor& rows, const at::Tensor& cols);

}  // namespace cvr::ops
