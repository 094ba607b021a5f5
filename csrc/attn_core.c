/*
 * attn_core.c -- scaled dot-product attention and linear layers over strided
 * views. See attn_core.h for the problem and the conventions.
 */
#include "attn_internal.h"

#include <assert.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/*
 * Dropout decisions from a counter-based hash (the splitmix64 finaliser):
 * element `index` is kept when a uniform number in [0, 1) drawn from
 * (seed, index) is >= p. No generator state: any thread can decide any
 * element, and the same seed gives the same mask.
 */
int attn_dropout_keep(uint64_t seed, uint64_t index, double p)
{
    uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    double u = (double)(z >> 11) * 0x1.0p-53;
    return u >= p;
}

/* The factor dropout multiplies weight (i, j) by: 0, or 1 / (1 - p). */
static inline double attn_dropout_factor(const attn_sdpa_args *a, const attn_head *hd,
                                         int64_t i, int64_t j)
{
    if (a->dropout_p <= 0.0) return 1.0;
    uint64_t index = ((uint64_t)hd->index * (uint64_t)a->L + (uint64_t)i) * (uint64_t)a->S +
                     (uint64_t)j;
    return attn_dropout_keep(a->dropout_seed, index, a->dropout_p) ? 1.0 / (1.0 - a->dropout_p)
                                                                    : 0.0;
}

/* ------------------------------------------------------------------------ */
/* Allocation                                                                 */

#ifdef ATTN_FAULT_INJECTION
static atomic_llong fault_countdown; /* > 0: the allocation that brings it to 0 fails */
static atomic_llong fault_counted;   /* allocations since the last attn_fault_inject */
static atomic_llong fault_live;      /* attn_malloc blocks not yet freed */

int64_t attn_fault_inject(int64_t n, int64_t *live)
{
    atomic_store(&fault_countdown, n > 0 ? n : 0);
    if (live) *live = atomic_load(&fault_live);
    return atomic_exchange(&fault_counted, 0);
}

int attn_fault_next(void)
{
    atomic_fetch_add(&fault_counted, 1);
    /* decrement only while positive: exactly one allocation sees 1 -> 0 */
    long long c = atomic_load(&fault_countdown);
    while (c > 0 && !atomic_compare_exchange_weak(&fault_countdown, &c, c - 1)) {
    }
    return c == 1;
}
#endif

void *attn_malloc(size_t n)
{
#ifdef ATTN_FAULT_INJECTION
    if (attn_fault_next()) return NULL;
    void *p = malloc(n);
    if (p) atomic_fetch_add(&fault_live, 1);
    return p;
#else
    return malloc(n);
#endif
}

void attn_free(void *p)
{
#ifdef ATTN_FAULT_INJECTION
    if (p) atomic_fetch_sub(&fault_live, 1);
#endif
    free(p);
}

/* The reference kernels, for each element type (the names they define are
   listed at the top of each file): attn_kernels.inc has the helpers, the
   backward and the linear layer, attn_reference.inc the forward. */
#define FN(name) ATTN_CAT(name, SFX)
/* Element (i, j) of a strided matrix at base with byte strides rs, cs. */
#define AT(base, i, j, rs, cs) (*(T *)((base) + (i) * (rs) + (j) * (cs)))

#define T float
#define SFX f32
#include "attn_kernels.inc"
#include "attn_reference.inc"
#undef T
#undef SFX

#define T double
#define SFX f64
#include "attn_kernels.inc"
#include "attn_reference.inc"
#undef T
#undef SFX

#undef AT
#undef FN

/* base + offset, or NULL when the tensor is absent. */
static inline char *attn_at(char *base, int64_t offset)
{
    return base ? base + offset : NULL;
}

/*
 * Problem p = b * num_heads + h: unravel the batch index b over batch_shape
 * (C order) and add index * stride in every tensor. Query head h reads
 * key/value head h / (num_heads / num_kv_heads).
 */
static void attn_locate(const attn_sdpa_args *a, int64_t p, attn_head *hd)
{
    enum { Q, K, V, M, M2, AL, OUT, W, SC, LG, DM, DR, LSE, NT };
    const attn_view *views[NT] = {&a->q, &a->k, &a->v, &a->mask, &a->mask2, &a->alibi,
                                  &a->out, &a->weights, &a->scores, &a->logits,
                                  &a->dropout_mask, &a->dropped, &a->lse};
    int64_t h = p % a->num_heads, b = p / a->num_heads;
    int64_t h_kv = h / (a->num_heads / a->num_kv_heads);
    int64_t off[NT];
    for (int t = 0; t < NT; t++) off[t] = (t == K || t == V ? h_kv : h) * views[t]->head;
    for (int d = a->nbatch - 1; d >= 0; d--) {
        int64_t idx = b % a->batch_shape[d];
        b /= a->batch_shape[d];
        for (int t = 0; t < NT; t++) off[t] += idx * views[t]->batch[d];
    }
    hd->index = p;
    hd->q = attn_at(a->q.data, off[Q]);
    hd->k = attn_at(a->k.data, off[K]);
    hd->v = attn_at(a->v.data, off[V]);
    hd->mask = a->mask_kind == ATTN_MASK_NONE ? NULL : a->mask.data + off[M];
    hd->mask2 = a->mask2_kind == ATTN_MASK_NONE ? NULL : a->mask2.data + off[M2];
    hd->alibi = a->alibi.data ? (const double *)(a->alibi.data + off[AL]) : NULL;
    hd->out = attn_at(a->out.data, off[OUT]);
    hd->weights = attn_at(a->weights.data, off[W]);
    hd->scores = attn_at(a->scores.data, off[SC]);
    hd->logits = attn_at(a->logits.data, off[LG]);
    hd->dropout_mask = attn_at(a->dropout_mask.data, off[DM]);
    hd->dropped = attn_at(a->dropped.data, off[DR]);
    hd->lse = attn_at(a->lse.data, off[LSE]);
}

/* The number of (batch, head) problems. */
static int64_t attn_problems(const attn_sdpa_args *a)
{
    int64_t n = a->num_heads;
    for (int d = 0; d < a->nbatch; d++) n *= a->batch_shape[d];
    return n;
}

#ifndef NDEBUG
/*
 * What the binding has validated about a problem (the boundary rule,
 * csrc/README.md): the core trusts it and checks it in debug builds only.
 * Sizes are not negative, query heads are a multiple of key/value heads,
 * every tensor the call reads is there, dropout_p is a probability.
 */
static int attn_problem_valid(const attn_sdpa_args *a)
{
    return a->nbatch >= 0 && a->nbatch <= ATTN_MAX_DIMS && a->num_heads >= 0 &&
           a->num_kv_heads > 0 && a->num_heads % a->num_kv_heads == 0 && a->L >= 0 &&
           a->S >= 0 && a->E >= 0 && a->Ev >= 0 && a->extra_keys >= 0 &&
           a->extra_keys <= a->S && a->q.data && a->k.data && a->v.data &&
           (a->mask_kind == ATTN_MASK_NONE || a->mask.data) &&
           (a->mask2_kind == ATTN_MASK_NONE || a->mask2.data) && a->dropout_p >= 0.0 &&
           a->dropout_p <= 1.0 && a->query_offset >= 0 && a->query_offset <= ATTN_MAX_EXTENT &&
           (!a->window || (a->window_left >= 0 && a->window_left <= ATTN_MAX_EXTENT &&
                           a->window_right >= 0 && a->window_right <= ATTN_MAX_EXTENT)) &&
           (a->dtype == ATTN_FLOAT32 || a->dtype == ATTN_FLOAT64);
}
#endif

/* ------------------------------------------------------------------------ */
/* Choosing a kernel, and the parallel loop                                   */

static atomic_int kernel_choice = ATTN_KERNEL_AUTO;

int attn_set_kernel(attn_kernel kernel)
{
    if (!attn_kernel_supported(kernel)) return ATTN_EINVAL;
    atomic_store(&kernel_choice, (int)kernel);
    return ATTN_OK;
}

attn_kernel attn_kernel_selected(void) { return (attn_kernel)atomic_load(&kernel_choice); }

attn_kernel attn_get_kernel(void)
{
    attn_kernel k = attn_kernel_selected();
    if (k != ATTN_KERNEL_AUTO) return k;
    if (attn_kernel_supported(ATTN_KERNEL_AVX512)) return ATTN_KERNEL_AVX512;
    if (attn_kernel_supported(ATTN_KERNEL_AVX2)) return ATTN_KERNEL_AVX2;
    if (attn_kernel_supported(ATTN_KERNEL_NEON)) return ATTN_KERNEL_NEON;
    if (attn_kernel_supported(ATTN_KERNEL_BASELINE)) return ATTN_KERNEL_BASELINE;
    return ATTN_KERNEL_REFERENCE; /* a compiler without vector extensions */
}

/* One call's work: the plan, and its workspace. Items are (problem, block of
   query rows), as many rows as the plan says. */
typedef struct {
    const attn_sdpa_args *a;
    const attn_plan *plan;
    char *work;            /* per-thread workspaces, plan->work_size bytes each */
    atomic_int overflow;   /* tiled kernels: a tile could overflow (rule 6) */
} attn_sdpa_job;

static void attn_sdpa_item(void *ctx, int64_t item, int thread)
{
    attn_sdpa_job *job = ctx;
    const attn_sdpa_args *a = job->a;
    const attn_plan *plan = job->plan;
    void *work = job->work + (size_t)thread * plan->work_size;
    /* the last query blocks first: under a causal mask they cost the most */
    int64_t blocks = plan->blocks[0], br = plan->block_rows;
    int64_t i0 = (blocks - 1 - item % blocks) * br, nr = a->L - i0 < br ? a->L - i0 : br;
    attn_head hd[ATTN_FAST_GROUP_MAX];
    const int64_t nh = plan->heads_per_item;
    for (int64_t h = 0; h < nh; h++) attn_locate(a, item / blocks * nh + h, &hd[h]);
    if (plan->kernel == ATTN_KERNEL_REFERENCE) {
        if (a->dtype == ATTN_FLOAT32) {
            if (hd->weights) attn_reference_f32(a, hd, i0, nr, work);
            else attn_reference_streaming_f32(a, hd, i0, nr, work);
        } else {
            if (hd->weights) attn_reference_f64(a, hd, i0, nr, work);
            else attn_reference_streaming_f64(a, hd, i0, nr, work);
        }
        return;
    }
    if (atomic_load_explicit(&job->overflow, memory_order_relaxed)) return; /* redone anyway */
    if (attn_fast_rows(plan->kernel, a, hd, nh, i0, nr, work)) atomic_store(&job->overflow, 1);
}

int attn_sdpa(const attn_sdpa_args *a) { return attn_sdpa_forced(a, NULL); }

int attn_sdpa_forced(const attn_sdpa_args *a, const attn_force *force)
{
    assert(attn_problem_valid(a) && a->out.data);
    assert(a->weights.data || (!a->scores.data && !a->logits.data && !a->dropout_mask.data &&
                               !a->dropped.data)); /* the trace needs the weights */

    if (a->E == 0 && a->scale != 0.0) {
        /* q k^T is an empty sum, 0, whatever the scale (torch scales q and k
           by sqrt(scale) first, so its scores are 0 too, even for the default
           scale 1 / sqrt(0) = inf, where scale * 0 would be NaN) */
        attn_sdpa_args zero_width = *a;
        zero_width.scale = 0.0;
        return attn_sdpa_forced(&zero_width, force);
    }
    int64_t nproblems = attn_problems(a);
    /* nothing to write: return before walking (maybe billions of) empty problems */
    if (nproblems == 0 || a->L == 0 ||
        (a->Ev == 0 && (!a->weights.data || a->S == 0) && !a->lse.data)) {
        if (a->ran) *a->ran = (attn_ran){.kernel = attn_get_kernel(), .reason = ATTN_REASON_EMPTY};
        return ATTN_OK;
    }

    attn_plan plan;
    attn_workspace ws;
    attn_cancel cancel;
    attn_cancel_init(&cancel, a->interrupt);
    attn_plan_sdpa(a, nproblems, force, &plan);
    int status = attn_plan_alloc(&plan, &ws);
    if (status == ATTN_OK) {
        attn_sdpa_job job = {.a = a, .plan = &plan, .work = ws.work};
        atomic_init(&job.overflow, 0);
        attn_parallel_for(plan.items, plan.threads, attn_sdpa_item, &job, &cancel);
        attn_plan_free(&ws);
        if (!atomic_load(&cancel.stop) && atomic_load(&job.overflow)) {
            /* NaN policy rule 6 (attn_core.h): a tile's T could overflow; the
               reference kernel (in double) does the whole call again */
            attn_plan_use_reference(&plan, ATTN_REASON_QK_OVERFLOW);
            status = attn_plan_alloc(&plan, &ws);
            if (status == ATTN_OK) {
                job.work = ws.work;
                attn_parallel_for(plan.items, plan.threads, attn_sdpa_item, &job, &cancel);
                attn_plan_free(&ws);
            }
        }
        if (status == ATTN_OK && atomic_load(&cancel.stop)) status = ATTN_EINTR;
    }
    if (a->ran) *a->ran = (attn_ran){.kernel = (int)plan.kernel, .reason = (int)plan.reason};
    return status;
}

/* ------------------------------------------------------------------------ */
/* The backward pass                                                          */

typedef struct {
    const attn_sdpa_grad_args *g;
    attn_sdpa_args locate_grad;  /* fwd, with grad_out / weights / trace as views */
    attn_sdpa_args locate_dst;   /* fwd, with q / k / v as the destination views */
    const attn_plan *plan;       /* REFERENCE: one item per problem */
    int phase;                   /* tiled kernels: 0 query-major, 1 key-major */
    char *stats;                 /* tiled kernels: 3 x L values per problem */
    atomic_int nonfinite;        /* tiled kernels: a gradient came out NaN or inf */
    atomic_int overflow;         /* tiled kernels: a tile could overflow (rule 6) */
    attn_cancel *cancel;
    char *work;
} attn_backward_job;

static void attn_backward_item(void *ctx, int64_t item, int thread)
{
    attn_backward_job *job = ctx;
    const attn_sdpa_grad_args *g = job->g;
    const attn_sdpa_args *a = &g->fwd;
    const attn_plan *plan = job->plan;
    const int64_t blocks = plan->blocks[job->phase];
    int64_t p = plan->kernel == ATTN_KERNEL_REFERENCE ? item : item / blocks;
    attn_head hd, hg; /* the problem in the inputs; in dO, weights and the trace */
    attn_locate(a, p, &hd);
    attn_locate(&job->locate_grad, p, &hg);
    size_t es = a->dtype == ATTN_FLOAT32 ? sizeof(float) : sizeof(double);
    /* each gradient: through its destination view, or into its slab */
    attn_head hdst;
    attn_locate(&job->locate_dst, p, &hdst);
    attn_mat dq = g->grad_q.data ? (attn_mat){(char *)hdst.q, g->grad_q.row, g->grad_q.col}
                                 : (attn_mat){g->dq + (size_t)p * (size_t)(a->L * a->E) * es,
                                              a->E * (int64_t)es, (int64_t)es};
    attn_mat dk = g->grad_k.data ? (attn_mat){(char *)hdst.k, g->grad_k.row, g->grad_k.col}
                                 : (attn_mat){g->dk + (size_t)p * (size_t)(a->S * a->E) * es,
                                              a->E * (int64_t)es, (int64_t)es};
    attn_mat dv = g->grad_v.data ? (attn_mat){(char *)hdst.v, g->grad_v.row, g->grad_v.col}
                                 : (attn_mat){g->dv + (size_t)p * (size_t)(a->S * a->Ev) * es,
                                              a->Ev * (int64_t)es, (int64_t)es};
    char *work = job->work + (size_t)thread * plan->work_size;
    if (plan->kernel != ATTN_KERNEL_REFERENCE) {
        /* fused: phase 1's item is the whole problem, and writes dq too */
        const int fused = plan->bwd_fused_dq;
        int64_t rows = job->phase == 0 ? a->L : a->S;
        int64_t br = fused && job->phase == 1 ? rows : plan->block_rows, start = item % blocks * br;
        int64_t n = rows - start < br ? rows - start : br;
        char *stats = job->stats + (size_t)p * (size_t)(3 * a->L) * es;
        if (atomic_load_explicit(&job->overflow, memory_order_relaxed)) return; /* redone */
        if (attn_fast_backward_rows(plan->kernel, g, &hd, hg.out, job->phase, fused, start, n,
                                    stats, dq, dk, dv, work)) {
            atomic_store(&job->overflow, 1); /* NaN policy rule 6 */
            return;
        }
        /* NaN policy rule 5, on the rows just written, while they are in cache */
        int finite = job->phase == 0
                         ? fused || attn_policy_grad_finite(a->dtype, dq, start, n, a->E)
                         : attn_policy_grad_finite(a->dtype, dk, start, n, a->E) &&
                               attn_policy_grad_finite(a->dtype, dv, start, n, a->Ev) &&
                               (!fused || attn_policy_grad_finite(a->dtype, dq, 0, a->L, a->E));
        if (!finite) atomic_store(&job->nonfinite, 1);
        return;
    }
    /* hg.out is dO, hg.weights the given weights, hg.scores / hg.logits the trace */
    if (a->dtype == ATTN_FLOAT32)
        attn_reference_backward_f32(g, &hd, hg.weights, hg.out, dq, dk, dv, hg.scores,
                                    hg.logits, (double *)work, job->cancel, thread);
    else
        attn_reference_backward_f64(g, &hd, hg.weights, hg.out, dq, dk, dv, hg.scores,
                                    hg.logits, (double *)work, job->cancel, thread);
}

/* Do the gradients (and the trace) of one problem hold no element at all? */
static int attn_grads_empty(const attn_sdpa_grad_args *g)
{
    const attn_sdpa_args *a = &g->fwd;
    int trace = g->grad_weights.data || g->grad_scores.data;
    return (a->L == 0 || a->E == 0) && (a->S == 0 || (a->E == 0 && a->Ev == 0)) &&
           (!trace || a->L == 0 || a->S == 0);
}

int attn_sdpa_backward(const attn_sdpa_grad_args *g)
{
    return attn_sdpa_backward_forced(g, NULL);
}

int attn_sdpa_backward_forced(const attn_sdpa_grad_args *g, const attn_force *force)
{
    const attn_sdpa_args *a = &g->fwd;
    assert(attn_problem_valid(a) && g->grad_out.data);
    assert((g->dq || g->grad_q.data) && (g->dk || g->grad_k.data) && (g->dv || g->grad_v.data));
    if (a->E == 0 && a->scale != 0.0) { /* the scores are 0: see attn_sdpa */
        attn_sdpa_grad_args zero_width = *g;
        zero_width.fwd.scale = 0.0;
        return attn_sdpa_backward_forced(&zero_width, force);
    }
    int64_t nproblems = attn_problems(a);
    if (nproblems == 0 || attn_grads_empty(g)) return ATTN_OK;

    attn_plan plan;
    attn_workspace ws;
    attn_cancel cancel;
    attn_cancel_init(&cancel, a->interrupt);
    attn_plan_backward(g, nproblems, force, &plan);
    /* a second description whose out / weights / scores / logits views are
       dO, the given weights and the trace, so attn_locate finds them too */
    attn_backward_job job = {.g = g, .locate_grad = *a, .plan = &plan, .cancel = &cancel};
    atomic_init(&job.nonfinite, 0);
    atomic_init(&job.overflow, 0);
    job.locate_grad.out = g->grad_out;
    job.locate_grad.weights = g->weights;
    job.locate_grad.scores = g->grad_weights;
    job.locate_grad.logits = g->grad_scores;
    job.locate_dst = *a; /* q, k, v: the destination views (NULL: slabs) */
    job.locate_dst.q = g->grad_q;
    job.locate_dst.k = g->grad_k;
    job.locate_dst.v = g->grad_v;

    if (attn_plan_alloc(&plan, &ws) != ATTN_OK) return ATTN_ENOMEM;
    job.work = ws.work;
    if (plan.kernel != ATTN_KERNEL_REFERENCE) {
        job.stats = ws.shared;
        for (job.phase = 0; job.phase < 2 && !atomic_load(&job.overflow); job.phase++)
            attn_parallel_for(nproblems * plan.blocks[job.phase], plan.threads,
                              attn_backward_item, &job, &cancel);
        attn_plan_free(&ws);
        if (atomic_load(&cancel.stop)) return ATTN_EINTR;
        /* NaN policy rules 6 and 5 (attn_core.h): a tile that could overflow,
           or a NaN or inf in a gradient, sends the call to the reference
           kernel, which overwrites every gradient */
        if (!atomic_load(&job.overflow) && !atomic_load(&job.nonfinite)) return ATTN_OK;
        attn_plan_use_reference(&plan, atomic_load(&job.overflow) ? ATTN_REASON_QK_OVERFLOW
                                                                  : ATTN_REASON_GRAD_NOT_FINITE);
        job.phase = 0;
        if (attn_plan_alloc(&plan, &ws) != ATTN_OK) return ATTN_ENOMEM;
        job.work = ws.work;
    }
    attn_parallel_for(plan.items, plan.threads, attn_backward_item, &job, &cancel);
    attn_plan_free(&ws);
    return atomic_load(&cancel.stop) ? ATTN_EINTR : ATTN_OK;
}

int attn_sdpa_reduce_grads(const attn_sdpa_grad_args *g, const attn_sdpa_args *r)
{
    const attn_sdpa_args *a = &g->fwd;
    int64_t nproblems = attn_problems(a);
    if (attn_grads_empty(g)) return ATTN_OK;
    size_t es = a->dtype == ATTN_FLOAT32 ? sizeof(float) : sizeof(double);
    void (*add)(char *, int64_t, int64_t, const char *, int64_t, int64_t) =
        a->dtype == ATTN_FLOAT32 ? attn_add_block_f32 : attn_add_block_f64;
    /* sequential: several problems may add into the same rows. A view with
       data == NULL is skipped (its gradient was written in place). */
    for (int64_t p = 0; p < nproblems; p++) {
        attn_head hd;
        attn_locate(r, p, &hd);
        if (r->q.data)
            add((char *)hd.q, r->q.row, r->q.col, g->dq + (size_t)p * (size_t)(a->L * a->E) * es,
                a->L, a->E);
        if (r->k.data)
            add((char *)hd.k, r->k.row, r->k.col, g->dk + (size_t)p * (size_t)(a->S * a->E) * es,
                a->S, a->E);
        if (r->v.data)
            add((char *)hd.v, r->v.row, r->v.col,
                g->dv + (size_t)p * (size_t)(a->S * a->Ev) * es, a->S, a->Ev);
    }
    return ATTN_OK;
}

/* ------------------------------------------------------------------------ */
/* Linear layers                                                              */

/* A linear layer's work: items are (batch, block of rows, group of output
   columns), as the plan says. */
typedef struct {
    const attn_linear_args *p;
    const attn_plan *plan;
    char *work;
} attn_linear_job;

static void attn_linear_item(void *ctx, int64_t item, int thread)
{
    const attn_linear_job *job = ctx;
    const attn_linear_args *p = job->p;
    const attn_plan *plan = job->plan;
    int64_t cg = item % plan->col_groups, rest = item / plan->col_groups;
    int64_t rb = rest % plan->blocks[0], n = rest / plan->blocks[0];
    int64_t br = plan->block_rows, l0 = rb * br, o0 = cg * plan->group_width;
    int64_t nr = p->M - l0 < br ? p->M - l0 : br;
    int64_t no = p->O - o0 < plan->group_width ? p->O - o0 : plan->group_width;
    if (no <= 0) return;
    if (plan->kernel != ATTN_KERNEL_REFERENCE)
        attn_fast_linear_block(plan->kernel, p, n, l0, nr, o0, no,
                               job->work + (size_t)thread * plan->work_size);
    else if (p->dtype == ATTN_FLOAT32)
        attn_linear_block_f32(p, n, l0, nr, o0, no);
    else
        attn_linear_block_f64(p, n, l0, nr, o0, no);
}

int attn_linear(const attn_linear_args *p) { return attn_linear_forced(p, NULL); }

int attn_linear_forced(const attn_linear_args *p, const attn_force *force)
{
    assert(p->N >= 0 && p->M >= 0 && p->K >= 0 && p->O >= 0 && p->x.data && p->w.data &&
           p->y.data && (p->dtype == ATTN_FLOAT32 || p->dtype == ATTN_FLOAT64));
    if (p->N == 0 || p->M == 0 || p->O == 0) return ATTN_OK;
    attn_plan plan;
    attn_workspace ws;
    attn_plan_linear(p, force, &plan);
    if (attn_plan_alloc(&plan, &ws) != ATTN_OK) return ATTN_ENOMEM;
    attn_linear_job job = {.p = p, .plan = &plan, .work = ws.work};
    attn_cancel cancel;
    attn_cancel_init(&cancel, p->interrupt);
    attn_parallel_for(plan.items, plan.threads, attn_linear_item, &job, &cancel);
    attn_plan_free(&ws);
    return atomic_load(&cancel.stop) ? ATTN_EINTR : ATTN_OK;
}
