// The native backend's small CPU calls in C++: KernelForwardPlan's call (`forward`), and differentiable calls without
// a Python autograd Function (`autograd`, a GatedNormCPUBackward node); gatednorm.backends.native_cpu_node builds and
// loads this file.
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

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <atomic>
#include <cstdint>
#include <new>

#include "autograd_node.h"
#include "call_key.h"  // call_key, key_classes: the eager plans' keys in C (shared with the triton plans' extension)
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

std::atomic<int64_t> served_forward{0}, served_backward{0}, served_plain{0};  // autograd, node, forward()

int64_t code_of(const at::Tensor& t) {  // native_cpu_kernel._DTYPES; -1: not a dtype the kernel takes
  if (t.scalar_type() == at::kFloat) return GN_F32;
  if (t.scalar_type() == at::kBFloat16) return GN_BF16;
  return -1;
}

int64_t address(const at::Tensor& t) { return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0; }

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

// The node: GatedNormNode's saved tensors and apply (autograd_node.h) with the C kernel's backward as its core,
// run on the engine's thread without the GIL (an allocation failure throws, as ATen's do).
struct GatedNormCPUBackward final : GatedNormNode {
  const Plan* plan = nullptr;  // in the capsule the node owns

  std::string name() const override { return "GatedNormCPUBackward"; }

  int core(const at::Tensor& dy, const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_,
           const at::Tensor& z_, const at::Tensor& m_, const at::Tensor& r_, at::Tensor g[4]) override {
    return backward_core(*plan, dy, x_, w_, b_, z_, m_, r_, needs, g) ? 1 : 0;
  }
};

void free_plan(PyObject* capsule) { delete static_cast<Plan*>(PyCapsule_GetPointer(capsule, kPlanCapsule)); }

// plan(forward entry address, backward entry address, n, groups, gs, block_elements, x_code, z_code, w_code,
//      b_code, eps, rstd_max, is_rms, gate_before, sigmoid_only) -> a capsule holding the signature's Plan
PyObject* plan(PyObject*, PyObject* args) {
  auto p = std::make_unique<Plan>();
  unsigned long long fwd = 0, bwd = 0;
  long long v[11];
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

// Rows of t (x or z: 2-D with any row stride, or contiguous of any rank) for the kernel: their stride.
int64_t row_stride(const Plan& p, const at::Tensor& t) {
  return !t.defined() ? 0 : t.dim() == 2 ? t.stride(0) : p.n;
}

// The forward of all rows of x in this thread, as native_cpu_kernel.planned_forward packs it: 1 with y (x's shape,
// contiguous), mean (undefined for RMSNorm) and rstd; 0 declined, nothing kept (no rows, above one block, or a group
// out of range: the rescue is the Python path's); -1 with a Python error set. GIL held on entry.
int forward_core(const Plan& p, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                 const at::Tensor& bias, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t m = x.dim() == 0 ? 0 : x.numel() / p.n;
  if (m == 0 || m * p.n > p.block_elements) return 0;
  try {
    y = at::empty_like(x, x.options(), at::MemoryFormat::Contiguous);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    rstd = at::empty({p.groups * m}, f32);
    if (!p.is_rms) mean = at::empty({p.groups * m}, f32);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return -1;
  }
  gn_forward_call c{};
  c.x = address(x), c.x_dtype = p.x_code, c.stride_x = row_stride(p, x);
  c.z = address(z), c.z_dtype = p.z_code, c.stride_z = row_stride(p, z);
  c.w = address(weight), c.w_dtype = p.w_code, c.b = address(bias), c.b_dtype = p.b_code;
  c.y = address(y), c.y_dtype = p.x_code, c.stride_y = p.n;
  c.mean = address(mean), c.rstd = address(rstd);
  c.M = m, c.r0 = 0, c.r1 = m, c.N = p.n, c.gs = p.gs, c.eps = p.eps, c.rstd_max = p.rstd_max;
  c.is_rms = p.is_rms, c.gate_before = p.gate_before, c.sigmoid_only = p.sigmoid_only;
  int64_t out_of_range;
  Py_BEGIN_ALLOW_THREADS
  out_of_range = p.forward(&c);
  Py_END_ALLOW_THREADS
  if (out_of_range < 0) {
    PyErr_NoMemory();
    return -1;
  }
  return out_of_range == 0 ? 1 : 0;
}

bool parse_call(PyObject* const* args, at::Tensor& x, at::Tensor& z, at::Tensor& weight, at::Tensor& bias) {
  return THPVariable_Check(args[0]) && THPVariable_Check(args[2]) && tensor_or_none(args[0], x) &&
         tensor_or_none(args[1], z) && tensor_or_none(args[2], weight) && tensor_or_none(args[3], bias);
}

// forward(plan capsule, x, z | None, weight, bias | None) -> (y in x's shape, mean | None, rstd), or None, nothing
// written (the Python plan runs): KernelForwardPlan's call in one C call. x and z: the signature's rows.
PyObject* forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  at::Tensor x, z, weight, bias;
  if (nargs != 5 || !PyCapsule_IsValid(args[0], kPlanCapsule) || !parse_call(args + 1, x, z, weight, bias)) {
    PyErr_SetString(PyExc_TypeError, "forward(plan, x, z, weight, bias)");
    return nullptr;
  }
  const Plan& p = *static_cast<const Plan*>(PyCapsule_GetPointer(args[0], kPlanCapsule));
  at::Tensor y, mean, rstd;
  const int rc = forward_core(p, x, z, weight, bias, y, mean, rstd);
  if (rc <= 0) return rc < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  served_plain.fetch_add(1, std::memory_order_relaxed);
  return forward_outputs(std::move(y), std::move(mean), std::move(rstd));
}

// autograd(plan capsule, fallback, x, z | None, weight, bias | None) -> (y, mean | None, rstd), y differentiable
// through a GatedNormCPUBackward node, or None, nothing written (the Python path runs). x and z: the signature's
// (M, N) rows; grad mode on and an input requiring grad. fallback(dy, x, weight, bias, z, mean, rstd, needs) ->
// (dx, dz, dweight, dbias): the Python backward, for what the node does not serve.
PyObject* autograd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  at::Tensor x, z, weight, bias;
  if (nargs != 6 || !PyCapsule_IsValid(args[0], kPlanCapsule) || !PyCallable_Check(args[1]) ||
      !parse_call(args + 2, x, z, weight, bias)) {
    PyErr_SetString(PyExc_TypeError, "autograd(plan, fallback, x, z, weight, bias)");
    return nullptr;
  }
  if (x.dim() != 2) Py_RETURN_NONE;  // the node saves (M, N) rows
  const Plan& p = *static_cast<const Plan*>(PyCapsule_GetPointer(args[0], kPlanCapsule));
  at::Tensor y, mean, rstd;
  const int rc = forward_core(p, x, z, weight, bias, y, mean, rstd);
  if (rc <= 0) return rc < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  try {
    auto node = make_node<GatedNormCPUBackward>();
    node->plan = &p;
    node->record(y, x, z, weight, bias, mean, rstd, args[1], args[0]);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  served_forward.fetch_add(1, std::memory_order_relaxed);
  return forward_outputs(std::move(y), std::move(mean), std::move(rstd));
}

// (differentiable forward calls, their backward calls, plain forward calls) this extension has served
PyObject* served(PyObject*, PyObject*) {
  return Py_BuildValue("(LLL)", static_cast<long long>(served_forward.load()),
                       static_cast<long long>(served_backward.load()), static_cast<long long>(served_plain.load()));
}

PyMethodDef methods[] = {
    {"plan", plan, METH_VARARGS, "a call signature's fixed fields, as a capsule"},
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward)), METH_FASTCALL,
     "a small call's forward through the C kernel"},
    {"autograd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(autograd)), METH_FASTCALL,
     "a differentiable small call through the C kernel and a C++ autograd node"},
    {"served", served, METH_NOARGS, "(differentiable forwards, their backwards, plain forwards) served"},
    {"call_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_key)), METH_FASTCALL,
     "call_key(x, weight, bias, z) -> (key bytes, differentiable) or None"},
    {"key_classes", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(key_classes)), METH_FASTCALL,
     "key_classes(torch.Tensor, torch.nn.Parameter)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "gatednorm_native_cpu_node", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_gatednorm_native_cpu_node() { return PyModule_Create(&module_def); }
