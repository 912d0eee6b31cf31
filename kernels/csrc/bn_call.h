// The eager fast path of fused_residual.batch_norm_relu / batch_norm_add_relu on the cpp backend: the op's
// whole call (layout, outputs, statistics, normalise (+ add) + ReLU and the autograd node) in one C++ call,
// with the kernels and formulas of batch_norm.h.
//
// Why in C++: at the activation sizes of a small-batch CPU ResNet (50K-800K elements), the Python autograd
// Function around the same kernels cost ~40 us of host time per forward + backward, as much as the kernels
// themselves. Python decides when this path applies (fused_residual/ops/batch_norm.py, `call`: plain eager
// mode, CPU tensors, the cpp backend) and checks the arguments first, so everything here is already valid;
// every other case (torch.compile, torch.export, other backends, modes and subclasses) takes the
// registered ops, whose results this path reproduces bit for bit (tests/test_batch_norm.py).
//
// Autograd keeps what the registered op's autograd keeps: x as given, the gate (the 1-bit mask or the
// output), the float32 mean and invstd, and weight. The backward is first-order only, as the registered
// op's: under create_graph its results carry a node that raises if differentiated again.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <cstring>

namespace fused_residual {
namespace {

// batch_norm.canonical_format: x's own layout where it is dense row-major or channels_last, else row-major.
at::MemoryFormat bn_memory_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// Elements of one channel adjacent in storage (batch_norm.inner_size).
int64_t bn_inner(const at::Tensor& x, at::MemoryFormat fmt) {
  if (fmt != at::MemoryFormat::Contiguous) return 1;
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) inner *= x.size(d);
  return inner;
}

// An op output, as fused_residual._alloc prepares them: huge pages advised from 4 MiB, and the 0x55 poison
// bytes when the caller's tests ask for them.
at::Tensor bn_prepared(at::Tensor t, bool poison) {
  if (t.nbytes() >= (size_t(4) << 20)) advise_huge_pages(t);
  if (poison && t.nbytes() > 0) std::memset(t.data_ptr(), 0x55, t.nbytes());
  return t;
}

std::optional<at::Tensor> bn_opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

int64_t dtype_code(const std::optional<at::Tensor>& t) { return t ? static_cast<int64_t>(t->scalar_type()) : -1; }

struct BatchNormReLUCall : public torch::autograd::Function<BatchNormReLUCall> {
  // Absent tensors are not inputs of the node: needs_input_grad counts the present ones, so the edge index
  // of skip, weight and bias is kept (-1: absent). Returns (out, mean, var); mean and var are not
  // differentiable.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const std::optional<at::Tensor>& skip,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var, bool training,
                                                double eps, bool save_mask, bool poison) {
    const at::MemoryFormat fmt = bn_memory_format(x);
    const at::Tensor xc = x.contiguous(fmt);
    const int64_t C = x.size(1), n = x.numel();
    at::Tensor out = bn_prepared(at::empty_like(xc), poison);
    at::Tensor mask = bn_prepared(at::empty({save_mask ? (n + 7) / 8 : 0}, x.options().dtype(at::kByte)), poison);
    const auto f32 = x.options().dtype(at::kFloat);
    at::Tensor mean = at::empty({C}, f32), invstd = at::empty({C}, f32), var = at::empty({C}, f32);
    bn_forward(xc, skip ? std::optional<at::Tensor>(skip->contiguous(fmt)) : std::nullopt, weight, bias,
               running_mean, running_var, training, eps, out,
               save_mask ? std::optional<at::Tensor>(mask) : std::nullopt, mean, invstd, var, C, bn_inner(x, fmt));
    ctx->save_for_backward({x, save_mask ? mask : out, mean, invstd, weight.value_or(at::Tensor())});
    int64_t edge = 1;  // x is edge 0
    for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>*>{"skip_edge", &skip},
                                  {"weight_edge", &weight}, {"bias_edge", &bias}}) {
      ctx->saved_data[name] = t->has_value() ? edge++ : int64_t(-1);
    }
    ctx->saved_data["training"] = training;
    ctx->saved_data["save_mask"] = save_mask;
    ctx->saved_data["weight_dtype"] = dtype_code(weight);
    ctx->saved_data["bias_dtype"] = dtype_code(bias);
    ctx->saved_data["poison"] = poison;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {out, mean, var};
  }

  static bool needs(torch::autograd::AutogradContext* ctx, const char* edge) {
    const int64_t i = ctx->saved_data[edge].toInt();
    return i >= 0 && ctx->needs_input_grad(static_cast<size_t>(i));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(10);  // one per forward argument, tensor or not
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return result;  // nothing flowed into out
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &gate = saved[1], &mean = saved[2], &invstd = saved[3], &weight = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const bool save_mask = ctx->saved_data["save_mask"].toBool();
    const bool poison = ctx->saved_data["poison"].toBool();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_skip = needs(ctx, "skip_edge");
    const bool need_w = needs(ctx, "weight_edge"), need_b = needs(ctx, "bias_edge");

    const at::MemoryFormat fmt = bn_memory_format(x);
    const at::Tensor xc = x.contiguous(fmt);
    const int64_t C = x.size(1);
    at::Tensor dx = bn_prepared(at::empty_like(xc), poison);
    at::Tensor dskip = need_skip ? bn_prepared(at::empty_like(xc), poison) : at::Tensor();
    const auto f32 = x.options().dtype(at::kFloat);
    at::Tensor dw = at::empty({C}, f32), db = at::empty({C}, f32);
    bn_backward(grad.contiguous(fmt), xc, save_mask ? std::nullopt : std::optional<at::Tensor>(gate.contiguous(fmt)),
                save_mask ? std::optional<at::Tensor>(gate) : std::nullopt, mean, invstd, bn_opt(weight), training,
                need_w || need_b, dx, bn_opt(dskip), dw, db, C, bn_inner(x, fmt));
    if (need_x) result[0] = dx;
    if (need_skip) result[1] = dskip;
    if (need_w) result[2] = dw.to(static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt()));
    if (need_b) result[3] = db.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
    return once_differentiable(std::move(result), grad, x, weight);
  }

  // As torch.autograd.function.once_differentiable: under create_graph, where the inputs of the backward
  // require grad, the gradients carry a node that raises when they are differentiated (the registered op
  // raises there too, having no formula for its backward).
  static torch::autograd::variable_list once_differentiable(torch::autograd::variable_list result,
                                                            const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& weight) {
    const bool any_grad = grad.requires_grad() || x.requires_grad() || (weight.defined() && weight.requires_grad());
    if (!at::GradMode::is_enabled() || !any_grad) return result;
    torch::autograd::variable_list leaves;
    for (const auto& t : result) leaves.push_back(t.defined() ? t.detach().requires_grad_(true) : at::Tensor());
    auto error = std::make_shared<torch::autograd::DelayedError>(
        "fused_residual: the backward of batch_norm_relu / batch_norm_add_relu is not differentiable (no double "
        "backward)",
        static_cast<int64_t>(leaves.size()));
    return error->apply(std::move(leaves));
  }
};

// The public call's op: (out, mean, var), out = relu(batch_norm(x) [+ skip]); the caller updates the running
// statistics from mean and var (batch_norm.update_running_stats).
std::vector<at::Tensor> bn_relu_call(const at::Tensor& x, const std::optional<at::Tensor>& skip,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var, bool training, double eps,
                                     bool save_mask, bool poison) {
  return BatchNormReLUCall::apply(x, skip, weight, bias, running_mean, running_var, training, eps, save_mask, poison);
}

}  // namespace
}  // namespace fused_residual
