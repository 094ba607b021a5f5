/*
 * attn_core.h -- the C core of attnpy: scaled dot-product attention on
 * strided views of float32 / float64 buffers.
 *
 * Pure C11. No Python, no NumPy: every tensor is a pointer plus byte strides,
 * exactly what a NumPy array carries, so the binding hands NumPy's buffers
 * over without copying them (a stride of 0 is a broadcast dimension, a
 * negative stride a reversed one).
 *
 * The problem, for every batch index b and query head h:
 *
 *     scores  = scale * q k^T + mask          (L x S)
 *     weights = softmax(scores) along S       (L x S)
 *     out     = weights v                     (L x Ev)
 *
 * with q (L x E) taken from query head h and k (S x E), v (S x Ev) from key/
 * value head h / (num_heads / num_kv_heads) (grouped-query attention; with
 * num_kv_heads == num_heads it is head h).
 */
#ifndef ATTN_CORE_H
#define ATTN_CORE_H

#include <stdint.h>

#define ATTN_MAX_DIMS 64 /* as NumPy 2's NPY_MAXDIMS */

/* The core's limits: every dimension (L, S, E, Ev, a linear layer's sizes)
   is at most ATTN_MAX_EXTENT, so that products of two stay far from
   overflowing 64 bits; at most ATTN_MAX_THREADS threads. The binding exports
   both to Python (_core.MAX_EXTENT, _core.MAX_THREADS). */
#define ATTN_MAX_EXTENT ((int64_t)INT32_MAX)
#define ATTN_MAX_THREADS 256

typedef enum { ATTN_FLOAT32 = 0, ATTN_FLOAT64 = 1 } attn_dtype;

typedef enum {
    ATTN_MASK_NONE = 0,
    ATTN_MASK_BOOL = 1,       /* one byte per element, nonzero = attend (torch SDPA) */
    ATTN_MASK_ADD = 2,        /* same dtype as q; added to the scores */
    ATTN_MASK_BOOL_BLOCK = 3  /* one byte per element, nonzero = do NOT attend
                                 (torch.nn.MultiheadAttention's polarity) */
} attn_mask_kind;

/* Status codes returned by the core. The core trusts its arguments (the
   binding validated them; debug builds assert it, see csrc/README.md): its
   calls fail only with ATTN_ENOMEM, and attn_set_kernel with ATTN_EINVAL
   for a kernel this CPU cannot run. */
enum { ATTN_OK = 0, ATTN_ENOMEM = 1, ATTN_EINVAL = 2, ATTN_EINTR = 3 };

/*
 * Stopping a long call early (the binding: Ctrl-C). A call whose args name
 * an attn_interrupt calls poll(ctx) on the calling thread about every
 * ATTN_POLL_MS milliseconds, between work items (a block of rows) and
 * between the rows of the reference backward. When poll returns nonzero,
 * every thread stops before its next item, the call returns ATTN_EINTR and
 * its outputs are partly written. interrupt == NULL: the call runs to the
 * end. poll may take locks (the binding takes the GIL back to run Python's
 * signal handlers): it is never called from the core's worker threads.
 */
#define ATTN_POLL_MS 50

/*
 * What a call ran, for a caller that wants to say (a result's repr): the
 * kernel (never ATTN_KERNEL_AUTO) and the planner's reason for it, an index
 * that attn_reason_name() turns into "use_tiled", "use_ref:qk_overflow",
 * ... (attn_plan.c lists them). A call with nothing to compute reports the
 * selected kernel (attn_get_kernel()) and the reason "empty"; a build
 * without tiled kernels (MSVC) reports the reference and "use_ref:selected"
 * although nobody selected it (AUTO resolves to it there).
 */
typedef struct attn_ran {
    int kernel; /* an attn_kernel */
    int reason;
} attn_ran;

/* The name of a reason of attn_ran; NULL when reason is not one. */
const char *attn_reason_name(int reason);
typedef struct {
    int (*poll)(void *ctx);
    void *ctx;
} attn_interrupt;

/*
 * One tensor of the problem, seen as (batch..., head, row, col).
 * data points at element (0, ..., 0). All strides are in bytes; a stride of
 * 0 repeats the same elements along that dimension (broadcasting).
 */
typedef struct {
    char *data;
    int64_t batch[ATTN_MAX_DIMS]; /* one stride per leading batch dim */
    int64_t head;                 /* stride between heads */
    int64_t row;                  /* stride between rows (L or S) */
    int64_t col;                  /* stride between columns (E, Ev or S) */
} attn_view;

typedef struct {
    attn_dtype dtype;
    int nbatch;                         /* number of leading batch dims */
    int64_t batch_shape[ATTN_MAX_DIMS]; /* their sizes */
    int64_t num_heads;                  /* Hq: heads of query, out, weights */
    int64_t num_kv_heads;               /* H: heads of key and value, divides Hq */
    int64_t L, S, E, Ev;                /* query rows, key rows, q/k width, v width */
    double scale;                       /* multiplies q k^T */

    /* Positions: query row i sits at position p = query_offset + i, key j at
       position j. is_causal hides the keys j > p (query_offset = 0: torch's
       top-left causal mask; S - L: bottom-right, decoding with a cache).
       window (nonzero) hides the keys outside p - window_left .. p +
       window_right (both >= 0). Both hide the extra keys too. */
    int is_causal;
    int64_t query_offset;
    int window;
    int64_t window_left, window_right;
    /* ALiBi (Press et al.): when alibi.data != NULL, -slope * |p - j| is
       added to the scaled scores of head h, slope the double at alibi.data +
       h * alibi.head + the batch strides (row and col unused). */
    attn_view alibi;
    attn_view q, k, v;                  /* inputs, read only */

    /* Two masks, both applied (MultiheadAttention's attn_mask and
       key_padding_mask; SDPA uses the first). Each is read when its kind is
       not ATTN_MASK_NONE, and covers keys j < S - extra_keys only: the last
       extra_keys keys (bias_k, the zero key) are never masked. */
    attn_mask_kind mask_kind, mask2_kind;
    attn_view mask, mask2;
    int64_t extra_keys;

    /* Dropout on the weights, after the softmax: key j of row i is kept with
       probability 1 - dropout_p, decided by a hash of (dropout_seed, element
       index), so the result does not depend on threads or call order; kept
       weights are scaled by 1 / (1 - dropout_p). */
    double dropout_p;
    uint64_t dropout_seed;

    attn_view out;                      /* written: (batch..., Hq, L, Ev) */
    attn_view weights;                  /* written when data != NULL: (batch..., Hq, L, S),
                                           the softmax (before dropout);
                                           data == NULL selects the streaming path */
    /* The trace, each written when data != NULL (needs weights.data): */
    attn_view scores;                   /* q k^T, unscaled, unmasked */
    attn_view logits;                   /* scale * q k^T + masks: the softmax's input */
    attn_view dropout_mask;             /* one byte per element: 1 = kept */
    attn_view dropped;                  /* weights after dropout: what multiplies v */
    /* The log-sum-exp of each row's softmax input, written when data != NULL:
       (batch..., Hq, L, 1) (col unused), log sum_j exp(logits_ij), so that
       weights_ij = exp(logits_ij - lse_i); -inf for a row with no open key,
       NaN for a NaN row. The backward takes it (with out) as saved statistics. */
    attn_view lse;

    const attn_interrupt *interrupt;    /* NULL: never stopped early (see above) */
    attn_ran *ran;                      /* NULL, or written at return: what ran, and why */
} attn_sdpa_args;

/*
 * Compute attention for every batch index and head.
 * With args->weights.data set, the weights are materialised (reference
 * kernel: scores, softmax, weighted sum). Without, keys are streamed with an
 * online softmax and no L x S buffer exists; extra memory is O(S_block + Ev).
 * A query row whose keys are all masked gets zero weights and a zero output.
 * Returns ATTN_OK, ATTN_ENOMEM, or ATTN_EINTR (args->interrupt asked).
 */
int attn_sdpa(const attn_sdpa_args *args);

/*
 * The backward pass. With O = dropout(softmax(S)) V, S = scale q k^T + masks,
 * and dO the gradient of the loss with respect to O, per problem:
 *
 *     P   = softmax(S)                 (recomputed row by row, or given)
 *     dP  = (dO v^T) * Z / (1 - p)     (Z: the dropout mask; 1 without dropout)
 *     D_i = sum_j P_ij dP_ij
 *     dS  = P * (dP - D)               (the softmax's Jacobian applied)
 *     dq  = scale dS k,   dk = scale dS^T q,   dv = (P * Z / (1 - p))^T dO
 *
 * fwd describes the forward call (q, k, v, masks, scale, causal, dropout;
 * its weights view is not used). With fwd.lse.data and fwd.out.data set
 * (the forward's lse and output, both read), the tiled kernels take the
 * softmax's statistics from them (P = exp(S - lse), D_i = dO_i . O_i)
 * instead of running the forward again; the reference kernel recomputes
 * them. The gradients are written per problem into dq (P, L, E),
 * dk (P, S, E), dv (P, S, Ev): contiguous, one
 * slab per (batch, query head) problem, so that problems never share a
 * destination; attn_sdpa_reduce_grads then sums them into arrays of the
 * inputs' shapes (over broadcast dims and the query heads of a kv group).
 */
typedef struct {
    attn_sdpa_args fwd;
    attn_view grad_out;      /* dO, (batch..., Hq, L, Ev) */
    attn_view weights;       /* the forward's softmax (pre-dropout); data NULL: recompute */
    char *dq, *dk, *dv;      /* per-problem gradients, contiguous (see above) */
    attn_view grad_q, grad_k, grad_v; /* when data != NULL: that gradient is written
                                 through this view of the inputs' layout instead of
                                 its slab (the caller guarantees that no two problems
                                 share rows: no broadcast, no key/value heads shared) */
    attn_view grad_weights;  /* trace, written when data != NULL: dP (batch..., Hq, L, S) */
    attn_view grad_scores;   /* trace: dS, the gradient of the softmax's input */
} attn_sdpa_grad_args;

int attn_sdpa_backward(const attn_sdpa_grad_args *g);

/* Sum the per-problem gradients into arrays of the inputs' shapes: the views
   of r.q, r.k, r.v (strides 0 on broadcast dims; kv heads mapped as in the
   forward) receive g->dq, g->dk, g->dv. They must be zero-filled first. A
   view with data == NULL is skipped: when an input is neither broadcast nor
   shared by several query heads, its per-problem slabs are already the
   gradient's own C-contiguous layout and the caller points g->dq (...) there. */
int attn_sdpa_reduce_grads(const attn_sdpa_grad_args *g, const attn_sdpa_args *r);

/* ------------------------------------------------------------------------ */
/* NaN and inf: THE POLICY                                                   */

/*
 * The core never makes a pass over its inputs of its own to look for NaN or
 * inf (the tiles' bound of rule 6 reads the tiles they have packed); every
 * kernel, reference or tiled, gives the same answer under these rules. They
 * are implemented once: rules 1-3 by the reference kernel's helpers
 * (attn_blocked in attn_internal.h, logit in attn_kernels.inc) that the
 * tiles follow (their -inf select in qk_tile, pv_tile_careful), rules 4-5
 * by the planner (attn_plan.c: attn_policy_tiles, attn_policy_grad_finite),
 * rule 6 by the tiles' bound (qk_may_overflow in attn_fast.inc), the rerun
 * in attn_core.c and the reference's score (attn_kernels.inc).
 *
 *  1. A masked pair never counts, whatever its score: a bool mask, the
 *     causal mask, or a float mask of -inf give it weight exactly 0, even
 *     when q . k is NaN or inf. (extra_keys are never masked.)
 *  2. A key whose weight is exactly 0 does not read its value row (a NaN in
 *     v there does not reach the output), and gets no gradient.
 *  3. A row whose every key is masked gets zero weights and a zero output
 *     (as torch's SDPA); a NaN score of an open pair makes its row NaN.
 *  4. A non-finite scale runs the reference kernel
 *     (use_ref:scale_not_finite): a tile multiplies scale into every pair of
 *     a block, and inf * 0 is NaN where the reference scores nothing.
 *  5. The tiled backward multiplies whole blocks, so a zero weight times an
 *     inf or NaN in q, k, v or dO can give NaN where rule 2 gives 0. It
 *     checks the gradient rows it writes (attn_policy_grad_finite) and, when
 *     one is not finite, the whole call is done again by the reference
 *     kernel (use_ref:grad_not_finite), which overwrites every gradient.
 *     Finite gradients mean no such product happened: the tiles' answer
 *     stands. (Checking the inputs first instead cost a pass over them on
 *     every call.)
 *  6. Scores are computed as the reference computes them, in double, so
 *     that a float32 q . k that overflows (or a weight row whose scores do)
 *     still gives the softmax the reference gives: every kernel and both
 *     paths (with and without weights) agree wherever the weights and the
 *     output are representable in the element type. The tiles compute in
 *     the element type T and look for an overflow in each tile: a tile no
 *     mask touches, after the fact (with finite inputs an overflow leaves
 *     an inf or NaN score, and nothing else does), a masked tile, whose
 *     -inf may be the mask's, by a bound first,
 *         E max|q| max|k| max(1, |scale|) <= T_MAX / 2;
 *     the flash kernel also checks its unnormalised output sum. When a tile
 *     finds one (an inf or NaN input looks like one too), the whole call is
 *     done again by the reference kernel (use_ref:qk_overflow). In float64
 *     the reference's dot product can overflow double itself: a score
 *     whose q . k is not finite is computed again as sum_e (scale q_e) k_e.
 *     A score that is +inf even so (an infinite input, or beyond 1.8e308)
 *     makes its row NaN, as torch's softmax of +inf does.
 *
 * The E == 0 rule (attn_sdpa): with no columns, q . k is an empty sum, 0,
 * and the scores are 0 whatever the scale (inf and NaN included), as torch's.
 */

/* Number of key rows the streaming kernel scores at a time. */
#define ATTN_KEY_BLOCK 64

/* Is element `index` kept by dropout with probability 1 - p under `seed`? */
int attn_dropout_keep(uint64_t seed, uint64_t index, double p);

/* ------------------------------------------------------------------------ */
/* Kernels and threads                                                       */

/*
 * Which kernel computes attention and linear layers. AUTO: the fastest this
 * CPU runs. REFERENCE: the readable kernel of attn_reference.inc (the trace
 * and dropout always use it; attn_plan.c says when else). The others are
 * the tiled kernels of attn_fast.inc, float32 and float64, for one
 * instruction set each: BASELINE 16-byte vectors (x86-64's SSE2, aarch64's
 * NEON), AVX2 (with FMA) and AVX512 (AVX-512F) on x86-64, NEON on aarch64
 * (32-byte vectors: two NEON registers each). A compiler without GCC's
 * vector extensions (MSVC) builds REFERENCE only. Setting a kernel this
 * build or CPU lacks returns ATTN_EINVAL.
 */
typedef enum {
    ATTN_KERNEL_AUTO = 0,
    ATTN_KERNEL_REFERENCE = 1,
    ATTN_KERNEL_BASELINE = 2,
    ATTN_KERNEL_AVX2 = 3,
    ATTN_KERNEL_AVX512 = 4,
    ATTN_KERNEL_NEON = 5
} attn_kernel;

int attn_kernel_supported(attn_kernel kernel);
int attn_set_kernel(attn_kernel kernel);
attn_kernel attn_get_kernel(void); /* what AUTO resolves to on this CPU */

/*
 * The tuner (attn_plan.c). With AUTO selected, the planner runs, for each
 * cell -- an operation (the forward, the backward, the linear layer), an
 * element type and, for attention, a class of head dimension E (<= 32,
 * <= 64, wider) -- the tiled kernel the tuner chose for it. At the first
 * call planned with AUTO, the tuner times the cell's candidates, the two
 * widest tiled kernels this CPU runs that are no wider than the cap
 * (AVX-512 and AVX2 on most x86-64 CPUs, NEON and the baseline on aarch64),
 * on one problem per cell on the calling thread, best of three rounds (six
 * when the first three put the narrower one ahead), within
 * ATTN_TUNE_BUDGET_S seconds in all (cells left over keep the widest).
 * The widest candidate stands unless the other is ATTN_TUNE_MARGIN faster.
 * A pinned cell is not timed. Tuning off: every cell runs the widest
 * candidate. Calls planned while another thread tunes use the widest.
 * Builds with ATTN_FAULT_INJECTION start with tuning off, so that the
 * allocations they count are the call's own.
 */
#define ATTN_TUNE_CELLS 14
#define ATTN_TUNE_CANDIDATES 2
#define ATTN_TUNE_BUDGET_S 0.1
#define ATTN_TUNE_MARGIN 0.05 /* 5%: less than that is noise, not a reason */

typedef enum { ATTN_TUNE_DEFAULT = 0, ATTN_TUNE_MEASURED, ATTN_TUNE_PINNED } attn_tune_source;

typedef struct {
    const char *name;  /* "sdpa_f32_e64", "backward_f64_e128", "linear_f32", ... */
    attn_kernel kernel; /* what the planner runs for this cell */
    attn_tune_source source;
    int ncandidates;
    attn_kernel candidates[ATTN_TUNE_CANDIDATES]; /* widest first */
    double seconds[ATTN_TUNE_CANDIDATES];         /* best time; 0: not timed */
} attn_tune_cell;

/* Start again: forget every measurement and pin, tune (enabled) or not,
   with candidates no wider than cap (AUTO: no cap). ATTN_EINVAL when cap is
   not a tiled kernel this CPU runs. */
int attn_tune_configure(int enabled, attn_kernel cap);
/* Pin a cell to a candidate kernel (AUTO: unpin, tune it again).
   ATTN_EINVAL when cell or kernel is not one. */
int attn_tune_pin(int cell, attn_kernel kernel);
/* A cell's state, measuring first when a measurement is due. ATTN_EINVAL
   when cell is not one. */
int attn_tune_get(int cell, attn_tune_cell *out);
/* A cell's name, NULL when cell is not one. */
const char *attn_tune_cell_name(int cell);
/* Seconds the last measurement took (0 before the first). */
double attn_tune_seconds(void);

/* The float32 FMA throughput of `threads` threads running the selected
   kernel's vectors (iters rounds each), in GFLOP/s: the peak the benchmark
   compares against. */
double attn_fma_peak_gflops(int threads, int64_t iters);

/* Threads used by the core: 1 <= n <= 256, or 0 for the default
   (OMP_NUM_THREADS if set, else the CPUs online). */
int attn_set_num_threads(int n);
int attn_get_num_threads(void);

/* ------------------------------------------------------------------------ */
/* Linear layers                                                            */

/* A batch of matrices (batch, row, col); byte strides. */
typedef struct {
    char *data;
    int64_t batch, row, col;
} attn_view3;

/* A vector; data == NULL means absent (no bias). */
typedef struct {
    char *data;
    int64_t stride;
} attn_vec;

/*
 * y = x W^T + b, as torch.nn.Linear: for every batch n and row l,
 *     y[n][l][o] = b[o] + sum_i x[n][l][i] W[o][i]
 * x (N, M, K), W (O, K) as a view3 with batch stride unused, y (N, M, O).
 * Any byte strides: x, W and y may be transposed views (W = V^T is V with
 * its row and column strides swapped), as the backward's dx = dy W and
 * dW = dy^T x need.
 */
typedef struct {
    attn_dtype dtype;
    int64_t N, M, K, O;
    attn_view3 x, w, y;
    attn_vec b;
    int accumulate; /* y += x W^T + b instead of y = ... */
    const attn_interrupt *interrupt; /* NULL: never stopped early */
} attn_linear_args;

int attn_linear(const attn_linear_args *args);

/* ------------------------------------------------------------------------ */
/* Fault injection (debug builds compiled with -DATTN_FAULT_INJECTION only)  */

#ifdef ATTN_FAULT_INJECTION
/*
 * Every allocation of the core (and each one the binding makes for a result
 * array) is counted. attn_fault_inject(n) makes the n-th allocation from now
 * fail, once (n = 0: none fails), and returns what happened since the last
 * call: the allocations counted, and in *live the core's blocks not yet freed.
 * attn_fault_next counts one allocation and says whether it must fail.
 */
int64_t attn_fault_inject(int64_t n, int64_t *live);
int attn_fault_next(void);
#endif

#endif /* ATTN_CORE_H */
