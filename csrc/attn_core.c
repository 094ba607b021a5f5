/*
 * attn_core.c -- scaled dot-product attention over strided views.
 * See attn_core.h for the problem and the conventions.
 */
#include "attn_core.h"

#include <math.h>
#include <stdlib.h>

#define ATTN_CAT_(a, b) a##_##b
#define ATTN_CAT(a, b) ATTN_CAT_(a, b)

/* Where one (batch, head) problem lives in each tensor. */
typedef struct {
    const char *q, *k, *v, *mask; /* mask is NULL without a mask */
    char *out, *weights;          /* weights is NULL on the streaming path */
} attn_head;

/* Is key j hidden from query row i by the causal mask or a bool mask?
   (Bool mask: nonzero = attend, as in torch's SDPA.) */
static inline int attn_blocked(const attn_sdpa_args *a, const attn_head *hd,
                               int64_t i, int64_t j)
{
    if (a->is_causal && j > i) return 1;
    if (a->mask_kind == ATTN_MASK_BOOL)
        return *(const unsigned char *)(hd->mask + i * a->mask.row + j * a->mask.col) == 0;
    return 0;
}

#define T float
#define SFX f32
#include "attn_kernels.inc"
#undef T
#undef SFX

#define T double
#define SFX f64
#include "attn_kernels.inc"
#undef T
#undef SFX

/*
 * Problem p = b * num_heads + h: unravel the batch index b over batch_shape
 * (C order) and add index * stride in every tensor. Query head h reads
 * key/value head h / (num_heads / num_kv_heads).
 */
static void attn_locate(const attn_sdpa_args *a, int64_t p, attn_head *hd)
{
    int64_t h = p % a->num_heads, b = p / a->num_heads;
    int64_t h_kv = h / (a->num_heads / a->num_kv_heads);
    int64_t oq = h * a->q.head, ok = h_kv * a->k.head, ov = h_kv * a->v.head;
    int64_t om = h * a->mask.head, oo = h * a->out.head, ow = h * a->weights.head;
    for (int d = a->nbatch - 1; d >= 0; d--) {
        int64_t idx = b % a->batch_shape[d];
        b /= a->batch_shape[d];
        oq += idx * a->q.batch[d];
        ok += idx * a->k.batch[d];
        ov += idx * a->v.batch[d];
        om += idx * a->mask.batch[d];
        oo += idx * a->out.batch[d];
        ow += idx * a->weights.batch[d];
    }
    hd->q = a->q.data + oq;
    hd->k = a->k.data + ok;
    hd->v = a->v.data + ov;
    hd->mask = a->mask_kind == ATTN_MASK_NONE ? NULL : a->mask.data + om;
    hd->out = a->out.data + oo;
    hd->weights = a->weights.data ? a->weights.data + ow : NULL;
}

int attn_sdpa(const attn_sdpa_args *a)
{
    if (a->nbatch < 0 || a->nbatch > ATTN_MAX_DIMS || a->num_heads < 0 ||
        a->num_kv_heads <= 0 || a->num_heads % a->num_kv_heads != 0 || a->L < 0 ||
        a->S < 0 || a->E < 0 || a->Ev < 0 || !a->q.data || !a->k.data || !a->v.data ||
        !a->out.data || (a->mask_kind != ATTN_MASK_NONE && !a->mask.data) ||
        (a->dtype != ATTN_FLOAT32 && a->dtype != ATTN_FLOAT64))
        return ATTN_EINVAL;

    int64_t nproblems = a->num_heads;
    for (int d = 0; d < a->nbatch; d++) nproblems *= a->batch_shape[d];
    if (nproblems == 0 || a->L == 0 || (a->Ev == 0 && !a->weights.data)) return ATTN_OK;

    /* workspace: a key block of scores and one output row, in double */
    double *work = malloc((size_t)(ATTN_KEY_BLOCK + a->Ev) * sizeof(double));
    if (!work) return ATTN_ENOMEM;

    for (int64_t p = 0; p < nproblems; p++) {
        attn_head hd;
        attn_locate(a, p, &hd);
        if (a->dtype == ATTN_FLOAT32) {
            if (hd.weights) attn_head_reference_f32(a, &hd, work);
            else attn_head_streaming_f32(a, &hd, work);
        } else {
            if (hd.weights) attn_head_reference_f64(a, &hd, work);
            else attn_head_streaming_f64(a, &hd, work);
        }
    }
    free(work);
    return ATTN_OK;
}
