/* The gated norm forward on CPU in one pass per row: the native backend's fast path where a C compiler
 * is present (gatednorm/backends/native_cpu_kernel.py builds this file on first use and falls back to the
 * pure-PyTorch block kernels where it cannot).
 *
 * Per row and group of GS features, in float32 (docs/design.md section 1):
 *
 *     xc   = x * act(z) if the gate comes first, else x
 *     mean = sum(xc) / GS, var = sum((xc - mean)^2) / GS       (RMSNorm: mean = 0)
 *     rstd = 1 / sqrt(var + eps)
 *     y    = ((xc - mean) * rstd * w + b) [* act(z) if the gate comes after], rounded once
 *
 * act(z) = z / (1 + e^-z) (swish, the formula of ATen's silu) or 1 / (1 + e^-z) (sigmoid).
 *
 * Why the bits do not depend on the batch: every element-wise step is a sequence of IEEE operations
 * (compiled with -ffp-contract=off, so no fused multiply-add appears in the vector body but not in the
 * scalar tail); the sums over a group (cascade_sum) follow an order that depends on GS only (not on the
 * row's address, its position or the thread).
 * e^x is computed here (Cody-Waite reduction, degree-7 polynomial: about 1 ulp), not by libm, so the
 * loops vectorise and the result does not depend on the C library.
 *
 * Groups whose var + eps leaves [SAFE_VAR_MIN, inf) are counted in the return value and their rstd is
 * written as computed; the caller redoes those rows with the rescue (the cold path).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

enum { GN_F32 = 0, GN_BF16 = 1 };

#define LANES 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays a quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((f != f) ? nan : rounded);
}

static void load_row(const void *src, int dtype, int64_t n, float *dst) {
    if (dtype == GN_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* e^x; about 1 ulp for |x| < 87; 0 below -87.3 (no denormals), inf from 88.4 (the largest finite
 * results are not produced); NaN propagates. */
static inline float gn_exp(float x) {
    float xc = x < -100.0f ? -100.0f : (x > 100.0f ? 100.0f : x); /* NaN passes */
    float t = xc * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest integer */
    float r = xc - n * 0.693145751953125f;      /* ln 2 split: the first product is exact */
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.9841270e-4f;
    p = p * r + 1.3888889e-3f;
    p = p * r + 8.3333338e-3f;
    p = p * r + 4.1666668e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    float nc = n < -127.0f ? -127.0f : (n > 128.0f ? 128.0f : n);
    nc = (nc != nc) ? 0.0f : nc;
    int32_t bits = ((int32_t)nc + 127) << 23; /* 2^n; n = -127 gives 0, n = 128 gives inf */
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static void activation(const float *z, int64_t n, int sigmoid_only, float *out) {
    if (sigmoid_only) {
        for (int64_t i = 0; i < n; i++) out[i] = 1.0f / (1.0f + gn_exp(-z[i]));
    } else {
        for (int64_t i = 0; i < n; i++) out[i] = z[i] / (1.0f + gn_exp(-z[i]));
    }
}

static float lane_sum(const float *v, int64_t n, int squares) {
    float acc[LANES];
    for (int k = 0; k < LANES; k++) acc[k] = 0.0f;
    int64_t i = 0;
    if (squares) {
        for (; i + LANES <= n; i += LANES)
            for (int k = 0; k < LANES; k++) acc[k] += v[i + k] * v[i + k];
        for (int k = 0; i + k < n; k++) acc[k] += v[i + k] * v[i + k];
    } else {
        for (; i + LANES <= n; i += LANES)
            for (int k = 0; k < LANES; k++) acc[k] += v[i + k];
        for (int k = 0; i + k < n; k++) acc[k] += v[i + k];
    }
    for (int s = LANES / 2; s >= 1; s /= 2)
        for (int k = 0; k < s; k++) acc[k] += acc[k + s];
    return acc[0];
}

/* Sum (of squares) of v[0:n): leaves of at most LEAF elements summed by lane_sum, leaves added pairwise, the
 * split at a multiple of LEAF: an order that depends on n only, with a rounding error growing like
 * LEAF / LANES + log2(n) (a plain loop: n / LANES), as ATen's cascade sum does. */
#define LEAF 128
static float cascade_sum(const float *v, int64_t n, int squares) {
    if (n <= LEAF) return lane_sum(v, n, squares);
    int64_t half = (n / 2 + LEAF - 1) / LEAF * LEAF;
    return cascade_sum(v, half, squares) + cascade_sum(v + half, n - half, squares);
}

/* Rows [r0, r1) of x (M, N). Row strides in elements; features contiguous. w, b: float32 (N,), b may be
 * NULL; z may be NULL. mean (NULL for RMSNorm) and rstd: G * M floats, group-major (g * M + m).
 * Returns the number of groups out of range, or -1 when out of memory. */
int64_t gn_forward_rows(const void *x, int x_dtype, int64_t stride_x, const void *z, int z_dtype,
                        int64_t stride_z, const float *w, const float *b, void *y, int y_dtype,
                        int64_t stride_y, float *mean, float *rstd, int64_t M, int64_t r0, int64_t r1,
                        int64_t N, int64_t gs, float eps, int is_rms, int gate_before, int sigmoid_only,
                        float safe_var_min) {
    float *xr = (float *)malloc((size_t)N * sizeof(float));
    float *ar = (float *)malloc((size_t)N * sizeof(float));
    if (xr == NULL || ar == NULL) {
        free(xr);
        free(ar);
        return -1;
    }
    const int64_t groups = N / gs;
    const float gs_f = (float)gs;
    const size_t xb = x_dtype == GN_BF16 ? 2 : 4, zb = z_dtype == GN_BF16 ? 2 : 4, yb = y_dtype == GN_BF16 ? 2 : 4;
    int64_t bad = 0;
    for (int64_t m = r0; m < r1; m++) {
        load_row((const char *)x + (size_t)(m * stride_x) * xb, x_dtype, N, xr);
        if (z != NULL) {
            load_row((const char *)z + (size_t)(m * stride_z) * zb, z_dtype, N, ar);
            activation(ar, N, sigmoid_only, ar);
            if (gate_before)
                for (int64_t i = 0; i < N; i++) xr[i] = xr[i] * ar[i];
        }
        for (int64_t g = 0; g < groups; g++) {
            float *v = xr + g * gs;
            float mu = 0.0f;
            if (!is_rms) {
                mu = cascade_sum(v, gs, 0) / gs_f;
                for (int64_t i = 0; i < gs; i++) v[i] = v[i] - mu;
                mean[g * M + m] = mu;
            }
            float var_eps = cascade_sum(v, gs, 1) / gs_f + eps;
            if (!(var_eps >= safe_var_min && var_eps <= 3.40282347e38f)) bad++;
            float rs = 1.0f / sqrtf(var_eps);
            rstd[g * M + m] = rs;
            for (int64_t i = 0; i < gs; i++) v[i] = v[i] * rs;
        }
        for (int64_t i = 0; i < N; i++) xr[i] = xr[i] * w[i];
        if (b != NULL)
            for (int64_t i = 0; i < N; i++) xr[i] = xr[i] + b[i];
        if (z != NULL && !gate_before)
            for (int64_t i = 0; i < N; i++) xr[i] = xr[i] * ar[i];
        void *yrow = (char *)y + (size_t)(m * stride_y) * yb;
        if (y_dtype == GN_BF16) {
            uint16_t *o = (uint16_t *)yrow;
            for (int64_t i = 0; i < N; i++) o[i] = f32_to_bf16(xr[i]);
        } else {
            memcpy(yrow, xr, (size_t)N * sizeof(float));
        }
    }
    free(xr);
    free(ar);
    return bad;
}
