// Schema of the gather-dot operators (the one place where they are declared) and the argument
// checks shared by their CPU and CUDA kernels.  They extend the `cvr` library of dr_loss.cpp.
#include "gather_dot.h"

#include <torch/library.h>

namespace cvr::ops {

void check_gather_dot(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& rows, const at::Tensor& cols) {
  constexpr const char* op = "cvr::gather_dot";
  TORCH_CHECK_VALUE(P.dim() == 2 && Q.dim() == 2, op, ": `P` and `Q` must be 2-D embedding tables; got shapes ",
                    P.sizes(), " and ", Q.sizes());
  TORCH_CHECK_VALUE(P.size(1) == Q.size(1), op, ": `P` and `Q` must have one embedding dimension; got ",
                    P.size(1), " and ", Q.size(1));
  TORCH_CHECK_VALUE(P.scalar_type() == Q.scalar_type() &&
                        (P.scalar_type() == at::kFloat || P.scalar_type() == at::kDouble),
                    op, ": `P` and `Q` must share one dtype, float32 or float64; got ", P.scalar_type(), " and ",
                    Q.scalar_type());
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong, op,
                    ": `rows` and `cols` must be int64 indices; got ", rows.scalar_type(), " and ",
                    cols.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.sizes() == cols.sizes(), op,
                    ": `rows` and `cols` must be 1-D of one length; got shapes ", rows.sizes(), " and ",
                    cols.sizes());
  TORCH_CHECK_VALUE(P.device() == Q.device() && rows.device() == P.device() && cols.device() == P.device(), op,
                    ": all tensors must be on one device; got P on ", P.device(), ", Q on ", Q.device(),
                    ", rows on ", rows.device(), ", cols on ", cols.device());
}

void check_gather_dot_backward(const at::Tensor& grad, const at::Tensor& P, const at::Tensor& Q,
                               const at::Tensor& rows, const at::Tensor& cols) {
  check_gather_dot(P, Q, rows, cols);
  TORCH_CHECK_VALUE(grad.sizes() == rows.sizes() && grad.scalar_type() == P.scalar_type() &&
                        grad.device() == P.device(),
                    "cvr::gather_dot_backward: `grad` must have the shape of `rows` and the dtype and device of "
                    "`P`; got shape ", grad.sizes(), ", ", grad.scalar_type(), " on ", grad.device());
}

// gather_dot_backward returns the gradients of the tables the caller asks for (need_P,
// need_Q); a gradient not asked for is an undefined tensor (None in Python).
TORCH_LIBRARY_FRAGMENT(cvr, m) {
  m.def("gather_dot(Tensor P, Tensor Q, Tensor rows, Tensor cols) -> Tensor");
  m.def(
      "gather_dot_backward(Tensor grad, Tensor P, Tensor Q, Tensor rows, Tensor cols, bool need_P, bool need_Q) "
      "-> (Tensor grad_P, Tensor grad_Q)");
}

}  // namespace cvr::ops
