// Schema of the fused DR-family losses (the one place where the operators are declared) and
// the argument checks shared by their CPU and CUDA kernels.
#include "dr_loss.h"
#include "kernel_names.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>

namespace cvr::ops {
namespace {

// The position of `name` in one of kernel_names.h's lists, which is its enum value.
template <typename Enum, size_t N>
Enum parse_name(const char* op, const char* what, const std::array<std::string_view, N>& names,
                std::string_view name) {
  for (size_t k = 0; k < N; ++k) {
    if (names[k] == name) return static_cast<Enum>(k);
  }
  std::string known;
  for (std::string_view n : names) known += (known.empty() ? "" : ", ") + std::string(n);
  TORCH_CHECK_VALUE(false, op, ": ", what, " must be one of ", known, "; got '", name, "'");
}

CrossEntropy parse_cross_entropy(const char* op, std::string_view name) {
  if (name == "logits") return CrossEntropy::logits;
  if (name == "clamped") return CrossEntropy::clamped;
  TORCH_CHECK(false, op, ": cross_entropy must be one of logits, clamped; got '", name, "'");
}

// A ValueError in Python (TORCH_CHECK_VALUE), as the Python wrappers raise for the same name.
ImputedError parse_imputed_error(const char* op, std::string_view name) {
  if (name == "paper") return ImputedError::paper;
  if (name == "published") return ImputedError::published;
  TORCH_CHECK_VALUE(false, op, ": imputed_error must be one of paper, published; got '", name, "'");
}

const at::Tensor& required(const char* op, const char* name, const std::optional<at::Tensor>& t) {
  TORCH_CHECK(t.has_value() && t->defined(), op, ": `", name, "` is required by this loss");
  return *t;
}

// Every tensor 1-D, of one floating dtype and on one device; the tensors of each group (B, U)
// of one length.
void check_group(const char* op, const at::Tensor& like, std::initializer_list<const at::Tensor*> group) {
  TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 tensors; got ", like.scalar_type());
  const at::Tensor& head = **group.begin();
  for (const at::Tensor* t : group) {
    TORCH_CHECK(t->dim() == 1, op, ": expected 1-D tensors; got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == like.scalar_type() && t->device() == like.device(), op,
                ": all tensors must share one dtype and device; got ", t->scalar_type(), " on ", t->device(),
                " and ", like.scalar_type(), " on ", like.device());
    TORCH_CHECK(t->numel() == head.numel(), op, ": tensors over one set of pairs must have one length; got ",
                t->numel(), " and ", head.numel());
  }
}

}  // namespace

PredictionInputs prepare_prediction(std::string_view estimator, const at::Tensor& x_b, const at::Tensor& r_b,
                                    const at::Tensor& p_hat_b, const std::optional<at::Tensor>& x_u,
                                    const std::optional<at::Tensor>& xt_b, const std::optional<at::Tensor>& xt_u,
                                    std::string_view cross_entropy) {
  constexpr const char* op = "cvr::prediction_loss";
  PredictionInputs in{parse_name<Estimator>(op, "estimator", kPredictionKernels, estimator),
                      parse_cross_entropy(op, cross_entropy)};
  in.x_b = x_b.contiguous();
  in.r_b = r_b.contiguous();
  in.p_hat_b = p_hat_b.contiguous();
  if (in.estimator == Estimator::dr || in.estimator == Estimator::badr) {
    in.xt_b = required(op, "xt_b", xt_b).contiguous();
    in.x_u = required(op, "x_u", x_u).contiguous();
    in.xt_u = required(op, "xt_u", xt_u).contiguous();
    check_group(op, x_b, {&in.x_b, &in.r_b, &in.p_hat_b, &in.xt_b});
    check_group(op, x_b, {&in.x_u, &in.xt_u});
  } else {
    check_group(op, x_b, {&in.x_b, &in.r_b, &in.p_hat_b});
  }
  return in;
}

ImputationInputs prepare_imputation(std::string_view kind, const at::Tensor& xt_b, const at::Tensor& x_b,
                                    const at::Tensor& r_b, const at::Tensor& p_hat_b,
                                    const std::optional<at::Tensor>& xt_u, const std::optional<at::Tensor>& x_u,
                                    double alpha, std::string_view cross_entropy, std::string_view imputed_error) {
  constexpr const char* op = "cvr::imputation_loss";
  ImputationInputs in{parse_name<ImputationKind>(op, "kind", kImputationKernels, kind),
                      parse_cross_entropy(op, cross_entropy),
                      parse_imputed_error(op, imputed_error)};
  const bool dr_family = in.kind != ImputationKind::badr && in.kind != ImputationKind::badr_paper;
  TORCH_CHECK_VALUE(dr_family || in.imputed_error == ImputedError::paper, op,
                    ": imputed_error='published' applies to the DR-family losses dr, mrdr, dr_bias, dr_mse; got '",
                    kind, "'");
  in.xt_b = xt_b.contiguous();
  in.x_b = x_b.contiguous();
  in.r_b = r_b.contiguous();
  in.p_hat_b = p_hat_b.contiguous();
  in.alpha = alpha;
  check_group(op, xt_b, {&in.xt_b, &in.x_b, &in.r_b, &in.p_hat_b});
  if (in.kind == ImputationKind::badr) {
    in.xt_u = required(op, "xt_u", xt_u).contiguous();
    in.x_u = required(op, "x_u", x_u).contiguous();
    check_group(op, xt_b, {&in.xt_u, &in.x_u});
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const PredictionInputs& in) {
  return {at::empty({}, in.x_b.options()), at::empty_like(in.x_b),
          in.x_u.defined() ? at::empty_like(in.x_u) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const ImputationInputs& in) {
  // The published BADR loss has no gradient on B (its e_hat there is detached); every other
  // loss has none on U.
  const bool on_u = in.kind == ImputationKind::badr;
  return {at::empty({}, in.xt_b.options()), on_u ? at::Tensor() : at::empty_like(in.xt_b),
          on_u ? at::empty_like(in.xt_u) : at::Tensor()};
}

// The estimator and the imputation loss are named by the strings of
// estimators/registry.py (a string keeps torch.ops.cvr calls self-describing; parsing it
// costs nanoseconds next to a pass over the data).  The tensors over U are optional because
// the naive, IPS and SNIPS estimators and the DR, MRDR, DR-BIAS, DR-MSE and eq.-32 BADR
// imputation losses do not read them; `alpha` is DR-MSE's mixing weight (eq. 10);
// `cross_entropy` the form of every cross-entropy of the loss ("logits" or "clamped");
// `imputed_error` how a DR-family imputation loss writes e_hat ("paper" or "published", input
// and target swapped; the BADR losses take "paper" only).
//
// prediction_loss / imputation_loss are the differentiable losses (autograd.cpp): the prediction
// loss differentiates x_b and x_u, the imputation loss xt_b and xt_u.  The *_and_grads kernels
// (CPU and CUDA) return the loss and those two gradients from the same passes.
TORCH_LIBRARY(cvr, m) {
  m.def(
      "prediction_loss(str estimator, Tensor x_b, Tensor r_b, Tensor p_hat_b, Tensor? x_u, Tensor? xt_b, "
      "Tensor? xt_u, str cross_entropy=\"logits\") -> Tensor");
  m.def(
      "imputation_loss(str kind, Tensor xt_b, Tensor x_b, Tensor r_b, Tensor p_hat_b, Tensor? xt_u, "
      "Tensor? x_u, float alpha, str cross_entropy=\"logits\", str imputed_error=\"paper\") -> Tensor");
  m.def(
      "prediction_loss_and_grads(str estimator, Tensor x_b, Tensor r_b, Tensor p_hat_b, Tensor? x_u, Tensor? xt_b, "
      "Tensor? xt_u, str cross_entropy=\"logits\") -> (Tensor loss, Tensor grad_x_b, Tensor grad_x_u)");
  m.def(
      "imputation_loss_and_grads(str kind, Tensor xt_b, Tensor x_b, Tensor r_b, Tensor p_hat_b, Tensor? xt_u, "
      "Tensor? x_u, float alpha, str cross_entropy=\"logits\", str imputed_error=\"paper\") -> (Tensor loss, "
      "Tensor grad_xt_b, Tensor grad_xt_u)");
}

}  // namespace cvr::ops
