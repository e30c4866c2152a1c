// The native backend's differentiable small CPU calls without a Python autograd Function
// (gatednorm.backends.native_cpu_node builds and loads this file).
//
// A differentiable eager call of one block of rows (KernelForwardPlan / KernelBackwardPlan in native_cpu.py) is a
// few microseconds of C kernel inside some sixty of Python: the autograd Function's apply, its ctx and saved
// tensors, and its backward called back from the engine (rmsnorm_fn bf16 1x128 forward+backward about 2.7-3x a
// plain autograd pair (x * z).backward(dy) on the 2-core VM, session 28). Here the forward allocates y and the
// statistics, fills native_cpu_kernel.h's gn_forward_call and calls the C kernel's entry point, then hands y a
// GatedNormCPUBackward node; the node's apply fills gn_backward_call the same way on the engine's thread. The same
// kernel calls with the same fields as the Python plans pack (native_cpu_kernel.planned_forward /
// planned_backward), so the same bits. The Python path runs instead, having nothing written, where a call is not
// this plan's (no rows, above one block) or has a group out of range (its rescue is Python's, on the stored rstd);
// the node calls the Python fallback where dy is not a float32 / bf16 (M, N) CPU tensor with unit feature stride
// and for a backward that records its own graph (create_graph=True).

#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "native_cpu_kernel.h"

namespace {

using ForwardEntry = int64_t (*)(const gn_forward_call*);
using BackwardEntry = int64_t (*)(const gn_backward_call*);

// One call signature's fixed fields: what KernelForwardPlan / KernelBackwardPlan keep (planned_forward_fields,
// planned_backward_fields) and the C kernel's entry points. Lives in a capsule the Python plan holds.
struct Plan {
  ForwardEntry forward = nullptr;
  BackwardEntry backward = nullptr;
  int64_t n = 0, groups = 0, gs = 0, block_elements = 0;
  int64_t x_code = 0, z_code = 0, w_code = 0, b_code = 0;
  double eps = 0.0, rstd_max = 0.0;
  int64_t is_rms = 0, gate_before = 0, sigmoid_only = 0;
};

constexpr const char* kPlanCapsule = "gatednorm.native_cpu_node.Plan";

std::atomic<int64_t> served_forward{0}, served_backward{0};

struct Needs {
  bool dx, dz, dw, db;
};

int64_t code_of(const at::Tensor& t) {  // native_cpu_kernel._DTYPES; -1: not a dtype the kernel takes
  if (t.scalar_type() == at::kFloat) return GN_F32;
  if (t.scalar_type() == at::kBFloat16) return GN_BF16;
  return -1;
}

int64_t address(const at::Tensor& t) { return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0; }

bool tensor_or_none(PyObject* obj, at::Tensor& out) {
  if (obj == Py_None) return true;
  if (!THPVariable_Check(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

PyObject* wrap_or_none(at::Tensor&& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(t));
}

// gn_backward_packed over all rows of one block in this thread, as native_cpu_kernel.planned_backward packs it,
// then dweight / dbias in the parameters' dtypes (one task: its partial row is the sum). false: not this call's
// (dy of another dtype, device or layout), nothing written.
bool backward_core(const Plan& p, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                   const at::Tensor& b, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& rstd,
                   const Needs& needs, at::Tensor g[4]) {
  const int64_t dy_code = code_of(dy);
  if (dy_code < 0 || !dy.device().is_cpu() || dy.layout() != at::kStrided || dy.dim() != 2 ||
      dy.sizes() != x.sizes() || dy.stride(1) != 1 || dy.unsafeGetTensorImpl()->is_python_dispatch() ||
      !dy.has_storage())
    return false;
  const int64_t m = x.size(0);
  const auto contiguous = at::MemoryFormat::Contiguous;
  if (needs.dx) g[0] = at::empty_like(x, x.options(), contiguous);
  if (needs.dz && z.defined()) g[1] = at::empty_like(z, z.options(), contiguous);
  at::Tensor part_w, part_b;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (needs.dw) part_w = at::empty({p.n}, f32);
  if (needs.db && b.defined()) part_b = at::empty({p.n}, f32);
  gn_backward_call c{};
  c.dy = address(dy), c.dy_dtype = dy_code, c.stride_dy = dy.stride(0);
  c.x = address(x), c.x_dtype = p.x_code, c.stride_x = x.stride(0);
  c.z = address(z), c.z_dtype = p.z_code, c.stride_z = z.defined() ? z.stride(0) : 0;
  c.w = address(w), c.w_dtype = p.w_code, c.b = address(b), c.b_dtype = p.b_code;
  c.mean = address(mean), c.rstd = address(rstd);
  c.dx = address(g[0]), c.dx_dtype = g[0].defined() ? p.x_code : 0, c.stride_dx = g[0].defined() ? p.n : 0;
  c.dz = address(g[1]), c.dz_dtype = g[1].defined() ? p.z_code : 0, c.stride_dz = g[1].defined() ? p.n : 0;
  c.part_w = address(part_w), c.part_b = address(part_b);
  c.M = m, c.r0 = 0, c.r1 = m, c.N = p.n, c.gs = p.gs;
  c.is_rms = p.is_rms, c.gate_before = p.gate_before, c.sigmoid_only = p.sigmoid_only;
  if (p.backward(&c) < 0) throw std::bad_alloc();
  if (part_w.defined()) g[2] = part_w.to(w.scalar_type());  // rounded once, as KernelBackwardPlan
  if (part_b.defined()) g[3] = part_b.to(b.scalar_type());
  served_backward.fetch_add(1, std::memory_order_relaxed);
  return true;
}

struct GatedNormCPUBackward final : torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, bias, z, mean, rstd;
  bool has_bias = false, has_z = false, has_mean = false;
  Needs needs{};
  const Plan* plan = nullptr;
  PyObject* owner = nullptr;     // owned: the plan's capsule (keeps `plan` alive)
  PyObject* fallback = nullptr;  // owned

  ~GatedNormCPUBackward() override {
    if ((owner != nullptr || fallback != nullptr) && Py_IsInitialized()) {
      PyGILState_STATE gil = PyGILState_Ensure();
      Py_XDECREF(owner);
      Py_XDECREF(fallback);
      PyGILState_Release(gil);
    }
  }

  std::string name() const override { return "GatedNormCPUBackward"; }

  void release_variables() override {
    for (auto* saved : {&x, &weight, &bias, &z, &mean, &rstd}) saved->reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(4);  // the next edges' order: x, weight, bias, z
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    auto self = getptr();
    at::Tensor x_ = x.unpack(self), w_ = weight.unpack(self), r_ = rstd.unpack(self);
    at::Tensor b_ = has_bias ? bias.unpack(self) : at::Tensor();
    at::Tensor z_ = has_z ? z.unpack(self) : at::Tensor();
    at::Tensor m_ = has_mean ? mean.unpack(self) : at::Tensor();
    at::Tensor g[4];  // dx, dz, dweight, dbias
    if (c10::GradMode::is_enabled() || !backward_core(*plan, dy, x_, w_, b_, z_, m_, r_, needs, g)) {
      PyGILState_STATE gil = PyGILState_Ensure();
      PyObject* result = PyObject_CallFunction(
          fallback, "NNNNNNN(NNNN)", THPVariable_Wrap(dy), THPVariable_Wrap(x_), THPVariable_Wrap(w_),
          wrap_or_none(std::move(b_)), wrap_or_none(std::move(z_)), wrap_or_none(std::move(m_)), THPVariable_Wrap(r_),
          PyBool_FromLong(needs.dx), PyBool_FromLong(needs.dz), PyBool_FromLong(needs.dw), PyBool_FromLong(needs.db));
      bool ok = result != nullptr && PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 4;
      for (int i = 0; ok && i < 4; ++i) ok = tensor_or_none(PyTuple_GET_ITEM(result, i), g[i]);
      if (!ok && result != nullptr)
        PyErr_SetString(PyExc_TypeError, "gatednorm native_cpu_node: the backward fallback must return 4 tensors or None");
      Py_XDECREF(result);
      if (!ok) {
        python_error err;
        err.persist();
        PyGILState_Release(gil);
        throw err;
      }
      PyGILState_Release(gil);
    }
    out[0] = std::move(g[0]);
    out[1] = std::move(g[2]);
    out[2] = std::move(g[3]);
    out[3] = std::move(g[1]);
    return out;
  }
};

// A new node, as the installed PyTorch holds them: c10::intrusive_ptr (2.13) or std::shared_ptr (before).
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N());
  }
}

void free_plan(PyObject* capsule) { delete static_cast<Plan*>(PyCapsule_GetPointer(capsule, kPlanCapsule)); }

// plan(forward entry address, backward entry address, n, groups, gs, block_elements, x_code, z_code, w_code,
//      b_code, eps, rstd_max, is_rms, gate_before, sigmoid_only) -> a capsule holding the signature's Plan
PyObject* plan(PyObject*, PyObject* args) {
  auto p = std::make_unique<Plan>();
  unsigned long long fwd = 0, bwd = 0;
  long long v[12];
  if (!PyArg_ParseTuple(args, "KKLLLLLLLLddLLL", &fwd, &bwd, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6],
                        &v[7], &p->eps, &p->rstd_max, &v[8], &v[9], &v[10]))
    return nullptr;
  if (fwd == 0 || bwd == 0) {
    PyErr_SetString(PyExc_ValueError, "gatednorm native_cpu_node.plan: null kernel entry point");
    return nullptr;
  }
  p->forward = reinterpret_cast<ForwardEntry>(static_cast<uintptr_t>(fwd));
  p->backward = reinterpret_cast<BackwardEntry>(static_cast<uintptr_t>(bwd));
  p->n = v[0], p->groups = v[1], p->gs = v[2], p->block_elements = v[3];
  p->x_code = v[4], p->z_code = v[5], p->w_code = v[6], p->b_code = v[7];
  p->is_rms = v[8], p->gate_before = v[9], p->sigmoid_only = v[10];
  PyObject* capsule = PyCapsule_New(p.get(), kPlanCapsule, free_plan);
  if (capsule != nullptr) p.release();
  return capsule;
}

// autograd(plan capsule, fallback, x, z | None, weight, bias | None) -> (y, mean | None, rstd), y differentiable
// through a GatedNormCPUBackward node, or None, nothing written (the Python path runs). x and z: the signature's
// (M, N) rows; grad mode on and an input requiring grad. fallback(dy, x, weight, bias, z, mean, rstd, needs) ->
// (dx, dz, dweight, dbias): the Python backward, for what the node does not serve.
PyObject* autograd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  at::Tensor x, z, weight, bias;
  if (nargs != 6 || !PyCapsule_IsValid(args[0], kPlanCapsule) || !PyCallable_Check(args[1]) ||
      !THPVariable_Check(args[2]) || !THPVariable_Check(args[4]) || !tensor_or_none(args[2], x) ||
      !tensor_or_none(args[3], z) || !tensor_or_none(args[4], weight) || !tensor_or_none(args[5], bias)) {
    PyErr_SetString(PyExc_TypeError, "autograd(plan, fallback, x, z, weight, bias)");
    return nullptr;
  }
  const Plan& p = *static_cast<const Plan*>(PyCapsule_GetPointer(args[0], kPlanCapsule));
  const int64_t m = x.dim() == 2 ? x.size(0) : 0;
  if (m == 0 || m * p.n > p.block_elements) Py_RETURN_NONE;
  at::Tensor y, mean, rstd;
  try {
    y = at::empty_like(x, x.options(), at::MemoryFormat::Contiguous);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    rstd = at::empty({p.groups * m}, f32);
    if (!p.is_rms) mean = at::empty({p.groups * m}, f32);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  gn_forward_call c{};
  c.x = address(x), c.x_dtype = p.x_code, c.stride_x = x.stride(0);
  c.z = address(z), c.z_dtype = p.z_code, c.stride_z = z.defined() ? z.stride(0) : 0;
  c.w = address(weight), c.w_dtype = p.w_code, c.b = address(bias), c.b_dtype = p.b_code;
  c.y = address(y), c.y_dtype = p.x_code, c.stride_y = p.n;
  c.mean = address(mean), c.rstd = address(rstd);
  c.M = m, c.r0 = 0, c.r1 = m, c.N = p.n, c.gs = p.gs, c.eps = p.eps, c.rstd_max = p.rstd_max;
  c.is_rms = p.is_rms, c.gate_before = p.gate_before, c.sigmoid_only = p.sigmoid_only;
  int64_t out_of_range;
  Py_BEGIN_ALLOW_THREADS
  out_of_range = p.forward(&c);
  Py_END_ALLOW_THREADS
  if (out_of_range < 0) return PyErr_NoMemory();
  if (out_of_range > 0) Py_RETURN_NONE;  // the rescue is the Python path's
  try {
    auto node = make_node<GatedNormCPUBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, z));
    node->needs = {x.requires_grad(), z.defined() && z.requires_grad(), weight.requires_grad(),
                   bias.defined() && bias.requires_grad()};
    node->has_bias = bias.defined();
    node->has_z = z.defined();
    node->has_mean = mean.defined();
    node->x = torch::autograd::SavedVariable(x, false);
    node->weight = torch::autograd::SavedVariable(weight, false);
    if (bias.defined()) node->bias = torch::autograd::SavedVariable(bias, false);
    if (z.defined()) node->z = torch::autograd::SavedVariable(z, false);
    if (mean.defined()) node->mean = torch::autograd::SavedVariable(mean, false);
    node->rstd = torch::autograd::SavedVariable(rstd, false);
    node->plan = &p;
    Py_INCREF(args[0]);
    node->owner = args[0];
    Py_INCREF(args[1]);
    node->fallback = args[1];
    torch::autograd::set_history(y, node);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  served_forward.fetch_add(1, std::memory_order_relaxed);
  PyObject* result = PyTuple_New(3);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(y)));
  PyTuple_SET_ITEM(result, 1, wrap_or_none(std::move(mean)));
  PyTuple_SET_ITEM(result, 2, THPVariable_Wrap(std::move(rstd)));
  return result;
}

// (forward calls, backward calls) this extension has served (tests, benchmarks)
PyObject* served(PyObject*, PyObject*) {
  return Py_BuildValue("(LL)", static_cast<long long>(served_forward.load()),
                       static_cast<long long>(served_backward.load()));
}

PyMethodDef methods[] = {
    {"plan", plan, METH_VARARGS, "a call signature's fixed fields, as a capsule"},
    {"autograd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(autograd)), METH_FASTCALL,
     "a differentiable small call through the C kernel and a C++ autograd node"},
    {"served", served, METH_NOARGS, "(forward, backward) calls served"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "gatednorm_native_cpu_node", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_gatednorm_native_cpu_node() { return PyModule_Create(&module_def); }
