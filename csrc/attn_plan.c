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
static int attn_threads_for(double flops)
{
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

/* The kernel the user selected (attn_set_kernel), or the reason it is not
   a tiled one. */
static attn_reason attn_plan_start(attn_plan *plan, attn_op op)
{
    memset(plan, 0, sizeof *plan);
    plan->op = op;
    plan->kernel = attn_get_kernel();
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

void attn_plan_sdpa(const attn_sdpa_args *a, int64_t nproblems, attn_plan *plan)
{
    attn_reason why = attn_plan_start(plan, ATTN_OP_SDPA);
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
    plan->threads = attn_threads_for(flops);
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

void attn_plan_backward(const attn_sdpa_grad_args *g, int64_t nproblems, attn_plan *plan)
{
    const attn_sdpa_args *a = &g->fwd;
    attn_reason why = attn_plan_start(plan, ATTN_OP_SDPA_BACKWARD);
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
    plan->threads = attn_threads_for(flops);
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

void attn_plan_linear(const attn_linear_args *p, attn_plan *plan)
{
    attn_reason why = attn_plan_start(plan, ATTN_OP_LINEAR);
    /* items: (batch, block of rows, group of ATTN_LINEAR_COLS output
       columns), for both kernels. An item packs its slice of W^T once for
       all its rows, so blocks are as tall as ATTN_LINEAR_BR allows, and
       halved (down to 64 rows) while there are fewer than 2 items per
       thread. */
    double flops = 2.0 * (double)p->N * (double)p->M * (double)p->K * (double)p->O;
    plan->threads = attn_threads_for(flops);
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
