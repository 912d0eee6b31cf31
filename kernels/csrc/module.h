// Python entry points of the CPU kernels: one extension module per instruction set (ext_<isa>.cpp).
//
// The Python ops layer checks user input, owns the op semantics and allocates the outputs; this file
// checks internal invariants, picks the flat or strided kernel, and releases the GIL around the work. One
// exception: the BatchNorm ops' eager call (bn_call.h, bn_fast_call) tests user input itself, to accept or
// decline the call; it raises nothing for bad input and leaves the errors to the Python checks.
#pragma once

#include <torch/extension.h>

#include <optional>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "batch_norm.h"

namespace fused_residual {
namespace {

namespace k = fused_residual::CPU_CAPABILITY;

#define FR_DTYPE_SWITCH(dtype, NAME, ...)                                      \
  switch (dtype) {                                                             \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }           \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__; break; }         \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__; break; } \
    default: TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);           \
  }

// Fresh outputs of a few MiB are dominated by first-touch page faults (4 KiB each), not by the kernel.
// Asking for transparent huge pages on the 2 MiB-aligned interior of the allocation before the first write
// cuts that cost several-fold where THP is in "madvise" mode; elsewhere it is a no-op.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  TORCH_CHECK(t.device().is_cpu(), "advise_huge_pages: CPU tensors only");
  const size_t nbytes = t.nbytes();
  if (nbytes < 2 * kHuge) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// True when both tensors are dense and share strides (dims of size 1 aside): storage element i is then
// element i of each, and one flat loop over storage covers both.
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fused_residual cpp backend: ", name, " must be a CPU tensor, got ",
              t.device());
}

// The kernels read every tensor as out's scalar type: a tensor of another dtype would be reinterpreted.
void check_dtype(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(), ", expected ",
              like.scalar_type());
}

uint8_t* mask_ptr(const std::optional<at::Tensor>& mask, int64_t numel) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kByte && mask->is_contiguous() && mask->numel() == (numel + 7) / 8,
              "fused_residual: mask must hold ", (numel + 7) / 8, " contiguous uint8 bytes, got ",
              mask->sizes(), " ", mask->scalar_type());
  return mask->data_ptr<uint8_t>();
}

// out = relu(z + skip); out may be z itself (in place). With a mask, out must be dense: the mask holds
// the gradient gate of out's elements in storage order.
void add_relu_fwd(const at::Tensor& z, const at::Tensor& skip, const at::Tensor& out,
                  const std::optional<at::Tensor>& mask) {
  check_cpu(z, "z");
  check_cpu(skip, "skip");
  check_cpu(out, "out");
  TORCH_CHECK(z.sizes() == skip.sizes() && z.sizes() == out.sizes(), "add_relu: shapes differ");
  check_dtype(z, out, "add_relu", "z");
  check_dtype(skip, out, "add_relu", "skip");
  uint8_t* m = mask_ptr(mask, out.numel());
  TORCH_CHECK(m == nullptr || out.is_non_overlapping_and_dense(), "add_relu: a mask needs a dense out");
  if (out.numel() == 0) return;
  py::gil_scoped_release no_gil;
  if (same_dense_layout(out, z) && same_dense_layout(out, skip)) {
    FR_DTYPE_SWITCH(out.scalar_type(), "add_relu",
                    k::add_relu_fwd_flat_t<scalar_t>(z.data_ptr(), skip.data_ptr(), out.data_ptr(), m,
                                                     out.numel()));
  } else {
    FR_DTYPE_SWITCH(out.scalar_type(), "add_relu", k::add_relu_fwd_strided_t<scalar_t>(z, skip, out));
    // out is dense: one more pass packs the gradient gate in its storage order.
    if (m) {
      FR_DTYPE_SWITCH(out.scalar_type(), "add_relu",
                      k::relu_mask_flat_t<scalar_t>(out.data_ptr(), m, out.numel()));
    }
  }
}

// gin = grad where not (out <= 0) (or where the mask bit is set) else +0. gin is dense; out, when given,
// has gin's layout; grad may have any strides.
void add_relu_bwd(const at::Tensor& grad, const std::optional<at::Tensor>& out,
                  const std::optional<at::Tensor>& mask, const at::Tensor& gin) {
  check_cpu(grad, "grad");
  check_cpu(gin, "gin");
  TORCH_CHECK(out.has_value() != mask.has_value(), "add_relu_bwd: pass exactly one of out and mask");
  TORCH_CHECK(grad.sizes() == gin.sizes(), "add_relu_bwd: shapes differ");
  check_dtype(grad, gin, "add_relu_bwd", "grad");
  if (out.has_value()) check_dtype(*out, gin, "add_relu_bwd", "out");
  TORCH_CHECK(gin.is_non_overlapping_and_dense(), "add_relu_bwd: gin must be dense");
  const uint8_t* m = mask_ptr(mask, gin.numel());
  if (out.has_value()) {
    check_cpu(*out, "out");
    TORCH_CHECK(same_dense_layout(gin, *out), "add_relu_bwd: out must have gin's layout");
  }
  if (gin.numel() == 0) return;
  at::Tensor g = grad;
  if (!same_dense_layout(gin, grad)) {
    if (m) {
      g = at::empty_like(gin).copy_(grad);  // the mask is in gin's storage order: bring grad there
    } else {
      py::gil_scoped_release no_gil;
      FR_DTYPE_SWITCH(gin.scalar_type(), "add_relu_backward",
                      k::add_relu_bwd_strided_t<scalar_t>(grad, *out, gin));
      return;
    }
  }
  py::gil_scoped_release no_gil;
  FR_DTYPE_SWITCH(gin.scalar_type(), "add_relu_backward",
                  k::add_relu_bwd_flat_t<scalar_t>(g.data_ptr(), out.has_value() ? out->data_ptr() : nullptr,
                                                   m, gin.data_ptr(), gin.numel()));
}

// out = relu(out + bias[col]) in place on a contiguous [M, N] tensor; bias optional.
void bias_relu_rows_(const at::Tensor& out, const std::optional<at::Tensor>& bias) {
  check_cpu(out, "out");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "bias_relu_rows_: out must be contiguous 2-D");
  if (bias.has_value()) check_dtype(*bias, out, "bias_relu_rows_", "bias");
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (out.numel() == 0) return;
  py::gil_scoped_release no_gil;
  FR_DTYPE_SWITCH(out.scalar_type(), "bias_relu_rows_", k::bias_relu_rows_t<scalar_t>(out, b));
}

// gm = grad gated by out, colsum (fp32 [N], optional) = column sums of gm, independent of the thread
// count. grad, out and gm are contiguous [M, N].
void relu_grad_colsum(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& gm,
                        const std::optional<at::Tensor>& colsum) {
  check_cpu(grad, "grad");
  check_cpu(out, "out");
  TORCH_CHECK(grad.dim() == 2 && out.sizes() == grad.sizes() && gm.sizes() == grad.sizes() &&
                  grad.is_contiguous() && out.is_contiguous() && gm.is_contiguous(),
              "relu_grad_colsum: grad, out and gm must be contiguous [M, N] tensors");
  check_dtype(out, grad, "relu_grad_colsum", "out");
  check_dtype(gm, grad, "relu_grad_colsum", "gm");
  TORCH_CHECK(!colsum.has_value() || (colsum->scalar_type() == at::kFloat && colsum->is_contiguous() &&
                                      colsum->numel() == grad.size(1)),
              "relu_grad_colsum: colsum must be a contiguous float32 [N] tensor");
  at::Tensor cs = colsum.has_value() ? *colsum : at::Tensor();
  if (grad.numel() == 0) {
    if (cs.defined()) cs.zero_();
    return;
  }
  py::gil_scoped_release no_gil;
  FR_DTYPE_SWITCH(grad.scalar_type(), "relu_grad_colsum",
                  k::relu_grad_colsum_t<scalar_t>(grad, out, gm, cs));
}

}  // namespace
}  // namespace fused_residual

#include "bn_call.h"  // after advise_huge_pages

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fused_residual;
  m.doc() = "fused_residual CPU kernels (ATen Vectorized + at::parallel_for), built for "
            C10_STRINGIZE(CPU_CAPABILITY);
  m.attr("capability") = C10_STRINGIZE(CPU_CAPABILITY);
  m.def("advise_huge_pages", &advise_huge_pages, py::arg("t"));
  m.def("add_relu_fwd", &add_relu_fwd, py::arg("z"), py::arg("skip"), py::arg("out"), py::arg("mask"));
  m.def("add_relu_bwd", &add_relu_bwd, py::arg("grad"), py::arg("out"), py::arg("mask"), py::arg("gin"));
  m.def("bias_relu_rows_", &bias_relu_rows_, py::arg("out"), py::arg("bias"));
  m.def("relu_grad_colsum", &relu_grad_colsum, py::arg("grad"), py::arg("out"), py::arg("gm"),
        py::arg("colsum"));
  // BatchNorm (+ add) + ReLU (batch_norm.h)
  m.def("bn_stats", &bn_stats, py::arg("x"), py::arg("C"), py::arg("inner"), py::arg("mean"), py::arg("var"));
  m.def("bn_apply", &bn_apply, py::arg("x"), py::arg("skip"), py::arg("mean"), py::arg("scale"),
        py::arg("shift"), py::arg("out"), py::arg("mask"), py::arg("C"), py::arg("inner"));
  m.def("bn_bwd_reduce", &bn_bwd_reduce, py::arg("dy"), py::arg("x"), py::arg("out"), py::arg("mask"),
        py::arg("mean"), py::arg("C"), py::arg("inner"), py::arg("sum_g"), py::arg("sum_gx"));
  m.def("bn_forward", &bn_forward, py::arg("x"), py::arg("skip"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("training"), py::arg("eps"), py::arg("out"),
        py::arg("mask"), py::arg("mean"), py::arg("invstd"), py::arg("var"), py::arg("C"), py::arg("inner"));
  m.def("bn_backward", &bn_backward, py::arg("dy"), py::arg("x"), py::arg("out"), py::arg("mask"), py::arg("mean"),
        py::arg("invstd"), py::arg("weight"), py::arg("training"), py::arg("param_grads"), py::arg("dx"),
        py::arg("dskip"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("C"), py::arg("inner"));
  m.def("bn_update_running", &bn_update_running, py::arg("running_mean"), py::arg("running_var"), py::arg("mean"),
        py::arg("var"), py::arg("count"), py::arg("momentum"));
  m.def("bn_fast_init", &bn_fast_init, py::arg("backend_var"), py::arg("poison_var"));
  m.def("bn_fast_call", &bn_fast_call, py::arg("x"), py::arg("skip"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("weight"), py::arg("bias"), py::arg("training"), py::arg("momentum"),
        py::arg("eps"), py::arg("save"));
  m.def("bn_bwd_apply", &bn_bwd_apply, py::arg("dy"), py::arg("x"), py::arg("out"), py::arg("mask"),
        py::arg("mean"), py::arg("a"), py::arg("b"), py::arg("d"), py::arg("dx"), py::arg("dskip"),
        py::arg("C"), py::arg("inner"));
}
