// Fused DR-family training losses of the joint-learning step (BADR paper, eqs. 2, 3, 6-10,
// 13, 32, 37).  The schemas are declared once, in dr_loss.cpp; the CPU kernels live in
// cpu/dr_loss_kernel.cpp, the CUDA kernels in cuda/dr_loss_kernel.cu and the autograd kernels
// in autograd.cpp.  The pure-PyTorch reference they must equal is estimators/joint_loss.py.
//
// The two *_and_grads kernels take logits (never probabilities) and return (loss, grad_1, grad_2): the
// scalar loss and, computed in the same passes, its gradients with respect to the logits it
// differentiates (x_b and x_u for the prediction loss, xt_b and xt_u for the imputation loss).
// A gradient that is identically zero (the input does not reach the loss) is returned as an
// undefined tensor, which Python receives as None.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <string_view>

namespace cvr::ops {

// Prediction-model estimators (the `estimator` argument) and imputation-model losses (the
// `kind` argument) the kernels implement, in the order of their names in kernel_names.h.
enum class Estimator { naive, ips, snips, dr, badr };
enum class ImputationKind { dr, mrdr, dr_bias, dr_mse, badr, badr_paper };
// The form of the binary cross-entropy l(sigmoid(x), t) (the `cross_entropy` argument, as
// CROSS_ENTROPIES in estimators/training/losses.py): `logits`, the exact softplus form; `clamped`, the published code's
// F.binary_cross_entropy(torch.sigmoid(x), t), logs clamped at -100 (see bce_clamped).
enum class CrossEntropy { logits, clamped };
// How the DR-family imputation losses (dr, mrdr, dr_bias, dr_mse) write the imputed error in
// the imputation step (the `imputed_error` argument, as IMPUTED_ERRORS there): `paper`,
// e_hat = l(x, s(xt)); `published`, e_hat = l(xt, s(x)), input and target swapped as in the
// published DR-JL code.  The BADR losses define their own and take `paper` only.
enum class ImputedError { paper, published };

// The inputs of one call, checked and made contiguous.  Tensors a loss does not read are
// undefined: U (x_u, xt_u, and xt_b) is read by the DR and BADR prediction losses and by the
// published BADR imputation loss.  BADR's eq. 32 ("badr_paper") reaches U only through
// E_hat - L, where the sums over U cancel, so its kernels do not read U.
struct PredictionInputs {
  Estimator estimator;
  CrossEntropy cross_entropy;
  at::Tensor x_b, r_b, p_hat_b, xt_b, x_u, xt_u;
};

struct ImputationInputs {
  ImputationKind kind;
  CrossEntropy cross_entropy;
  ImputedError imputed_error;
  at::Tensor xt_b, x_b, r_b, p_hat_b, xt_u, x_u;
  double alpha;
};

// Raw pointers to the inputs (null for the undefined ones), taken once per call: a tensor's
// data accessor checks the dtype on every call, which would cost more than the arithmetic.
template <typename T>
struct InputPointers {
  const T *x_b, *r_b, *p_hat_b, *xt_b, *x_u, *xt_u;

  template <typename Inputs>
  explicit InputPointers(const Inputs& in)
      : x_b(get(in.x_b)), r_b(get(in.r_b)), p_hat_b(get(in.p_hat_b)), xt_b(get(in.xt_b)), x_u(get(in.x_u)),
        xt_u(get(in.xt_u)) {}

  static const T* get(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }
};

// Shared by the CPU and CUDA kernels.  The Python wrappers validate user input with readable
// messages first; these checks keep a direct call to torch.ops.cvr.* from reading out of bounds.
PredictionInputs prepare_prediction(std::string_view estimator, const at::Tensor& x_b, const at::Tensor& r_b,
                                    const at::Tensor& p_hat_b, const std::optional<at::Tensor>& x_u,
                                    const std::optional<at::Tensor>& xt_b, const std::optional<at::Tensor>& xt_u,
                                    std::string_view cross_entropy);

ImputationInputs prepare_imputation(std::string_view kind, const at::Tensor& xt_b, const at::Tensor& x_b,
                                    const at::Tensor& r_b, const at::Tensor& p_hat_b,
                                    const std::optional<at::Tensor>& xt_u, const std::optional<at::Tensor>& x_u,
                                    double alpha, std::string_view cross_entropy, std::string_view imputed_error);

// The outputs of one call, allocated like the inputs: the scalar loss and the gradients the
// loss has (on B and U for the prediction losses that read U, on B only for the others; on U
// only for the published BADR imputation loss, on B for the other imputation losses), the rest
// undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const PredictionInputs& in);
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const ImputationInputs& in);

// A defined tensor's data, else null.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace cvr::ops
