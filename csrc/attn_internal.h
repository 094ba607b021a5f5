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

/* The tiled kernels need GCC's vector extensions (GCC, clang); MSVC builds
   the reference kernel only. -DATTN_HAVE_FAST=0 builds that way anywhere
   (the C tests do, to keep the MSVC path honest). */
#ifndef ATTN_HAVE_FAST
#if defined(__GNUC__) || defined(__clang__)
#define ATTN_HAVE_FAST 1
#else
#define ATTN_HAVE_FAST 0
#endif
#endif

/* A monotonic clock, in seconds (attn_parallel.c). */
double attn_seconds(void);

/* keep a helper out of line (where inlining it costs its caller registers) */
#if defined(_MSC_VER)
#define ATTN_NOINLINE __declspec(noinline)
#else
#define ATTN_NOINLINE __attribute__((noinline))
#endif

/* Where one (batch, head) problem lives in each tensor. NULL = absent. */
typedef struct {
    int64_t index; /* the problem's number: b * num_heads + h */
    const char *q, *k, *v, *mask, *mask2;
    const double *alibi; /* this head's ALiBi slope, or NULL */
    char *out, *weights, *scores, *logits, *dropout_mask, *dropped, *lse;
} attn_head;

/* Does a bool mask of this kind hide the element at p? */
static inline int attn_bool_hides(attn_mask_kind kind, const char *p)
{
    if (kind == ATTN_MASK_BOOL) return *(const unsigned char *)p == 0;
    if (kind == ATTN_MASK_BOOL_BLOCK) return *(const unsigned char *)p != 0;
    return 0;
}

/*
 * The keys query row i may see by position (is_causal, window): keys
 * attn_key_begin(a, i) <= j < attn_key_end(a, i), none when begin >= end.
 * Both are nondecreasing in i. The queries that may see key j by position:
 * attn_query_begin(a, j) <= i < attn_query_end(a, j).
 */
static inline int64_t attn_key_begin(const attn_sdpa_args *a, int64_t i)
{
    const int64_t b = a->window ? a->query_offset + i - a->window_left : 0;
    return b > 0 ? b : 0;
}

static inline int64_t attn_key_end(const attn_sdpa_args *a, int64_t i)
{
    const int64_t p = a->query_offset + i;
    int64_t e = a->S;
    if (a->is_causal && p + 1 < e) e = p + 1;
    if (a->window && p + a->window_right + 1 < e) e = p + a->window_right + 1;
    return e;
}

static inline int64_t attn_query_begin(const attn_sdpa_args *a, int64_t j)
{
    int64_t b = 0;
    if (a->is_causal && j - a->query_offset > b) b = j - a->query_offset;
    if (a->window && j - a->query_offset - a->window_right > b)
        b = j - a->query_offset - a->window_right;
    return b;
}

static inline int64_t attn_query_end(const attn_sdpa_args *a, int64_t j)
{
    const int64_t e = a->window ? j + a->window_left - a->query_offset + 1 : a->L;
    return e < a->L ? e : a->L;
}

/* Does this call hide keys by position? */
static inline int attn_has_positions(const attn_sdpa_args *a)
{
    return a->is_causal || a->window;
}

/* ALiBi's term for query row i, key j: -slope |p - j| (hd->alibi set) */
static inline double attn_alibi(const attn_sdpa_args *a, const attn_head *hd, int64_t i,
                                int64_t j)
{
    const int64_t d = a->query_offset + i - j;
    return -*hd->alibi * (double)(d < 0 ? -d : d);
}

/* Is key j hidden from query row i by position (causal, window) or a bool mask? */
static inline int attn_blocked(const attn_sdpa_args *a, const attn_head *hd, int64_t i,
                               int64_t j)
{
    if (attn_has_positions(a) && (j < attn_key_begin(a, i) || j >= attn_key_end(a, i))) return 1;
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

/*
 * One call's interrupt state (attn_parallel.c). attn_cancel_check returns 1
 * once the call must stop: on thread 0 (the caller) it polls the caller's
 * attn_interrupt when ATTN_POLL_MS have passed since the last poll; on any
 * thread it reads the stop flag. cancel == NULL: never stops.
 */
typedef struct {
    const attn_interrupt *interrupt; /* NULL: nothing to poll */
    _Atomic int stop;
    int64_t checks, next_poll_ns;    /* thread 0 only */
} attn_cancel;
void attn_cancel_init(attn_cancel *c, const attn_interrupt *interrupt);
int attn_cancel_check(attn_cancel *c, int thread);

/* Thread pool (attn_parallel.c): fn(ctx, item, thread) for every item, on at
   most max_threads threads; thread is in [0, max_threads). With cancel, each
   thread checks attn_cancel_check before each item and stops when it says
   so (then some items never ran). */
/* fork() safety: attn_register_fork installs the pool's fork handlers
   (once; attn_parallel_for does it too); the child's handler calls
   attn_tune_forked (attn_plan.c), which gives a measurement that the fork
   cut short (its thread is not in the child) back to the next call. */
void attn_register_fork(void);
void attn_tune_forked(void);

void attn_parallel_for(int64_t n, int max_threads,
                       void (*fn)(void *ctx, int64_t item, int thread), void *ctx,
                       attn_cancel *cancel);

/* Fast kernels (attn_fast.c), float32 and float64. */
#define ATTN_FAST_BR 128  /* query rows per work item */
size_t attn_fast_workspace(const attn_sdpa_args *a); /* bytes per thread */
/* attn_fast_rows and the backward's phase 0 return 1 (and may have written
   part of their rows) when the tile's arithmetic could overflow T: NaN
   policy rule 6, the call is then the reference kernel's. hd points to
   nheads heads that share one key/value head (nheads > 1 only for
   decoding rows, the plan's heads_per_item). */
int attn_fast_rows(attn_kernel kernel, const attn_sdpa_args *a, const attn_head *hd,
                   int64_t nheads, int64_t i0, int64_t nr, void *workspace);

/* A decoding step: so few query rows that the tiles (2 vectors of queries
   wide) would mostly compute padding; q, k and v rows read in place when
   their features are contiguous. attn_fast_rows then runs decode_rows. */
#define ATTN_FAST_ROWS_MAX 4
#define ATTN_FAST_GROUP_MAX 32 /* heads per decoding item, at most */
static inline int attn_fast_use_rows(const attn_sdpa_args *a)
{
    const int64_t elem = a->dtype == ATTN_FLOAT64 ? 8 : 4;
    return a->L <= ATTN_FAST_ROWS_MAX && a->q.col == elem && a->k.col == elem &&
           a->q.row % elem == 0 &&
           a->v.col == elem && a->k.row % elem == 0 && a->v.row % elem == 0;
}

/* A linear layer's work items: at most ATTN_LINEAR_BR rows (fewer when that
   leaves threads idle) by ATTN_LINEAR_COLS output columns (a multiple of
   every fast kernel's tile width). */
#define ATTN_LINEAR_BR 512
#define ATTN_LINEAR_COLS 256
size_t attn_fast_linear_workspace(const attn_linear_args *p, int64_t block_rows); /* per thread */
void attn_fast_linear_block(attn_kernel kernel, const attn_linear_args *p, int64_t n,
                            int64_t l0, int64_t nr, int64_t o0, int64_t no, void *workspace);

/* The backward pass's fast kernels: phase 0 (query-major) writes dq rows
   start .. start+n-1 and this problem's stats (m, 1/l, D: 3 x L values);
   phase 1 (key-major) writes dk, dv rows start .. start+n-1 from them.
   fused (attn_plan.bwd_fused_dq): phase 0 writes the stats only, and phase 1
   takes the whole problem (start 0, n = S) and writes dq, dk and dv. */
size_t attn_fast_backward_workspace(const attn_sdpa_args *a, int fused); /* per thread */
int attn_fast_backward_rows(attn_kernel kernel, const attn_sdpa_grad_args *g,
                            const attn_head *hd, const char *dout, int phase, int fused,
                            int64_t start, int64_t n, void *stats, attn_mat dq, attn_mat dk,
                            attn_mat dv, void *workspace);

/* ------------------------------------------------------------------------ */
/* The planner (attn_plan.c): every decision about how a call runs.          */

/* Why a plan runs the kernel it runs. use_tiled: a tiled kernel of
   attn_fast.inc; every other reason names what sends the call to the
   reference kernel. Names: attn_reason_names. */
typedef enum {
    ATTN_REASON_TILED = 0,        /* use_tiled */
    ATTN_REASON_SELECTED,         /* attn_set_kernel(ATTN_KERNEL_REFERENCE) */
    ATTN_REASON_TRACE,            /* a trace view asked for (scores, logits, dP, dS, ...) */
    ATTN_REASON_DROPOUT,          /* dropout_p > 0 */
    ATTN_REASON_WEIGHTS_STRIDE,   /* the weights buffer's column stride is not one element */
    ATTN_REASON_SCALE_NOT_FINITE, /* NaN policy rule 4 */
    ATTN_REASON_GIVEN_WEIGHTS,    /* backward: the forward's weights given to read */
    ATTN_REASON_NO_ROWS,          /* backward: L == 0 or S == 0 */
    ATTN_REASON_QK_OVERFLOW,      /* NaN policy rule 6: the tiles' T could overflow */
    ATTN_REASON_NO_WORKSPACE,     /* the tiles' workspace could not be allocated */
    ATTN_REASON_GRAD_NOT_FINITE,  /* NaN policy rule 5: the tiled backward's result rejected */
    ATTN_REASON_EMPTY,            /* nothing to compute (attn_ran only, never planned) */
    ATTN_REASON_COUNT
} attn_reason;

extern const char *const attn_reason_names[ATTN_REASON_COUNT];

/* The operation a plan is for. */
typedef enum { ATTN_OP_SDPA, ATTN_OP_SDPA_BACKWARD, ATTN_OP_LINEAR } attn_op;

/* How one call runs. Items are numbered 0 .. items-1 and handed to
   attn_parallel_for; each thread gets work_size bytes of workspace, and
   shared_size bytes are shared by all (the backward's stats). */
typedef struct {
    attn_op op;                /* what for */
    attn_kernel kernel;        /* ATTN_KERNEL_REFERENCE or a tiled ISA */
    attn_reason reason;        /* why this kernel */
    int64_t nproblems;         /* attention: (batch, head) problems */
    int64_t block_rows;        /* rows per item (tiled: ATTN_FAST_BR / ATTN_LINEAR_BR;
                                  reference attention: a whole problem's L) */
    int64_t blocks[2];         /* row blocks per problem: [0] the forward's (and the
                                  backward's query-major loop), [1] the backward's
                                  key-major loop; 1 for the reference */
    int64_t col_groups, group_width; /* linear: output columns per item */
    int bwd_fused_dq;          /* tiled backward: the key-major loop sums dq too,
                                  one item per problem (attn_plan_backward) */
    int64_t heads_per_item;    /* tiled decoding rows: query heads of one key/value
                                  head per item (problems are numbered so that
                                  they are consecutive); 1 otherwise */
    int64_t items;             /* items of the (first) parallel loop */
    int threads;               /* threads to run them on */
    size_t work_size;          /* workspace bytes per thread, a multiple of 64 */
    size_t shared_size;        /* workspace bytes shared by all threads */
    /* the reference kernel's numbers, for a fallback to it */
    int64_t ref_block_rows, ref_blocks, ref_items;
    size_t ref_work_size;
} attn_plan;

/* The tuner's way in: a call that runs this tiled kernel on this many
   threads, whatever the selection and the tuned cells say (attn_plan.c
   times its candidates with them). NULL: plan as usual. */
typedef struct {
    attn_kernel kernel;
    int threads;
} attn_force;

void attn_plan_sdpa(const attn_sdpa_args *a, int64_t nproblems, const attn_force *force,
                    attn_plan *plan);
void attn_plan_backward(const attn_sdpa_grad_args *g, int64_t nproblems,
                        const attn_force *force, attn_plan *plan);
void attn_plan_linear(const attn_linear_args *p, const attn_force *force, attn_plan *plan);

/* The entry points of attn_core.h, forced (attn_sdpa(a) is
   attn_sdpa_forced(a, NULL)). */
int attn_sdpa_forced(const attn_sdpa_args *a, const attn_force *force);
int attn_sdpa_backward_forced(const attn_sdpa_grad_args *g, const attn_force *force);
int attn_linear_forced(const attn_linear_args *p, const attn_force *force);

/* The kernel attn_set_kernel last set: AUTO, or the one selected. */
attn_kernel attn_kernel_selected(void);

/* Switch a plan to the reference kernel, for the reason given. */
void attn_plan_use_reference(attn_plan *plan, attn_reason why);

/* A plan's workspace. attn_plan_alloc allocates it; when the tiles' does not
   fit, it switches the plan to the reference kernel (use_ref:no_workspace)
   and tries again. ATTN_OK or ATTN_ENOMEM (nothing allocated). */
typedef struct {
    char *work;   /* threads x work_size bytes */
    char *shared; /* shared_size bytes */
} attn_workspace;
int attn_plan_alloc(attn_plan *plan, attn_workspace *ws);
void attn_plan_free(attn_workspace *ws);

/* NaN policy rule 5 (attn_core.h): is every element of rows r0 .. r0+rows-1
   (cols wide) of a gradient finite? */
int attn_policy_grad_finite(attn_dtype dtype, attn_mat m, int64_t r0, int64_t rows,
                            int64_t cols);

#endif /* ATTN_INTERNAL_H */
