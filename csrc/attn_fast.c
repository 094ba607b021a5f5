/*
 * attn_fast.c -- the fast kernels, built for three instruction sets and two
 * element types from one source (attn_fast.inc) and chosen at run time. Release builds do
 * not depend on -march: each copy carries its own target attribute, and
 * attn_kernel_supported() asks the CPU which copies it can run.
 */
#include "attn_internal.h"

#include <assert.h>
#include <float.h>
#include <stdint.h>
#include <string.h>

#define BR ATTN_FAST_BR /* query rows per tile */
#define BC 128          /* keys per tile */
/*
 * BCS: the row stride of every tile laid out [..][BC] (transposed q or k,
 * scores, their gradients), one cache line more than BC. At a stride of BC
 * floats, 512 bytes, a tile's rows fall into 8 of the L1 cache's 64 sets,
 * and the products that walk down it (p.v reads a column of P for every key)
 * evicted their own rows: the extra line spreads them over all the sets. On
 * a Zen 3 (AVX2), one thread: 1.06-1.18x on the forward without weights,
 * 1.13x with, 1.08x on the backward (bench/README.md).
 */
#define BCS (BC + 16)
/* VS(Dvp): the row stride of the rows p.v products read as their v (v in
   the forward; v, k, q, dO in the backward), one cache line more than their
   Dvp columns for the same reason (a 64-float row is 256 bytes): a further
   1.03-1.04x at E = 64 and 1.11x at E = 128 on the forward without
   weights, 0.99-1.03x and 1.08x on the backward */
#define VS(Dvp) ((Dvp) + 16)

/*
 * The backward's tiles in one thread's workspace, as element offsets from its
 * start, in one place for the kernels and for attn_fast_backward_workspace.
 * Phase A (bwd_query_rows): O holds O, then dq (width max(Ep, Evp)). Phase B
 * (bwd_key_rows): with dq fused (bwd_keys_fused), k's rows and the problem's
 * dq sums (L_pad rows) follow. Ep, Evp: E and Ev rounded up to the copy's
 * 2 VLEN; the workspace is sized with the widest rounding, so every copy's
 * layout fits in it. Every tile but the last is a multiple of 16 elements
 * long (BR, BC and BCS are), so each starts as aligned as the workspace.
 */
typedef struct { size_t Qp, dOp, Kt, Vt, Kp, Vp, S, dP, O, end; } attn_bwd_query_ws;
typedef struct { size_t Kp, Vp, Qt, dOt, Qr, dOr, St, dPt, dK, dV, Kr, dQ, end; } attn_bwd_key_ws;

#define ATTN_WS_TAKE(w, at, field, n) ((w).field = (at), (at) += (size_t)(n))

static inline attn_bwd_query_ws attn_bwd_query_layout(int64_t E, int64_t Ep, int64_t Evp)
{
    attn_bwd_query_ws w;
    size_t at = 0;
    ATTN_WS_TAKE(w, at, Qp, BR * E);
    ATTN_WS_TAKE(w, at, dOp, BR * Evp);
    ATTN_WS_TAKE(w, at, Kt, E * BCS);
    ATTN_WS_TAKE(w, at, Vt, Evp * BCS);
    ATTN_WS_TAKE(w, at, Kp, BC * VS(Ep));
    ATTN_WS_TAKE(w, at, Vp, BC * VS(Evp));
    ATTN_WS_TAKE(w, at, S, BR * BCS);
    ATTN_WS_TAKE(w, at, dP, BR * BCS);
    ATTN_WS_TAKE(w, at, O, BR * (Ep > Evp ? Ep : Evp));
    w.end = at;
    return w;
}

static inline attn_bwd_key_ws attn_bwd_key_layout(int64_t E, int64_t Ep, int64_t Evp,
                                                  int64_t L_pad, int fused)
{
    attn_bwd_key_ws w;
    size_t at = 0;
    ATTN_WS_TAKE(w, at, Kp, BC * E);
    ATTN_WS_TAKE(w, at, Vp, BC * Evp);
    ATTN_WS_TAKE(w, at, Qt, E * BCS);
    ATTN_WS_TAKE(w, at, dOt, Evp * BCS);
    ATTN_WS_TAKE(w, at, Qr, BC * VS(Ep));
    ATTN_WS_TAKE(w, at, dOr, BC * VS(Evp));
    ATTN_WS_TAKE(w, at, St, BC * BCS);
    ATTN_WS_TAKE(w, at, dPt, BC * BCS);
    ATTN_WS_TAKE(w, at, dK, BC * Ep);
    ATTN_WS_TAKE(w, at, dV, BC * Evp);
    ATTN_WS_TAKE(w, at, Kr, fused ? BC * VS(Ep) : 0);
    ATTN_WS_TAKE(w, at, dQ, fused ? L_pad * Ep : 0);
    w.end = at;
    return w;
}

/* Linear layers (attn_fast.inc): W^T is packed kc rows by LIN_LO columns at
   a time, kc = LIN_KC_BYTES / sizeof(T): 384 floats, 192 doubles. The
   panel (384 KiB) stays in a 1 MiB L2, and each pass over K reads and
   writes y once, so fewer passes pay: 2-6% on the bench's projections
   (E = 384 and 768, AMD Zen 4) over 128 floats. (A packed x, the
   backward's transposed dW operand, adds up to 768 KiB of rows beside the
   panel: there it was neither faster nor slower.) Workspaces are sized
   for the widest copy's MR and vectors. */
#define LIN_LO ATTN_LINEAR_COLS
#define LIN_KC_BYTES 1536
#define LIN_MR_MAX 8
#define LIN_VLEN_MAX 16

/* Terms of the sum per pass over a tile, for elements of es bytes: kc, fewer
   for a short K, and one (of nothing) when K = 0, so that a pass still
   writes y = b. */
static inline int64_t attn_linear_kc(int64_t K, int64_t es)
{
    const int64_t kc = LIN_KC_BYTES / es;
    return K < kc ? (K > 0 ? K : 1) : kc;
}

/* Are x's rows read where they lie (contiguous columns, a whole number of
   elements between rows and batches)? Otherwise each block is copied. */
#if ATTN_HAVE_FAST
static int attn_linear_x_in_place(const attn_linear_args *p)
{
    const int64_t es = p->dtype == ATTN_FLOAT64 ? (int64_t)sizeof(double) : (int64_t)sizeof(float);
    return p->x.col == es && p->x.row % es == 0 && p->x.batch % es == 0 &&
           (uintptr_t)p->x.data % (uintptr_t)es == 0;
}
#endif

/*
 * Each instruction set, each element type. VLEN: elements per vector, MR:
 * rows per microkernel tile (more registers, more rows).
 *
 * The kernels are written with GCC's vector extensions, which GCC and clang
 * (Apple's too) both compile; MSVC has none (ATTN_HAVE_FAST 0: the reference
 * kernel only, see csrc/README.md). The x86 copies are compiled for their
 * instruction set with a pragma each compiler honours: GCC's `target`
 * pragma, clang's `attribute push` (clang ignores GCC's, and would build the
 * "avx512" copy for SSE2). NEON is aarch64's baseline: its copy needs no
 * target, and is wider (two NEON registers per vector) than "baseline".
 */
#if defined(__x86_64__) || defined(__i386__)
#define ATTN_X86 1
#else
#define ATTN_X86 0
#endif
#if defined(__aarch64__)
#define ATTN_ARM64 1
#else
#define ATTN_ARM64 0
#endif

/* __builtin_shufflevector: clang, and GCC from version 12 (-DATTN_HAVE_SHUFFLE=0
   builds the element-by-element fallback, for its tests) */
#ifdef ATTN_HAVE_SHUFFLE
#elif defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ATTN_HAVE_SHUFFLE 1
#else
#define ATTN_HAVE_SHUFFLE 0
#endif

#define ATTN_STR_(x) #x
#define ATTN_STR(x) ATTN_STR_(x)
#if defined(__clang__)
#define ATTN_TARGET_BEGIN(isa) \
    _Pragma(ATTN_STR(clang attribute push(__attribute__((target(isa))), apply_to = function)))
#define ATTN_TARGET_END _Pragma("clang attribute pop")
#else
#define ATTN_TARGET_BEGIN(isa) _Pragma("GCC push_options") _Pragma(ATTN_STR(GCC target(isa)))
#define ATTN_TARGET_END _Pragma("GCC pop_options")
#endif

/* ATTN_ISA_AVX512: the copy may use AVX-512's own instructions through
   immintrin.h where the vector extensions have no word for them (V(exp2)) */
#define ATTN_ISA_AVX512 0
#if ATTN_HAVE_FAST && ATTN_X86
#include <immintrin.h>
ATTN_TARGET_BEGIN("avx512f,avx2,fma")
#undef ATTN_ISA_AVX512
#define ATTN_ISA_AVX512 1
#define ISA avx512
#define MR 8
#define VLEN_F32 16
#include "attn_fast_isa.h"
#undef ATTN_ISA_AVX512
#define ATTN_ISA_AVX512 0
ATTN_TARGET_END

ATTN_TARGET_BEGIN("avx2,fma")
#define ISA avx2
#define MR 4
#define VLEN_F32 8
#include "attn_fast_isa.h"
ATTN_TARGET_END
#endif

#if ATTN_HAVE_FAST && ATTN_ARM64
#define ISA neon
#define MR 4
#define VLEN_F32 8
#include "attn_fast_isa.h"
#endif

#if ATTN_HAVE_FAST
/* 16-byte vectors: SSE2 on x86-64, NEON on aarch64, what the compiler has elsewhere */
#define ISA base
#define MR 4
#define VLEN_F32 4
#include "attn_fast_isa.h"
#endif

#if ATTN_X86 && (defined(__GNUC__) || defined(__clang__))
static int attn_cpu_has(int avx512)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           (!avx512 || __builtin_cpu_supports("avx512f"));
}
#else
static int attn_cpu_has(int avx512)
{
    (void)avx512;
    return 0;
}
#endif

int attn_kernel_supported(attn_kernel kernel)
{
    switch (kernel) {
    case ATTN_KERNEL_AUTO:
    case ATTN_KERNEL_REFERENCE: return 1;
    case ATTN_KERNEL_BASELINE: return ATTN_HAVE_FAST;
    case ATTN_KERNEL_AVX2: return ATTN_HAVE_FAST && attn_cpu_has(0);
    case ATTN_KERNEL_AVX512: return ATTN_HAVE_FAST && attn_cpu_has(1);
    case ATTN_KERNEL_NEON: return ATTN_HAVE_FAST && ATTN_ARM64;
    }
    return 0;
}

#if ATTN_HAVE_FAST
size_t attn_fast_workspace(const attn_sdpa_args *a)
{
    /* Qp (BR x E), Kt (E x BC, rows BCS apart), Vp (BC x Evp, rows VS(Evp)
       apart), S (BR x BC, rows BCS apart), O (BR x Evp); Evp rounded for
       the widest vectors */
    size_t E = (size_t)a->E, Evp = (size_t)attn_round_up(a->Ev, 32);
    size_t elem = a->dtype == ATTN_FLOAT64 ? sizeof(double) : sizeof(float);
    return (BR * E + E * BCS + BC * VS(Evp) + BR * BCS + BR * Evp) * elem;
}

size_t attn_fast_linear_workspace(const attn_linear_args *p, int64_t block_rows)
{
    /* Wt (kc x LIN_LO), tmp (one tile), Xp (the block's rows x kc, or one
       tile's rows when x is read in place) */
    size_t elem = p->dtype == ATTN_FLOAT64 ? sizeof(double) : sizeof(float);
    size_t kc = (size_t)attn_linear_kc(p->K, (int64_t)elem);
    size_t rows = (size_t)attn_round_up(block_rows < p->M ? block_rows : p->M, LIN_MR_MAX);
    if (attn_linear_x_in_place(p)) rows = LIN_MR_MAX;
    return (kc * LIN_LO + LIN_MR_MAX * 2 * LIN_VLEN_MAX + rows * kc) * elem;
}

/* One name per (instruction set, element type): pick the function (of the
   copies this machine has; the planner never asks for another). */
#if ATTN_X86
#define ATTN_PICK(fn, kernel, sfx)                                    \
    ((kernel) == ATTN_KERNEL_AVX512 ? fn##_avx512_##sfx                \
     : (kernel) == ATTN_KERNEL_AVX2 ? fn##_avx2_##sfx : fn##_base_##sfx)
#elif ATTN_ARM64
#define ATTN_PICK(fn, kernel, sfx) \
    ((kernel) == ATTN_KERNEL_NEON ? fn##_neon_##sfx : fn##_base_##sfx)
#else
#define ATTN_PICK(fn, kernel, sfx) ((void)(kernel), fn##_base_##sfx)
#endif

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

size_t attn_fast_backward_workspace(const attn_sdpa_args *a, int fused)
{
    const int64_t Ep = attn_round_up(a->E, 32), Evp = attn_round_up(a->Ev, 32);
    size_t elem = a->dtype == ATTN_FLOAT64 ? sizeof(double) : sizeof(float);
    size_t phase_a = attn_bwd_query_layout(a->E, Ep, Evp).end;
    size_t phase_b = attn_bwd_key_layout(a->E, Ep, Evp, attn_round_up(a->L, BR), fused).end;
    return (phase_a > phase_b ? phase_a : phase_b) * elem;
}

int attn_fast_backward_rows(attn_kernel kernel, const attn_sdpa_grad_args *g,
                            const attn_head *hd, const char *dout, int phase, int fused,
                            int64_t start, int64_t n, void *stats, attn_mat dq, attn_mat dk,
                            attn_mat dv, void *ws)
{
    attn_mat no_dq = {NULL, 0, 0}; /* fused: phase 0 writes the stats only */
    if (g->fwd.dtype == ATTN_FLOAT64) {
        if (phase == 0)
            return ATTN_PICK(bwd_query_rows, kernel, f64)(g, hd, dout, start, n, stats,
                                                          fused ? no_dq : dq, ws);
        if (fused) ATTN_PICK(bwd_keys_fused, kernel, f64)(g, hd, dout, stats, dq, dk, dv, ws);
        else ATTN_PICK(bwd_key_rows, kernel, f64)(g, hd, dout, start, n, stats, dk, dv, ws, NULL);
    } else {
        if (phase == 0)
            return ATTN_PICK(bwd_query_rows, kernel, f32)(g, hd, dout, start, n, stats,
                                                          fused ? no_dq : dq, ws);
        if (fused) ATTN_PICK(bwd_keys_fused, kernel, f32)(g, hd, dout, stats, dq, dk, dv, ws);
        else ATTN_PICK(bwd_key_rows, kernel, f32)(g, hd, dout, start, n, stats, dk, dv, ws, NULL);
    }
    return 0;
}

int attn_fast_rows(attn_kernel kernel, const attn_sdpa_args *a, const attn_head *hd,
                   int64_t nheads, int64_t i0, int64_t nr, void *ws)
{
    /* which fast kernel: a decoding step's few rows (the only one that takes
       a group of heads), the weights map, or tiles */
    const int use_rows = hd->weights == NULL && attn_fast_use_rows(a);
    if (use_rows) {
        return a->dtype == ATTN_FLOAT64
                   ? ATTN_PICK(decode_rows, kernel, f64)(a, hd, nheads, i0, nr, ws)
                   : ATTN_PICK(decode_rows, kernel, f32)(a, hd, nheads, i0, nr, ws);
    }
    assert(nheads == 1);
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
    float r = ATTN_PICK(fma_loop, job->kernel, f32)(job->iters, job->seed);
    job->sink += r; /* racy on purpose: only keeps the result alive */
}

double attn_fma_peak_gflops(int threads, int64_t iters)
{
    attn_fma_job job = {.kernel = attn_get_kernel(), .iters = iters, .seed = 1.0f};
    if (job.kernel == ATTN_KERNEL_REFERENCE) job.kernel = ATTN_KERNEL_BASELINE;
    int vlen = job.kernel == ATTN_KERNEL_AVX512                                ? 16
               : job.kernel == ATTN_KERNEL_AVX2 || job.kernel == ATTN_KERNEL_NEON ? 8
                                                                                : 4;
    double t0 = attn_seconds();
    attn_parallel_for(threads, threads, attn_fma_item, &job, NULL);
    double seconds = attn_seconds() - t0;
    return (double)threads * (double)iters * 12.0 * vlen * 2.0 / seconds / 1e9;
}

#else /* !ATTN_HAVE_FAST: no vector extensions (MSVC); the planner never
         picks a tiled kernel (attn_kernel_supported), so these never run */

size_t attn_fast_workspace(const attn_sdpa_args *a) { (void)a; return 0; }
size_t attn_fast_linear_workspace(const attn_linear_args *p, int64_t block_rows)
{
    (void)p, (void)block_rows;
    return 0;
}
size_t attn_fast_backward_workspace(const attn_sdpa_args *a, int fused)
{
    (void)a, (void)fused;
    return 0;
}

void attn_fast_linear_block(attn_kernel kernel, const attn_linear_args *p, int64_t n,
                            int64_t l0, int64_t nr, int64_t o0, int64_t no, void *ws)
{
    (void)kernel, (void)p, (void)n, (void)l0, (void)nr, (void)o0, (void)no, (void)ws;
}

int attn_fast_backward_rows(attn_kernel kernel, const attn_sdpa_grad_args *g,
                            const attn_head *hd, const char *dout, int phase, int fused,
                            int64_t start, int64_t n, void *stats, attn_mat dq, attn_mat dk,
                            attn_mat dv, void *ws)
{
    (void)kernel, (void)g, (void)hd, (void)dout, (void)phase, (void)fused, (void)start;
    (void)n, (void)stats, (void)dq, (void)dk, (void)dv, (void)ws;
    return 1;
}

int attn_fast_rows(attn_kernel kernel, const attn_sdpa_args *a, const attn_head *hd,
                   int64_t nheads, int64_t i0, int64_t nr, void *ws)
{
    (void)kernel, (void)a, (void)hd, (void)nheads, (void)i0, (void)nr, (void)ws;
    return 1;
}

double attn_fma_peak_gflops(int threads, int64_t iters)
{
    (void)threads, (void)iters;
    return 0.0;
}
#endif
