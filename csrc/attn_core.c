/*
 * attn_core.c -- scaled dot-product attention and the multi-head layer over
 * strided views. See attn_core.h for the problem and the conventions.
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
    enum { Q, K, V, M, M2, OUT, W, SC, LG, DM, DR, NT };
    const attn_view *views[NT] = {&a->q, &a->k, &a->v, &a->mask, &a->mask2, &a->out,
                                  &a->weights, &a->scores, &a->logits, &a->dropout_mask,
                                  &a->dropped};
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
    hd->out = attn_at(a->out.data, off[OUT]);
    hd->weights = attn_at(a->weights.data, off[W]);
    hd->scores = attn_at(a->scores.data, off[SC]);
    hd->logits = attn_at(a->logits.data, off[LG]);
    hd->dropout_mask = attn_at(a->dropout_mask.data, off[DM]);
    hd->dropped = attn_at(a->dropped.data, off[DR]);
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
           a->dropout_p <= 1.0 && (a->dtype == ATTN_FLOAT32 || a->dtype == ATTN_FLOAT64);
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

attn_kernel attn_get_kernel(void)
{
    attn_kernel k = (attn_kernel)atomic_load(&kernel_choice);
    if (k != ATTN_KERNEL_AUTO) return k;
    if (attn_kernel_supported(ATTN_KERNEL_AVX512)) return ATTN_KERNEL_AVX512;
    if (attn_kernel_supported(ATTN_KERNEL_AVX2)) return ATTN_KERNEL_AVX2;
    return ATTN_KERNEL_BASELINE;
}

/* One call's work: the plan, and its workspace. Items are (problem, block of
   query rows) for the tiled kernels, whole problems for the reference. */
typedef struct {
    const attn_sdpa_args *a;
    const attn_plan *plan;
    char *work; /* per-thread workspaces, plan->work_size bytes each */
} attn_sdpa_job;

static void attn_sdpa_item(void *ctx, int64_t item, int thread)
{
    const attn_sdpa_job *job = ctx;
    const attn_sdpa_args *a = job->a;
    const attn_plan *plan = job->plan;
    void *work = job->work + (size_t)thread * plan->work_size;
    attn_head hd;
    if (plan->kernel == ATTN_KERNEL_REFERENCE) {
        attn_locate(a, item, &hd);
        if (a->dtype == ATTN_FLOAT32) {
            if (hd.weights) attn_reference_f32(a, &hd, work);
            else attn_reference_streaming_f32(a, &hd, work);
        } else {
            if (hd.weights) attn_reference_f64(a, &hd, work);
            else attn_reference_streaming_f64(a, &hd, work);
        }
        return;
    }
    /* the last query blocks first: under a causal mask they cost the most */
    int64_t blocks = plan->blocks[0], br = plan->block_rows;
    int64_t block = blocks - 1 - item % blocks;
    int64_t i0 = block * br;
    attn_locate(a, item / blocks, &hd);
    attn_fast_rows(plan->kernel, a, &hd, i0, a->L - i0 < br ? a->L - i0 : br, work);
}

int attn_sdpa(const attn_sdpa_args *a)
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
        return attn_sdpa(&zero_width);
    }
    int64_t nproblems = attn_problems(a);
    /* nothing to write: return before walking (maybe billions of) empty problems */
    if (nproblems == 0 || a->L == 0 || (a->Ev == 0 && (!a->weights.data || a->S == 0)))
        return ATTN_OK;

    attn_plan plan;
    attn_workspace ws;
    attn_plan_sdpa(a, nproblems, &plan);
    if (attn_plan_alloc(&plan, &ws) != ATTN_OK) return ATTN_ENOMEM;
    attn_sdpa_job job = {.a = a, .plan = &plan, .work = ws.work};
    attn_parallel_for(plan.items, plan.threads, attn_sdpa_item, &job);
    attn_plan_free(&ws);
    return ATTN_OK;
}

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
    char *work;
} attn_backward_job;

static void attn_backward_item(void *ctx, int64_t item, int thread)
{
    const attn_backward_job *job = ctx;
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
        int64_t br = plan->block_rows, start = item % blocks * br;
        int64_t rows = job->phase == 0 ? a->L : a->S;
        int64_t n = rows - start < br ? rows - start : br;
        char *stats = job->stats + (size_t)p * (size_t)(3 * a->L) * es;
        attn_fast_backward_rows(plan->kernel, g, &hd, hg.out, job->phase, start, n, stats,
                                job->phase == 0 ? dq : dk, dv, work);
        /* NaN policy rule 5, on the rows just written, while they are in cache */
        int finite = job->phase == 0
                         ? attn_policy_grad_finite(a->dtype, dq, start, n, a->E)
                         : attn_policy_grad_finite(a->dtype, dk, start, n, a->E) &&
                               attn_policy_grad_finite(a->dtype, dv, start, n, a->Ev);
        if (!finite) atomic_store(&((attn_backward_job *)job)->nonfinite, 1);
        return;
    }
    /* hg.out is dO, hg.weights the given weights, hg.scores / hg.logits the trace */
    if (a->dtype == ATTN_FLOAT32)
        attn_reference_backward_f32(g, &hd, hg.weights, hg.out, dq, dk, dv, hg.scores, hg.logits,
                               (double *)work);
    else
        attn_reference_backward_f64(g, &hd, hg.weights, hg.out, dq, dk, dv, hg.scores, hg.logits,
                               (double *)work);
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
    const attn_sdpa_args *a = &g->fwd;
    assert(attn_problem_valid(a) && g->grad_out.data);
    assert((g->dq || g->grad_q.data) && (g->dk || g->grad_k.data) && (g->dv || g->grad_v.data));
    if (a->E == 0 && a->scale != 0.0) { /* the scores are 0: see attn_sdpa */
        attn_sdpa_grad_args zero_width = *g;
        zero_width.fwd.scale = 0.0;
        return attn_sdpa_backward(&zero_width);
    }
    int64_t nproblems = attn_problems(a);
    if (nproblems == 0 || attn_grads_empty(g)) return ATTN_OK;

    attn_plan plan;
    attn_workspace ws;
    attn_plan_backward(g, nproblems, &plan);
    /* a second description whose out / weights / scores / logits views are
       dO, the given weights and the trace, so attn_locate finds them too */
    attn_backward_job job = {.g = g, .locate_grad = *a, .plan = &plan};
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
        for (job.phase = 0; job.phase < 2; job.phase++)
            attn_parallel_for(nproblems * plan.blocks[job.phase], plan.threads,
                              attn_backward_item, &job);
        attn_plan_free(&ws);
        /* NaN policy rule 5 (attn_core.h): a NaN or inf in a gradient sends
           the call to the reference kernel, which overwrites every gradient */
        if (!atomic_load(&job.nonfinite)) return ATTN_OK;
        attn_plan_use_reference(&plan, ATTN_REASON_GRAD_NOT_FINITE);
        job.phase = 0;
        if (attn_plan_alloc(&plan, &ws) != ATTN_OK) return ATTN_ENOMEM;
        job.work = ws.work;
    }
    attn_parallel_for(plan.items, plan.threads, attn_backward_item, &job);
    attn_plan_free(&ws);
    return ATTN_OK;
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

int attn_linear(const attn_linear_args *p)
{
    assert(p->N >= 0 && p->M >= 0 && p->K >= 0 && p->O >= 0 && p->x.data && p->w.data &&
           p->y.data && (p->dtype == ATTN_FLOAT32 || p->dtype == ATTN_FLOAT64));
    if (p->N == 0 || p->M == 0 || p->O == 0) return ATTN_OK;
    attn_plan plan;
    attn_workspace ws;
    attn_plan_linear(p, &plan);
    if (attn_plan_alloc(&plan, &ws) != ATTN_OK) return ATTN_ENOMEM;
    attn_linear_job job = {.p = p, .plan = &plan, .work = ws.work};
    attn_parallel_for(plan.items, plan.threads, attn_linear_item, &job);
    attn_plan_free(&ws);
    return ATTN_OK;
}

/*
 * Self-attention's three projections read the same x: when the fast kernels
 * run and the row blocks alone keep every thread busy, one parallel loop
 * packs each row block of x^T once and produces q, k and v from it.
 * Returns -1 when the separate linear layers should be used instead.
 */
typedef struct {
    const attn_linear_args *ps;
    int count;
    attn_kernel kernel;
    int64_t row_blocks;
    char *work;
    size_t work_size;
} attn_linear_many_job;

static void attn_linear_many_item(void *ctx, int64_t item, int thread)
{
    const attn_linear_many_job *job = ctx;
    int64_t rb = item % job->row_blocks, n = item / job->row_blocks;
    int64_t l0 = rb * ATTN_LINEAR_BR;
    int64_t nr = job->ps[0].M - l0 < ATTN_LINEAR_BR ? job->ps[0].M - l0 : ATTN_LINEAR_BR;
    attn_fast_linear_many(job->kernel, job->ps, job->count, n, l0, nr,
                          job->work + (size_t)thread * job->work_size);
}

static int attn_linear_shared_x(const attn_linear_args *ps, int count)
{
    attn_linear_many_job job = {.ps = ps, .count = count, .kernel = attn_get_kernel()};
    const attn_linear_args *p = &ps[0];
    if (job.kernel == ATTN_KERNEL_REFERENCE) return -1;
    job.row_blocks = (p->M + ATTN_LINEAR_BR - 1) / ATTN_LINEAR_BR;
    int64_t items = p->N * job.row_blocks;
    double flops = 0;
    for (int c = 0; c < count; c++) flops += 2.0 * (double)p->N * (double)p->M * (double)p->K * (double)ps[c].O;
    int threads = attn_threads_for(flops);
    if (items < 2 * threads) return -1; /* too few row blocks: split columns instead */
    job.work_size = (attn_fast_linear_workspace(p) + 63) / 64 * 64;
    job.work = attn_malloc(job.work_size * (size_t)threads);
    if (!job.work) return -1;
    attn_parallel_for(items, threads, attn_linear_many_item, &job);
    attn_free(job.work);
    return ATTN_OK;
}

static int attn_same_view3(attn_view3 a, attn_view3 b)
{
    return a.data == b.data && a.batch == b.batch && a.row == b.row && a.col == b.col;
}

/* Rows S.. of k and v (per batch n): bias_k / bias_v, then zeros. */
static void attn_append_kv(const attn_mha_args *m)
{
    const int64_t kw = m->num_kv_heads * m->head_dim, vw = m->num_kv_heads * m->head_dim_v;
    void (*copy)(char *, int64_t, const char *, int64_t, int64_t) =
        m->dtype == ATTN_FLOAT32 ? attn_copy_row_f32 : attn_copy_row_f64;
    int64_t row = m->S;
    if ((!m->bias_k.data && !m->add_zero_attn) || (kw == 0 && vw == 0)) return; /* nothing */
    for (int64_t n = 0; n < m->N; n++) {
        char *k = m->k.data + n * m->k.batch, *v = m->v.data + n * m->v.batch;
        if (m->bias_k.data) {
            copy(k + row * m->k.row, m->k.col, m->bias_k.data, m->bias_k.stride, kw);
            copy(v + row * m->v.row, m->v.col, m->bias_v.data, m->bias_v.stride, vw);
        }
        if (m->add_zero_attn) {
            int64_t z = row + (m->bias_k.data ? 1 : 0);
            copy(k + z * m->k.row, m->k.col, NULL, 0, kw);
            copy(v + z * m->v.row, m->v.col, NULL, 0, vw);
        }
    }
}

/* A projection of the layer: y = x W^T + b. */
static int attn_project(const attn_mha_args *m, int64_t M, int64_t K, int64_t O,
                        attn_view3 x, attn_view3 w, attn_vec b, attn_view3 y)
{
    attn_linear_args p = {.dtype = m->dtype, .N = m->N, .M = M, .K = K, .O = O,
                          .x = x, .w = w, .y = y, .b = b};
    return attn_linear(&p);
}

/* The head split: (N, rows, H*D) seen as (N, H, rows, D), a view. */
static attn_view attn_heads_of(attn_view3 x, int64_t head_dim)
{
    attn_view view;
    memset(&view, 0, sizeof view);
    view.data = x.data;
    view.batch[0] = x.batch;
    view.head = head_dim * x.col;
    view.row = x.row;
    view.col = x.col;
    return view;
}

int attn_mha(attn_mha_args *m)
{
    if (m->num_heads <= 0 || m->num_kv_heads <= 0 || m->num_heads % m->num_kv_heads != 0 ||
        m->N < 0 || m->L < 0 || m->S < 0 || m->head_dim < 0 || m->head_dim_v < 0 ||
        (m->bias_k.data == NULL) != (m->bias_v.data == NULL))
        return ATTN_EINVAL;
    const int64_t H = m->num_heads, Hkv = m->num_kv_heads, D = m->head_dim, Dv = m->head_dim_v;
    const int64_t extra = (m->bias_k.data ? 1 : 0) + (m->add_zero_attn ? 1 : 0);
    int status;

    /* 1. projections (self-attention: the three at once, x^T packed once) */
    attn_linear_args proj[3] = {
        {.dtype = m->dtype, .N = m->N, .M = m->L, .K = m->qdim, .O = H * D,
         .x = m->query, .w = m->w_q, .y = m->q, .b = m->b_q},
        {.dtype = m->dtype, .N = m->N, .M = m->S, .K = m->kdim, .O = Hkv * D,
         .x = m->key, .w = m->w_k, .y = m->k, .b = m->b_k},
        {.dtype = m->dtype, .N = m->N, .M = m->S, .K = m->vdim, .O = Hkv * Dv,
         .x = m->value, .w = m->w_v, .y = m->v, .b = m->b_v}};
    int shared = attn_same_view3(m->query, m->key) && attn_same_view3(m->key, m->value) &&
                 m->L == m->S && m->qdim == m->kdim && m->kdim == m->vdim;
    if (!shared || attn_linear_shared_x(proj, 3) != ATTN_OK)
        for (int i = 0; i < 3; i++)
            if ((status = attn_linear(&proj[i]))) return status;

    /* 2. bias_k / bias_v and the zero key, as extra key positions */
    attn_append_kv(m);

    /* 3. attention per head, on views: heads in, heads out into concat */
    attn_sdpa_args *a = &m->attn;
    a->dtype = m->dtype;
    a->nbatch = 1;
    a->batch_shape[0] = m->N;
    a->num_heads = H;
    a->num_kv_heads = Hkv;
    a->L = m->L;
    a->S = m->S + extra;
    a->E = D;
    a->Ev = Dv;
    a->extra_keys = extra;
    a->q = attn_heads_of(m->q, D);
    a->k = attn_heads_of(m->k, D);
    a->v = attn_heads_of(m->v, Dv);
    a->out = attn_heads_of(m->concat, Dv);
    if ((status = attn_sdpa(a))) return status;

    /* 4. output projection */
    if (m->w_out.data)
        return attn_project(m, m->L, H * Dv, m->out_dim, m->concat, m->w_out, m->b_out, m->out);
    return ATTN_OK;
}

/* ------------------------------------------------------------------------ */
/* The multi-head layer's backward pass                                       */

/* x[n][r][c] = 0 for n < N, r < rows, c < cols. */
static void attn_zero3(attn_dtype dt, attn_view3 x, int64_t N, int64_t rows, int64_t cols)
{
    size_t es = dt == ATTN_FLOAT32 ? sizeof(float) : sizeof(double);
    if (rows == 0 || cols == 0) return; /* not N empty loops */
    for (int64_t n = 0; n < N; n++)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < cols; c++)
                memset(x.data + n * x.batch + r * x.row + c * x.col, 0, es);
}

/* x^T as a view: (batch, rows, cols) -> (batch, cols, rows). */
static attn_view3 attn_transposed(attn_view3 x)
{
    attn_view3 t = {x.data, x.batch, x.col, x.row};
    return t;
}

/*
 * A linear layer's gradients from dy (N, M, O) and its input x (N, M, K):
 *   dx = dy W               (skipped when dx.data == NULL)
 *   dW = sum_n dy[n]^T x[n] (skipped when dW.data == NULL)
 *   db = sum_{n,l} dy       (skipped when db.data == NULL)
 */
static int attn_linear_backward(attn_dtype dtype, int64_t N, int64_t M, int64_t K, int64_t O,
                                attn_view3 x, attn_view3 w, attn_view3 dy, attn_view3 dx,
                                attn_view3 dw, attn_vec db)
{
    int status;
    if (N == 0 || M == 0) {
        /* no rows: dx is empty, dW and db are zero (not N empty loops) */
        size_t es = dtype == ATTN_FLOAT32 ? sizeof(float) : sizeof(double);
        if (dw.data) attn_zero3(dtype, dw, 1, O, K);
        for (int64_t o = 0; db.data && o < O; o++) memset(db.data + o * db.stride, 0, es);
        return ATTN_OK;
    }
    if (dx.data) {
        attn_linear_args p = {.dtype = dtype, .N = N, .M = M, .K = O, .O = K,
                              .x = dy, .w = attn_transposed(w), .y = dx};
        if ((status = attn_linear(&p))) return status;
    }
    if (dw.data && N > 0 && dy.batch == M * dy.row && x.batch == M * x.row) {
        /* the batch continues the rows (contiguous over n, l): one product
           whose inner dimension runs over all N * M rows */
        attn_view3 dyf = {dy.data, 0, dy.row, dy.col}, xf = {x.data, 0, x.row, x.col};
        attn_linear_args p = {.dtype = dtype, .N = 1, .M = O, .K = N * M, .O = K,
                              .x = attn_transposed(dyf), .w = attn_transposed(xf), .y = dw};
        if ((status = attn_linear(&p))) return status;
    } else if (dw.data) {
        for (int64_t n = 0; n < N; n++) {
            attn_view3 dyn = {dy.data + n * dy.batch, 0, dy.row, dy.col};
            attn_view3 xn = {x.data + n * x.batch, 0, x.row, x.col};
            attn_linear_args p = {.dtype = dtype, .N = 1, .M = O, .K = M, .O = K,
                                  .x = attn_transposed(dyn), .w = attn_transposed(xn), .y = dw,
                                  .accumulate = n > 0};
            if ((status = attn_linear(&p))) return status;
        }
    }
    if (db.data) {
        if (dtype == ATTN_FLOAT32) attn_bias_grad_f32(&dy, N, M, O, db);
        else attn_bias_grad_f64(&dy, N, M, O, db);
    }
    return ATTN_OK;
}

int attn_mha_backward(attn_mha_grad_args *g)
{
    attn_mha_args *m = &g->fwd;
    if (m->num_heads <= 0 || m->num_kv_heads <= 0 || m->num_heads % m->num_kv_heads != 0 ||
        m->N < 0 || m->L < 0 || m->S < 0 || !g->dq.data || !g->dk.data || !g->dv.data ||
        !g->dconcat.data ||
        (m->num_kv_heads != m->num_heads && (!g->dk_heads || !g->dv_heads)))
        return ATTN_EINVAL;
    const int64_t H = m->num_heads, Hkv = m->num_kv_heads, D = m->head_dim, Dv = m->head_dim_v;
    const int64_t extra = (m->bias_k.data ? 1 : 0) + (m->add_zero_attn ? 1 : 0);
    const attn_dtype dt = m->dtype;
    int status;

    /* 1. output projection */
    if (m->w_out.data) {
        if ((status = attn_linear_backward(dt, m->N, m->L, H * Dv, m->out_dim, m->concat,
                                           m->w_out, g->grad_out, g->dconcat, g->grad_w_out,
                                           g->grad_b_out)))
            return status;
    } else {
        g->dconcat = g->grad_out; /* no output projection: dconcat is dout */
    }

    /* 2. attention, per head, on views of the forward's buffers */
    attn_sdpa_grad_args sg;
    memset(&sg, 0, sizeof sg);
    sg.fwd = m->attn;
    sg.fwd.dtype = dt;
    sg.fwd.nbatch = 1;
    sg.fwd.batch_shape[0] = m->N;
    sg.fwd.num_heads = H;
    sg.fwd.num_kv_heads = Hkv;
    sg.fwd.L = m->L;
    sg.fwd.S = m->S + extra;
    sg.fwd.E = D;
    sg.fwd.Ev = Dv;
    sg.fwd.extra_keys = extra;
    sg.fwd.q = attn_heads_of(m->q, D);
    sg.fwd.k = attn_heads_of(m->k, D);
    sg.fwd.v = attn_heads_of(m->v, Dv);
    sg.grad_out = attn_heads_of(g->dconcat, Dv);
    /* with dropout, the reference kernel reads the forward's weights; without,
       the fast kernels recompute them (the same to rounding, and faster than
       reading an L x S map back) */
    if (m->attn.dropout_p > 0.0) sg.weights = m->attn.weights;
    /* each head writes its own columns of dq in place; dk, dv too unless
       several query heads share a key/value head (then slabs, summed) */
    sg.grad_q = attn_heads_of(g->dq, D);
    if (Hkv == H) {
        sg.grad_k = attn_heads_of(g->dk, D);
        sg.grad_v = attn_heads_of(g->dv, Dv);
    } else {
        sg.dk = g->dk_heads;
        sg.dv = g->dv_heads;
    }
    if ((status = attn_sdpa_backward(&sg))) return status;
    if (Hkv != H) {
        attn_sdpa_args r = sg.fwd;
        r.q.data = NULL; /* written in place */
        r.k = attn_heads_of(g->dk, D);
        r.v = attn_heads_of(g->dv, Dv);
        attn_zero3(dt, g->dk, m->N, m->S + extra, Hkv * D);
        attn_zero3(dt, g->dv, m->N, m->S + extra, Hkv * Dv);
        if ((status = attn_sdpa_reduce_grads(&sg, &r))) return status;
    }

    /* 3. bias_k, bias_v: the sums of the key / value gradients at row S */
    if (m->bias_k.data) {
        attn_view3 krow = {g->dk.data + m->S * g->dk.row, g->dk.batch, g->dk.row, g->dk.col};
        attn_view3 vrow = {g->dv.data + m->S * g->dv.row, g->dv.batch, g->dv.row, g->dv.col};
        void (*bias_grad)(const attn_view3 *, int64_t, int64_t, int64_t, attn_vec) =
            dt == ATTN_FLOAT32 ? attn_bias_grad_f32 : attn_bias_grad_f64;
        if (g->grad_bias_k.data) bias_grad(&krow, m->N, 1, Hkv * D, g->grad_bias_k);
        if (g->grad_bias_v.data) bias_grad(&vrow, m->N, 1, Hkv * Dv, g->grad_bias_v);
    }

    /* 4. input projections (the first S rows of dk, dv: the appended ones have no input) */
    if ((status = attn_linear_backward(dt, m->N, m->L, m->qdim, H * D, m->query, m->w_q, g->dq,
                                       g->grad_query, g->grad_w_q, g->grad_b_q)) ||
        (status = attn_linear_backward(dt, m->N, m->S, m->kdim, Hkv * D, m->key, m->w_k, g->dk,
                                       g->grad_key, g->grad_w_k, g->grad_b_k)) ||
        (status = attn_linear_backward(dt, m->N, m->S, m->vdim, Hkv * Dv, m->value, m->w_v,
                                       g->dv, g->grad_value, g->grad_w_v, g->grad_b_v)))
        return status;
    return ATTN_OK;
}
