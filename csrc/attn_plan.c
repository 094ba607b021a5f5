/*
 * attn_plan.c -- the planner: every decision about how an attention call or
 * a linear layer runs is made here, and only here.
 *
 * For each operation (the forward, the backward, the linear layer) a plan
 * names the kernel (the reference or a tiled ISA), WHY (an attn_reason, with
 * a name in attn_reason_names), the rows per work item, the work items, the
 * threads and the workspace. The entry points in attn_core.c execute the
 * plan; they decide nothing. The NaN / inf policy of attn_core.h is
 * implemented here too: which calls the tiles may not run, and the check of
 * the backward's gradients that sends a call back to the reference kernel.
 *
 * Numbers (tile sizes, thread thresholds) are those the kernels were tuned
 * with; the one place to change them per call is attn_plan_tune() below.
 */
#include "attn_internal.h"

#include <stdatomic.h>
#include <string.h>

const char *const attn_reason_names[ATTN_REASON_COUNT] = {
    [ATTN_REASON_TILED] = "use_tiled",
    [ATTN_REASON_SELECTED] = "use_ref:selected",
    [ATTN_REASON_TRACE] = "use_ref:trace",
    [ATTN_REASON_DROPOUT] = "use_ref:dropout",
    [ATTN_REASON_WEIGHTS_STRIDE] = "use_ref:weights_col_stride",
    [ATTN_REASON_SCALE_NOT_FINITE] = "use_ref:scale_not_finite",
    [ATTN_REASON_GIVEN_WEIGHTS] = "use_ref:given_weights",
    [ATTN_REASON_NO_ROWS] = "use_ref:no_rows",
    [ATTN_REASON_QK_OVERFLOW] = "use_ref:qk_overflow",
    [ATTN_REASON_NO_WORKSPACE] = "use_ref:no_workspace",
    [ATTN_REASON_GRAD_NOT_FINITE] = "use_ref:grad_not_finite",
    [ATTN_REASON_EMPTY] = "empty",
};

const char *attn_reason_name(int reason)
{
    return reason >= 0 && reason < ATTN_REASON_COUNT ? attn_reason_names[reason] : NULL;
}

static size_t attn_elem_size(attn_dtype dtype)
{
    return dtype == ATTN_FLOAT64 ? sizeof(double) : sizeof(float);
}

/*
 * How many threads a job of `flops` floating-point operations should use.
 * Below 2e5 (a few microseconds) handing out work costs more than it saves.
 * Above it every thread is asked, even when the workers sleep: the caller
 * never waits for one that has not started (attn_parallel.c's join protocol),
 * so a one-off call pays only the wake-up's system call, and the next call
 * of a loop finds the workers spinning. (Running such calls alone while the
 * pool slept kept it asleep for a whole loop of (1,12,32,32) calls: 57 us a
 * call against 36 us with both threads, Xeon model 167.)
 */
static int attn_threads_for(double flops, const attn_force *force)
{
    if (force) return force->threads;
    return flops < 2e5 ? 1 : attn_get_num_threads();
}

/* Per-thread workspaces are a cache line apart. */
static size_t attn_cache_lines(size_t bytes) { return (bytes + 63) / 64 * 64; }

/*
 * ======================== TUNER HOOK ========================
 * Every plan passes through here after the default heuristics and before
 * any memory is allocated, with the call's arguments: args is the
 * attn_sdpa_args, attn_sdpa_grad_args or attn_linear_args of plan->op. A
 * tuner (a table measured per CPU and shape, an environment override, ...)
 * may change plan->threads (1 .. attn_get_num_threads()), or switch a tiled
 * plan to the reference kernel with attn_plan_use_reference(). It must not
 * change block_rows or the workspace sizes of a tiled plan: the attention
 * kernels are compiled for ATTN_FAST_BR rows, and a linear plan's workspace
 * is sized for its block_rows. Today: the defaults stand.
 * ============================================================
 */
static void attn_plan_tune(attn_plan *plan, const void *args)
{
    (void)plan;
    (void)args;
}

void attn_plan_use_reference(attn_plan *plan, attn_reason why)
{
    plan->kernel = ATTN_KERNEL_REFERENCE;
    plan->reason = why;
    plan->block_rows = plan->ref_block_rows;
    plan->blocks[0] = plan->blocks[1] = plan->ref_blocks;
    plan->items = plan->ref_items;
    plan->heads_per_item = 1;
    plan->bwd_fused_dq = 0;
    plan->work_size = plan->ref_work_size;
    plan->shared_size = 0;
    if (plan->threads > plan->items) plan->threads = (int)plan->items;
    if (plan->threads < 1) plan->threads = 1;
}

static attn_kernel attn_tuned_kernel(attn_op op, attn_dtype dtype, int64_t E);

/* The kernel forced, else the one the user selected (attn_set_kernel), else
   (AUTO) the one the tuner chose for this cell; or the reason it is not a
   tiled one. */
static attn_reason attn_plan_start(attn_plan *plan, attn_op op, attn_dtype dtype, int64_t E,
                                   const attn_force *force)
{
    memset(plan, 0, sizeof *plan);
    plan->op = op;
    if (force) plan->kernel = force->kernel;
    else if (attn_kernel_selected() != ATTN_KERNEL_AUTO) plan->kernel = attn_get_kernel();
    else plan->kernel = attn_tuned_kernel(op, dtype, E);
    return plan->kernel == ATTN_KERNEL_REFERENCE ? ATTN_REASON_SELECTED : ATTN_REASON_TILED;
}

/* The tiled plan when why is ATTN_REASON_TILED, else the reference one. */
static void attn_plan_finish(attn_plan *plan, attn_reason why, const void *args)
{
    if (why != ATTN_REASON_TILED) attn_plan_use_reference(plan, why);
    else plan->reason = ATTN_REASON_TILED;
    attn_plan_tune(plan, args);
}

/* ------------------------------------------------------------------------ */
/* The NaN / inf policy (stated in attn_core.h)                              */

/*
 * Rule 4 of the policy: calls the tiles must not compute. A tile
 * computes scale * (q . k) for every pair of a block and masks afterwards;
 * with a non-finite scale, scale * 0 is NaN where the reference kernel does
 * not score a masked pair at all.
 */
static attn_reason attn_policy_tiles(const attn_sdpa_args *a)
{
    if (!isfinite(a->scale)) return ATTN_REASON_SCALE_NOT_FINITE;
    /* rule 6 (q . k overflowing T) is decided per tile, by the tiles
       themselves (qk_may_overflow): the bound needs the values */
    return ATTN_REASON_TILED;
}

/* Rule 5: max |x| over a strided (rows x cols) block, inf when one is NaN or
   inf (attn_max_abs.inc: attn_max_abs_f32, attn_max_abs_f64). */
#define T float
#define TBITS int32_t
#define SFX f32
#include "attn_max_abs.inc"
#undef T
#undef TBITS
#undef SFX
#define T double
#define TBITS int64_t
#define SFX f64
#include "attn_max_abs.inc"
#undef T
#undef TBITS
#undef SFX

int attn_policy_grad_finite(attn_dtype dtype, attn_mat m, int64_t r0, int64_t rows,
                            int64_t cols)
{
    const char *p = m.data + r0 * m.row;
    double largest = dtype == ATTN_FLOAT32 ? attn_max_abs_f32(p, m.row, m.col, rows, cols)
                                           : attn_max_abs_f64(p, m.row, m.col, rows, cols);
    return !isinf(largest);
}

/* ------------------------------------------------------------------------ */
/* The three plans                                                           */

void attn_plan_sdpa(const attn_sdpa_args *a, int64_t nproblems, const attn_force *force,
                    attn_plan *plan)
{
    attn_reason why = attn_plan_start(plan, ATTN_OP_SDPA, a->dtype, a->E, force);
    const size_t elem = attn_elem_size(a->dtype);
    if (why == ATTN_REASON_TILED) {
        /* the tiles know no trace and no dropout, and write the weights
           (if any) as contiguous rows */
        if (a->scores.data || a->logits.data || a->dropout_mask.data || a->dropped.data)
            why = ATTN_REASON_TRACE;
        else if (a->dropout_p != 0.0) why = ATTN_REASON_DROPOUT;
        else if (a->weights.data && a->weights.col != (int64_t)elem)
            why = ATTN_REASON_WEIGHTS_STRIDE;
        else why = attn_policy_tiles(a);
    }
    /* tiled: items are (problem, block of ATTN_FAST_BR query rows);
       reference: (problem, block of rows), each block about 2^22
       multiply-adds (a few milliseconds), so that an interrupt is seen
       soon; workspace: a row of scores (with weights) or a key block of
       them, and one output row, in double */
    plan->nproblems = nproblems;
    plan->block_rows = ATTN_FAST_BR;
    plan->blocks[0] = (a->L + ATTN_FAST_BR - 1) / ATTN_FAST_BR;
    plan->items = nproblems * plan->blocks[0];
    plan->work_size = attn_cache_lines(attn_fast_workspace(a));
    int64_t ref_rows = ((int64_t)1 << 22) / (a->S * (a->E + a->Ev + 1) + 1);
    plan->ref_block_rows = ref_rows < 1 ? 1 : ref_rows < a->L ? ref_rows : (a->L > 0 ? a->L : 1);
    plan->ref_blocks = (a->L + plan->ref_block_rows - 1) / plan->ref_block_rows;
    plan->ref_items = nproblems * plan->ref_blocks;
    int64_t score_row = a->weights.data && a->S > ATTN_KEY_BLOCK ? a->S : ATTN_KEY_BLOCK;
    plan->ref_work_size = attn_cache_lines((size_t)(score_row + a->Ev) * sizeof(double));
    /* small problems stay on the calling thread: waking others costs more */
    double flops = 2.0 * (double)nproblems * (double)a->L * (double)a->S * (double)(a->E + a->Ev);
    plan->threads = attn_threads_for(flops, force);
    /* decoding rows with grouped heads: the query heads of one key/value
       head in one item, so that each block of keys and values is read from
       memory once for all of them; as many as leave 2 items per thread */
    plan->heads_per_item = 1;
    if (!a->weights.data && attn_fast_use_rows(a)) {
        const int64_t group = a->num_heads / a->num_kv_heads;
        for (int64_t hp = group; hp > 1; hp--) {
            if (group % hp || hp > ATTN_FAST_GROUP_MAX || hp * a->L > ATTN_FAST_BR) continue;
            if (nproblems / hp < 2 * (int64_t)plan->threads) continue;
            plan->heads_per_item = hp;
            break;
        }
        plan->items = nproblems / plan->heads_per_item * plan->blocks[0];
    }
    if (plan->threads > plan->items) plan->threads = (int)plan->items;
    attn_plan_finish(plan, why, a);
}

void attn_plan_backward(const attn_sdpa_grad_args *g, int64_t nproblems,
                        const attn_force *force, attn_plan *plan)
{
    const attn_sdpa_args *a = &g->fwd;
    attn_reason why = attn_plan_start(plan, ATTN_OP_SDPA_BACKWARD, a->dtype, a->E, force);
    const size_t elem = attn_elem_size(a->dtype);
    if (why == ATTN_REASON_TILED) {
        /* the tiles recompute the weights, know no dropout and no trace, and
           need a row and a key */
        if (g->grad_weights.data || g->grad_scores.data) why = ATTN_REASON_TRACE;
        else if (a->dropout_p > 0.0) why = ATTN_REASON_DROPOUT;
        else if (g->weights.data) why = ATTN_REASON_GIVEN_WEIGHTS;
        else if (a->L == 0 || a->S == 0) why = ATTN_REASON_NO_ROWS;
        else why = attn_policy_tiles(a);
    }
    /* tiled: two loops, (problem, block of query rows) writing dq and the
       stats (m, 1/l, D: 3 x L values per problem, shared), then (problem,
       block of key rows) writing dk, dv; reference: whole problems, P and dP
       rows (2 x S doubles) of workspace.
       use_fused_dq: the key-major loop sums dq as well, from the dS tiles it
       has anyway, and the query-major loop computes the stats alone: seven
       block products per pair instead of nine. Its items are whole problems,
       so it needs two per thread to balance, a problem small enough
       (L S (E + Ev) <= 2^29: about 35 ms on one core at L = S = 2048, D = 64)
       that Ctrl-C, polled between items, still stops the call within 0.1 s,
       and dq's L rows of sums in each thread's workspace bounded (2^20
       values: 4 MiB in float32 at L = 16384, E = 64). */
    double flops = 8.0 * (double)nproblems * (double)a->L * (double)a->S * (double)(a->E + a->Ev);
    plan->threads = attn_threads_for(flops, force);
    const int use_fused_dq =
        nproblems >= 2 * (int64_t)plan->threads &&
        (double)a->L * (double)a->S * (double)(a->E + a->Ev) <= 536870912.0 &&
        (double)attn_round_up(a->L, ATTN_FAST_BR) * (double)attn_round_up(a->E, 32) <= 1048576.0;
    plan->nproblems = nproblems;
    plan->block_rows = ATTN_FAST_BR;
    plan->bwd_fused_dq = use_fused_dq;
    plan->blocks[0] = (a->L + ATTN_FAST_BR - 1) / ATTN_FAST_BR;
    plan->blocks[1] = use_fused_dq ? 1 : (a->S + ATTN_FAST_BR - 1) / ATTN_FAST_BR;
    plan->items = nproblems * plan->blocks[0];
    plan->work_size = attn_cache_lines(attn_fast_backward_workspace(a, use_fused_dq));
    /* the binding caps every dimension at 2**31 - 1, but nproblems can be
       large through broadcasting: no product may wrap */
    if ((double)nproblems * 3.0 * (double)a->L * (double)elem < 1e18)
        plan->shared_size = (size_t)nproblems * (size_t)(3 * a->L) * elem;
    else if (why == ATTN_REASON_TILED)
        why = ATTN_REASON_NO_WORKSPACE;
    plan->ref_block_rows = a->L;
    plan->ref_blocks = 1;
    plan->ref_items = nproblems;
    plan->ref_work_size = attn_cache_lines((size_t)(2 * (a->S > 0 ? a->S : 1)) * sizeof(double));
    attn_plan_finish(plan, why, g);
}

void attn_plan_linear(const attn_linear_args *p, const attn_force *force, attn_plan *plan)
{
    attn_reason why = attn_plan_start(plan, ATTN_OP_LINEAR, p->dtype, 0, force);
    /* items: (batch, block of rows, group of ATTN_LINEAR_COLS output
       columns), for both kernels. An item packs its slice of W^T once for
       all its rows, so blocks are as tall as ATTN_LINEAR_BR allows, and
       halved (down to 64 rows) while there are fewer than 2 items per
       thread. */
    double flops = 2.0 * (double)p->N * (double)p->M * (double)p->K * (double)p->O;
    plan->threads = attn_threads_for(flops, force);
    plan->col_groups = (p->O + ATTN_LINEAR_COLS - 1) / ATTN_LINEAR_COLS;
    if (plan->col_groups < 1) plan->col_groups = 1;
    plan->group_width = ATTN_LINEAR_COLS;
    int64_t rows = ATTN_LINEAR_BR;
    while (rows > 64 && p->N * ((p->M + rows - 1) / rows) * plan->col_groups < 2 * plan->threads)
        rows /= 2;
    int64_t row_blocks = (p->M + rows - 1) / rows;
    plan->block_rows = plan->ref_block_rows = rows;
    plan->blocks[0] = plan->ref_blocks = row_blocks;
    plan->items = plan->ref_items = p->N * row_blocks * plan->col_groups;
    if (plan->threads > plan->items) plan->threads = (int)plan->items;
    plan->work_size = attn_cache_lines(attn_fast_linear_workspace(p, rows));
    plan->ref_work_size = 0; /* the reference kernel needs no workspace */
    attn_plan_finish(plan, why, p);
}

/* ------------------------------------------------------------------------ */
/* The plan's memory                                                          */

static int attn_plan_try_alloc(const attn_plan *plan, attn_workspace *ws)
{
    ws->work = ws->shared = NULL;
    if (plan->work_size) ws->work = attn_malloc(plan->work_size * (size_t)plan->threads);
    if (plan->shared_size) ws->shared = attn_malloc(plan->shared_size);
    if ((plan->work_size && !ws->work) || (plan->shared_size && !ws->shared)) {
        attn_plan_free(ws);
        return ATTN_ENOMEM;
    }
    return ATTN_OK;
}

int attn_plan_alloc(attn_plan *plan, attn_workspace *ws)
{
    if (attn_plan_try_alloc(plan, ws) == ATTN_OK) return ATTN_OK;
    if (plan->kernel == ATTN_KERNEL_REFERENCE) return ATTN_ENOMEM;
    /* the tiles did not fit: the reference kernel needs far less */
    attn_plan_use_reference(plan, ATTN_REASON_NO_WORKSPACE);
    return attn_plan_try_alloc(plan, ws);
}

void attn_plan_free(attn_workspace *ws)
{
    attn_free(ws->work);
    attn_free(ws->shared);
    ws->work = ws->shared = NULL;
}

/* ------------------------------------------------------------------------ */
/* The tuner (attn_core.h)                                                    */

/*
 * Cells: for each element type, the forward and the backward per class of
 * head dimension (E <= 32, <= 64, wider), then the linear layer. Each is
 * timed on one problem of its class: one head, E = Ev = 32, 64 or 128, the
 * forward without weights at L = S = 256 (the flash kernel: two query
 * blocks, two key blocks), the backward at L = S = 128 reading the
 * forward's saved statistics, the linear layer at (M, K, O) = (128, 256,
 * 256). About 50 ms in all on one AVX-512 core.
 */
enum { TUNE_OPS = 3, TUNE_WIDTHS = 3, TUNE_ATTN_CELLS = 2 * 2 * TUNE_WIDTHS };
static const char *const tune_names[ATTN_TUNE_CELLS] = {
    "sdpa_f32_e32",     "sdpa_f32_e64",     "sdpa_f32_e128",
    "backward_f32_e32", "backward_f32_e64", "backward_f32_e128",
    "sdpa_f64_e32",     "sdpa_f64_e64",     "sdpa_f64_e128",
    "backward_f64_e32", "backward_f64_e64", "backward_f64_e128",
    "linear_f32",       "linear_f64",
};

static attn_dtype attn_tune_dtype(int cell)
{
    int f64 = cell >= TUNE_ATTN_CELLS ? cell > TUNE_ATTN_CELLS : cell >= 2 * TUNE_WIDTHS;
    return f64 ? ATTN_FLOAT64 : ATTN_FLOAT32;
}

static int attn_tune_cell_of(attn_op op, attn_dtype dtype, int64_t E)
{
    int f64 = dtype == ATTN_FLOAT64;
    if (op == ATTN_OP_LINEAR) return TUNE_ATTN_CELLS + f64;
    int width = E <= 32 ? 0 : E <= 64 ? 1 : 2;
    return f64 * 2 * TUNE_WIDTHS + (op == ATTN_OP_SDPA_BACKWARD) * TUNE_WIDTHS + width;
}

/* state: DUE (measure at the next AUTO plan), BUSY (a thread measures or
   configures: the others plan with the cells as they are), DONE. The
   kernels are atomics, read by every plan; the rest is written while BUSY
   only and read by attn_tune_get, which holds BUSY itself. */
enum { TUNE_DUE, TUNE_BUSY, TUNE_DONE };
#ifdef ATTN_FAULT_INJECTION
static atomic_int tune_state = TUNE_DONE, tune_enabled = 0; /* off: see attn_core.h */
#else
static atomic_int tune_state = TUNE_DUE, tune_enabled = 1;
#endif
static atomic_int tune_kernel[ATTN_TUNE_CELLS]; /* AUTO (0): the widest candidate */
static attn_tune_source tune_source[ATTN_TUNE_CELLS];
static double tune_time[ATTN_TUNE_CELLS][ATTN_TUNE_CANDIDATES];
static atomic_int tune_cap = ATTN_KERNEL_AUTO;
static double tune_total;

/* The candidates, widest first: the tiled kernels this CPU runs, from the
   cap down. */
static int attn_tune_candidates(attn_kernel cap, attn_kernel *out)
{
    static const attn_kernel widest_first[] = {ATTN_KERNEL_AVX512, ATTN_KERNEL_AVX2,
                                               ATTN_KERNEL_NEON, ATTN_KERNEL_BASELINE};
    int n = 0, below_cap = cap == ATTN_KERNEL_AUTO;
    for (size_t i = 0; i < sizeof widest_first / sizeof *widest_first; i++) {
        below_cap |= widest_first[i] == cap;
        if (below_cap && n < ATTN_TUNE_CANDIDATES && attn_kernel_supported(widest_first[i]))
            out[n++] = widest_first[i];
    }
    return n;
}

/* Take the tuner (from any state but BUSY); returns the state it was in. */
static int attn_tune_take(void)
{
    for (;;) {
        int s = atomic_load(&tune_state);
        if (s != TUNE_BUSY && atomic_compare_exchange_weak(&tune_state, &s, TUNE_BUSY)) return s;
    }
}

/* Deterministic small values, so that no tile can overflow (rule 6). */
static void attn_tune_fill(char *p, attn_dtype dtype, int64_t n, int64_t seed)
{
    for (int64_t i = 0; i < n; i++) {
        double x = (double)((i * 7919 + seed * 104729) % 17 - 8) / 16.0;
        if (dtype == ATTN_FLOAT64) ((double *)p)[i] = x;
        else ((float *)p)[i] = (float)x;
    }
}

/* One run of cell's problem with kernel k on this thread; its seconds, or
   a negative number when the call failed. buf holds 8 x 128 x 256 elements. */
static double attn_tune_run(int cell, attn_kernel k, char *buf)
{
    const attn_force force = {.kernel = k, .threads = 1};
    const attn_dtype dtype = attn_tune_dtype(cell);
    const int64_t es = (int64_t)attn_elem_size(dtype), n = 128 * 256;
    char *slab[8];
    for (int i = 0; i < 8; i++) slab[i] = buf + (size_t)(i * n * es);
    double t0, t1;
    int status;
    if (cell >= TUNE_ATTN_CELLS) {
        attn_linear_args p = {.dtype = dtype, .N = 1, .M = 128, .K = 256, .O = 256};
        p.x = (attn_view3){slab[0], 0, 256 * es, es};
        p.w = (attn_view3){slab[1], 0, 256 * es, es}; /* 256 x 256: slabs 1 and 2 */
        p.y = (attn_view3){slab[3], 0, 256 * es, es};
        t0 = attn_seconds();
        status = attn_linear_forced(&p, &force);
        t1 = attn_seconds();
        return status == ATTN_OK ? t1 - t0 : -1.0;
    }
    const int backward = cell % (2 * TUNE_WIDTHS) >= TUNE_WIDTHS;
    const int64_t E = (int64_t)32 << (cell % TUNE_WIDTHS), L = backward ? 128 : 256;
    attn_sdpa_args a;
    memset(&a, 0, sizeof a);
    a.dtype = dtype;
    a.num_heads = a.num_kv_heads = 1;
    a.L = a.S = L;
    a.E = a.Ev = E;
    a.scale = 1.0 / sqrt((double)E);
    a.q = (attn_view){.data = slab[0], .row = E * es, .col = es};
    a.k = (attn_view){.data = slab[1], .row = E * es, .col = es};
    a.v = (attn_view){.data = slab[2], .row = E * es, .col = es};
    a.out = (attn_view){.data = slab[3], .row = E * es, .col = es};
    if (!backward) {
        t0 = attn_seconds();
        status = attn_sdpa_forced(&a, &force);
        t1 = attn_seconds();
        return status == ATTN_OK ? t1 - t0 : -1.0;
    }
    a.lse = (attn_view){.data = slab[7], .row = es};
    if (attn_sdpa_forced(&a, &force) != ATTN_OK) return -1.0;
    attn_sdpa_grad_args g;
    memset(&g, 0, sizeof g);
    g.fwd = a;
    g.grad_out = (attn_view){.data = slab[4], .row = E * es, .col = es};
    g.dq = slab[5];
    g.dk = slab[6];
    g.dv = slab[6] + (size_t)(L * E * es);
    t0 = attn_seconds();
    status = attn_sdpa_backward_forced(&g, &force);
    t1 = attn_seconds();
    return status == ATTN_OK ? t1 - t0 : -1.0;
}

/* Time the candidates of every cell not measured or pinned yet (the caller
   holds BUSY). */
static void attn_tune_measure(void)
{
    attn_kernel cand[ATTN_TUNE_CANDIDATES];
    const int ncand = attn_tune_candidates((attn_kernel)atomic_load(&tune_cap), cand);
    const double start = attn_seconds();
    const int64_t n = 128 * 256; /* elements per slab */
    attn_register_fork();        /* a fork while BUSY: see attn_tune_forked */
    char *buf = ncand > 1 ? attn_malloc((size_t)(8 * n) * sizeof(double)) : NULL;
    int filled = -1;             /* the element type buf holds */
    int warmed = 0;
    for (int cell = 0; buf && cell < ATTN_TUNE_CELLS; cell++) {
        if (tune_source[cell] != ATTN_TUNE_DEFAULT) continue;
        if (attn_seconds() - start > ATTN_TUNE_BUDGET_S) break; /* the rest: the widest */
        const attn_dtype dtype = attn_tune_dtype(cell);
        if ((int)dtype != filled) {
            for (int i = 0; i < 8; i++)
                attn_tune_fill(buf + (size_t)(i * n) * attn_elem_size(dtype), dtype, n, i);
            filled = (int)dtype;
        }
        /* rounds that run each candidate in turn, so that a moment when the
           machine is busy slows both; three more when the first three put
           the narrower one ahead (it must win twice to be chosen) */
        double best[ATTN_TUNE_CANDIDATES] = {-1.0, -1.0};
        int ok = 1;
        /* the first cell timed pays for cold code, caches and a clock
           still rising: two untimed rounds first */
        for (int warm = 0; warm < 2 && !warmed && ok; warm++)
            for (int c = 0; c < ncand && ok; c++) ok = attn_tune_run(cell, cand[c], buf) >= 0.0;
        warmed = 1;
        for (int round = 0; round < 6 && ok; round++) {
            if (round == 3 && (ncand < 2 || best[1] >= best[0])) break;
            for (int c = 0; c < ncand && ok; c++) {
                double t = attn_tune_run(cell, cand[c], buf);
                ok = t >= 0.0;
                if (ok && (best[c] < 0.0 || t < best[c])) best[c] = t;
            }
        }
        if (!ok) break; /* out of memory: the rest keep the widest */
        int pick = 0;
        for (int c = 1; c < ncand; c++)
            if (best[c] < best[pick] * (1.0 - ATTN_TUNE_MARGIN)) pick = c;
        for (int c = 0; c < ncand; c++) tune_time[cell][c] = best[c];
        tune_source[cell] = ATTN_TUNE_MEASURED;
        atomic_store(&tune_kernel[cell], (int)cand[pick]);
    }
    attn_free(buf);
    tune_total = attn_seconds() - start;
}

void attn_tune_forked(void)
{
    if (atomic_load(&tune_state) == TUNE_BUSY) atomic_store(&tune_state, TUNE_DUE);
}

static attn_kernel attn_tuned_kernel(attn_op op, attn_dtype dtype, int64_t E)
{
    int s = TUNE_DUE;
    if (atomic_load(&tune_state) == TUNE_DUE &&
        atomic_compare_exchange_strong(&tune_state, &s, TUNE_BUSY)) {
        attn_tune_measure();
        atomic_store(&tune_state, TUNE_DONE);
    }
    attn_kernel k = (attn_kernel)atomic_load(&tune_kernel[attn_tune_cell_of(op, dtype, E)]);
    if (k != ATTN_KERNEL_AUTO) return k;
    attn_kernel cand[ATTN_TUNE_CANDIDATES];
    return attn_tune_candidates((attn_kernel)atomic_load(&tune_cap), cand) ? cand[0]
                                                                           : attn_get_kernel();
}

int attn_tune_configure(int enabled, attn_kernel cap)
{
    if (cap != ATTN_KERNEL_AUTO && (cap == ATTN_KERNEL_REFERENCE || !attn_kernel_supported(cap)))
        return ATTN_EINVAL;
    attn_tune_take();
    atomic_store(&tune_cap, (int)cap);
    for (int cell = 0; cell < ATTN_TUNE_CELLS; cell++) {
        atomic_store(&tune_kernel[cell], ATTN_KERNEL_AUTO);
        tune_source[cell] = ATTN_TUNE_DEFAULT;
        tune_time[cell][0] = tune_time[cell][1] = 0.0;
    }
    atomic_store(&tune_enabled, enabled != 0);
    atomic_store(&tune_state, enabled ? TUNE_DUE : TUNE_DONE);
    return ATTN_OK;
}

int attn_tune_pin(int cell, attn_kernel kernel)
{
    if (cell < 0 || cell >= ATTN_TUNE_CELLS) return ATTN_EINVAL;
    if (kernel != ATTN_KERNEL_AUTO &&
        (kernel == ATTN_KERNEL_REFERENCE || !attn_kernel_supported(kernel)))
        return ATTN_EINVAL;
    int was = attn_tune_take();
    tune_time[cell][0] = tune_time[cell][1] = 0.0;
    atomic_store(&tune_kernel[cell], (int)kernel);
    tune_source[cell] = kernel == ATTN_KERNEL_AUTO ? ATTN_TUNE_DEFAULT : ATTN_TUNE_PINNED;
    /* unpinned while tuning is on: measure it (and only it) again */
    atomic_store(&tune_state,
                 kernel == ATTN_KERNEL_AUTO && atomic_load(&tune_enabled) ? TUNE_DUE : was);
    return ATTN_OK;
}

int attn_tune_get(int cell, attn_tune_cell *out)
{
    if (cell < 0 || cell >= ATTN_TUNE_CELLS) return ATTN_EINVAL;
    int was = attn_tune_take();
    if (was == TUNE_DUE) {
        attn_tune_measure();
        was = TUNE_DONE;
    }
    memset(out, 0, sizeof *out);
    out->name = tune_names[cell];
    out->ncandidates =
        attn_tune_candidates((attn_kernel)atomic_load(&tune_cap), out->candidates);
    out->kernel = (attn_kernel)atomic_load(&tune_kernel[cell]);
    if (out->kernel == ATTN_KERNEL_AUTO)
        out->kernel = out->ncandidates ? out->candidates[0] : attn_get_kernel();
    out->source = tune_source[cell];
    for (int c = 0; c < ATTN_TUNE_CANDIDATES; c++) out->seconds[c] = tune_time[cell][c];
    atomic_store(&tune_state, was);
    return ATTN_OK;
}

const char *attn_tune_cell_name(int cell)
{
    return cell >= 0 && cell < ATTN_TUNE_CELLS ? tune_names[cell] : NULL;
}

double attn_tune_seconds(void)
{
    int was = attn_tune_take();
    double t = tune_total;
    atomic_store(&tune_state, was);
    return t;
}
