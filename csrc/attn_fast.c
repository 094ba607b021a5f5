/*
 * attn_fast.c -- the fast float32 kernels, built for three instruction sets
 * from one source (attn_fast.inc) and chosen at run time. Release builds do
 * not depend on -march: each copy carries its own target attribute, and
 * attn_kernel_supported() asks the CPU which copies it can run.
 */
#include "attn_internal.h"

#include <stdint.h>
#include <time.h>

#define BR ATTN_FAST_BR /* query rows per tile */
#define BC 128          /* keys per tile */

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define ISA avx512
#define VLEN 16
#define MR 8
#include "attn_fast.inc"
#undef ISA
#undef VLEN
#undef MR
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA avx2
#define VLEN 8
#define MR 4
#include "attn_fast.inc"
#undef ISA
#undef VLEN
#undef MR
#pragma GCC pop_options

#define ISA base
#define VLEN 4
#define MR 4
#include "attn_fast.inc"
#undef ISA
#undef VLEN
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
    return BR * E + E * BC + BC * Evp + BR * BC + BR * Evp;
}

size_t attn_fast_linear_workspace(const attn_linear_args *p)
{
    size_t K = (size_t)p->K;
    return BR * K + K * BC + BR * BC;
}

void attn_fast_linear_block(attn_kernel kernel, const attn_linear_args *p, int64_t n,
                            int64_t l0, int64_t nr, int64_t o0, int64_t no, float *ws)
{
    switch (kernel) {
    case ATTN_KERNEL_AVX512: linear_block_avx512(p, n, l0, nr, o0, no, ws); break;
    case ATTN_KERNEL_AVX2: linear_block_avx2(p, n, l0, nr, o0, no, ws); break;
    default: linear_block_base(p, n, l0, nr, o0, no, ws); break;
    }
}

void attn_fast_rows(attn_kernel kernel, const attn_sdpa_args *a, const attn_head *hd,
                    int64_t i0, int64_t nr, float *ws)
{
    switch (kernel) {
    case ATTN_KERNEL_AVX512:
        if (hd->weights) weights_rows_avx512(a, hd, i0, nr, ws);
        else flash_rows_avx512(a, hd, i0, nr, ws);
        break;
    case ATTN_KERNEL_AVX2:
        if (hd->weights) weights_rows_avx2(a, hd, i0, nr, ws);
        else flash_rows_avx2(a, hd, i0, nr, ws);
        break;
    default:
        if (hd->weights) weights_rows_base(a, hd, i0, nr, ws);
        else flash_rows_base(a, hd, i0, nr, ws);
        break;
    }
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
    case ATTN_KERNEL_AVX512: r = fma_loop_avx512(job->iters, job->seed); break;
    case ATTN_KERNEL_AVX2: r = fma_loop_avx2(job->iters, job->seed); break;
    default: r = fma_loop_base(job->iters, job->seed); break;
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
    attn_parallel_for(threads, threads, attn_fma_item, &job);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return (double)threads * (double)iters * 12.0 * vlen * 2.0 / seconds / 1e9;
}
