/* The packed calls of native_cpu_kernel.c's entry points: one struct of 8-byte fields per call (pointers and
 * integers as int64, a NULL pointer 0; eps and rstd_max double). Python packs them with struct.Struct
 * (native_cpu_kernel.py, _FORWARD_CALL / _BACKWARD_CALL); native_cpu_node.cpp, the autograd node of small calls,
 * fills them in C++ and calls the entry points through the addresses Python hands it. */
#ifndef GATEDNORM_NATIVE_CPU_KERNEL_H
#define GATEDNORM_NATIVE_CPU_KERNEL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { GN_F32 = 0, GN_BF16 = 1 };

/* A quantized output as 8 fields of a packed forward call (q 0: none, the forward writes y) */
typedef struct {
    int64_t q, stride_q, scale, stride_sm, stride_sg, k, kind, ue8m0;
} gn_quant_fields;

typedef struct {
    int64_t x, x_dtype, stride_x, z, z_dtype, stride_z, w, w_dtype, b, b_dtype, y, y_dtype, stride_y, mean, rstd, M,
        r0, r1, counter, chunk_rows, N, gs;
    double eps, rstd_max;
    int64_t is_rms, gate_before, sigmoid_only, threads, late;
    gn_quant_fields quant;
} gn_forward_call;

typedef struct {
    int64_t dy, dy_dtype, stride_dy, x, x_dtype, stride_x, z, z_dtype, stride_z, w, w_dtype, b, b_dtype, mean, rstd,
        dx, dx_dtype, stride_dx, dz, dz_dtype, stride_dz, part_w, part_b, M, r0, r1, counter, task_rows, tasks, N, gs,
        is_rms, gate_before, sigmoid_only, threads, late;
} gn_backward_call;

/* Rows [r0, r1) (counter 0) of the forward: returns the count of groups out of range, -1 when out of memory. */
int64_t gn_forward_packed(const gn_forward_call *c);
/* Rows [r0, r1) (counter 0) of the backward into one partial row of dweight / dbias: 0, -1 when out of memory. */
int64_t gn_backward_packed(const gn_backward_call *c);

#ifdef __cplusplus
}
#endif

#endif
