// The eager plans' signature key of a call's tensors in C (gatednorm.ops, "Eager plans"), shared by the two
// extensions that may offer it (backends.base.call_key): the native backend's CPU node (native_cpu_node.cpp) and the
// triton plans' C++ entry (triton/cxx_plans.cpp). Each is one translation unit, so everything here has internal
// linkage; each registers call_key and key_classes among its module's methods, and its Python side calls
// key_classes(torch.Tensor, torch.nn.Parameter) once loaded, then sets backends.base.call_key.
//
// ops builds a key per eager call from its tensors' metadata; in Python that is some twenty attribute reads: the
// whole signature (ops._call_signature) took 2.2 us on the CPU machine and 2.6-2.8 us on an H100 host, with
// call_key, which reads the same fields from the ATen tensors in one C call, 0.5 and 0.7 us (session 23).

#ifndef GATEDNORM_CALL_KEY_H
#define GATEDNORM_CALL_KEY_H

#include <Python.h>

#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <exception>

namespace {

PyObject* tensor_class = nullptr;     // torch.Tensor
PyObject* parameter_class = nullptr;  // torch.nn.Parameter

constexpr int kKeyMaxDims = 4;  // parameters of more dims: the Python key

struct KeyWriter {
  int64_t v[64];
  int n = 0;
  void put(int64_t value) { v[n++] = value; }
};

// The fields both kinds of tensor share: class (1 torch.Tensor, 2 torch.nn.Parameter), dtype, device, rank.
// False for another class or a tensor whose strides are not plain (sparse, nested, ...): the Python key decides.
bool put_tensor_common(KeyWriter& key, PyObject* obj, const at::Tensor& t) {
  const PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  const int tag = type == tensor_class ? 1 : type == parameter_class ? 2 : 0;
  if (tag == 0 || t.layout() != at::kStrided || t.is_nested()) return false;
  key.put(tag);
  key.put(static_cast<int64_t>(t.scalar_type()));
  key.put(static_cast<int64_t>(t.device().type()));
  key.put(t.device().index());
  key.put(t.dim());
  return true;
}

// x or z (None: -1): as ops._rows_signature, the row strides of a 2-D tensor, else whether it is contiguous.
bool put_rows(KeyWriter& key, PyObject* obj, const at::Tensor& t) {
  if (!t.defined()) return key.put(-1), true;
  if (!put_tensor_common(key, obj, t)) return false;
  if (t.dim() == 2) {
    key.put(t.stride(0));
    key.put(t.stride(1));
  } else {
    key.put(t.is_contiguous());
  }
  return true;
}

// weight or bias (None: -1): as ops._param_signature, shape and strides.
bool put_param(KeyWriter& key, PyObject* obj, const at::Tensor& t) {
  if (!t.defined()) return key.put(-1), true;
  if (t.dim() > kKeyMaxDims || !put_tensor_common(key, obj, t)) return false;
  for (int64_t d = 0; d < t.dim(); ++d) key.put(t.size(d));
  for (int64_t d = 0; d < t.dim(); ++d) key.put(t.stride(d));
  return true;
}

// call_key(x, weight, bias, z) -> (key bytes, differentiable) or None. The key's tensor part (what
// ops._signature_key reads from x, z, weight and bias; equal bytes iff equal Python fields) and whether grad mode
// is on with an input that requires grad (ops.needs_autograd). None where the Python path must decide: x not
// exactly a torch.Tensor, of rank 0 or empty (not planned); a gate or parameter of another class, layout or rank.
PyObject* call_key(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "call_key(x, weight, bias, z)");
    return nullptr;
  }
  if (tensor_class == nullptr || Py_TYPE(args[0]) != reinterpret_cast<PyTypeObject*>(tensor_class) ||
      !THPVariable_Check(args[1]) || !(args[2] == Py_None || THPVariable_Check(args[2])) ||
      !(args[3] == Py_None || THPVariable_Check(args[3]))) {
    Py_RETURN_NONE;
  }
  static const at::Tensor undefined;
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  const at::Tensor& bias = args[2] == Py_None ? undefined : THPVariable_Unpack(args[2]);
  const at::Tensor& z = args[3] == Py_None ? undefined : THPVariable_Unpack(args[3]);
  KeyWriter key;
  try {
    if (x.dim() == 0 || x.numel() == 0 || !put_rows(key, args[0], x) || !put_rows(key, args[3], z) ||
        !put_param(key, args[1], weight) || !put_param(key, args[2], bias)) {
      Py_RETURN_NONE;
    }
    key.put(x.size(-1));
  } catch (const std::exception&) {  // metadata that cannot be read this way: the Python key decides
    Py_RETURN_NONE;
  }
  const bool differentiable = c10::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()) ||
       (z.defined() && z.requires_grad()));
  PyObject* bytes = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(key.v),
                                              static_cast<Py_ssize_t>(key.n * sizeof(int64_t)));
  if (bytes == nullptr) return nullptr;
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) {
    Py_DECREF(bytes);
    return nullptr;
  }
  PyTuple_SET_ITEM(out, 0, bytes);
  PyTuple_SET_ITEM(out, 1, PyBool_FromLong(differentiable));
  return out;
}

// key_classes(torch.Tensor, torch.nn.Parameter): the classes call_key keys on (held for the process).
PyObject* key_classes(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyType_Check(args[0]) || !PyType_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "key_classes(torch.Tensor, torch.nn.Parameter)");
    return nullptr;
  }
  Py_INCREF(args[0]);
  Py_XSETREF(tensor_class, args[0]);
  Py_INCREF(args[1]);
  Py_XSETREF(parameter_class, args[1]);
  Py_RETURN_NONE;
}

}  // namespace

#endif  // GATEDNORM_CALL_KEY_H
