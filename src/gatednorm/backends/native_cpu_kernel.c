/* The gated norm on CPU, forward and backward, one pass per row: the native backend's fast path where a C
 * compiler is present (gatednorm/backends/native_cpu_kernel.py builds this file on first use and falls back to the
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
 * Groups whose var + eps leaves [SAFE_VAR_MIN, inf) get their rstd written as computed and are counted (the
 * forward's return value): the caller, only when the count is not 0, finds them on the stored rstd (as it does
 * for the block kernels) and redoes those rows with the rescue (the cold path).
 *
 * weight and bias are read in their own dtype (float32 or bf16), converted once per call: a bf16 model's
 * parameters need no float32 copy per call.
 */
/* 512-bit vectors where the CPU has them (gcc keeps to 256 by default): single thread, preallocated output,
 * the forward 10-30% faster (65536x128 bf16 gated RMSNorm 12.1 -> 10.0 ms), the backward 0-20%; the same bits
 * (every element's operations are the same, the lane sums fixed by LANES, not by the vector width). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "native_cpu_kernel.h"

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

static void store_row(const float *src, int64_t n, int dtype, void *dst) {
    if (dtype == GN_BF16) {
        uint16_t *o = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++) o[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

/* weight / bias (N,) in dtype into float32 dst; src NULL leaves dst unused (returns NULL). */
static const float *load_params(const void *src, int dtype, int64_t n, float *dst) {
    if (src == NULL) return NULL;
    if (dtype == GN_F32) return (const float *)src;
    load_row(src, dtype, n, dst);
    return dst;
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

/* Sum of v[0:n), or with `squares` of (v - mu)^2 (mu = 0 for the plain squares: v - 0 is v exactly): element
 * i goes to lane i % LANES, the lanes are added in a fixed tree. */
static float lane_sum(const float *v, int64_t n, int squares, float mu) {
    float acc[LANES];
    for (int k = 0; k < LANES; k++) acc[k] = 0.0f;
    int64_t i = 0;
    if (squares) {
        for (; i + LANES <= n; i += LANES)
            for (int k = 0; k < LANES; k++) {
                const float d = v[i + k] - mu;
                acc[k] += d * d;
            }
        for (int k = 0; i + k < n; k++) {
            const float d = v[i + k] - mu;
            acc[k] += d * d;
        }
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
static float cascade_sum(const float *v, int64_t n, int squares, float mu) {
    if (n <= LEAF) return lane_sum(v, n, squares, mu);
    int64_t half = (n / 2 + LEAF - 1) / LEAF * LEAF;
    return cascade_sum(v, half, squares, mu) + cascade_sum(v + half, n - half, squares, mu);
}

/* Work sharing without the GIL: the threads of one call each make one call into this file with the same
 * counter, and take the next piece of work from it (dynamic, so a thread on a busy core takes less), instead
 * of one call per piece, each paying a hand-over of Python's GIL. What a piece computes never depends on
 * which thread takes it.
 *
 * next_piece: the next [*lo, *hi) of [0, end) in pieces of `size` (forward: rows; backward: tasks) from
 * *counter; without a counter, [*lo, *hi) as given, once. Returns 0 when nothing is left. */
static int next_piece(int64_t *counter, int64_t size, int64_t end, int64_t *lo, int64_t *hi, int *taken) {
    if (counter == NULL) {
        if (*taken) return 0;
        *taken = 1;
        return *lo < *hi;
    }
    const int64_t start = __atomic_fetch_add(counter, size, __ATOMIC_RELAXED);
    if (start >= end) return 0;
    *lo = start;
    *hi = start + size < end ? start + size : end;
    return 1;
}

/* The forward's two element-wise passes over one group, specialised (always_inline, called with constant
 * flags) so that each combination of dtypes and gate is one straight loop that gcc vectorises, the
 * conversions of bf16 inputs and output done in the same loop as the arithmetic (no separate load and store
 * passes). Each element sees the operations of the formula in the formula's order, as before. */

#if defined(__AVX512F__)
#include <immintrin.h>
/* Where gcc vectorises gn_exp itself it turns each clamp into masked paths (about 50 instructions per 16
 * elements); written out it is one straight sequence: forward and backward 2-9% faster on gated rows, single
 * thread, the same bits (benchmarks/ab_cpu_kernel.py, 8064 tensors). The scalar code stays for the tails and
 * other CPUs.
 *
 * gn_exp on 16 lanes, the same IEEE operations in the same order (so the same bits as the scalar gn_exp): the
 * clamps as max/min (x86's max/min return the second operand for a NaN, as the scalar comparisons do) */
static inline __m512 gn_exp16(__m512 x) {
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-100.0f), x));
    const __m512 t = _mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f));
    const __m512 big = _mm512_set1_ps(12582912.0f);
    const __m512 n = _mm512_sub_ps(_mm512_add_ps(t, big), big);
    __m512 r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693145751953125f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f)));
    __m512 p = _mm512_set1_ps(1.9841270e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3888889e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3333338e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1666668e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666667e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    __m512 nc = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), n));
    nc = _mm512_mask_mov_ps(nc, _mm512_cmp_ps_mask(nc, nc, _CMP_UNORD_Q), _mm512_setzero_ps());
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(nc), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

/* -x as the scalar code's unary minus: the sign bit flipped (also for 0 and NaN) */
static inline __m512 neg16(__m512 x) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)));
}

static inline __m512 load16(const void *base, const int bf16, int64_t i) {
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + i);
}
#endif

/* gate pass: v = x [* act(z) if the gate comes first], a = act(z) (kept for a gate after) */
static inline __attribute__((always_inline)) void gate_pass(const void *xg, const int x_bf16, const void *zg,
                                                            const int z_bf16, const int has_z, const int sigmoid_only,
                                                            const int gate_before, int64_t gs, float *v, float *a) {
    const uint16_t *xh = (const uint16_t *)xg, *zh = (const uint16_t *)zg;
    const float *xf = (const float *)xg, *zf = (const float *)zg;
    int64_t i0 = 0;
#if defined(__AVX512F__)
    if (has_z) {
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i0 + 16 <= gs; i0 += 16) {
            __m512 xv = load16(xg, x_bf16, i0);
            const __m512 zv = load16(zg, z_bf16, i0);
            const __m512 d = _mm512_add_ps(one, gn_exp16(neg16(zv)));
            const __m512 act = _mm512_div_ps(sigmoid_only ? one : zv, d);
            _mm512_storeu_ps(a + i0, act);
            if (gate_before) xv = _mm512_mul_ps(xv, act);
            _mm512_storeu_ps(v + i0, xv);
        }
    }
#endif
    for (int64_t i = i0; i < gs; i++) {
        float xv = x_bf16 ? bf16_to_f32(xh[i]) : xf[i];
        if (has_z) {
            const float zv = z_bf16 ? bf16_to_f32(zh[i]) : zf[i];
            const float d = 1.0f + gn_exp(-zv);
            const float act = sigmoid_only ? 1.0f / d : zv / d;
            a[i] = act;
            if (gate_before) xv = xv * act;
        }
        v[i] = xv;
    }
}

/* output pass: y = ((v - mu) * rstd * w + b) [* a if the gate comes after], rounded once into y's dtype */
static inline __attribute__((always_inline)) void output_pass(const float *v, const float *a, const float *wg,
                                                              const float *bg, const int has_b, const int gate_after,
                                                              float mu, float rs, int64_t gs, void *yg,
                                                              const int y_bf16) {
    uint16_t *yh = (uint16_t *)yg;
    float *yf = (float *)yg;
    for (int64_t i = 0; i < gs; i++) {
        float t = (v[i] - mu) * rs;
        t = t * wg[i];
        if (has_b) t = t + bg[i];
        if (gate_after) t = t * a[i];
        if (y_bf16) yh[i] = f32_to_bf16(t); else yf[i] = t;
    }
}

/* The specialisations, selected by bits: x bf16, z bf16, z present, sigmoid, gate first (gate pass); y bf16,
 * bias present, gate after (output pass). */
static void gate_pass_any(int code, const void *xg, const void *zg, int64_t gs, float *v, float *a) {
#define GATE_CASE(c) case c: gate_pass(xg, (c) & 1, zg, ((c) >> 1) & 1, ((c) >> 2) & 1, ((c) >> 3) & 1, ((c) >> 4) & 1, gs, v, a); return;
    switch (code) {
        GATE_CASE(0) GATE_CASE(1) GATE_CASE(2) GATE_CASE(3) GATE_CASE(4) GATE_CASE(5) GATE_CASE(6) GATE_CASE(7)
        GATE_CASE(8) GATE_CASE(9) GATE_CASE(10) GATE_CASE(11) GATE_CASE(12) GATE_CASE(13) GATE_CASE(14) GATE_CASE(15)
        GATE_CASE(16) GATE_CASE(17) GATE_CASE(18) GATE_CASE(19) GATE_CASE(20) GATE_CASE(21) GATE_CASE(22) GATE_CASE(23)
        GATE_CASE(24) GATE_CASE(25) GATE_CASE(26) GATE_CASE(27) GATE_CASE(28) GATE_CASE(29) GATE_CASE(30) GATE_CASE(31)
    }
#undef GATE_CASE
}

static void output_pass_any(int code, const float *v, const float *a, const float *wg, const float *bg, float mu,
                            float rs, int64_t gs, void *yg) {
#define OUT_CASE(c) case c: output_pass(v, a, wg, bg, ((c) >> 1) & 1, ((c) >> 2) & 1, mu, rs, gs, yg, (c) & 1); return;
    switch (code) {
        OUT_CASE(0) OUT_CASE(1) OUT_CASE(2) OUT_CASE(3) OUT_CASE(4) OUT_CASE(5) OUT_CASE(6) OUT_CASE(7)
    }
#undef OUT_CASE
}

/* ---- The quantized output's last step (docs/design.md, "Quantized output"), on float32 rows of y ----------------
 *
 * Per row and block of k features: amax = max |y| (NaN when the block holds one), scale = max(RN(amax / qmax),
 * 2^-126) (ue8m0: then rounded up to a power of two on the bits), q = round_half_even(clamp(y / scale, +-qmax)),
 * each step one IEEE float32 operation: numerics.quantize_blocks' steps on the same y, so the same codes and
 * scales (a NaN scale is the one quiet NaN, as the triton kernel and quantize_blocks write it).
 * kind: 0 int8 (qmax 127), 1 e4m3fn (448), 2 e4m3fnuz (240); fp8 codes
 * are written as their bits. A block holding a NaN gets scale NaN, one holding an Inf (and no NaN) scale +Inf,
 * and every code of such a block is the format's NaN (0x7F, 0x80) or 0 (int8). Scales at
 * scale + m * stride_sm + block * stride_sg. */

#define GN_RNE_MAGIC 12582912.0f /* 1.5 * 2^23: t + it rounds |t| < 2^22 half to even onto the integers */

static inline uint32_t gn_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float gn_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* The e4m3fn (fnuz: e4m3fnuz) bits of a finite v with |v| <= the format's largest value, rounded to nearest
 * even: backends/triton/kernels.py's _fp8_e4m3_bits, step for step (normal results by rounding the mantissa
 * on the bits and re-biasing the exponent; subnormal ones as multiples of the spacing). */
static inline uint8_t gn_fp8_code(float v, const int fnuz) {
    const uint32_t bits = gn_f32_bits(v);
    const uint32_t mag = bits & 0x7FFFFFFFu;
    const float a = gn_bits_f32(mag);
    const int32_t normal = (int32_t)((mag + 0x7FFFFu + ((mag >> 20) & 1u)) >> 20) - (fnuz ? 952 : 960);
    const int32_t sub = (int32_t)((a * (fnuz ? 1024.0f : 512.0f) + GN_RNE_MAGIC) - GN_RNE_MAGIC);
    const int32_t code = a < (fnuz ? 0.0078125f : 0.015625f) ? sub : normal;
    const uint32_t sign = (fnuz && code == 0) ? 0u : (bits >> 24) & 0x80u;
    return (uint8_t)((uint32_t)code | sign);
}

/* Where a forward writes its rows quantized instead of y (gn_forward_rows' qo): codes, their row stride, the
 * scales and their strides, the block size k, kind and ue8m0 as above. */
typedef struct {
    uint8_t *q;
    int64_t stride_q;
    float *scale;
    int64_t stride_sm, stride_sg, k;
    int kind, ue8m0;
} gn_quant_out;

static void quantize_block(const float *y, int64_t k, const int kind, const int ue8m0, uint8_t *q, float *scale_at) {
    const float qmax = kind == 0 ? 127.0f : (kind == 1 ? 448.0f : 240.0f);
    /* max |y| on the bits: for non-NaN floats the magnitudes order as their bits do, and every NaN's
     * magnitude bits exceed Inf's (an integer max: vectorised, no NaN rules) */
    uint32_t amax_bits = 0;
    for (int64_t i = 0; i < k; i++) {
        const uint32_t m = gn_f32_bits(y[i]) & 0x7FFFFFFFu;
        amax_bits = m > amax_bits ? m : amax_bits;
    }
    const int has_nan = amax_bits > 0x7F800000u;
    float scale = gn_bits_f32(amax_bits) / qmax;
    if (scale < 0x1p-126f) scale = 0x1p-126f;
    if (ue8m0) scale = gn_bits_f32((gn_f32_bits(scale) + 0x7FFFFFu) & 0x7F800000u); /* Inf stays Inf */
    if (has_nan) scale = NAN;
    *scale_at = scale;
    if (!(scale <= 3.4028234663852886e38f)) { /* NaN or Inf: the block's codes mark it */
        memset(q, kind == 0 ? 0 : (kind == 1 ? 0x7F : 0x80), (size_t)k);
        return;
    }
    if (kind == 0) {
        for (int64_t i = 0; i < k; i++) {
            float t = y[i] / scale;
            t = t < -qmax ? -qmax : (t > qmax ? qmax : t);
            q[i] = (uint8_t)(gn_f32_bits(t + GN_RNE_MAGIC) & 0xFFu); /* the low byte: the integer, two's complement */
        }
    } else {
        const int fnuz = kind == 2;
        for (int64_t i = 0; i < k; i++) {
            float t = y[i] / scale;
            t = t < -qmax ? -qmax : (t > qmax ? qmax : t);
            q[i] = gn_fp8_code(t, fnuz);
        }
    }
}

/* Row m's N values (float32, at y) quantized into qo's row m */
static void quantize_row(const float *y, int64_t N, int64_t m, const gn_quant_out *qo) {
    for (int64_t blk = 0; blk < N / qo->k; blk++) {
        quantize_block(y + blk * qo->k, qo->k, qo->kind, qo->ue8m0, qo->q + m * qo->stride_q + blk * qo->k,
                       qo->scale + m * qo->stride_sm + blk * qo->stride_sg);
    }
}

/* Rows [r0, r1) of y (M, N) float32, row stride stride_y, or with a counter (next_piece) chunks of chunk_rows
 * rows of [0, M): quantized into qo's rows. Returns 0. */
int64_t gn_quantize_rows(const float *y, int64_t stride_y, int64_t M, int64_t r0, int64_t r1, int64_t *counter,
                         int64_t chunk_rows, int64_t N, const gn_quant_out *qo) {
    int taken = 0;
    while (next_piece(counter, chunk_rows, M, &r0, &r1, &taken)) {
        for (int64_t m = r0; m < r1; m++) quantize_row(y + m * stride_y, N, m, qo);
    }
    return 0;
}

/* Rows [r0, r1) of x (M, N), or with a counter (see next_piece) chunks of chunk_rows rows of [0, M) taken
 * from it. Row strides in elements; features contiguous. w, b: (N,) contiguous in w_dtype / b_dtype, b may
 * be NULL; z may be NULL. mean (NULL for RMSNorm) and rstd: G * M floats, group-major (g * M + m). With qo
 * (else NULL), each row is quantized as gn_quantize_rows would quantize its float32 y, and y is not written
 * (may be NULL): the quantized output in one pass. Returns the number of groups whose rstd is outside
 * (0, rstd_max) or NaN (the rows the caller redoes; with qo, redoes and quantizes), or -1 when out of memory. */
int64_t gn_forward_rows(const void *x, int x_dtype, int64_t stride_x, const void *z, int z_dtype,
                        int64_t stride_z, const void *w_in, int w_dtype, const void *b_in, int b_dtype, void *y,
                        int y_dtype, int64_t stride_y, float *mean, float *rstd, int64_t M, int64_t r0, int64_t r1,
                        int64_t *counter, int64_t chunk_rows, int64_t N, int64_t gs, float eps, float rstd_max,
                        int is_rms, int gate_before, int sigmoid_only, const gn_quant_out *qo) {
    /* one group at a time, as the backward (gs-wide buffers); with qo a float32 row for y too */
    float *buf = (float *)malloc(((size_t)gs * 2 + (size_t)N * (qo != NULL ? 3 : 2)) * sizeof(float));
    if (buf == NULL) return -1;
    float *xr = buf, *ar = buf + gs, *yq = qo != NULL ? buf + 2 * gs + 2 * N : NULL;
    const float *w = load_params(w_in, w_dtype, N, buf + 2 * gs), *b = load_params(b_in, b_dtype, N, buf + 2 * gs + N);
    int64_t out_of_range = 0;
    const int64_t groups = N / gs;
    const float gs_f = (float)gs;
    const size_t xb = x_dtype == GN_BF16 ? 2 : 4, zb = z_dtype == GN_BF16 ? 2 : 4, yb = y_dtype == GN_BF16 ? 2 : 4;
    const int has_z = z != NULL, gate_after = has_z && !gate_before;
    const int gate_code = (x_dtype == GN_BF16) | (has_z && z_dtype == GN_BF16) << 1 | has_z << 2
                          | (has_z && sigmoid_only) << 3 | (has_z && gate_before) << 4;
    const int out_code = (qo == NULL && y_dtype == GN_BF16) | (b != NULL) << 1 | gate_after << 2;
    int taken = 0;
    while (next_piece(counter, chunk_rows, M, &r0, &r1, &taken)) {
        for (int64_t m = r0; m < r1; m++) {
            const char *x_row = (const char *)x + (size_t)(m * stride_x) * xb;
            const char *z_row = has_z ? (const char *)z + (size_t)(m * stride_z) * zb : NULL;
            char *y_row = qo != NULL ? (char *)yq : (char *)y + (size_t)(m * stride_y) * yb;
            const size_t out_b = qo != NULL ? 4 : yb;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t o = g * gs;
                gate_pass_any(gate_code, x_row + (size_t)o * xb, has_z ? z_row + (size_t)o * zb : NULL, gs, xr, ar);
                float mu = 0.0f;
                if (!is_rms) {
                    mu = cascade_sum(xr, gs, 0, 0.0f) / gs_f;
                    mean[g * M + m] = mu;
                }
                float var_eps = cascade_sum(xr, gs, 1, mu) / gs_f + eps;
                float rs = 1.0f / sqrtf(var_eps);
                rstd[g * M + m] = rs;
                out_of_range += !(rs > 0.0f && rs < rstd_max);
                output_pass_any(out_code, xr, ar, w + o, b != NULL ? b + o : NULL, mu, rs, gs, y_row + (size_t)o * out_b);
            }
            if (qo != NULL) quantize_row(yq, N, m, qo);
        }
    }
    free(buf);
    return out_of_range;
}

/* Rows per chunk of the dweight / dbias partial sums: rows are added one by one into a chunk's sum, the
 * chunks one by one into the task's (two short sequential sums instead of one long one). */
#define SUM_CHUNK_ROWS 32

/* Gradients of rows [r0, r1) (see backends/native_cpu.py, _backward_rows, for the formulas):
 *
 *     xhat = (xc - mean) * rstd, g = dy [* act(z) when the gate comes after]
 *     dz   = dy * (xhat * w + b) * act'(z)                          (gate after)
 *     part_w += g * xhat, part_b += g                                (this task's partial sums)
 *     wdy  = g * w, dxc = (wdy - mean(wdy) - xhat * mean(xhat * wdy)) * rstd   (RMSNorm: no mean(wdy))
 *     dz   = dxc * x * act'(z), dx = dxc * act(z)                   (gate first; else dx = dxc)
 *
 * act is recomputed with the forward's formula, so xhat is the forward's bit for bit. dx, dz, part_w,
 * part_b may be NULL (not needed). part_w / part_b: N floats each, overwritten. w, b as for the forward.
 * With a counter (see next_piece): tasks of task_rows rows of [0, M) taken from it, `tasks` of them, task t
 * writing rows t * N of part_w / part_b (the same sums whichever thread takes it). Returns 0, or -1 when out
 * of memory. */
int64_t gn_backward_rows(const void *dy, int dy_dtype, int64_t stride_dy, const void *x, int x_dtype,
                         int64_t stride_x, const void *z, int z_dtype, int64_t stride_z, const void *w_in,
                         int w_dtype, const void *b_in, int b_dtype, const float *mean, const float *rstd,
                         void *dx, int dx_dtype, int64_t stride_dx, void *dz, int dz_dtype, int64_t stride_dz,
                         float *part_w, float *part_b, int64_t M, int64_t r0, int64_t r1, int64_t *counter,
                         int64_t task_rows, int64_t tasks, int64_t N, int64_t gs, int is_rms, int gate_before,
                         int sigmoid_only) {
    /* One group at a time (gs-wide buffers, in L1 for the usual group sizes: a row of 4096 features in
     * groups of 128 would otherwise keep nine row-wide buffers in L2); the N-wide chunk sums and the
     * parameters are touched once per row. Every element sees the same operations in the same order as
     * row-wide passes would, so the bits do not depend on this. */
    float *buf = (float *)malloc(((size_t)gs * 7 + (size_t)N * 4) * sizeof(float));
    if (buf == NULL) return -1;
    float *xr = buf, *gr = buf + gs, *zr = buf + 2 * gs, *act = buf + 3 * gs, *dact = buf + 4 * gs;
    float *xh = buf + 5 * gs, *t = buf + 6 * gs, *chunk_w = buf + 7 * gs, *chunk_b = chunk_w + N;
    const float *w = load_params(w_in, w_dtype, N, chunk_b + N), *b = load_params(b_in, b_dtype, N, chunk_b + 2 * N);
    const int64_t groups = N / gs;
    const float gs_f = (float)gs;
    const size_t dyb = dy_dtype == GN_BF16 ? 2 : 4, xb = x_dtype == GN_BF16 ? 2 : 4, zb = z_dtype == GN_BF16 ? 2 : 4;
    const size_t dxb = dx_dtype == GN_BF16 ? 2 : 4, dzb = dz_dtype == GN_BF16 ? 2 : 4;
    const int gate_after = z != NULL && !gate_before;
    const int need_dxc = dx != NULL || (gate_before && dz != NULL);
    int taken = 0;
    int64_t task = 0, task_end = 1;
    while (next_piece(counter, 1, tasks, &task, &task_end, &taken)) {
        const int64_t lo = counter == NULL ? r0 : task * task_rows;
        const int64_t hi = counter == NULL ? r1 : (lo + task_rows < M ? lo + task_rows : M);
        float *pw = part_w == NULL ? NULL : part_w + (counter == NULL ? 0 : task * N);
        float *pb = part_b == NULL ? NULL : part_b + (counter == NULL ? 0 : task * N);
        if (pw != NULL) memset(pw, 0, (size_t)N * sizeof(float));
        if (pb != NULL) memset(pb, 0, (size_t)N * sizeof(float));
        memset(chunk_w, 0, (size_t)N * sizeof(float));
        memset(chunk_b, 0, (size_t)N * sizeof(float));
        for (int64_t m = lo; m < hi; m++) {
            const char *x_row = (const char *)x + (size_t)(m * stride_x) * xb;
            const char *dy_row = (const char *)dy + (size_t)(m * stride_dy) * dyb;
            const char *z_row = z != NULL ? (const char *)z + (size_t)(m * stride_z) * zb : NULL;
            char *dx_row = dx != NULL ? (char *)dx + (size_t)(m * stride_dx) * dxb : NULL;
            char *dz_row = dz != NULL ? (char *)dz + (size_t)(m * stride_dz) * dzb : NULL;
            const int flush = (m - lo) % SUM_CHUNK_ROWS == SUM_CHUNK_ROWS - 1 || m == hi - 1;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t o = g * gs;
                const float rs = rstd[g * M + m], mu = is_rms ? 0.0f : mean[g * M + m];
                const float *wg = w + o, *bg = b != NULL ? b + o : NULL;
                load_row(x_row + (size_t)o * xb, x_dtype, gs, xr);
                load_row(dy_row + (size_t)o * dyb, dy_dtype, gs, gr);
                if (z != NULL) {
                    load_row(z_row + (size_t)o * zb, z_dtype, gs, zr);
                    /* act exactly as gate_pass() computes it in the forward (the same e and 1 + e), so xhat
                     * is the forward's; s and act' from the same e (one exponential per element) */
                    int64_t i0 = 0;
#if defined(__AVX512F__)
                    {
                        const __m512 one = _mm512_set1_ps(1.0f);
                        for (; i0 + 16 <= gs; i0 += 16) {
                            const __m512 zv = _mm512_loadu_ps(zr + i0);
                            const __m512 d = _mm512_add_ps(one, gn_exp16(neg16(zv)));
                            const __m512 s = _mm512_div_ps(one, d);
                            const __m512 one_minus_s = _mm512_sub_ps(one, s);
                            _mm512_storeu_ps(act + i0, sigmoid_only ? s : _mm512_div_ps(zv, d));
                            /* act' as the scalar loop below: s (1 - s), or ((1 - s) z + 1) s */
                            const __m512 swish_slope = _mm512_add_ps(_mm512_mul_ps(one_minus_s, zv), one);
                            _mm512_storeu_ps(dact + i0, _mm512_mul_ps(sigmoid_only ? s : swish_slope,
                                                                      sigmoid_only ? one_minus_s : s));
                        }
                    }
#endif
                    for (int64_t i = i0; i < gs; i++) {
                        const float d = 1.0f + gn_exp(-zr[i]);
                        const float s = 1.0f / d;
                        act[i] = sigmoid_only ? s : zr[i] / d;
                        dact[i] = sigmoid_only ? s * (1.0f - s) : ((1.0f - s) * zr[i] + 1.0f) * s;
                    }
                }
                if (gate_before) {
                    if (is_rms)
                        for (int64_t i = 0; i < gs; i++) xh[i] = (xr[i] * act[i]) * rs;
                    else
                        for (int64_t i = 0; i < gs; i++) xh[i] = (xr[i] * act[i] - mu) * rs;
                } else if (is_rms) {
                    for (int64_t i = 0; i < gs; i++) xh[i] = xr[i] * rs;
                } else {
                    for (int64_t i = 0; i < gs; i++) xh[i] = (xr[i] - mu) * rs;
                }
                if (gate_after) {
                    if (dz != NULL) {
                        for (int64_t i = 0; i < gs; i++) {
                            float p = xh[i] * wg[i];
                            if (bg != NULL) p = p + bg[i];
                            t[i] = (p * gr[i]) * dact[i];
                        }
                        store_row(t, gs, dz_dtype, dz_row + (size_t)o * dzb);
                    }
                    for (int64_t i = 0; i < gs; i++) gr[i] = gr[i] * act[i];
                }
                /* this task's dweight / dbias: rows into a chunk's sums, chunks into the task's */
                float *cw = chunk_w + o, *cb = chunk_b + o;
                if (pw != NULL) {
                    for (int64_t i = 0; i < gs; i++) cw[i] += gr[i] * xh[i];
                    if (flush)
                        for (int64_t i = 0; i < gs; i++) { pw[o + i] += cw[i]; cw[i] = 0.0f; }
                }
                if (pb != NULL) {
                    for (int64_t i = 0; i < gs; i++) cb[i] += gr[i];
                    if (flush)
                        for (int64_t i = 0; i < gs; i++) { pb[o + i] += cb[i]; cb[i] = 0.0f; }
                }
                if (!need_dxc) continue;
                for (int64_t i = 0; i < gs; i++) gr[i] = gr[i] * wg[i]; /* wdy */
                for (int64_t i = 0; i < gs; i++) t[i] = xh[i] * gr[i];
                const float c1 = cascade_sum(t, gs, 0, 0.0f) / gs_f;
                if (!is_rms) {
                    const float c2 = cascade_sum(gr, gs, 0, 0.0f) / gs_f;
                    for (int64_t i = 0; i < gs; i++) gr[i] = gr[i] - c2;
                }
                for (int64_t i = 0; i < gs; i++) gr[i] = (gr[i] - xh[i] * c1) * rs; /* dL/dxc */
                if (gate_before) {
                    if (dz != NULL) {
                        for (int64_t i = 0; i < gs; i++) t[i] = (gr[i] * xr[i]) * dact[i];
                        store_row(t, gs, dz_dtype, dz_row + (size_t)o * dzb);
                    }
                    for (int64_t i = 0; i < gs; i++) gr[i] = gr[i] * act[i];
                }
                if (dx != NULL) store_row(gr, gs, dx_dtype, dx_row + (size_t)o * dxb);
            }
        }
    }
    free(buf);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
 * The same calls on an OpenMP team (built with -fopenmp where the compiler has it, and used only where the
 * process's OpenMP runtime is PyTorch's own: the team is then the threads of ATen's parallel ops).
 *
 * Why: after an ATen parallel op, its OpenMP threads spin for a while waiting for the next one. A thread of
 * gatednorm's own pool started in that window shares a core with a spinning thread (2 cores, 4096x2048
 * LayerNorm bf16 forward after ATen ops: 3.4 ms on the pool, 1.75 ms on the team, 1.66-1.82 ms for
 * F.layer_norm). The team's price: its region ends at a barrier, which waits for a helper that another
 * process keeps off its core (the same call with one core busy: 5.4 ms on the team, 3.9 ms on the pool). So
 * each call reports how late the team was, and the caller goes back to the pool for a while after a late
 * one: *late (seconds) is the later of the helpers' start after the call began and the
 * master's wait at the closing barrier (a helper taken off its core in the middle of its rows). Every thread
 * runs the plain call with the shared counter: the rows and tasks, and so every bit, are those of the pool's
 * calls.
 * ------------------------------------------------------------------------------------------------------------ */
#ifdef _OPENMP
#include <omp.h>
#include <time.h>

static double gn_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int64_t gn_forward_rows_team(const void *x, int x_dtype, int64_t stride_x, const void *z, int z_dtype,
                             int64_t stride_z, const void *w_in, int w_dtype, const void *b_in, int b_dtype, void *y,
                             int y_dtype, int64_t stride_y, float *mean, float *rstd, int64_t M, int64_t *counter,
                             int64_t chunk_rows, int64_t N, int64_t gs, float eps, float rstd_max, int is_rms,
                             int gate_before, int sigmoid_only, const gn_quant_out *qo, int threads, double *late) {
    const double start = gn_seconds();
    double delay = 0.0, master_done = start;
    int64_t out_of_range = 0;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : out_of_range) reduction(| : failed) reduction(max : delay)
    {
        if (omp_get_thread_num() != 0) delay = gn_seconds() - start;
        const int64_t r = gn_forward_rows(x, x_dtype, stride_x, z, z_dtype, stride_z, w_in, w_dtype, b_in, b_dtype, y,
                                          y_dtype, stride_y, mean, rstd, M, 0, M, counter, chunk_rows, N, gs, eps,
                                          rstd_max, is_rms, gate_before, sigmoid_only, qo);
        if (r < 0) failed = 1;
        else out_of_range += r;
        if (omp_get_thread_num() == 0) master_done = gn_seconds();
    }
    const double waited = gn_seconds() - master_done;
    *late = delay > waited ? delay : waited;
    return failed ? -1 : out_of_range;
}

int64_t gn_backward_rows_team(const void *dy, int dy_dtype, int64_t stride_dy, const void *x, int x_dtype,
                              int64_t stride_x, const void *z, int z_dtype, int64_t stride_z, const void *w_in,
                              int w_dtype, const void *b_in, int b_dtype, const float *mean, const float *rstd,
                              void *dx, int dx_dtype, int64_t stride_dx, void *dz, int dz_dtype, int64_t stride_dz,
                              float *part_w, float *part_b, int64_t M, int64_t *counter, int64_t task_rows,
                              int64_t tasks, int64_t N, int64_t gs, int is_rms, int gate_before, int sigmoid_only,
                              int threads, double *late) {
    const double start = gn_seconds();
    double delay = 0.0, master_done = start;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed) reduction(max : delay)
    {
        if (omp_get_thread_num() != 0) delay = gn_seconds() - start;
        if (gn_backward_rows(dy, dy_dtype, stride_dy, x, x_dtype, stride_x, z, z_dtype, stride_z, w_in, w_dtype, b_in,
                             b_dtype, mean, rstd, dx, dx_dtype, stride_dx, dz, dz_dtype, stride_dz, part_w, part_b, M,
                             0, M, counter, task_rows, tasks, N, gs, is_rms, gate_before, sigmoid_only) < 0)
            failed = 1;
        if (omp_get_thread_num() == 0) master_done = gn_seconds();
    }
    const double waited = gn_seconds() - master_done;
    *late = delay > waited ? delay : waited;
    return failed ? -1 : 0;
}
#endif

/* ------------------------------------------------------------------------------------------------------------
 * Packed calls: the arguments of one call as one struct (built by native_cpu_kernel.py with struct.pack: every
 * field 8 bytes, pointers and integers as int64, eps and rstd_max as double), handed over as one pointer.
 *
 * Why: ctypes converts each argument of a call by its declared type; for the 27-36 arguments of these calls
 * that took 5.3 us per call on the 2-core VM, against 0.4 us for packing them and passing one pointer. A
 * decode-sized call (one to a few dozen rows) computes for a few microseconds, so the conversion was most of
 * its time in C. `threads` and `late` (a double *) are read by the team calls only.
 * ------------------------------------------------------------------------------------------------------------ */
/* gn_forward_call, gn_backward_call: native_cpu_kernel.h (shared with native_cpu_node.cpp) */

typedef struct {
    int64_t y, stride_y, M, r0, r1, counter, chunk_rows, N;
    gn_quant_fields quant;
} gn_quantize_call;

#define GN_PTR(v) ((void *)(intptr_t)(v))

/* The gn_quant_out of a call's quantized-output fields (NULL where q is 0: the forward writes y). */
static const gn_quant_out *quant_out_of(const gn_quant_fields *f, gn_quant_out *qo) {
    if (f->q == 0) return NULL;
    qo->q = (uint8_t *)GN_PTR(f->q);
    qo->stride_q = f->stride_q;
    qo->scale = (float *)GN_PTR(f->scale);
    qo->stride_sm = f->stride_sm;
    qo->stride_sg = f->stride_sg;
    qo->k = f->k;
    qo->kind = (int)f->kind;
    qo->ue8m0 = (int)f->ue8m0;
    return qo;
}

int64_t gn_quantize_packed(const gn_quantize_call *c) {
    gn_quant_out qo;
    return gn_quantize_rows((const float *)GN_PTR(c->y), c->stride_y, c->M, c->r0, c->r1,
                            (int64_t *)GN_PTR(c->counter), c->chunk_rows, c->N, quant_out_of(&c->quant, &qo));
}

int64_t gn_forward_packed(const gn_forward_call *c) {
    gn_quant_out qo;
    return gn_forward_rows(GN_PTR(c->x), (int)c->x_dtype, c->stride_x, GN_PTR(c->z), (int)c->z_dtype, c->stride_z,
                           GN_PTR(c->w), (int)c->w_dtype, GN_PTR(c->b), (int)c->b_dtype, GN_PTR(c->y), (int)c->y_dtype,
                           c->stride_y, (float *)GN_PTR(c->mean), (float *)GN_PTR(c->rstd), c->M, c->r0, c->r1,
                           (int64_t *)GN_PTR(c->counter), c->chunk_rows, c->N, c->gs, (float)c->eps,
                           (float)c->rstd_max, (int)c->is_rms, (int)c->gate_before, (int)c->sigmoid_only,
                           quant_out_of(&c->quant, &qo));
}

int64_t gn_backward_packed(const gn_backward_call *c) {
    return gn_backward_rows(GN_PTR(c->dy), (int)c->dy_dtype, c->stride_dy, GN_PTR(c->x), (int)c->x_dtype, c->stride_x,
                            GN_PTR(c->z), (int)c->z_dtype, c->stride_z, GN_PTR(c->w), (int)c->w_dtype, GN_PTR(c->b),
                            (int)c->b_dtype, (const float *)GN_PTR(c->mean), (const float *)GN_PTR(c->rstd),
                            GN_PTR(c->dx), (int)c->dx_dtype, c->stride_dx, GN_PTR(c->dz), (int)c->dz_dtype,
                            c->stride_dz, (float *)GN_PTR(c->part_w), (float *)GN_PTR(c->part_b), c->M, c->r0, c->r1,
                            (int64_t *)GN_PTR(c->counter), c->task_rows, c->tasks, c->N, c->gs, (int)c->is_rms,
                            (int)c->gate_before, (int)c->sigmoid_only);
}

#ifdef _OPENMP
int64_t gn_forward_team_packed(const gn_forward_call *c) {
    gn_quant_out qo;
    return gn_forward_rows_team(GN_PTR(c->x), (int)c->x_dtype, c->stride_x, GN_PTR(c->z), (int)c->z_dtype,
                                c->stride_z, GN_PTR(c->w), (int)c->w_dtype, GN_PTR(c->b), (int)c->b_dtype, GN_PTR(c->y),
                                (int)c->y_dtype, c->stride_y, (float *)GN_PTR(c->mean), (float *)GN_PTR(c->rstd), c->M,
                                (int64_t *)GN_PTR(c->counter), c->chunk_rows, c->N, c->gs, (float)c->eps,
                                (float)c->rstd_max, (int)c->is_rms, (int)c->gate_before, (int)c->sigmoid_only,
                                quant_out_of(&c->quant, &qo), (int)c->threads, (double *)GN_PTR(c->late));
}

int64_t gn_backward_team_packed(const gn_backward_call *c) {
    return gn_backward_rows_team(GN_PTR(c->dy), (int)c->dy_dtype, c->stride_dy, GN_PTR(c->x), (int)c->x_dtype,
                                 c->stride_x, GN_PTR(c->z), (int)c->z_dtype, c->stride_z, GN_PTR(c->w), (int)c->w_dtype,
                                 GN_PTR(c->b), (int)c->b_dtype, (const float *)GN_PTR(c->mean),
                                 (const float *)GN_PTR(c->rstd), GN_PTR(c->dx), (int)c->dx_dtype, c->stride_dx,
                                 GN_PTR(c->dz), (int)c->dz_dtype, c->stride_dz, (float *)GN_PTR(c->part_w),
                                 (float *)GN_PTR(c->part_b), c->M, (int64_t *)GN_PTR(c->counter), c->task_rows,
                                 c->tasks, c->N, c->gs, (int)c->is_rms, (int)c->gate_before, (int)c->sigmoid_only,
                                 (int)c->threads, (double *)GN_PTR(c->late));
}
#endif
