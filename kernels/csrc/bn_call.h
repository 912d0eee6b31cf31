// The eager call of fused_residual.batch_norm_relu / batch_norm_add_relu on the cpp backend: argument and mode
// checks, layout, outputs, statistics, normalise (+ add) + ReLU, the autograd node and the running-statistics
// update in one C++ call (bn_fast_call, at the bottom), with the kernels and formulas of batch_norm.h.
//
// Why in C++: at the activation sizes of a small-batch CPU ResNet (50K-800K elements), the Python around the
// same kernels (checks, dispatch, a Python autograd Function) cost as much host time as the kernels. Every
// case bn_fast_call does not take (torch.compile, torch.export, other backends, modes, transforms,
// subclasses, invalid arguments) goes back to Python and the registered ops, whose results this path
// reproduces bit for bit (tests/test_batch_norm.py).
//
// Autograd keeps what the registered op's autograd keeps: x as given, the gate (the 1-bit mask or the
// output), the float32 mean and invstd, and weight. The backward is first-order only, as the registered
// op's: under create_graph its results carry a node that raises if differentiated again.
#pragma once

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/profiler/orchestration/observer.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

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

// ---- the public functions' eager call, whole ---------------------------------------------------------------
//
// fused_residual.batch_norm_relu / batch_norm_add_relu hand their arguments here first (after their own
// torch.compile and forward-AD tests, which are Python state). bn_fast_call takes the call when nothing but
// autograd needs to see it and every argument is plainly valid, and then does all of it: the output, the
// autograd node and the running-statistics update. Otherwise it returns None and touches nothing: the Python
// path then takes the call, raises the errors (with the messages of batch_norm.check) or goes through the
// registered ops. At the ~50K-800K element activations of a small-batch CPU ResNet, the Python checks and
// dispatch before the C++ call cost about as much host time as the kernels (cold caches after a convolution
// make each Python line dearer inside a model than in a loop), so they are done here in a few compares.

// The ContextVars of fused_residual._backend.use_backend and fused_residual._alloc.poison_outputs, set once by
// batch_norm.py (bn_fast_init).
PyObject* g_backend_var = nullptr;
PyObject* g_poison_var = nullptr;

void bn_fast_init(py::object backend_var, py::object poison_var) {
  TORCH_CHECK(PyContextVar_CheckExact(backend_var.ptr()) && PyContextVar_CheckExact(poison_var.ptr()),
              "bn_fast_init: expected two contextvars.ContextVar");
  Py_XDECREF(g_backend_var);
  Py_XDECREF(g_poison_var);
  g_backend_var = backend_var.release().ptr();
  g_poison_var = poison_var.release().ptr();
}

// The ContextVar's value (a new reference), or nullptr where it has none.
py::object context_value(PyObject* var) {
  PyObject* value = nullptr;
  if (PyContextVar_Get(var, nullptr, &value) < 0) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(value);
}

// _backend.resolve(cpu) is "cpp": use_backend("cpp" / "auto"), else $FUSED_RESIDUAL_BACKEND cpp / auto / unset.
// (This extension is loaded, so "auto" means cpp on CPU.) An invalid name is left to Python, which raises.
bool cpp_backend_selected() {
  const py::object chosen = context_value(g_backend_var);
  std::string name;
  if (chosen && !chosen.is_none()) {
    if (!PyUnicode_Check(chosen.ptr())) return false;
    name = PyUnicode_AsUTF8(chosen.ptr());
  } else {
    const char* env = std::getenv("FUSED_RESIDUAL_BACKEND");
    if (env == nullptr || *env == '\0') return true;
    for (const char* c = env; *c; ++c) name += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  }
  return name == "cpp" || name == "auto";
}

// batch_norm.py's plain_eager for the call: no tracer, mode, functorch transform or profiler is active (the
// caller has ruled out torch.compile and forward-mode AD).
bool nothing_intercepts() {
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !at::impl::torch_function_mode_enabled() &&
         // a functorch transform (grad, vmap, jvp, functionalize) includes its dynamic-layer key while active
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !torch::profiler::impl::profilerEnabled() &&
         !torch::jit::tracer::isTracing();
}

bool supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// `obj` is None (t stays empty) or a plain Tensor / Parameter (not a subclass) on the CPU, strided, holding its
// values as stored (no lazy negation or conjugation), in a supported floating dtype.
bool plain_arg(PyObject* obj, std::optional<at::Tensor>& t) {
  if (obj == Py_None) return true;
  if (!THPVariable_CheckExact(obj)) return false;
  const at::Tensor& v = THPVariable_Unpack(obj);
  if (!v.device().is_cpu() || v.layout() != at::kStrided || v.is_neg() || v.is_conj() ||
      !supported_float(v.scalar_type())) {
    return false;
  }
  t = v;
  return true;
}

// A Python float or int (not bool, not a subclass) as a double.
bool plain_number(PyObject* obj, double& out) {
  if (PyFloat_CheckExact(obj)) {
    out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (PyLong_CheckExact(obj)) {
    out = PyLong_AsDouble(obj);
    if (out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// The checks of batch_norm.check, as accept / leave-to-Python; plus x not empty and running buffers that may be
// written in place here (an inference tensor outside InferenceMode is left to the Python path).
bool valid_call(const at::Tensor& x, const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& rm,
                const std::optional<at::Tensor>& rv, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, bool training) {
  if (x.dim() < 2 || x.numel() == 0) return false;
  const int64_t C = x.size(1);
  if (skip && (skip->sizes() != x.sizes() || skip->scalar_type() != x.scalar_type())) return false;
  for (const auto* t : {&rm, &rv, &weight, &bias}) {
    if (*t && ((*t)->dim() != 1 || (*t)->size(0) != C)) return false;
  }
  if (rm.has_value() != rv.has_value()) return false;
  if (!training && !rm) return false;
  if (training && x.numel() / C <= 1) return false;
  if (rm) {
    const bool in_inference = c10::InferenceMode::is_enabled();
    for (const auto* t : {&rm, &rv}) {
      if ((*t)->is_inference() && !in_inference) return false;
    }
  }
  return true;
}

// batch_norm.update_running_stats: float32 dense buffers in one loop (bn_update_running), others with the
// tensor operations the Python path uses, so the buffers come out bit-identical either way.
void bn_update_running_buffers(const at::Tensor& rm, const at::Tensor& rv, const at::Tensor& mean,
                               const at::Tensor& var, int64_t count, double momentum) {
  if (rm.scalar_type() == at::kFloat && rv.scalar_type() == at::kFloat && rm.is_contiguous() && rv.is_contiguous()) {
    bn_update_running(rm, rv, mean, var, count, momentum);
    return;
  }
  // Python's `t.mul_(0.9)` multiplies by a 0-dim float64 tensor (mul_.Tensor), which rounds differently from
  // mul_.Scalar in half precision: the same overloads here.
  const at::NoGradGuard no_grad;
  const auto number = [](double v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble)); };
  const at::Tensor unbiased =
      count > 1 ? var.mul(number(static_cast<double>(count) / static_cast<double>(count - 1))) : var;
  rm.mul_(number(1 - momentum)).add_(mean.to(rm.scalar_type()), momentum);
  rv.mul_(number(1 - momentum)).add_(unbiased.to(rv.scalar_type()), momentum);
}

// (x, skip, running_mean, running_var, weight, bias, training, momentum, eps, save) as the public functions
// take them -> the output, or None: not taken, nothing done.
py::object bn_fast_call(py::handle x_obj, py::handle skip_obj, py::handle rm_obj, py::handle rv_obj,
                        py::handle weight_obj, py::handle bias_obj, py::handle training_obj,
                        py::handle momentum_obj, py::handle eps_obj, py::handle save_obj) {
  TORCH_CHECK(g_backend_var != nullptr, "bn_fast_call: bn_fast_init was not called");
  std::optional<at::Tensor> x, skip, rm, rv, weight, bias;
  double momentum = 0.0, eps = 0.0;
  if (x_obj.ptr() == Py_None || !plain_arg(x_obj.ptr(), x) || !plain_arg(skip_obj.ptr(), skip) ||
      !plain_arg(rm_obj.ptr(), rm) || !plain_arg(rv_obj.ptr(), rv) || !plain_arg(weight_obj.ptr(), weight) ||
      !plain_arg(bias_obj.ptr(), bias) || !PyBool_Check(training_obj.ptr()) ||
      !plain_number(momentum_obj.ptr(), momentum) || !plain_number(eps_obj.ptr(), eps) ||
      !PyUnicode_Check(save_obj.ptr())) {
    return py::none();
  }
  const bool training = training_obj.ptr() == Py_True;
  const bool mask_mode = PyUnicode_CompareWithASCIIString(save_obj.ptr(), "mask") == 0;
  if (!mask_mode && PyUnicode_CompareWithASCIIString(save_obj.ptr(), "output") != 0) return py::none();
  if (!valid_call(*x, skip, rm, rv, weight, bias, training) || !nothing_intercepts() || !cpp_backend_selected()) {
    return py::none();
  }
  const py::object poison_value = context_value(g_poison_var);
  const bool poison = poison_value && PyObject_IsTrue(poison_value.ptr()) == 1;
  bool any_grad = false;
  for (const auto* t : {&x, &skip, &weight, &bias}) any_grad = any_grad || (*t && (*t)->requires_grad());
  const bool save_mask = mask_mode && at::GradMode::is_enabled() && any_grad;
  at::Tensor out;
  {
    auto r = BatchNormReLUCall::apply(*x, skip, weight, bias, rm, rv, training, eps, save_mask, poison);
    out = std::move(r[0]);
    if (training && rm) bn_update_running_buffers(*rm, *rv, r[1], r[2], x->numel() / x->size(1), momentum);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

}  // namespace
}  // namespace fused_residual

