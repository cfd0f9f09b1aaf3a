// Schema of the Adam update (the one place where it is declared); the CPU kernel lives in
// cpu/adam_kernel.cpp.  It extends the `cvr` library of dr_loss.cpp.
//
// adam_ updates `param`, `exp_avg` and `exp_avg_sq` in place with one step of Adam (Kingma & Ba,
// with torch.optim.Adam's L2 weight decay added to the gradient), `step` being the 1-based
// count of updates including this one.  It computes what torch._fused_adam_ (the kernel behind
// torch.optim.Adam(fused=True)) computes, element by element in the same order, so the two
// agree bitwise; what it does not do is enter a parallel region for small tensors.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(cvr, m) {
  m.def(
      "adam_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, int step, float lr, "
      "float beta1, float beta2, float weight_decay, float eps) -> ()");
}
