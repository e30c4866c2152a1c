// The eager plans' per-call host work in C++ (gatednorm.backends.triton.cxx_plans builds and loads it).
//
// What a call of plans.ForwardPlan does in Python (about 11 us on an H100 host, of which Triton's C launcher is
// 3.8 and the two output allocations 4.1) is done here in one C call, and a call of plans.BackwardPlan and of
// plans.QuantPlan (fwd_quant_kernel, then quant_rescue_kernel on large calls) likewise:
// read M off x, pick the kernel variant, allocate the outputs, check the addresses' alignment and launch the
// plan's kernels (fwd_kernel, then rescue_kernel on large calls; bwd_kernel, then sum_partials_kernel where
// dweight or dbias is asked) with cuLaunchKernelEx exactly as Triton 3.6's generated launcher does: the kernel's
// parameters are its signature's non-constexpr arguments in order (pointers as CUdeviceptr, integers as int32 /
// int64 as the signature types them, floats as their float32 bits), then two null scratch pointers (global and
// profile scratch; plans only register kernels that need neither). Everything decided per signature sits in a
// ForwardPlanState / BackwardPlanState / QuantPlanState that Python fills (ctypes, plans.py) as the kernel
// variants get compiled; a variant not registered yet, a misaligned address, another current GPU or an installed
// Triton launch hook returns None, having launched nothing, and Python takes its own path (which compiles and
// registers).

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/Dtype.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../autograd_node.h"  // Needs, the node's saved tensors and apply, tensor_or_none, ... (shared with the CPU node)
#include "../call_key.h"       // call_key, key_classes: the eager plans' keys (shared with the CPU node)
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

// The decisions of one call signature of the fused quantized forward. Mirrored by plans._QuantPlanState.
struct QuantPlanState {
  int64_t n, groups, rows, tiles, scan_rows, rescue_min, pdl_max_elements, max_grid_y;
  int32_t pdl_mode, pdl_ok, groups_fastest_order, column_major, device_index, on_cuda;
  int64_t fixed[3];  // after m: x's, z's and q's row strides (the scales' two strides follow M, then eps)
  double eps;
  KernelLaunch variants[kVariants][2];  // fwd_quant_kernel, quant_rescue_kernel
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
int64_t served_quant = 0;            // fused quantized forwards launched from here

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

// Whether a launch hook is installed, read as plans._launch_hooks reads the enter hook: Triton 3.6's knobs hold
// a HookChain (never None; its `calls` list empty while no profiler has hooked in), older ones a callable or None.
// The exit hook is read the same way (the Python plan passes it to Triton's launcher; this entry calls neither).
// Where one is installed the call goes back to Python.
bool hooks_installed() {
  if (runtime_knobs == nullptr) return false;
  // interned once: every call reads both hooks (PyObject_GetAttrString would build the names each time)
  static PyObject* names[3] = {PyUnicode_InternFromString("launch_enter_hook"),
                               PyUnicode_InternFromString("launch_exit_hook"), PyUnicode_InternFromString("calls")};
  if (names[0] == nullptr || names[1] == nullptr || names[2] == nullptr) return true;  // let Python's path decide
  for (int i = 0; i < 2; ++i) {
    PyObject* hook = PyObject_GetAttr(runtime_knobs, names[i]);
    if (hook == nullptr) {
      PyErr_Clear();
      return true;  // unreadable: let Python's path decide
    }
    int installed = 0;
    if (hook != Py_None) {
      PyObject* calls = PyObject_GetAttr(hook, names[2]);
      if (calls == nullptr) {
        PyErr_Clear();
        installed = 1;  // a plain callable
      } else {
        installed = PyObject_IsTrue(calls);  // a HookChain: installed while its list holds a hook
        Py_DECREF(calls);
        if (installed < 0) {
          PyErr_Clear();
          installed = 1;
        }
      }
    }
    Py_DECREF(hook);
    if (installed) return true;
  }
  return false;
}

// The stream and the checks both entries make before allocating: 1 go on, 0 decline (Python's path), -1 error.
int launch_context(int32_t on_cuda, int32_t device_index, uint64_t* stream) {
  *stream = 0;
  if (hooks_installed() || (recorder == nullptr && !open_driver())) return 0;
  if (!on_cuda) return 1;
  if (raw_stream == nullptr || raw_stream == Py_None) return 0;  // a torch without CUDA streams
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

uintptr_t address(const at::Tensor& t) { return t.defined() ? reinterpret_cast<uintptr_t>(t.data_ptr()) : 0; }

// The launch's result as the cores return it: 1 launched, -1 with a Python error set.
int launched(int rc) {
  if (rc == 0) return 1;
  if (rc != -1) raise_cuda(rc);
  return -1;
}

// float32 `value`'s bits, as Triton's launcher packs a float argument.
uint64_t float32_bits(double value) {
  float narrow = static_cast<float>(value);
  uint32_t bits;
  std::memcpy(&bits, &narrow, sizeof(bits));
  return bits;
}

// Whether a call launches with PDL: the backend's option where set (mode 0 / 1), else (-1) by the call's size where
// the GPU supports it (launch.TritonBackend._pdl).
bool use_pdl(int32_t mode, int64_t numel, int64_t max_elements, int32_t ok) {
  return mode >= 0 ? mode != 0 : (numel < max_elements && ok);
}

// A forward plan's or quantized plan's launches for a call's variant (M == 1, M % 16 == 0, USE_PDL,
// GROUPS_FASTEST, rescue after): the kernel and its rescue kernel, or nullptr where the variant (or its rescue,
// where one runs after) is not registered yet.
const KernelLaunch* registered(const KernelLaunch (*variants)[2], int64_t m, bool pdl, bool groups_fastest,
                               bool after) {
  const KernelLaunch* pair = variants[(m == 1) << 4 | ((m & 15) == 0) << 3 | pdl << 2 | groups_fastest << 1 | after];
  return pair[0].function == 0 || (after && pair[1].function == 0) ? nullptr : pair;
}

// ForwardPlan's call on tensors (z, bias undefined where absent): 1 with y, mean (undefined for RMSNorm) and
// rstd allocated and the kernels launched; 0 declined, nothing launched; -1 a Python error set. GIL held.
int forward_core(const ForwardPlanState* st, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                 const at::Tensor& bias, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t numel = x.numel();
  const int64_t m = numel / st->n;
  if (m == 0 || m >= (int64_t{1} << 31)) return 0;
  const bool pdl = use_pdl(st->pdl_mode, numel, st->pdl_max_elements, st->pdl_ok);
  const int64_t tiles = (m + st->rows - 1) / st->rows;
  const bool groups_fastest = st->groups_fastest && tiles <= st->max_grid_y;
  const bool after = numel >= st->rescue_min;
  const KernelLaunch* pair = registered(st->variants, m, pdl, groups_fastest, after);
  if (pair == nullptr) return 0;
  const KernelLaunch &fwd = pair[0], &rescue = pair[1];
  uint64_t stream;
  const int ready = launch_context(st->on_cuda, st->device_index, &stream);
  if (ready <= 0) return ready;
  try {
    c10::AutoGradMode no_grad(false);
    y = at::empty_like(x, x.options(), at::MemoryFormat::Contiguous);
    auto stats = x.options().dtype(at::kFloat);
    rstd = at::empty({st->groups * m}, stats);
    if (!st->is_rms) mean = at::empty({st->groups * m}, stats);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return -1;
  }
  // x, residual, z, weight, bias, y, residual_out, mean, rstd (forward's order; no residual in a plan), then m
  ArgValues values{{address(x), 0, address(z), address(weight), address(bias), address(y), 0, address(mean),
                    address(rstd), static_cast<uint64_t>(m)}};
  uint64_t aligned = 0;
  for (int i = 0; i < 9; ++i) aligned |= values.v[i];
  if (aligned & 15) return 0;
  for (int i = 0; i < 5; ++i) values.v[10 + i] = static_cast<uint64_t>(st->fixed[i]);
  values.v[15] = float32_bits(st->eps);
  const int64_t grid_a = groups_fastest ? st->groups : tiles, grid_b = groups_fastest ? tiles : st->groups;
  int rc = launch(fwd, values, static_cast<unsigned>(grid_a), static_cast<unsigned>(grid_b), stream);
  if (rc == 0 && after)  // rescue_kernel: the forward's arguments and warps, a program per SCAN rows of a group
    rc = launch(rescue, values, static_cast<unsigned>((m + st->scan_rows - 1) / st->scan_rows),
                static_cast<unsigned>(st->groups), stream);
  if (rc == 0) ++served;
  return launched(rc);
}

// QuantPlan's call on tensors (z, bias undefined where absent): 1 with q (M, N) of q_dtype and the scales'
// storage ((M, G), or (G, M) for column-major scales) allocated and the kernels launched; 0 declined, nothing
// launched; -1 a Python error set. GIL held.
int quant_core(const QuantPlanState* st, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
               const at::Tensor& bias, at::ScalarType q_dtype, at::Tensor& q, at::Tensor& storage) {
  const int64_t numel = x.numel();
  const int64_t m = numel / st->n;
  if (m == 0 || m >= (int64_t{1} << 31)) return 0;
  const bool pdl = use_pdl(st->pdl_mode, numel, st->pdl_max_elements, st->pdl_ok);
  const bool after = numel >= st->rescue_min;
  // launch._quant_grid: a row's tiles in neighbouring programs where the order asks and the row tiles fit
  const int64_t row_tiles = (m + st->rows - 1) / st->rows;
  const bool groups_fastest = st->groups_fastest_order && st->tiles > 1 && row_tiles <= st->max_grid_y;
  const KernelLaunch* pair = registered(st->variants, m, pdl, groups_fastest, after);
  if (pair == nullptr) return 0;
  const KernelLaunch &fwd = pair[0], &rescue = pair[1];
  uint64_t stream;
  const int ready = launch_context(st->on_cuda, st->device_index, &stream);
  if (ready <= 0) return ready;
  try {
    c10::AutoGradMode no_grad(false);
    q = at::empty({m, st->n}, x.options().dtype(q_dtype));
    storage = st->column_major ? at::empty({st->groups, m}, x.options().dtype(at::kFloat))
                               : at::empty({m, st->groups}, x.options().dtype(at::kFloat));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return -1;
  }
  // x, z, weight, bias, q, scales, m, the three row strides, the scales' strides, eps: forward_quant's order
  ArgValues values{{address(x), address(z), address(weight), address(bias), address(q), address(storage),
                    static_cast<uint64_t>(m), static_cast<uint64_t>(st->fixed[0]), static_cast<uint64_t>(st->fixed[1]),
                    static_cast<uint64_t>(st->fixed[2]), static_cast<uint64_t>(st->column_major ? 1 : st->groups),
                    static_cast<uint64_t>(st->column_major ? m : 1), float32_bits(st->eps)}};
  uint64_t aligned = 0;
  for (int i = 0; i < 6; ++i) aligned |= values.v[i];
  if (aligned & 15) return 0;
  const int64_t grid_a = groups_fastest ? st->tiles : row_tiles, grid_b = groups_fastest ? row_tiles : st->tiles;
  int rc = launch(fwd, values, static_cast<unsigned>(grid_a), static_cast<unsigned>(grid_b), stream);
  if (rc == 0 && after)  // quant_rescue_kernel: the forward's arguments and warps, a program per SCAN rows of a tile
    rc = launch(rescue, values, static_cast<unsigned>((m + st->scan_rows - 1) / st->scan_rows),
                static_cast<unsigned>(st->tiles), stream);
  if (rc == 0) ++served_quant;
  return launched(rc);
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

// BackwardPlan's call on tensors (bias, z, mean undefined where absent): 1 with the asked gradients in
// grads (dx, dz, dweight, dbias; undefined where not asked) and the kernels launched; 0 declined, nothing
// launched; -1 a Python error set. GIL held.
int backward_core(const BackwardPlanState* st, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor& bias, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& rstd,
                  Needs needs, at::Tensor grads[4]) {
  if (x.dim() != 2) return 0;
  const int64_t m = x.size(0), n = x.size(1);
  if (m == 0 || m >= (int64_t{1} << 31) || dy.scalar_type() != x.scalar_type() || dy.dim() != 2 ||
      dy.stride(1) != 1)
    return 0;
  const int64_t dy_stride = dy.stride(0);
  const bool pdl = use_pdl(st->pdl_mode, m * n, st->pdl_max_elements, st->pdl_ok);
  // launch._bwd_programs: persistent programs per group
  const int64_t tiles = (m + st->rows - 1) / st->rows;
  const int64_t per_sm = tiles * st->groups <= st->sms * st->per_sm ? 1 : st->per_sm;
  const int64_t per_group = std::max<int64_t>(1, (st->sms * per_sm) / st->groups);
  const int64_t progs = std::max<int64_t>(1, std::min(per_group, tiles));
  const bool groups_fastest = st->groups_fastest_order && st->groups > 1 && progs <= st->max_grid_y;
  const bool fits32 = dy_stride >= -(int64_t{1} << 31) && dy_stride < (int64_t{1} << 31);
  const bool sums = needs.dw || needs.db;
  const bool flags[] = {m == 1, (m & 15) == 0, dy_stride == 1, (dy_stride & 15) == 0, fits32, progs == 1,
                        (progs & 15) == 0, needs.dx, needs.dz, needs.dw, needs.db, pdl, groups_fastest};
  int32_t key = 0;
  for (bool f : flags) key = key << 1 | f;
  const BackwardVariant* variant = nullptr;
  for (const auto& v : st->variants)
    if (v.key == key) variant = &v;
  if (variant == nullptr || variant->bwd.function == 0 || (sums && variant->part.function == 0)) return 0;
  uint64_t stream;
  const int ready = launch_context(st->on_cuda, st->device_index, &stream);
  if (ready <= 0) return ready;
  at::Tensor dw_part, db_part;
  at::Tensor& dx = grads[0];
  at::Tensor& dz = grads[1];
  at::Tensor& dw = grads[2];
  at::Tensor& db = grads[3];
  try {
    c10::AutoGradMode no_grad(false);
    if (needs.dx) dx = at::empty_like(x, x.options(), at::MemoryFormat::Contiguous);
    if (needs.dz) dz = at::empty_like(z, z.options(), at::MemoryFormat::Contiguous);
    auto f32 = x.options().dtype(at::kFloat);
    if (needs.dw) dw_part = st->zero_partials ? at::zeros({progs, n}, f32) : at::empty({progs, n}, f32);
    if (needs.db) db_part = st->zero_partials ? at::zeros({progs, n}, f32) : at::empty({progs, n}, f32);
    if (needs.dw) dw = at::empty_like(weight, weight.options(), at::MemoryFormat::Contiguous);
    if (needs.db) db = at::empty_like(bias, bias.options(), at::MemoryFormat::Contiguous);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return -1;
  }
  ArgValues values{};
  const at::Tensor* pointers[] = {&dy, &x, &z, &weight, &bias, &mean, &rstd, &dx, &dz, &dw_part, &db_part};
  uint64_t aligned = address(dw) | address(db);
  for (int i = 0; i < 11; ++i) aligned |= values.v[i] = address(*pointers[i]);
  if (aligned & 15) {
    for (int i = 0; i < 4; ++i) grads[i] = at::Tensor();
    return 0;
  }
  const int64_t ints[] = {m, dy_stride, st->x_stride, st->z_stride, n, n, n};
  for (int i = 0; i < 7; ++i) values.v[11 + i] = static_cast<uint64_t>(ints[i]);
  const int64_t grid_a = groups_fastest ? st->groups : progs, grid_b = groups_fastest ? progs : st->groups;
  int rc = launch(variant->bwd, values, static_cast<unsigned>(grid_a), static_cast<unsigned>(grid_b), stream);
  if (rc == 0 && sums) {  // (dw_part, db_part, dw, db, programs, N), as backward launches it
    const ArgValues partials{{address(dw_part), address(db_part), address(dw), address(db),
                              static_cast<uint64_t>(progs), static_cast<uint64_t>(n)}};
    rc = launch(variant->part, partials, static_cast<unsigned>((n + st->block_n - 1) / st->block_n), 1, stream);
  }
  if (rc == 0) ++served_backward;
  return launched(rc);
}

// --- From Python --------------------------------------------------------------------------------------------

// forward(state address, x, z | None, weight, bias | None) -> (y, mean | None, rstd) or None (see the top).
PyObject* forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  at::Tensor x, z, weight, bias;
  if (nargs != 5 || !THPVariable_Check(args[1]) || !THPVariable_Check(args[3]) || !tensor_or_none(args[1], x) ||
      !tensor_or_none(args[2], z) || !tensor_or_none(args[3], weight) || !tensor_or_none(args[4], bias)) {
    PyErr_SetString(PyExc_TypeError, "forward(state, x, z, weight, bias): x, weight tensors, z, bias or None");
    return nullptr;
  }
  auto* st = static_cast<const ForwardPlanState*>(PyLong_AsVoidPtr(args[0]));
  if (st == nullptr) return nullptr;
  at::Tensor y, mean, rstd;
  const int rc = forward_core(st, x, z, weight, bias, y, mean, rstd);
  if (rc <= 0) return rc < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  return forward_outputs(std::move(y), std::move(mean), std::move(rstd));
}

// quant(state address, x, z | None, weight, bias | None, q dtype) -> (q, scale storage) or None (see the top).
PyObject* quant(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  at::Tensor x, z, weight, bias;
  if (nargs != 6 || !THPVariable_Check(args[1]) || !THPVariable_Check(args[3]) || !tensor_or_none(args[1], x) ||
      !tensor_or_none(args[2], z) || !tensor_or_none(args[3], weight) || !tensor_or_none(args[4], bias) ||
      !THPDtype_Check(args[5])) {
    PyErr_SetString(PyExc_TypeError,
                    "quant(state, x, z, weight, bias, q_dtype): x, weight tensors, z, bias or None, a torch.dtype");
    return nullptr;
  }
  auto* st = static_cast<const QuantPlanState*>(PyLong_AsVoidPtr(args[0]));
  if (st == nullptr) return nullptr;
  at::Tensor q, storage;
  const int rc = quant_core(st, x, z, weight, bias, reinterpret_cast<THPDtype*>(args[5])->scalar_type, q, storage);
  if (rc <= 0) return rc < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(q)));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(storage)));
  return out;
}

bool needs_of(PyObject* tuple, Needs& needs) {
  if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != 4) return false;
  bool flags[4];
  for (int i = 0; i < 4; ++i) {
    const int t = PyObject_IsTrue(PyTuple_GET_ITEM(tuple, i));
    if (t < 0) return false;
    flags[i] = t == 1;
  }
  needs = {flags[0], flags[1], flags[2], flags[3]};
  return true;
}

PyObject* grads_tuple(at::Tensor grads[4]) {
  PyObject* out = PyTuple_New(4);
  if (out == nullptr) return nullptr;
  for (int i = 0; i < 4; ++i) PyTuple_SET_ITEM(out, i, wrap_or_none(std::move(grads[i])));
  return out;
}

// backward(state address, dy, x, weight, bias | None, z | None, mean | None, rstd, needs) -> (dx, dz, dweight,
// dbias), each None where not asked, or None, having launched nothing (BackwardPlan.__call__'s contract).
PyObject* backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  at::Tensor dy, x, weight, bias, z, mean, rstd;
  Needs needs;
  if (nargs != 9 || !THPVariable_Check(args[1]) || !THPVariable_Check(args[2]) || !THPVariable_Check(args[3]) ||
      !THPVariable_Check(args[7]) || !tensor_or_none(args[1], dy) || !tensor_or_none(args[2], x) ||
      !tensor_or_none(args[3], weight) || !tensor_or_none(args[4], bias) || !tensor_or_none(args[5], z) ||
      !tensor_or_none(args[6], mean) || !tensor_or_none(args[7], rstd) || !needs_of(args[8], needs)) {
    PyErr_SetString(PyExc_TypeError, "backward(state, dy, x, weight, bias, z, mean, rstd, needs): dy, x, weight, "
                                     "rstd tensors, bias, z, mean tensors or None, needs 4 flags");
    return nullptr;
  }
  auto* st = static_cast<const BackwardPlanState*>(PyLong_AsVoidPtr(args[0]));
  if (st == nullptr) return nullptr;
  at::Tensor grads[4];
  const int rc = backward_core(st, dy, x, weight, bias, z, mean, rstd, needs, grads);
  if (rc <= 0) return rc < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  return grads_tuple(grads);
}

// --- The autograd node -----------------------------------------------------------------------------------------
//
// A differentiable eager call through both plans, without a Python autograd.Function: autograd(...) runs the
// forward core and records a GatedNormBackward node (a C++ torch::autograd::Node, as PyTorch's own ops have) whose
// apply runs the backward core on the autograd engine's thread; the Function's Python (apply, ctx, the saved
// tensors, the backward wrapper) is what took a planned forward+backward to twice the host time of a plain
// autograd pair (docs/design.md, "Eager plans"). Where the core declines (a variant not registered yet, dy of
// another dtype or layout, a misaligned address) and for a backward that records its own graph
// (create_graph=True), apply calls the Python fallback the plan gave: the Function's backward, same results.

struct GatedNormBackward final : GatedNormNode {
  const BackwardPlanState* state = nullptr;  // kept alive by the fallback (it holds the plans)

  std::string name() const override { return "GatedNormBackward"; }

  bool core_needs_gil() const override { return true; }  // the launch reads Triton's hooks

  int core(const at::Tensor& dy, const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& b_,
           const at::Tensor& z_, const at::Tensor& m_, const at::Tensor& r_, at::Tensor g[4]) override {
    return backward_core(state, dy, x_, w_, b_, z_, m_, r_, needs, g);
  }
};

// autograd(forward state, backward state, fallback, x, z | None, weight, bias | None) -> (y, mean | None, rstd)
// with y differentiable through a GatedNormBackward node, or None (declined: the Function's path runs). Called
// with grad mode on and an input that requires grad; x and z (M, N) rows. fallback(dy, x, weight, bias, z, mean,
// rstd, needs) -> (dx, dz, dweight, dbias): the Python backward, for what the node's core declines.
PyObject* autograd(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  at::Tensor x, z, weight, bias;
  if (nargs != 7 || !THPVariable_Check(args[3]) || !THPVariable_Check(args[5]) || !tensor_or_none(args[3], x) ||
      !tensor_or_none(args[4], z) || !tensor_or_none(args[5], weight) || !tensor_or_none(args[6], bias) ||
      !PyCallable_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "autograd(fstate, bstate, fallback, x, z, weight, bias)");
    return nullptr;
  }
  auto* fst = static_cast<const ForwardPlanState*>(PyLong_AsVoidPtr(args[0]));
  auto* bst = static_cast<const BackwardPlanState*>(PyLong_AsVoidPtr(args[1]));
  if (fst == nullptr || bst == nullptr) return nullptr;
  at::Tensor y, mean, rstd;
  const int rc = forward_core(fst, x, z, weight, bias, y, mean, rstd);
  if (rc <= 0) return rc < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  try {
    auto node = make_node<GatedNormBackward>();
    node->state = bst;
    node->record(y, x, z, weight, bias, mean, rstd, args[2], nullptr);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return forward_outputs(std::move(y), std::move(mean), std::move(rstd));
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

PyObject* launches(PyObject*, PyObject*) { return Py_BuildValue("(LLL)", served, served_backward, served_quant); }

PyObject* layout(PyObject*, PyObject*) {  // the struct sizes and offsets plans.py's ctypes mirrors must equal
  return Py_BuildValue("(nnnnnnnnnnn)", sizeof(KernelLaunch), sizeof(ForwardPlanState),
                       offsetof(ForwardPlanState, fixed), offsetof(ForwardPlanState, variants),
                       offsetof(KernelLaunch, kinds), sizeof(BackwardVariant), sizeof(BackwardPlanState),
                       offsetof(BackwardPlanState, variants), sizeof(QuantPlanState), offsetof(QuantPlanState, fixed),
                       offsetof(QuantPlanState, variants));
}

PyMethodDef methods[] = {
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward)), METH_FASTCALL,
     "forward(state, x, z, weight, bias) -> (y, mean, rstd) or None"},
    {"backward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(backward)), METH_FASTCALL,
     "backward(state, dy, x, weight, bias, z, mean, rstd, needs) -> (dx, dz, dweight, dbias) or None"},
    {"quant", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(quant)), METH_FASTCALL,
     "quant(state, x, z, weight, bias, q_dtype) -> (q, scale storage) or None"},
    {"autograd", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(autograd)), METH_FASTCALL,
     "autograd(fstate, bstate, fallback, x, z, weight, bias) -> (y, mean, rstd), y through a GatedNormBackward node"},
    {"call_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_key)), METH_FASTCALL,
     "call_key(x, weight, bias, z) -> (key bytes, differentiable) or None"},
    {"key_classes", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(key_classes)), METH_FASTCALL,
     "key_classes(torch.Tensor, torch.nn.Parameter)"},
    {"setup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup)), METH_FASTCALL, "setup"},
    {"set_recorder", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_recorder)), METH_FASTCALL,
     "set_recorder"},
    {"driver_available", driver_available, METH_NOARGS, "whether libcuda's launch entry points are there"},
    {"launches", launches, METH_NOARGS, "(forwards, backwards, quantized forwards) launched from C++"},
    {"layout", layout, METH_NOARGS, "struct sizes and offsets"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "gatednorm_cxx_plans", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_gatednorm_cxx_plans() { return PyModule_Create(&module); }
