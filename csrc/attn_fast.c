/*
 * attn_fast.c -- the fast kernels, built for three instruction sets and two
 * element types from one source (attn_fast.inc) and chosen at run time. Release builds do
 * not depend on -march: each copy carries its own target attribute, and
 * attn_kernel_supported() asks the CPU which copies it can run.
 */
#include "attn_internal.h"

#include <float.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define BR ATTN_FAST_BR /* query rows per tile */
#define BC 128          /* keys per tile */

/* Each instruction set, each element type. VLEN: elements per vector, MR:
   rows per microkernel tile (more registers, more rows). */
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define ISA avx512
#define MR 8
#define ATTN_F64 0
#define VLEN 16
#include "attn_fast_instance.h"
#define ATTN_F64 1
#define VLEN 8
#include "attn_fast_instance.h"
#undef ISA
#undef MR
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA avx2
#define MR 4
#define ATTN_F64 0
#define VLEN 8
#include "attn_fast_instance.h"
#define ATTN_F64 1
#define VLEN 4
#include "attn_fast_instance.h"
#undef ISA
#undef MR
#pragma GCC pop_options

#define ISA base
#define MR 4
#define ATTN_F64 0
#define VLEN 4
#include "attn_fast_instance.h"
#define ATTN_F64 1
#define VLEN 2
#include "attn_fast_instance.h"
#undef ISA
#undef MR

int attn_kernel_supported(attn_kernel kernel)
{
    switch (kernel) {
    case ATTN_KERNEL_AUTO:
    case ATTN_KERNEL_REFERENCE:
    case ATTN_KERNEL_BASELINE: return 1;
    case ATTN_KERNEL_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ATTN_KERNEL_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma");
    }
    return 0;
}

size_t attn_fast_workspace(const attn_sdpa_args *a)
{
    /* Qp (BR x E), Kt (E x BC), Vp (BC x Evp), S (BR x BC), O (BR x Evp);
       Evp rounded for the widest vectors */
    size_t E = (size_t)a->E, Evp = (size_t)attn_round_up(a->Ev, 32);
    size_t elem = a->dtype == ATTN_FLOAT64 ? sizeof(double) : sizeof(float);
    return (BR * E + E * BC + BC * Evp + BR * BC + BR * Evp) * elem;
}

size_t attn_fast_linear_workspace(const attn_linear_args *p)
{
    /* Xt (K x BC), Wp (64 x K), Y (64 x BC) */
    size_t K = (size_t)p->K;
    size_t elem = p->dtype == ATTN_FLOAT64 ? sizeof(double) : sizeof(float);
    return (K * BC + 64 * K + 64 * BC) * elem;
}

/* One name per (instruction set, element type): pick the function. */
#define ATTN_PICK(fn, kernel, sfx)                                    \
    ((kernel) == ATTN_KERNEL_AVX512 ? fn##_avx512_##sfx                \
     : (kernel) == ATTN_KERNEL_AVX2 ? fn##_avx2_##sfx : fn##_base_##sfx)

void attn_fast_linear_block(attn_kernel kernel, const attn_linear_args *p, int64_t n,
                            int64_t l0, int64_t nr, int64_t o0, int64_t no, void *ws)
{
    if (p->dtype == ATTN_FLOAT64) {
        void (*fn)(const attn_linear_args *, int64_t, int64_t, int64_t, int64_t, int64_t,
                   double *) = ATTN_PICK(linear_block, kernel, f64);
        fn(p, n, l0, nr, o0, no, ws);
    } else {
        void (*fn)(const attn_linear_args *, int64_t, int64_t, int64_t, int64_t, int64_t,
                   float *) = ATTN_PICK(linear_block, kernel, f32);
        fn(p, n, l0, nr, o0, no, ws);
    }
}

size_t attn_fast_backward_workspace(const attn_sdpa_args *a)
{
    size_t E = (size_t)a->E, Ep = (size_t)attn_round_up(a->E, 32);
    size_t Evp = (size_t)attn_round_up(a->Ev, 32), W = Ep > Evp ? Ep : Evp;
    size_t elem = a->dtype == ATTN_FLOAT64 ? sizeof(double) : sizeof(float);
    size_t phase_a = BR * E + BR * Evp + E * BC + Evp * BC + BC * Ep + BC * Evp + 2 * BR * BC +
                     BR * W;
    size_t phase_b = BC * E + BC * Evp + E * BC + Evp * BC + BC * Ep + BC * Evp + 2 * BC * BC +
                     BC * Ep + BC * Evp;
    return (phase_a > phase_b ? phase_a : phase_b) * elem;
}

int attn_fast_backward_rows(attn_kernel kernel, const attn_sdpa_grad_args *g,
                            const attn_head *hd, const char *dout, int phase, int64_t start,
                            int64_t n, void *stats, attn_mat grad0, attn_mat grad1, void *ws)
{
    if (g->fwd.dtype == ATTN_FLOAT64) {
        if (phase == 0)
            return ATTN_PICK(bwd_query_rows, kernel, f64)(g, hd, dout, start, n, stats, grad0, ws);
        ATTN_PICK(bwd_key_rows, kernel, f64)(g, hd, dout, start, n, stats, grad0, grad1, ws);
    } else {
        if (phase == 0)
            return ATTN_PICK(bwd_query_rows, kernel, f32)(g, hd, dout, start, n, stats, grad0, ws);
        ATTN_PICK(bwd_key_rows, kernel, f32)(g, hd, dout, start, n, stats, grad0, grad1, ws);
    }
    return 0;
}

int attn_fast_rows(attn_kernel kernel, const attn_sdpa_args *a, const attn_head *hd,
                   int64_t i0, int64_t nr, void *ws)
{
    if (a->dtype == ATTN_FLOAT64) {
        int (*fn)(const attn_sdpa_args *, const attn_head *, int64_t, int64_t, double *) =
            hd->weights ? ATTN_PICK(weights_rows, kernel, f64) : ATTN_PICK(flash_rows, kernel, f64);
        return fn(a, hd, i0, nr, ws);
    }
    int (*fn)(const attn_sdpa_args *, const attn_head *, int64_t, int64_t, float *) =
        hd->weights ? ATTN_PICK(weights_rows, kernel, f32) : ATTN_PICK(flash_rows, kernel, f32);
    return fn(a, hd, i0, nr, ws);
}

/* ------------------------------------------------------------------------ */
/* FMA peak                                                                  */

typedef struct {
    attn_kernel kernel;
    int64_t iters;
    volatile float seed, sink;
} attn_fma_job;

static void attn_fma_item(void *ctx, int64_t item, int thread)
{
    (void)item;
    (void)thread;
    attn_fma_job *job = ctx;
    float r;
    switch (job->kernel) {
    case ATTN_KERNEL_AVX512: r = fma_loop_avx512_f32(job->iters, job->seed); break;
    case ATTN_KERNEL_AVX2: r = fma_loop_avx2_f32(job->iters, job->seed); break;
    default: r = fma_loop_base_f32(job->iters, job->seed); break;
    }
    job->sink += r; /* racy on purpose: only keeps the result alive */
}

double attn_fma_peak_gflops(int threads, int64_t iters)
{
    attn_fma_job job = {.kernel = attn_get_kernel(), .iters = iters, .seed = 1.0f};
    if (job.kernel == ATTN_KERNEL_REFERENCE) job.kernel = ATTN_KERNEL_BASELINE;
    int vlen = job.kernel == ATTN_KERNEL_AVX512 ? 16 : job.kernel == ATTN_KERNEL_AVX2 ? 8 : 4;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    attn_parallel_for(threads, threads, attn_fma_item, &job, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return (double)threads * (double)iters * 12.0 * vlen * 2.0 / seconds / 1e9;
}
