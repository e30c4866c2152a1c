// The eager forward plan's per-call host work in C++ (gatednorm.backends.triton.host_forward builds and loads it).
//
// What a call of plans.ForwardPlan does in Python (about 11 us on an H100 host, of which Triton's C launcher is
// 3.8 and the two output allocations 4.1) is done here in one C call: read M off x, pick the kernel variant,
// allocate y, mean and rstd, check the addresses' alignment and launch fwd_kernel (and rescue_kernel after it on
// large calls) with cuLaunchKernelEx exactly as Triton 3.6's generated launcher does: the kernel's parameters are
// its signature's non-constexpr arguments in order (pointers as CUdeviceptr, integers as int32 / int64 as the
// signature types them, floats as their float32 bits), then two null scratch pointers (global and profile
// scratch; plans only register kernels that need neither). Everything decided per signature sits in a
// ForwardPlanState that Python fills (ctypes, plans.py) as the kernel variants get compiled; a variant not
// registered yet, a misaligned address, another current GPU or an installed Triton launch hook returns None,
// having launched nothing, and Python takes its own path (which compiles and registers).

#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/python_variable.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstring>

#include "cuda.h"  // Triton's copy of the driver API header (types only; libcuda is opened at run time)

namespace {

// How one argument of a kernel's signature is passed (plans.py, _ARG_KINDS).
enum ArgKind : int8_t { ARG_SKIP = 0, ARG_PTR = 1, ARG_I32 = 2, ARG_I64 = 3, ARG_F32 = 4 };

constexpr int kMaxArgs = 32;
constexpr int kForwardArgs = 16;  // x, residual, z, weight, bias, y, residual_out, mean, rstd, m, 5 strides, eps
constexpr int kVariants = 32;     // (M == 1, M % 16 == 0, USE_PDL, GROUPS_FASTEST, rescue after)

// One compiled kernel, ready to launch (function 0: not compiled yet). Mirrored by plans._KernelLaunch.
struct KernelLaunch {
  uint64_t function;
  int32_t num_warps, num_ctas, shared_memory, cooperative, pdl;
  int32_t num_args;
  int8_t kinds[kMaxArgs];
};

// The decisions of one call signature. Mirrored by plans._ForwardPlanState.
struct ForwardPlanState {
  int64_t n, groups, rows, scan_rows, rescue_min, pdl_max_elements, max_grid_y;
  int32_t pdl_mode, pdl_ok, groups_fastest, is_rms, device_index, on_cuda;
  int64_t fixed[5];  // after m: x's, the residual's, z's, y's and the residual output's row strides
  double eps;
  KernelLaunch variants[kVariants][2];  // fwd_kernel, rescue_kernel
};

using LaunchKernelEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);
using CtxGetCurrent = CUresult (*)(CUcontext*);
using GetErrorString = CUresult (*)(CUresult, const char**);

LaunchKernelEx launch_kernel_ex = nullptr;
CtxGetCurrent ctx_get_current = nullptr;
GetErrorString get_error_string = nullptr;
PyObject* runtime_knobs = nullptr;   // triton.knobs.runtime: its launch hooks are read on every call
PyObject* raw_stream = nullptr;      // torch._C._cuda_getCurrentRawStream
PyObject* recorder = nullptr;        // tests: called with each launch instead of the driver
int64_t served = 0;                  // forwards launched from here

bool open_driver() {
  if (launch_kernel_ex != nullptr) return true;
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY);
  if (lib == nullptr) return false;
  launch_kernel_ex = reinterpret_cast<LaunchKernelEx>(dlsym(lib, "cuLaunchKernelEx"));
  ctx_get_current = reinterpret_cast<CtxGetCurrent>(dlsym(lib, "cuCtxGetCurrent"));
  get_error_string = reinterpret_cast<GetErrorString>(dlsym(lib, "cuGetErrorString"));
  return launch_kernel_ex != nullptr && ctx_get_current != nullptr && get_error_string != nullptr;
}

// A launch's arguments: per signature position the value as 64 bits (pointers, integers; eps's float32 bits).
struct ArgValues {
  uint64_t v[kMaxArgs];
};

// Launches `k` on the grid; 0 on success, else the CUDA error (Python error set where a recorder failed: -1).
int launch(const KernelLaunch& k, const ArgValues& values, unsigned grid0, unsigned grid1, uint64_t stream) {
  int32_t narrow[kMaxArgs];
  void* params[kMaxArgs + 2];
  uint64_t scratch[2] = {0, 0};  // global_scratch, profile_scratch: none (plans.py registers no kernel using them)
  int count = 0;
  uint64_t* wide = const_cast<uint64_t*>(values.v);
  for (int i = 0; i < k.num_args; ++i) {
    switch (k.kinds[i]) {
      case ARG_SKIP:
        break;
      case ARG_I32:
      case ARG_F32:  // int32 or float32 bits: the low 32 bits
        narrow[i] = static_cast<int32_t>(static_cast<uint32_t>(values.v[i]));
        params[count++] = &narrow[i];
        break;
      default:  // ARG_PTR, ARG_I64
        params[count++] = &wide[i];
    }
  }
  params[count++] = &scratch[0];
  params[count++] = &scratch[1];
  if (recorder != nullptr) {  // tests: (grid0, grid1, function, warps, shared, cooperative, pdl, params as ints)
    PyObject* args = PyTuple_New(count);
    if (args == nullptr) return -1;
    int j = 0;
    for (int i = 0; i < k.num_args; ++i) {
      if (k.kinds[i] == ARG_SKIP) continue;
      PyObject* item = k.kinds[i] == ARG_I32 ? PyLong_FromLong(narrow[i])
                       : k.kinds[i] == ARG_F32 ? PyLong_FromUnsignedLong(static_cast<uint32_t>(narrow[i]))
                       : k.kinds[i] == ARG_I64 ? PyLong_FromLongLong(static_cast<int64_t>(values.v[i]))
                                               : PyLong_FromUnsignedLongLong(values.v[i]);
      PyTuple_SET_ITEM(args, j++, item);
    }
    PyTuple_SET_ITEM(args, j++, PyLong_FromLong(0));
    PyTuple_SET_ITEM(args, j++, PyLong_FromLong(0));
    PyObject* out = PyObject_CallFunction(recorder, "IIKiiiiN", grid0, grid1, (unsigned long long)k.function,
                                          k.num_warps, k.shared_memory, k.cooperative, k.pdl, args);
    if (out == nullptr) return -1;
    Py_DECREF(out);
    return 0;
  }
  if (grid0 == 0 || grid1 == 0) return 0;
  CUlaunchAttribute attrs[2];
  unsigned num_attrs = 0;
  if (k.pdl) {
    attrs[num_attrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[num_attrs].value.programmaticStreamSerializationAllowed = 1;
    ++num_attrs;
  }
  if (k.cooperative) {
    attrs[num_attrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attrs[num_attrs].value.cooperative = 1;
    ++num_attrs;
  }
  CUlaunchConfig config;
  std::memset(&config, 0, sizeof(config));
  config.gridDimX = grid0;  // plans.py registers num_ctas == 1 kernels only
  config.gridDimY = grid1;
  config.gridDimZ = 1;
  config.blockDimX = 32 * k.num_warps;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = k.shared_memory;
  config.hStream = reinterpret_cast<CUstream>(stream);
  config.attrs = attrs;
  config.numAttrs = num_attrs;
  CUresult rc;
  Py_BEGIN_ALLOW_THREADS;  // as Triton's launcher: the driver may block when its launch queue is full
  rc = launch_kernel_ex(&config, reinterpret_cast<CUfunction>(k.function), params, nullptr);
  Py_END_ALLOW_THREADS;
  return static_cast<int>(rc);
}

PyObject* raise_cuda(int rc) {
  const char* text = "unknown error";
  if (get_error_string != nullptr) get_error_string(static_cast<CUresult>(rc), &text);
  PyErr_Format(PyExc_RuntimeError, "gatednorm host_forward: cuLaunchKernelEx failed: %s (%d)", text, rc);
  return nullptr;
}

bool hooks_installed() {
  if (runtime_knobs == nullptr) return false;
  for (const char* name : {"launch_enter_hook", "launch_exit_hook"}) {
    PyObject* hook = PyObject_GetAttrString(runtime_knobs, name);
    if (hook == nullptr) {
      PyErr_Clear();
      return true;  // unreadable: let Python's path decide
    }
    bool none = hook == Py_None;
    Py_DECREF(hook);
    if (!none) return true;
  }
  return false;
}

// forward(state address, x, z | None, weight, bias | None) -> (y, mean | None, rstd) or None (see the top).
PyObject* forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "forward(state, x, z, weight, bias): 5 arguments");
    return nullptr;
  }
  auto* st = static_cast<const ForwardPlanState*>(PyLong_AsVoidPtr(args[0]));
  if (st == nullptr) return nullptr;
  for (int i = 1; i < 5; ++i) {
    if (!(THPVariable_Check(args[i]) || ((i == 2 || i == 4) && args[i] == Py_None))) {
      PyErr_SetString(PyExc_TypeError, "forward: x and weight must be tensors, z and bias tensors or None");
      return nullptr;
    }
  }
  const at::Tensor& x = THPVariable_Unpack(args[1]);
  const at::Tensor& weight = THPVariable_Unpack(args[3]);
  const bool has_z = args[2] != Py_None, has_bias = args[4] != Py_None;
  const int64_t numel = x.numel();
  const int64_t m = numel / st->n;
  if (m == 0 || m >= (int64_t{1} << 31)) Py_RETURN_NONE;
  const bool pdl = st->pdl_mode >= 0 ? st->pdl_mode != 0 : (numel < st->pdl_max_elements && st->pdl_ok);
  const int64_t tiles = (m + st->rows - 1) / st->rows;
  const bool groups_fastest = st->groups_fastest && tiles <= st->max_grid_y;
  const bool after = numel >= st->rescue_min;
  const int variant = (m == 1) << 4 | ((m & 15) == 0) << 3 | pdl << 2 | groups_fastest << 1 | after;
  const KernelLaunch& fwd = st->variants[variant][0];
  const KernelLaunch& rescue = st->variants[variant][1];
  if (fwd.function == 0 || (after && rescue.function == 0)) Py_RETURN_NONE;
  if (recorder == nullptr && (!open_driver() || hooks_installed())) Py_RETURN_NONE;
  uint64_t stream = 0;
  if (st->on_cuda) {
    const auto* guard = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    if (guard->getDevice().index() != st->device_index) Py_RETURN_NONE;
    PyObject* index = PyLong_FromLong(st->device_index);
    PyObject* s = index == nullptr ? nullptr : PyObject_CallOneArg(raw_stream, index);
    Py_XDECREF(index);
    if (s == nullptr) return nullptr;
    stream = PyLong_AsUnsignedLongLong(s);
    Py_DECREF(s);
    if (PyErr_Occurred()) return nullptr;
    CUcontext ctx = nullptr;  // as Triton's launcher: a current context (torch's allocation made one current)
    if (recorder == nullptr && (ctx_get_current(&ctx) != CUDA_SUCCESS || ctx == nullptr)) Py_RETURN_NONE;
  }
  at::Tensor y, mean, rstd;
  try {
    y = at::empty_like(x, x.options(), at::MemoryFormat::Contiguous);
    auto stats = x.options().dtype(at::kFloat);
    rstd = at::empty({st->groups * m}, stats);
    if (!st->is_rms) mean = at::empty({st->groups * m}, stats);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  ArgValues values;
  std::memset(&values, 0, sizeof(values));
  values.v[0] = reinterpret_cast<uintptr_t>(x.data_ptr());
  values.v[2] = has_z ? reinterpret_cast<uintptr_t>(THPVariable_Unpack(args[2]).data_ptr()) : 0;
  values.v[3] = reinterpret_cast<uintptr_t>(weight.data_ptr());
  values.v[4] = has_bias ? reinterpret_cast<uintptr_t>(THPVariable_Unpack(args[4]).data_ptr()) : 0;
  values.v[5] = reinterpret_cast<uintptr_t>(y.data_ptr());
  values.v[7] = st->is_rms ? 0 : reinterpret_cast<uintptr_t>(mean.data_ptr());
  values.v[8] = reinterpret_cast<uintptr_t>(rstd.data_ptr());
  if ((values.v[0] | values.v[2] | values.v[3] | values.v[4] | values.v[5] | values.v[7] | values.v[8]) & 15)
    Py_RETURN_NONE;
  values.v[9] = static_cast<uint64_t>(m);
  for (int i = 0; i < 5; ++i) values.v[10 + i] = static_cast<uint64_t>(st->fixed[i]);
  float eps32 = static_cast<float>(st->eps);
  uint32_t eps_bits;
  std::memcpy(&eps_bits, &eps32, sizeof(eps_bits));
  values.v[15] = eps_bits;
  const int64_t grid_a = groups_fastest ? st->groups : tiles, grid_b = groups_fastest ? tiles : st->groups;
  int rc = launch(fwd, values, static_cast<unsigned>(grid_a), static_cast<unsigned>(grid_b), stream);
  if (rc == 0 && after)  // rescue_kernel: the forward's arguments and warps, a program per SCAN rows of a group
    rc = launch(rescue, values, static_cast<unsigned>((m + st->scan_rows - 1) / st->scan_rows),
                static_cast<unsigned>(st->groups), stream);
  if (rc == -1) return nullptr;
  if (rc != 0) return raise_cuda(rc);
  ++served;
  PyObject* out = PyTuple_New(3);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(y)));
  if (st->is_rms) {
    Py_INCREF(Py_None);
    PyTuple_SET_ITEM(out, 1, Py_None);
  } else {
    PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(mean)));
  }
  PyTuple_SET_ITEM(out, 2, THPVariable_Wrap(std::move(rstd)));
  return out;
}

// setup(triton.knobs.runtime, torch._C._cuda_getCurrentRawStream or None): what every call reads.
PyObject* setup(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "setup(runtime_knobs, raw_stream)");
    return nullptr;
  }
  Py_XINCREF(args[0]);
  Py_XSETREF(runtime_knobs, args[0]);
  Py_XINCREF(args[1]);
  Py_XSETREF(raw_stream, args[1]);
  Py_RETURN_NONE;
}

// set_recorder(callable | None): tests record the launches instead of making them.
PyObject* set_recorder(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1) {
    PyErr_SetString(PyExc_TypeError, "set_recorder(callable or None)");
    return nullptr;
  }
  PyObject* value = args[0] == Py_None ? nullptr : args[0];
  Py_XINCREF(value);
  Py_XSETREF(recorder, value);
  Py_RETURN_NONE;
}

PyObject* driver_available(PyObject*, PyObject*) { return PyBool_FromLong(open_driver()); }

PyObject* launches(PyObject*, PyObject*) { return PyLong_FromLongLong(served); }

PyObject* layout(PyObject*, PyObject*) {  // the struct sizes and offsets plans.py's ctypes mirrors must equal
  return Py_BuildValue("(nnnnn)", sizeof(KernelLaunch), sizeof(ForwardPlanState),
                       offsetof(ForwardPlanState, fixed), offsetof(ForwardPlanState, variants),
                       offsetof(KernelLaunch, kinds));
}

PyMethodDef methods[] = {
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward)), METH_FASTCALL,
     "forward(state, x, z, weight, bias) -> (y, mean, rstd) or None"},
    {"setup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup)), METH_FASTCALL, "setup"},
    {"set_recorder", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_recorder)), METH_FASTCALL,
     "set_recorder"},
    {"driver_available", driver_available, METH_NOARGS, "whether libcuda's launch entry points are there"},
    {"launches", launches, METH_NOARGS, "forwards launched from C++"},
    {"layout", layout, METH_NOARGS, "struct sizes and offsets"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "gatednorm_host_forward", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_gatednorm_host_forward() { return PyModule_Create(&module); }
