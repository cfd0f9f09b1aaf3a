// CUDA kernels of the gather-dot operators (see gather_dot.h), kept simple: one thread per
// (pair, embedding entry) in grid-stride loops.
//
// The forward sums each pair's dim products in one thread, so it is deterministic.  The
// backward scatters with atomicAdd, so the order of the additions into a row of dP (dQ) varies
// from run to run: the gradients agree with the CPU kernel up to float rounding, not bitwise.
// (The CPU kernel's sort-by-row is the deterministic alternative, if that is ever needed here.)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../gather_dot.h"

namespace cvr::ops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

int blocks_for(int64_t n) { return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks)); }

// Out-of-range indices: flagged in device memory and reported after the kernel, since a kernel
// cannot raise (reading the flag synchronises with the device once per call).
template <typename T>
__global__ void forward_kernel(const T* P, const T* Q, const int64_t* rows, const int64_t* cols, int64_t n,
                               int64_t dim, int64_t n_rows, int64_t n_cols, T* out, int* bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
    const int64_t u = rows[k], i = cols[k];
    if (u < 0 || u >= n_rows || i < 0 || i >= n_cols) {
      *bad = 1;
      continue;
    }
    T sum = 0;
    for (int64_t d = 0; d < dim; ++d) sum += P[u * dim + d] * Q[i * dim + d];
    out[k] = sum;
  }
}

// out[key[k]] += g[k] * other[other_idx[k]]: one thread per (pair, entry).
template <typename T>
__global__ void scatter_kernel(const T* g, const T* other, const int64_t* key, const int64_t* other_idx, int64_t n,
                               int64_t dim, int64_t n_out, int64_t n_other, T* out, int* bad) {
  const int64_t total = n * dim;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t k = t / dim, d = t % dim;
    const int64_t u = key[k], i = other_idx[k];
    if (u < 0 || u >= n_out || i < 0 || i >= n_other) {
      *bad = 1;
      continue;
    }
    atomicAdd(out + u * dim + d, g[k] * other[i * dim + d]);
  }
}

void raise_if_bad(const at::Tensor& bad) {
  TORCH_CHECK_VALUE(bad.item<int>() == 0, "cvr::gather_dot: `rows` and `cols` must lie in [0, rows of P) and "
                    "[0, rows of Q)");
}

at::Tensor gather_dot_cuda(const at::Tensor& P, const at::Tensor& Q, const at::Tensor& rows,
                           const at::Tensor& cols) {
  check_gather_dot(P, Q, rows, cols);
  const c10::cuda::CUDAGuard guard(P.device());
  const at::Tensor Pc = P.contiguous(), Qc = Q.contiguous(), r = rows.contiguous(), c = cols.contiguous();
  const int64_t n = r.numel(), dim = Pc.size(1);
  at::Tensor out = at::empty({n}, Pc.options());
  at::Tensor bad = at::zeros({}, r.options().dtype(at::kInt));
  if (n > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(Pc.scalar_type(), "cvr::gather_dot", [&] {
      forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          Pc.const_data_ptr<scalar_t>(), Qc.const_data_ptr<scalar_t>(), r.const_data_ptr<int64_t>(),
          c.const_data_ptr<int64_t>(), n, dim, Pc.size(0), Qc.size(0), out.mutable_data_ptr<scalar_t>(),
          bad.mutable_data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  raise_if_bad(bad);
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_dot_backward_cuda(const at::Tensor& grad, const at::Tensor& P,
                                                            const at::Tensor& Q, const at::Tensor& rows,
                                                            const at::Tensor& cols, bool need_P, bool need_Q) {
  check_gather_dot_backward(grad, P, Q, rows, cols);
  const c10::cuda::CUDAGuard guard(P.device());
  const at::Tensor g = grad.contiguous(), Pc = P.contiguous(), Qc = Q.contiguous(), r = rows.contiguous(),
                   c = cols.contiguous();
  const int64_t n = r.numel(), dim = Pc.size(1);
  at::Tensor grad_P = need_P ? at::zeros_like(Pc) : at::Tensor();
  at::Tensor grad_Q = need_Q ? at::zeros_like(Qc) : at::Tensor();
  at::Tensor bad = at::zeros({}, r.options().dtype(at::kInt));
  if (n > 0 && dim > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(Pc.scalar_type(), "cvr::gather_dot_backward", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const int64_t *rp = r.const_data_ptr<int64_t>(), *cp = c.const_data_ptr<int64_t>();
      if (need_P) {
        scatter_kernel<scalar_t><<<blocks_for(n * dim), kThreads, 0, stream>>>(
            gp, Qc.const_data_ptr<scalar_t>(), rp, cp, n, dim, Pc.size(0), Qc.size(0),
            grad_P.mutable_data_ptr<scalar_t>(), bad.mutable_data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_Q) {
        scatter_kernel<scalar_t><<<blocks_for(n * dim), kThreads, 0, stream>>>(
            gp, Pc.const_data_ptr<scalar_t>(), cp, rp, n, dim, Qc.size(0), Pc.size(0),
            grad_Q.mutable_data_ptr<scalar_t>(), bad.mutable_data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  raise_if_bad(bad);
  return {grad_P, grad_Q};
}

}  // namespace

TORCH_LIBRARY_IMPL(cvr, CUDA, m) {
  m.impl("gather_dot", &gather_dot_cuda);
  m.impl("gather_dot_backward", &gather_dot_backward_cuda);
}

}  // namespace cvr::ops
