// The C++ autograd node of a differentiable eager call, shared by the two extensions that record one: the native
// backend's CPU node (native_cpu_node.cpp) and the triton plans' C++ entry (triton/cxx_plans.cpp). Each is one
// translation unit, so everything here has internal linkage.
//
// A node saves the call's rows and statistics as PyTorch's own ops do (SavedVariable: version checks, saved-tensor
// hooks), and its apply runs the extension's backward core on the autograd engine's thread; where the core declines
// (returns 0, nothing written) and for a backward that records its own graph (create_graph=True), it calls the
// Python fallback the plan gave (gatednorm.ops._node_backward: the Function's backward, the same results).

#ifndef GATEDNORM_AUTOGRAD_NODE_H
#define GATEDNORM_AUTOGRAD_NODE_H

#include <Python.h>

#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace {

// Which gradients a backward computes: dx, dz, dweight, dbias (GradsNeeded's order).
struct Needs {
  bool dx, dz, dw, db;
};

// A Python tensor or None into out (undefined for None); false for anything else.
bool tensor_or_none(PyObject* obj, at::Tensor& out) {
  if (obj == Py_None) return true;
  if (!THPVariable_Check(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

PyObject* wrap_or_none(at::Tensor&& t) {
  if (t.defined()) return THPVariable_Wrap(std::move(t));
  Py_INCREF(Py_None);
  return Py_None;
}

// (y, mean | None, rstd) as a new tuple
PyObject* forward_outputs(at::Tensor&& y, at::Tensor&& mean, at::Tensor&& rstd) {
  PyObject* out = PyTuple_New(3);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, wrap_or_none(std::move(y)));
  PyTuple_SET_ITEM(out, 1, wrap_or_none(std::move(mean)));
  PyTuple_SET_ITEM(out, 2, wrap_or_none(std::move(rstd)));
  return out;
}

// A new node, as the installed PyTorch holds them: c10::intrusive_ptr (2.13) or std::shared_ptr (before).
template <typename N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::shared_ptr<N>(new N());
  }
}

// The saved tensors of one call, what its inputs need, the Python fallback, and the apply that runs core() or it.
struct GatedNormNode : torch::autograd::Node {
  torch::autograd::SavedVariable x, weight, bias, z, mean, rstd;
  bool has_bias = false, has_z = false, has_mean = false;
  Needs needs{};
  PyObject* owner = nullptr;     // owned, may be null: keeps what core() reads alive (a plan's state)
  PyObject* fallback = nullptr;  // owned: fallback(dy, x, weight, bias, z, mean, rstd, needs) -> 4 grads or None

  ~GatedNormNode() override {
    if ((owner != nullptr || fallback != nullptr) && Py_IsInitialized()) {
      PyGILState_STATE gil = PyGILState_Ensure();
      Py_XDECREF(owner);
      Py_XDECREF(fallback);
      PyGILState_Release(gil);
    }
  }

  // The backward without Python: 1 with the asked gradients in g (dx, dz, dweight, dbias), 0 declined (nothing
  // written), -1 with a Python error set. Called with the GIL held where core_needs_gil().
  virtual int core(const at::Tensor& dy, const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_,
                   const at::Tensor& z_, const at::Tensor& m_, const at::Tensor& r_, at::Tensor g[4]) = 0;
  virtual bool core_needs_gil() const { return false; }

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
    at::Tensor g[4];
    int rc = 0;
    const bool plain = !c10::GradMode::is_enabled();  // else the backward records a graph: the fallback's
    if (plain && !core_needs_gil()) rc = core(dy, x_, w_, b_, z_, m_, r_, g);
    if (rc == 0 || core_needs_gil()) {
      PyGILState_STATE gil = PyGILState_Ensure();
      if (plain && core_needs_gil()) rc = core(dy, x_, w_, b_, z_, m_, r_, g);
      if (rc == 0) rc = call_fallback(dy, x_, w_, std::move(b_), std::move(z_), std::move(m_), r_, g);
      if (rc < 0) {
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

  // The fallback's gradients into g: 1, or -1 with a Python error set. GIL held.
  int call_fallback(const at::Tensor& dy, const at::Tensor& x_, const at::Tensor& w_, at::Tensor&& b_,
                    at::Tensor&& z_, at::Tensor&& m_, const at::Tensor& r_, at::Tensor g[4]) {
    PyObject* result = PyObject_CallFunction(
        fallback, "NNNNNNN(NNNN)", THPVariable_Wrap(dy), THPVariable_Wrap(x_), THPVariable_Wrap(w_),
        wrap_or_none(std::move(b_)), wrap_or_none(std::move(z_)), wrap_or_none(std::move(m_)), THPVariable_Wrap(r_),
        PyBool_FromLong(needs.dx), PyBool_FromLong(needs.dz), PyBool_FromLong(needs.dw), PyBool_FromLong(needs.db));
    int rc = -1;
    if (result != nullptr && PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 4) {
      rc = 1;
      for (int i = 0; i < 4; ++i)
        if (!tensor_or_none(PyTuple_GET_ITEM(result, i), g[i])) rc = -1;
    }
    if (rc < 0 && result != nullptr)
      PyErr_SetString(PyExc_TypeError, "gatednorm: the backward fallback must return 4 tensors or None");
    Py_XDECREF(result);
    return rc;
  }

  // Make this node y's grad_fn: the edges to x, weight, bias and z, what each needs, the saved tensors (z, bias,
  // mean undefined where absent), the fallback and the owner (new references taken).
  void record(at::Tensor& y, const at::Tensor& x_, const at::Tensor& z_, const at::Tensor& w_, const at::Tensor& b_,
              const at::Tensor& m_, const at::Tensor& r_, PyObject* fallback_, PyObject* owner_) {
    set_next_edges(torch::autograd::collect_next_edges(x_, w_, b_, z_));
    needs = {x_.requires_grad(), z_.defined() && z_.requires_grad(), w_.requires_grad(),
             b_.defined() && b_.requires_grad()};
    has_bias = b_.defined();
    has_z = z_.defined();
    has_mean = m_.defined();
    x = torch::autograd::SavedVariable(x_, false);
    weight = torch::autograd::SavedVariable(w_, false);
    if (has_bias) bias = torch::autograd::SavedVariable(b_, false);
    if (has_z) z = torch::autograd::SavedVariable(z_, false);
    if (has_mean) mean = torch::autograd::SavedVariable(m_, false);
    rstd = torch::autograd::SavedVariable(r_, false);
    Py_XINCREF(owner_);
    owner = owner_;
    Py_INCREF(fallback_);
    fallback = fallback_;
    torch::autograd::set_history(y, getptr());
  }
};

}  // namespace

#endif
