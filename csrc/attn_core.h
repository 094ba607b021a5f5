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

typedef enum { ATTN_FLOAT32 = 0, ATTN_FLOAT64 = 1 } attn_dtype;

typedef enum {
    ATTN_MASK_NONE = 0,
    ATTN_MASK_BOOL = 1, /* one byte per element, nonzero = attend (torch SDPA) */
    ATTN_MASK_ADD = 2   /* same dtype as q; added to the scores */
} attn_mask_kind;

/* Status codes returned by the core. */
enum { ATTN_OK = 0, ATTN_ENOMEM = 1, ATTN_EINVAL = 2 };

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
    int is_causal;                      /* mask out key j > query i (top-left) */
    attn_mask_kind mask_kind;
    attn_view q, k, v;                  /* inputs, read only */
    attn_view mask;                     /* read when mask_kind != ATTN_MASK_NONE */
    attn_view out;                      /* written: (batch..., Hq, L, Ev) */
    attn_view weights;                  /* written when data != NULL: (batch..., Hq, L, S);
                                           data == NULL selects the streaming path */
} attn_sdpa_args;

/*
 * Compute attention for every batch index and head.
 * With args->weights.data set, the weights are materialised (reference
 * kernel: scores, softmax, weighted sum). Without, keys are streamed with an
 * online softmax and no L x S buffer exists; extra memory is O(S_block + Ev).
 * A query row whose keys are all masked gets zero weights and a zero output.
 * Returns ATTN_OK, ATTN_ENOMEM or ATTN_EINVAL.
 */
int attn_sdpa(const attn_sdpa_args *args);

/* Number of key rows the streaming kernel scores at a time. */
#define ATTN_KEY_BLOCK 64

#endif /* ATTN_CORE_H */
