/*
 * test_core.c -- the C core tested on its own, without Python.
 *
 * Each case builds q, k, v (and a mask) in double, lays them out in float32
 * or float64 with the case's strides (contiguous, transposed key, broadcast
 * key/value batch), calls attn_sdpa on both paths (weights materialised and
 * streaming) and compares with a naive loop written here from the formula.
 * Small enough to run under valgrind and the sanitizers.
 *
 * Prints one line per failure and closes with "N passed, M failed".
 */
#include "attn_core.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_passed, n_failed;

enum { MASK_NONE, MASK_BOOL, MASK_ADD };

typedef struct {
    const char *name;
    int B, Hq, H, L, S, E, Ev;
    int mask;        /* MASK_* ; bool/add masks hide a pseudo-random third of keys
                        and the whole of query row 0 (a fully masked row) */
    int causal;
    int k_transposed; /* key stored as (B, H, E, S) and viewed as (B, H, S, E) */
    int kv_broadcast; /* key/value stored once, broadcast over B (stride 0) */
} test_case;

/* deterministic values in [-2, 2) */
static double uniform(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return 4.0 * (double)(*state >> 8) / (double)(1u << 24) - 2.0;
}

static int hidden(const test_case *c, int b, int h, int i, int j)
{
    if (c->causal && j > i) return 1;
    if (c->mask == MASK_NONE) return 0;
    if (i == 0) return 1;
    if (c->mask == MASK_ADD) b = h = 0; /* the float mask is one (L, S) for all */
    return (b * 7 + h * 5 + i * 3 + j) % 3 == 0;
}

/* The naive reference: the formula, in double, one output element at a time.
   q[b][h][i][e], k[b][hk][j][e], v[b][hk][j][c]; hk = h / (Hq / H). */
static void naive(const test_case *c, const double *q, const double *k, const double *v,
                  const double *maskadd, double scale, double *out, double *weights)
{
    int group = c->Hq / c->H;
    double *s = malloc(sizeof(double) * (size_t)(c->S > 0 ? c->S : 1));
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hq; h++)
            for (int i = 0; i < c->L; i++) {
                int hk = h / group;
                const double *qi = q + (((size_t)b * c->Hq + h) * c->L + i) * c->E;
                double m = -INFINITY;
                for (int j = 0; j < c->S; j++) {
                    const double *kj = k + (((size_t)b * c->H + hk) * c->S + j) * c->E;
                    double dot = 0;
                    for (int e = 0; e < c->E; e++) dot += qi[e] * kj[e];
                    s[j] = hidden(c, b, h, i, j) ? -INFINITY : scale * dot;
                    if (c->mask == MASK_ADD && !hidden(c, b, h, i, j))
                        s[j] += maskadd[(size_t)i * c->S + j];
                    if (s[j] > m) m = s[j];
                }
                double sum = 0;
                for (int j = 0; j < c->S; j++) sum += m == -INFINITY ? 0 : exp(s[j] - m);
                for (int x = 0; x < c->Ev; x++) out[(((size_t)b * c->Hq + h) * c->L + i) * c->Ev + x] = 0;
                for (int j = 0; j < c->S; j++) {
                    double w = m == -INFINITY ? 0 : exp(s[j] - m) / sum;
                    weights[(((size_t)b * c->Hq + h) * c->L + i) * c->S + j] = w;
                    for (int x = 0; x < c->Ev; x++)
                        out[(((size_t)b * c->Hq + h) * c->L + i) * c->Ev + x] +=
                            w * v[(((size_t)b * c->H + hk) * c->S + j) * c->Ev + x];
                }
            }
    free(s);
}

static void store(void *dst, size_t idx, double x, int f32)
{
    if (f32) ((float *)dst)[idx] = (float)x;
    else ((double *)dst)[idx] = x;
}

static double load(const void *src, size_t idx, int f32)
{
    return f32 ? (double)((const float *)src)[idx] : ((const double *)src)[idx];
}

static void run_case(const test_case *c, int f32, int streaming)
{
    unsigned seed = 12345u + (unsigned)(c->L * 31 + c->S * 17 + c->E);
    size_t nq = (size_t)c->B * c->Hq * c->L * c->E, nk = (size_t)c->B * c->H * c->S * c->E;
    size_t nv = (size_t)c->B * c->H * c->S * c->Ev, no = (size_t)c->B * c->Hq * c->L * c->Ev;
    size_t nw = (size_t)c->B * c->Hq * c->L * c->S, nm = (size_t)c->L * c->S;
    double *q = calloc(nq + 1, sizeof(double)), *k = calloc(nk + 1, sizeof(double));
    double *v = calloc(nv + 1, sizeof(double)), *ma = calloc(nm + 1, sizeof(double));
    double *ref_out = calloc(no + 1, sizeof(double)), *ref_w = calloc(nw + 1, sizeof(double));
    size_t isz = f32 ? sizeof(float) : sizeof(double);
    char *bq = calloc(nq + 1, isz), *bk = calloc(nk + 1, isz), *bv = calloc(nv + 1, isz);
    char *bm = calloc(nm + 1, isz), *bmb = calloc(nm * c->B * c->Hq + 1, 1);
    char *bo = calloc(no + 1, isz), *bw = calloc(nw + 1, isz);

    for (size_t x = 0; x < nq; x++) q[x] = uniform(&seed);
    /* a broadcast key/value batch: the same data for every b */
    size_t kb = (size_t)c->H * c->S * c->E, vb = (size_t)c->H * c->S * c->Ev;
    for (size_t x = 0; x < nk; x++) k[x] = c->kv_broadcast && x >= kb ? k[x % kb] : uniform(&seed);
    for (size_t x = 0; x < nv; x++) v[x] = c->kv_broadcast && x >= vb ? v[x % vb] : uniform(&seed);
    for (size_t x = 0; x < nm; x++) ma[x] = 0.5 * uniform(&seed);
    double scale = 1.0 / sqrt((double)c->E);
    naive(c, q, k, v, ma, scale, ref_out, ref_w);

    /* lay out the inputs */
    for (size_t x = 0; x < nq; x++) store(bq, x, q[x], f32);
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->H; h++)
            for (int j = 0; j < c->S; j++)
                for (int e = 0; e < c->E; e++) {
                    size_t src = (((size_t)b * c->H + h) * c->S + j) * c->E + e;
                    size_t dst = c->k_transposed ? (((size_t)b * c->H + h) * c->E + e) * c->S + j : src;
                    store(bk, dst, k[src], f32);
                }
    for (size_t x = 0; x < nv; x++) store(bv, x, v[x], f32);
    /* additive mask: the values, with -inf where hidden; bool: 1 = attend */
    for (int i = 0; i < c->L; i++)
        for (int j = 0; j < c->S; j++)
            store(bm, (size_t)i * c->S + j, hidden(c, 0, 0, i, j) ? -INFINITY : ma[(size_t)i * c->S + j], f32);
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hq; h++)
            for (int i = 0; i < c->L; i++)
                for (int j = 0; j < c->S; j++)
                    bmb[(((size_t)b * c->Hq + h) * c->L + i) * c->S + j] =
                        !(c->mask != MASK_NONE && hidden(c, b, h, i, j) && !(c->causal && j > i));

    attn_sdpa_args a;
    memset(&a, 0, sizeof a);
    a.dtype = f32 ? ATTN_FLOAT32 : ATTN_FLOAT64;
    a.nbatch = 1;
    a.batch_shape[0] = c->B;
    a.num_heads = c->Hq;
    a.num_kv_heads = c->H;
    a.L = c->L; a.S = c->S; a.E = c->E; a.Ev = c->Ev;
    a.scale = scale;
    a.is_causal = c->causal;
    int64_t is = (int64_t)isz;
    a.q = (attn_view){.data = bq, .batch = {c->Hq * c->L * c->E * is}, .head = c->L * c->E * is,
                      .row = c->E * is, .col = is};
    a.k = (attn_view){.data = bk, .batch = {c->kv_broadcast ? 0 : c->H * c->S * c->E * is},
                      .head = c->S * c->E * is,
                      .row = c->k_transposed ? is : c->E * is,
                      .col = c->k_transposed ? c->S * is : is};
    a.v = (attn_view){.data = bv, .batch = {c->kv_broadcast ? 0 : c->H * c->S * c->Ev * is},
                      .head = c->S * c->Ev * is, .row = c->Ev * is, .col = is};
    if (c->mask == MASK_ADD) {
        /* one (L, S) float mask broadcast over batch and heads */
        a.mask_kind = ATTN_MASK_ADD;
        a.mask = (attn_view){.data = bm, .batch = {0}, .head = 0, .row = c->S * is, .col = is};
    } else if (c->mask == MASK_BOOL) {
        a.mask_kind = ATTN_MASK_BOOL;
        a.mask = (attn_view){.data = bmb, .batch = {c->Hq * c->L * c->S}, .head = c->L * c->S,
                             .row = c->S, .col = 1};
    }
    a.out = (attn_view){.data = bo, .batch = {c->Hq * c->L * c->Ev * is}, .head = c->L * c->Ev * is,
                        .row = c->Ev * is, .col = is};
    if (!streaming)
        a.weights = (attn_view){.data = bw, .batch = {c->Hq * c->L * c->S * is},
                                .head = c->L * c->S * is, .row = c->S * is, .col = is};

    int status = attn_sdpa(&a);
    double tol = f32 ? 2e-6 : 1e-13;
    double err_out = 0, err_w = 0;
    for (size_t x = 0; x < no; x++) {
        double d = fabs(load(bo, x, f32) - ref_out[x]) / (1.0 + fabs(ref_out[x]));
        if (!(d <= err_out)) err_out = d; /* NaN counts as an error */
    }
    if (!streaming)
        for (size_t x = 0; x < nw; x++) {
            double d = fabs(load(bw, x, f32) - ref_w[x]);
            if (!(d <= err_w)) err_w = d;
        }
    int ok = status == ATTN_OK && err_out <= tol && err_w <= tol;
    if (ok) n_passed++;
    else {
        n_failed++;
        printf("FAIL %s [%s, %s]: status %d, max error out %.3g, weights %.3g (tol %.1g)\n",
               c->name, f32 ? "float32" : "float64", streaming ? "streaming" : "weights", status,
               err_out, err_w, tol);
    }
    free(q); free(k); free(v); free(ma); free(ref_out); free(ref_w);
    free(bq); free(bk); free(bv); free(bm); free(bmb); free(bo); free(bw);
}

/* The core refuses what it cannot compute instead of reading out of bounds. */
static void test_rejects_bad_args(void)
{
    attn_sdpa_args a;
    memset(&a, 0, sizeof a);
    a.num_heads = 3;
    a.num_kv_heads = 2; /* 3 % 2 != 0 */
    int status = attn_sdpa(&a);
    if (status == ATTN_EINVAL) n_passed++;
    else {
        n_failed++;
        printf("FAIL rejects_bad_args: status %d, expected ATTN_EINVAL\n", status);
    }
}

int main(void)
{
    static const test_case cases[] = {
        /* name                  B  Hq H  L   S    E   Ev  mask       causal kT bc */
        {"one head",             1, 1, 1, 4,  4,   8,  8,  MASK_NONE, 0, 0, 0},
        {"L != S, Ev != E",      2, 3, 3, 5,  9,   6,  4,  MASK_NONE, 0, 0, 0},
        {"one token",            1, 2, 2, 1,  1,   3,  5,  MASK_NONE, 0, 0, 0},
        {"causal L < S",         1, 2, 2, 3,  7,   4,  4,  MASK_NONE, 1, 0, 0},
        {"causal L > S",         2, 1, 1, 9,  4,   4,  2,  MASK_NONE, 1, 0, 0},
        {"bool mask",            2, 2, 2, 6,  70,  5,  3,  MASK_BOOL, 0, 0, 0},
        {"float mask",           1, 3, 3, 6,  130, 4,  6,  MASK_ADD,  0, 0, 0},
        {"bool mask + causal",   1, 2, 2, 8,  8,   4,  4,  MASK_BOOL, 1, 0, 0},
        {"gqa 4 -> 2",           2, 4, 2, 5,  6,   8,  8,  MASK_NONE, 0, 0, 0},
        {"mqa 3 -> 1",           1, 3, 1, 4,  5,   4,  4,  MASK_BOOL, 0, 0, 0},
        {"transposed key",       2, 2, 2, 7,  65,  5,  5,  MASK_NONE, 0, 1, 0},
        {"broadcast key/value",  3, 2, 2, 4,  5,   4,  3,  MASK_ADD,  0, 0, 1},
        {"long keys",            1, 1, 1, 3,  300, 16, 8,  MASK_NONE, 1, 1, 0},
        {"no keys",              1, 1, 1, 3,  0,   4,  4,  MASK_NONE, 0, 0, 0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int f32 = 0; f32 < 2; f32++)
            for (int streaming = 0; streaming < 2; streaming++) run_case(&cases[c], f32, streaming);
    test_rejects_bad_args();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
