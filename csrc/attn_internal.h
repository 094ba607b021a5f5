/*
 * attn_internal.h -- what the core's own files share: one (batch, head)
 * problem located in every tensor, the mask helpers, the thread pool and
 * the fast kernels' entry points. Not part of the core's public header.
 */
#ifndef ATTN_INTERNAL_H
#define ATTN_INTERNAL_H

#include "attn_core.h"

#include <math.h>
#include <stddef.h>

#define ATTN_CAT_(a, b) a##_##b
#define ATTN_CAT(a, b) ATTN_CAT_(a, b)

#define ATTN_LOG2E 1.4426950408889634

/* Where one (batch, head) problem lives in each tensor. NULL = absent. */
typedef struct {
    int64_t index; /* the problem's number: b * num_heads + h */
    const char *q, *k, *v, *mask, *mask2;
    char *out, *weights, *scores, *logits, *dropout_mask, *dropped;
} attn_head;

/* Does a bool mask of this kind hide the element at p? */
static inline int attn_bool_hides(attn_mask_kind kind, const char *p)
{
    if (kind == ATTN_MASK_BOOL) return *(const unsigned char *)p == 0;
    if (kind == ATTN_MASK_BOOL_BLOCK) return *(const unsigned char *)p != 0;
    return 0;
}

/* Is key j hidden from query row i by the causal mask or a bool mask? */
static inline int attn_blocked(const attn_sdpa_args *a, const attn_head *hd, int64_t i,
                               int64_t j)
{
    if (a->is_causal && j > i) return 1;
    if (j >= a->S - a->extra_keys) return 0; /* bias_k / zero key: never masked */
    return attn_bool_hides(a->mask_kind, hd->mask + i * a->mask.row + j * a->mask.col) ||
           attn_bool_hides(a->mask2_kind, hd->mask2 + i * a->mask2.row + j * a->mask2.col);
}

/* Every allocation of the core goes through these two (attn_core.c): one
   place to count them and, in a fault-injection build, to make one fail. */
void *attn_malloc(size_t n);
void attn_free(void *p);

static inline int64_t attn_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* Where one problem's gradient goes: element (r, c) at data + r*row + c*col. */
typedef struct {
    char *data;
    int64_t row, col;
} attn_mat;

/* Thread pool (attn_parallel.c): fn(ctx, item, thread) for every item, on at
   most max_threads threads; thread is in [0, max_threads). */
void attn_parallel_for(int64_t n, int max_threads,
                       void (*fn)(void *ctx, int64_t item, int thread), void *ctx);

/* Is a worker awake (spinning, or working)? Waking a sleeping one costs
   up to ~0.5 ms: small jobs are better done on the calling thread then. */
int attn_parallel_awake(void);

/* How many threads a job of `flops` floating-point operations should use. */
static inline int attn_threads_for(double flops)
{
    if (flops < 2e5) return 1;                            /* ~ a few microseconds */
    if (flops < 2e7 && !attn_parallel_awake()) return 1;  /* less than a wake-up */
    return attn_get_num_threads();
}

/* Fast kernels (attn_fast.c), float32 and float64. */
#define ATTN_FAST_BR 128  /* query rows per work item */
size_t attn_fast_workspace(const attn_sdpa_args *a); /* bytes per thread */
void attn_fast_rows(attn_kernel kernel, const attn_sdpa_args *a, const attn_head *hd,
                    int64_t i0, int64_t nr, void *workspace);

#define ATTN_LINEAR_BR 128 /* rows per linear work item (the fast kernels' BC) */
size_t attn_fast_linear_workspace(const attn_linear_args *p); /* bytes per thread */
void attn_fast_linear_block(attn_kernel kernel, const attn_linear_args *p, int64_t n,
                            int64_t l0, int64_t nr, int64_t o0, int64_t no, void *workspace);

/* Several linear layers of one x (same data, strides and sizes but O):
   x^T of the row block is packed once for all of them. */
void attn_fast_linear_many(attn_kernel kernel, const attn_linear_args *ps, int count,
                           int64_t n, int64_t l0, int64_t nr, void *workspace);

/* The backward pass's fast kernels: phase 0 (query-major) writes dq rows
   start .. start+n-1 and this problem's stats (m, 1/l, D: 3 x L values);
   phase 1 (key-major) writes dk, dv rows start .. start+n-1 from them. */
size_t attn_fast_backward_workspace(const attn_sdpa_args *a); /* bytes per thread */
void attn_fast_backward_rows(attn_kernel kernel, const attn_sdpa_grad_args *g,
                             const attn_head *hd, const char *dout, int phase, int64_t start,
                             int64_t n, void *stats, attn_mat grad0, attn_mat grad1,
                             void *workspace);

#endif /* ATTN_INTERNAL_H */
