// The eager plans' per-call host work in C++ (gatednorm.backends.triton.cxx_plans builds and loads it).
//
// What a call of plans.ForwardPlan does in Python (about 11 us on an H100 host, of which Triton's C launcher is
// 3.8 and the two output allocations 4.1) is done here in one C call, and a call of plans.BackwardPlan likewise:
// read M off x, pick the kernel variant, allocate the outputs, check the addresses' alignment and launch the
// plan's kernels (fwd_kernel, then rescue_kernel on large calls; bwd_kernel, then sum_partials_kernel where
// dweight or dbias is asked) with cuLaunchKernelEx exactly as Triton 3.6's generated launcher does: the kernel's
// parameters are its signature's non-constexpr arguments in order (pointers as CUdeviceptr, integers as int32 /
// int64 as the signature types them, floats as their float32 bits), then two null scratch pointers (global and
// profile scratch; plans only register kernels that need neither). Everything decided per signature sits in a
// ForwardPlanState / BackwardPlanState that Python fills (ctypes, plans.py) as the kernel variants get compiled;
// a variant not registered yet, a misaligned address, another current GPU or an installed Triton launch hook
// returns None, having launched nothing, and Python takes its own path (which compiles and registers).

#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/python_variable.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cuda.h"  // Triton's copy of the driver API header (types only; libcuda is opened at run time)

namespace {

// How one argument of a kernel's signature is passed (plans.py, _ARG_KINDS).
enum ArgKind : int8_t { ARG_SKIP = 0, ARG_PTR = 1, ARG_I32 = 2, ARG_I64 = 3, ARG_F32 = 4 };

constexpr int kMaxArgs = 48;  // plans._MAX_ARGS (bwd_kernel has 35, constexprs included)
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
int64_t served_backward = 0;         // backwards launched from here

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
  PyErr_Format(PyExc_RuntimeError, "gatednorm cxx_plans: cuLaunchKernelEx failed: %s (%d)", text, rc);
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

int launch_context(int32_t on_cuda, int32_t device_index, uint64_t* stream);

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
  uint64_t stream;
  const int ready = launch_context(st->on_cuda, st->device_index, &stream);
  if (ready <= 0) return ready < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
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

// One backward variant: its key (BackwardPlan's variant flattened to bits, -1: a free slot) and its launches.
struct BackwardVariant {
  int32_t key, pad;
  KernelLaunch bwd, part;  // bwd_kernel; sum_partials_kernel (function 0 where no dweight / dbias is asked)
};

constexpr int kBackwardSlots = 16;

// The decisions of one call signature's backward. Mirrored by plans._BackwardPlanState.
struct BackwardPlanState {
  int64_t n, groups, rows, sms, per_sm, pdl_max_elements, max_grid_y, block_n, x_stride, z_stride;
  int32_t pdl_mode, pdl_ok, groups_fastest_order, zero_partials, device_index, on_cuda;
  BackwardVariant variants[kBackwardSlots];
};

bool truthy(PyObject* tuple, int i) { return PyObject_IsTrue(PyTuple_GET_ITEM(tuple, i)) == 1; }

uintptr_t address(const at::Tensor& t) { return t.defined() ? reinterpret_cast<uintptr_t>(t.data_ptr()) : 0; }

PyObject* wrap_or_none(at::Tensor&& t) {
  if (t.defined()) return THPVariable_Wrap(std::move(t));
  Py_INCREF(Py_None);
  return Py_None;
}

// The stream and checks both entries make before allocating: 1 go on, 0 decline (Python's path), -1 error.
int launch_context(int32_t on_cuda, int32_t device_index, uint64_t* stream) {
  *stream = 0;
  if (recorder == nullptr && (!open_driver() || hooks_installed())) return 0;
  if (!on_cuda) return 1;
  const auto* guard = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  if (guard->getDevice().index() != device_index) return 0;
  PyObject* index = PyLong_FromLong(device_index);
  PyObject* s = index == nullptr ? nullptr : PyObject_CallOneArg(raw_stream, index);
  Py_XDECREF(index);
  if (s == nullptr) return -1;
  *stream = PyLong_AsUnsignedLongLong(s);
  Py_DECREF(s);
  if (PyErr_Occurred()) return -1;
  CUcontext ctx = nullptr;  // as Triton's launcher: a current context (torch's allocations made one current)
  if (recorder == nullptr && (ctx_get_current(&ctx) != CUDA_SUCCESS || ctx == nullptr)) return 0;
  return 1;
}

// backward(state address, dy, x, weight, bias | None, z | None, mean | None, rstd, needs) -> (dx, dz, dweight,
// dbias), each None where not asked, or None, having launched nothing (BackwardPlan.__call__'s contract).
PyObject* backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9 || !PyTuple_Check(args[8]) || PyTuple_GET_SIZE(args[8]) != 4) {
    PyErr_SetString(PyExc_TypeError, "backward(state, dy, x, weight, bias, z, mean, rstd, needs)");
    return nullptr;
  }
  auto* st = static_cast<const BackwardPlanState*>(PyLong_AsVoidPtr(args[0]));
  if (st == nullptr) return nullptr;
  for (int i = 1; i < 8; ++i) {
    const bool optional = i == 4 || i == 5 || i == 6;
    if (!(THPVariable_Check(args[i]) || (optional && args[i] == Py_None))) {
      PyErr_SetString(PyExc_TypeError, "backward: dy, x, weight, rstd must be tensors, bias, z, mean tensors or None");
      return nullptr;
    }
  }
  const at::Tensor& dy = THPVariable_Unpack(args[1]);
  const at::Tensor& x = THPVariable_Unpack(args[2]);
  const at::Tensor& weight = THPVariable_Unpack(args[3]);
  const bool has_bias = args[4] != Py_None, has_z = args[5] != Py_None, has_mean = args[6] != Py_None;
  if (x.dim() != 2) Py_RETURN_NONE;
  const int64_t m = x.size(0), n = x.size(1);
  if (m == 0 || m >= (int64_t{1} << 31) || dy.scalar_type() != x.scalar_type() || dy.dim() != 2 ||
      dy.stride(1) != 1)
    Py_RETURN_NONE;
  const int64_t dy_stride = dy.stride(0);
  const bool need_dx = truthy(args[8], 0), need_dz = truthy(args[8], 1), need_dw = truthy(args[8], 2),
             need_db = truthy(args[8], 3);
  const bool pdl = st->pdl_mode >= 0 ? st->pdl_mode != 0 : (m * n < st->pdl_max_elements && st->pdl_ok);
  // launch._bwd_programs: persistent programs per group
  const int64_t tiles = (m + st->rows - 1) / st->rows;
  const int64_t per_sm = tiles * st->groups <= st->sms * st->per_sm ? 1 : st->per_sm;
  const int64_t per_group = std::max<int64_t>(1, (st->sms * per_sm) / st->groups);
  const int64_t progs = std::max<int64_t>(1, std::min(per_group, tiles));
  const bool groups_fastest = st->groups_fastest_order && st->groups > 1 && progs <= st->max_grid_y;
  const bool fits32 = dy_stride >= -(int64_t{1} << 31) && dy_stride < (int64_t{1} << 31);
  const bool flags[] = {m == 1, (m & 15) == 0, dy_stride == 1, (dy_stride & 15) == 0, fits32, progs == 1,
                        (progs & 15) == 0, need_dx, need_dz, need_dw, need_db, pdl, groups_fastest};
  int32_t key = 0;
  for (bool f : flags) key = key << 1 | f;
  const BackwardVariant* variant = nullptr;
  for (const auto& v : st->variants)
    if (v.key == key) variant = &v;
  if (variant == nullptr || variant->bwd.function == 0 || ((need_dw || need_db) && variant->part.function == 0))
    Py_RETURN_NONE;
  uint64_t stream;
  const int ready = launch_context(st->on_cuda, st->device_index, &stream);
  if (ready <= 0) return ready < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  const at::Tensor& z = has_z ? THPVariable_Unpack(args[5]) : at::Tensor();
  at::Tensor dx, dz, dw_part, db_part, dw, db;
  try {
    if (need_dx) dx = at::empty_like(x, x.options(), at::MemoryFormat::Contiguous);
    if (need_dz) dz = at::empty_like(z, z.options(), at::MemoryFormat::Contiguous);
    auto f32 = x.options().dtype(at::kFloat);
    if (need_dw) dw_part = st->zero_partials ? at::zeros({progs, n}, f32) : at::empty({progs, n}, f32);
    if (need_db) db_part = st->zero_partials ? at::zeros({progs, n}, f32) : at::empty({progs, n}, f32);
    if (need_dw) dw = at::empty_like(weight, weight.options(), at::MemoryFormat::Contiguous);
    if (need_db) {
      const at::Tensor& bias = THPVariable_Unpack(args[4]);
      db = at::empty_like(bias, bias.options(), at::MemoryFormat::Contiguous);
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  ArgValues values;
  std::memset(&values, 0, sizeof(values));
  values.v[0] = address(dy);
  values.v[1] = address(x);
  values.v[2] = address(z);
  values.v[3] = address(weight);
  values.v[4] = has_bias ? address(THPVariable_Unpack(args[4])) : 0;
  values.v[5] = has_mean ? address(THPVariable_Unpack(args[6])) : 0;
  values.v[6] = address(THPVariable_Unpack(args[7]));
  values.v[7] = address(dx);
  values.v[8] = address(dz);
  values.v[9] = address(dw_part);
  values.v[10] = address(db_part);
  uint64_t aligned = 0;
  for (int i = 0; i < 11; ++i) aligned |= values.v[i];
  aligned |= address(dw) | address(db);
  if (aligned & 15) Py_RETURN_NONE;
  const int64_t ints[] = {m, dy_stride, st->x_stride, st->z_stride, n, n, n};
  for (int i = 0; i < 7; ++i) values.v[11 + i] = static_cast<uint64_t>(ints[i]);
  const int64_t grid_a = groups_fastest ? st->groups : progs, grid_b = groups_fastest ? progs : st->groups;
  int rc = launch(variant->bwd, values, static_cast<unsigned>(grid_a), static_cast<unsigned>(grid_b), stream);
  if (rc == 0 && (need_dw || need_db)) {  // (dw_part, db_part, dw, db, programs, N), as backward launches it
    ArgValues sums;
    std::memset(&sums, 0, sizeof(sums));
    sums.v[0] = address(dw_part);
    sums.v[1] = address(db_part);
    sums.v[2] = address(dw);
    sums.v[3] = address(db);
    sums.v[4] = static_cast<uint64_t>(progs);
    sums.v[5] = static_cast<uint64_t>(n);
    rc = launch(variant->part, sums, static_cast<unsigned>((n + st->block_n - 1) / st->block_n), 1, stream);
  }
  if (rc == -1) return nullptr;
  if (rc != 0) return raise_cuda(rc);
  ++served_backward;
  PyObject* out = PyTuple_New(4);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, wrap_or_none(std::move(dx)));
  PyTuple_SET_ITEM(out, 1, wrap_or_none(std::move(dz)));
  PyTuple_SET_ITEM(out, 2, wrap_or_none(std::move(dw)));
  PyTuple_SET_ITEM(out, 3, wrap_or_none(std::move(db)));
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

PyObject* launches(PyObject*, PyObject*) { return Py_BuildValue("(LL)", served, served_backward); }

PyObject* layout(PyObject*, PyObject*) {  // the struct sizes and offsets plans.py's ctypes mirrors must equal
  return Py_BuildValue("(nnnnnnnn)", sizeof(KernelLaunch), sizeof(ForwardPlanState),
                       offsetof(ForwardPlanState, fixed), offsetof(ForwardPlanState, variants),
                       offsetof(KernelLaunch, kinds), sizeof(BackwardVariant), sizeof(BackwardPlanState),
                       offsetof(BackwardPlanState, variants));
}

PyMethodDef methods[] = {
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward)), METH_FASTCALL,
     "forward(state, x, z, weight, bias) -> (y, mean, rstd) or None"},
    {"backward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(backward)), METH_FASTCALL,
     "backward(state, dy, x, weight, bias, z, mean, rstd, needs) -> (dx, dz, dweight, dbias) or None"},
    {"setup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup)), METH_FASTCALL, "setup"},
    {"set_recorder", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_recorder)), METH_FASTCALL,
     "set_recorder"},
    {"driver_available", driver_available, METH_NOARGS, "whether libcuda's launch entry points are there"},
    {"launches", launches, METH_NOARGS, "(forwards, backwards) launched from C++"},
    {"layout", layout, METH_NOARGS, "struct sizes and offsets"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "gatednorm_cxx_plans", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_gatednorm_cxx_plans() { return PyModule_Create(&module); }
