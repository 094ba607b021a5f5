/*
 * tests/c/test_core.c -- the C core tested on its own, without Python
 * (built with -Icsrc: see dev.sh).
 *
 * Each case builds q, k, v (and a mask) in double, lays them out in float32
 * or float64 with the case's strides (contiguous, transposed key, broadcast
 * key/value batch), calls attn_sdpa on both paths (weights materialised and
 * streaming) and compares with a naive loop written here from the formula.
 * Small enough to run under valgrind and the sanitizers.
 *
 * Prints one line per failure and closes with "N passed, M failed".
 */
#include "attn_internal.h" /* the planner's tests; -Icsrc */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
    int offset;       /* query_offset: query i sits at position offset + i */
    int window, wl, wr; /* a window: keys p - wl .. p + wr */
    int alibi;        /* ALiBi slopes, one per (batch, head), stored (Hq, B) */
} test_case;

/* deterministic values in [-2, 2) */
static double uniform(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return 4.0 * (double)(*state >> 8) / (double)(1u << 24) - 2.0;
}

/* hidden by position (causal, window)? */
static int pos_hidden(const test_case *c, int i, int j)
{
    int p = c->offset + i;
    return (c->causal && j > p) || (c->window && (j < p - c->wl || j > p + c->wr));
}

/* ALiBi's slope of (b, h) */
static double slope_of(int b, int h) { return 0.125 * (h + 1) + 0.0625 * b; }

static int hidden(const test_case *c, int b, int h, int i, int j)
{
    if (pos_hidden(c, i, j)) return 1;
    if (c->mask == MASK_NONE) return 0;
    if (i == 0) return 1;
    if (c->mask == MASK_ADD) b = h = 0; /* the float mask is one (L, S) for all */
    return (b * 7 + h * 5 + i * 3 + j) % 3 == 0;
}

/* The naive reference: the formula, in double, one output element at a time.
   q[b][h][i][e], k[b][hk][j][e], v[b][hk][j][c]; hk = h / (Hq / H). */
static void naive(const test_case *c, const double *q, const double *k, const double *v,
                  const double *maskadd, double scale, double *out, double *weights,
                  double *lse /* NULL, or per row: log sum_j exp(s_j), -inf when all hidden */)
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
                    if (c->alibi && !hidden(c, b, h, i, j))
                        s[j] -= slope_of(b, h) * fabs((double)(c->offset + i - j));
                    if (s[j] > m) m = s[j];
                }
                double sum = 0;
                for (int j = 0; j < c->S; j++) sum += m == -INFINITY ? 0 : exp(s[j] - m);
                if (lse) lse[((size_t)b * c->Hq + h) * c->L + i] = m == -INFINITY ? -INFINITY : m + log(sum);
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
    size_t nl = (size_t)c->B * c->Hq * c->L;
    double *ref_lse = calloc(nl + 1, sizeof(double));
    size_t isz = f32 ? sizeof(float) : sizeof(double);
    char *bq = calloc(nq + 1, isz), *bk = calloc(nk + 1, isz), *bv = calloc(nv + 1, isz);
    char *bm = calloc(nm + 1, isz), *bmb = calloc(nm * c->B * c->Hq + 1, 1);
    char *bo = calloc(no + 1, isz), *bw = calloc(nw + 1, isz), *bl = calloc(nl + 1, isz);

    for (size_t x = 0; x < nq; x++) q[x] = uniform(&seed);
    /* a broadcast key/value batch: the same data for every b */
    size_t kb = (size_t)c->H * c->S * c->E, vb = (size_t)c->H * c->S * c->Ev;
    for (size_t x = 0; x < nk; x++) k[x] = c->kv_broadcast && x >= kb ? k[x % kb] : uniform(&seed);
    for (size_t x = 0; x < nv; x++) v[x] = c->kv_broadcast && x >= vb ? v[x % vb] : uniform(&seed);
    for (size_t x = 0; x < nm; x++) ma[x] = 0.5 * uniform(&seed);
    double scale = 1.0 / sqrt((double)c->E);
    naive(c, q, k, v, ma, scale, ref_out, ref_w, ref_lse);

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
                        !(c->mask != MASK_NONE && hidden(c, b, h, i, j) && !pos_hidden(c, i, j));

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
    a.query_offset = c->offset;
    a.window = c->window;
    a.window_left = c->wl;
    a.window_right = c->wr;
    /* the slopes stored (Hq, B): strided, as a transposed NumPy array */
    double *slopes = calloc((size_t)c->B * c->Hq + 1, sizeof(double));
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hq; h++) slopes[(size_t)h * c->B + b] = slope_of(b, h);
    if (c->alibi)
        a.alibi = (attn_view){.data = (char *)slopes, .batch = {(int64_t)sizeof(double)},
                              .head = c->B * (int64_t)sizeof(double)};
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
    if ((c->L + f32 + streaming) % 2 == 0) /* the lse on half the calls, on both paths */
        a.lse = (attn_view){.data = bl, .batch = {c->Hq * c->L * is}, .head = c->L * is, .row = is};

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
    double err_lse = 0;
    for (size_t x = 0; a.lse.data && x < nl; x++) {
        double got = load(bl, x, f32), d = fabs(got - ref_lse[x]) / (1.0 + fabs(ref_lse[x]));
        if (got == -INFINITY && ref_lse[x] == -INFINITY) continue;
        if (!(d <= err_lse)) err_lse = d;
    }
    int ok = status == ATTN_OK && err_out <= tol && err_w <= tol && err_lse <= tol;
    if (ok) n_passed++;
    else {
        n_failed++;
        printf("FAIL %s [%s, %s]: status %d, max error out %.3g, weights %.3g, lse %.3g "
               "(tol %.1g)\n", c->name, f32 ? "float32" : "float64",
               streaming ? "streaming" : "weights", status, err_out, err_w, err_lse, tol);
    }
    free(q); free(k); free(v); free(ma); free(ref_out); free(ref_w); free(ref_lse);
    free(bq); free(bk); free(bv); free(bm); free(bmb); free(bo); free(bw); free(bl); free(slopes);
}

/*
 * attn_linear against the formula, y = x W^T + b (+ y with accumulate), on
 * strided views: x with padded rows, W stored (O, K) or given as the
 * transpose of a stored (K, O) matrix (row and column strides swapped), y
 * with padded rows; both dtypes, with and without bias and accumulate, on
 * every kernel the caller selected. Shapes cover partial tiles of rows,
 * columns and of the terms (K = 389: passes of 384 floats and a rest of 5,
 * of 192 doubles and a rest of 5).
 */
static void test_linear(const char *kernel_name)
{
    enum { N = 2, M = 131, K = 389, O = 70, XP = K + 3, YP = O + 5 };
    static double x[N][M][XP], wt[K][O], b[O], y0[N][M][YP];
    unsigned seed = 4242u;
    for (int n = 0; n < N; n++)
        for (int l = 0; l < M; l++)
            for (int i = 0; i < XP; i++) x[n][l][i] = uniform(&seed);
    for (int i = 0; i < K; i++)
        for (int o = 0; o < O; o++) wt[i][o] = uniform(&seed);
    for (int o = 0; o < O; o++) b[o] = uniform(&seed);
    for (int n = 0; n < N; n++)
        for (int l = 0; l < M; l++)
            for (int o = 0; o < YP; o++) y0[n][l][o] = uniform(&seed);
    for (int f32 = 0; f32 < 2; f32++)
        for (int variant = 0; variant < 8; variant++) {
            int bias = variant & 1, acc = (variant >> 1) & 1, w_rows = variant >> 2;
            size_t es = f32 ? sizeof(float) : sizeof(double);
            char *bx = malloc(sizeof x), *bw = malloc(sizeof wt), *bb = malloc(sizeof b);
            char *by = malloc(sizeof y0);
            for (size_t t = 0; t < sizeof x / sizeof(double); t++) store(bx, t, (&x[0][0][0])[t], f32);
            for (int i = 0; i < K; i++)    /* wt as stored (K, O), or W = wt^T stored (O, K) */
                for (int o = 0; o < O; o++)
                    store(bw, w_rows ? (size_t)o * K + i : (size_t)i * O + o, wt[i][o], f32);
            for (size_t t = 0; t < O; t++) store(bb, t, b[t], f32);
            for (size_t t = 0; t < sizeof y0 / sizeof(double); t++) store(by, t, (&y0[0][0][0])[t], f32);
            attn_linear_args p;
            memset(&p, 0, sizeof p);
            p.dtype = f32 ? ATTN_FLOAT32 : ATTN_FLOAT64;
            p.N = N; p.M = M; p.K = K; p.O = O;
            p.x = (attn_view3){bx, (int64_t)(M * XP * es), (int64_t)(XP * es), (int64_t)es};
            p.w = w_rows ? (attn_view3){bw, 0, (int64_t)(K * es), (int64_t)es}
                         : (attn_view3){bw, 0, (int64_t)es, (int64_t)(O * es)}; /* W = wt^T */
            p.y = (attn_view3){by, (int64_t)(M * YP * es), (int64_t)(YP * es), (int64_t)es};
            if (bias) p.b = (attn_vec){bb, (int64_t)es};
            p.accumulate = acc;
            int status = attn_linear(&p);
            double err = 0;
            for (int n = 0; n < N; n++)
                for (int l = 0; l < M; l++)
                    for (int o = 0; o < YP; o++) {
                        double want = y0[n][l][o];
                        if (o < O) {
                            double sum = (bias ? b[o] : 0) + (acc ? y0[n][l][o] : 0);
                            for (int i = 0; i < K; i++) sum += x[n][l][i] * wt[i][o];
                            want = f32 ? (double)(float)sum : sum;
                        } else if (f32) {
                            want = (double)(float)want; /* the padding: untouched */
                        }
                        double e = fabs(load(by, ((size_t)n * M + l) * YP + o, f32) - want) /
                                   (1.0 + fabs(want));
                        if (!(e <= err)) err = e;
                    }
            double tol = f32 ? 4e-6 * sqrt((double)K) : 1e-13; /* float32: K rounded terms */
            if (status == ATTN_OK && err <= tol) n_passed++;
            else {
                n_failed++;
                printf("FAIL linear [%s, %s, bias %d, accumulate %d, W rows %d]: status %d, "
                       "error %.3g\n", kernel_name, f32 ? "float32" : "float64", bias, acc, w_rows,
                       status, err);
            }
            free(bx); free(bw); free(bb); free(by);
        }
}

/*
 * attn_sdpa_backward against the gradients written here from the weights of
 * naive(): dP = dO v^T, D_i = sum_j P_ij dP_ij, dS = P (dP - D),
 * dq = scale dS k, dk = scale dS^T q, dv = P^T dO. The cases take both of
 * the tiled backward's plans (one problem: dq in the query-major loop; four:
 * dq summed in the key-major loop, fused), several tiles of queries and of
 * keys with partial ones, widths that are no multiple of a vector, a
 * transposed key, causal and windowed positions.
 */
static void test_backward(const char *kernel_name)
{
    static const test_case cases[] = {
        /* name                  B  Hq H  L    S    E   Ev  mask       causal kT bc offset window wl wr */
        {"bwd, one problem",     1, 1, 1, 150, 300, 24, 40, MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"bwd, fused dq",        2, 2, 2, 150, 300, 24, 40, MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"bwd, causal, kT",      1, 1, 1, 260, 140, 33, 17, MASK_NONE, 1, 1, 0, 0, 0, 0, 0, 0},
        {"bwd, fused, causal",   2, 2, 2, 130, 260, 64, 64, MASK_NONE, 1, 0, 0, 130, 0, 0, 0, 0},
        {"bwd, fused, window",   2, 3, 3, 200, 200, 16, 8,  MASK_NONE, 1, 1, 0, 0, 1, 40, 0, 0},
    };
    int plans_seen[2] = {0, 0}; /* tiled plans without and with dq fused */
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (int f32 = 0; f32 < 2; f32++)
        for (int saved = 0; saved < 2; saved++) {
            const test_case *c = &cases[ci];
            const int P = c->B * c->Hq, L = c->L, S = c->S, E = c->E, Ev = c->Ev;
            size_t nq = (size_t)P * L * E, nk = (size_t)P * S * E, nv = (size_t)P * S * Ev;
            size_t no = (size_t)P * L * Ev, nw = (size_t)P * L * S, isz = f32 ? 4 : 8;
            double *q = malloc(nq * 8), *k = malloc(nk * 8), *v = malloc(nv * 8), *dO = malloc(no * 8);
            double *out = malloc(no * 8), *w = malloc(nw * 8), *dS = malloc(nw * 8);
            double *dq = calloc(nq, 8), *dk = calloc(nk, 8), *dv = calloc(nv, 8);
            char *bq = malloc(nq * isz), *bk = malloc(nk * isz), *bv = malloc(nv * isz);
            char *bdo = malloc(no * isz), *gq = malloc(nq * isz), *gk = malloc(nk * isz);
            char *gv = malloc(nv * isz), *fo = malloc(no * isz), *fl = malloc((size_t)P * L * isz);
            unsigned seed = 777u + (unsigned)ci;
            for (size_t x = 0; x < nq; x++) q[x] = uniform(&seed);
            for (size_t x = 0; x < nk; x++) k[x] = uniform(&seed);
            for (size_t x = 0; x < nv; x++) v[x] = uniform(&seed);
            for (size_t x = 0; x < no; x++) dO[x] = uniform(&seed);
            const double scale = 1.0 / sqrt((double)E);
            naive(c, q, k, v, NULL, scale, out, w, NULL);
            for (int p = 0; p < P; p++)
                for (int i = 0; i < L; i++) {
                    const double *Pi = w + ((size_t)p * L + i) * S, *dOi = dO + ((size_t)p * L + i) * Ev;
                    double D = 0;
                    for (int j = 0; j < S; j++) {
                        double dP = 0;
                        for (int x = 0; x < Ev; x++) dP += dOi[x] * v[((size_t)p * S + j) * Ev + x];
                        dS[((size_t)p * L + i) * S + j] = dP;
                        D += Pi[j] * dP;
                    }
                    for (int j = 0; j < S; j++) {
                        double *ds = dS + ((size_t)p * L + i) * S + j;
                        *ds = Pi[j] * (*ds - D);
                        for (int e = 0; e < E; e++) {
                            dq[((size_t)p * L + i) * E + e] += scale * *ds * k[((size_t)p * S + j) * E + e];
                            dk[((size_t)p * S + j) * E + e] += scale * *ds * q[((size_t)p * L + i) * E + e];
                        }
                        for (int x = 0; x < Ev; x++) dv[((size_t)p * S + j) * Ev + x] += Pi[j] * dOi[x];
                    }
                }
            for (size_t x = 0; x < nq; x++) store(bq, x, q[x], f32);
            for (size_t x = 0; x < nv; x++) store(bv, x, v[x], f32);
            for (size_t x = 0; x < no; x++) store(bdo, x, dO[x], f32);
            for (int p = 0; p < P; p++) /* a transposed key: stored (P, E, S) */
                for (int j = 0; j < S; j++)
                    for (int e = 0; e < E; e++)
                        store(bk, c->k_transposed ? ((size_t)p * E + e) * S + j : ((size_t)p * S + j) * E + e,
                              k[((size_t)p * S + j) * E + e], f32);

            attn_sdpa_grad_args g;
            memset(&g, 0, sizeof g);
            attn_sdpa_args *a = &g.fwd;
            const int64_t is = (int64_t)isz;
            a->dtype = f32 ? ATTN_FLOAT32 : ATTN_FLOAT64;
            a->nbatch = 1;
            a->batch_shape[0] = c->B;
            a->num_heads = a->num_kv_heads = c->Hq;
            a->L = L; a->S = S; a->E = E; a->Ev = Ev;
            a->scale = scale;
            a->is_causal = c->causal;
            a->query_offset = c->offset;
            a->window = c->window;
            a->window_left = c->wl;
            a->window_right = c->wr;
            a->q = (attn_view){.data = bq, .batch = {c->Hq * L * E * is}, .head = L * E * is,
                               .row = E * is, .col = is};
            a->k = (attn_view){.data = bk, .batch = {c->Hq * S * E * is}, .head = S * E * is,
                               .row = c->k_transposed ? is : E * is,
                               .col = c->k_transposed ? S * is : is};
            a->v = (attn_view){.data = bv, .batch = {c->Hq * S * Ev * is}, .head = S * Ev * is,
                               .row = Ev * is, .col = is};
            g.grad_out = (attn_view){.data = bdo, .batch = {c->Hq * L * Ev * is},
                                     .head = L * Ev * is, .row = Ev * is, .col = is};
            g.dq = gq; g.dk = gk; g.dv = gv;
            if (saved) { /* the forward's output and lse, as the backward's saved statistics */
                a->out = (attn_view){.data = fo, .batch = {c->Hq * L * Ev * is}, .head = L * Ev * is,
                                     .row = Ev * is, .col = is};
                a->lse = (attn_view){.data = fl, .batch = {c->Hq * L * is}, .head = L * is, .row = is};
                if (attn_sdpa(a) != ATTN_OK) n_failed++, printf("FAIL %s: the forward\n", c->name);
            }
            attn_plan plan;
            attn_plan_backward(&g, P, NULL, &plan);
            if (plan.reason == ATTN_REASON_TILED) plans_seen[plan.bwd_fused_dq != 0] = 1;
            int status = attn_sdpa_backward(&g);
            double err = 0;
            for (size_t x = 0; x < nq; x++) {
                double d = fabs(load(gq, x, f32) - dq[x]) / (1.0 + fabs(dq[x]));
                if (!(d <= err)) err = d;
            }
            for (size_t x = 0; x < nk; x++) {
                double d = fabs(load(gk, x, f32) - dk[x]) / (1.0 + fabs(dk[x]));
                if (!(d <= err)) err = d;
            }
            for (size_t x = 0; x < nv; x++) {
                double d = fabs(load(gv, x, f32) - dv[x]) / (1.0 + fabs(dv[x]));
                if (!(d <= err)) err = d;
            }
            const double tol = f32 ? 2e-5 : 1e-12;
            if (status == ATTN_OK && err <= tol) n_passed++;
            else {
                n_failed++;
                printf("FAIL %s [%s, %s, plan %s%s%s]: status %d, max error %.3g (tol %.1g)\n",
                       c->name, f32 ? "float32" : "float64", kernel_name,
                       attn_reason_name(plan.reason), plan.bwd_fused_dq ? ", fused dq" : "",
                       saved ? ", saved lse" : "", status, err, tol);
            }
            free(q); free(k); free(v); free(dO); free(out); free(w); free(dS);
            free(dq); free(dk); free(dv); free(bq); free(bk); free(bv); free(bdo);
            free(gq); free(gk); free(gv); free(fo); free(fl);
        }
    if (strcmp(kernel_name, "reference") != 0) {
        if (plans_seen[0] && plans_seen[1]) n_passed++;
        else {
            n_failed++;
            printf("FAIL backward [%s]: the cases took the split plan %d, the fused %d (want both)\n",
                   kernel_name, plans_seen[0], plans_seen[1]);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* The planner (attn_plan.c): which kernel, and the named reason why.        */

static void check(int ok, const char *what)
{
    if (ok) n_passed++;
    else {
        n_failed++;
        printf("FAIL planner: %s\n", what);
    }
}

static void test_planner(void)
{
    static float buf[64];
    attn_sdpa_args a;
    memset(&a, 0, sizeof a);
    a.dtype = ATTN_FLOAT32;
    a.nbatch = 1;
    a.batch_shape[0] = 2;
    a.num_heads = a.num_kv_heads = 3;
    a.L = 300; a.S = 7; a.E = 4; a.Ev = 5;
    a.scale = 0.5;
    a.q.data = a.k.data = a.v.data = a.out.data = (char *)buf;
    attn_plan plan;

    /* every reason has a distinct name */
    int names_ok = 1;
    for (int r = 0; r < ATTN_REASON_COUNT; r++) {
        names_ok &= attn_reason_names[r] != NULL;
        for (int s = 0; s < r && names_ok; s++)
            names_ok &= strcmp(attn_reason_names[r], attn_reason_names[s]) != 0;
    }
    check(names_ok, "every reason has a distinct name");
    check(strcmp(attn_reason_names[ATTN_REASON_TILED], "use_tiled") == 0, "use_tiled's name");

    attn_set_kernel(ATTN_KERNEL_REFERENCE);
    attn_plan_sdpa(&a, 6, NULL, &plan);
    check(plan.kernel == ATTN_KERNEL_REFERENCE && plan.reason == ATTN_REASON_SELECTED &&
              plan.items == 6 && plan.blocks[0] == 1 && plan.work_size % 64 == 0,
          "the reference kernel selected: one item per problem");
    attn_linear_args lin;
    memset(&lin, 0, sizeof lin);
    lin.dtype = ATTN_FLOAT32;
    lin.N = 2; lin.M = 200; lin.K = 3; lin.O = 100;
    attn_plan_linear(&lin, NULL, &plan);
    check(plan.reason == ATTN_REASON_SELECTED && plan.work_size == 0 && plan.col_groups == 1 &&
              plan.block_rows >= 64 && plan.blocks[0] == (200 + plan.block_rows - 1) / plan.block_rows &&
              plan.items == 2 * plan.blocks[0],
          "the reference linear layer needs no workspace");

    attn_set_kernel(ATTN_KERNEL_BASELINE);
    attn_plan_sdpa(&a, 6, NULL, &plan);
    check(plan.op == ATTN_OP_SDPA && plan.kernel == ATTN_KERNEL_BASELINE &&
              plan.reason == ATTN_REASON_TILED &&
              plan.block_rows == ATTN_FAST_BR && plan.blocks[0] == 3 && plan.items == 18 &&
              plan.threads >= 1 && plan.threads <= 18,
          "use_tiled: (problem, block of ATTN_FAST_BR rows) items");
    attn_plan_use_reference(&plan, ATTN_REASON_NO_WORKSPACE);
    check(plan.kernel == ATTN_KERNEL_REFERENCE && plan.reason == ATTN_REASON_NO_WORKSPACE &&
              plan.items == 6 && plan.threads <= 6 &&
              plan.work_size == (ATTN_KEY_BLOCK + 5) * sizeof(double) / 64 * 64 + 64,
          "the fallback to the reference kernel: its items and workspace");
    attn_plan_linear(&lin, NULL, &plan);
    check(plan.reason == ATTN_REASON_TILED && plan.group_width == ATTN_LINEAR_COLS &&
              plan.items == 2 * plan.blocks[0] * plan.col_groups && plan.work_size > 0,
          "the linear layer: (batch, row block, column group) items");
    lin.M = 5000; lin.O = 600;
    attn_plan_linear(&lin, NULL, &plan);
    check(plan.block_rows == ATTN_LINEAR_BR && plan.blocks[0] == 10 && plan.col_groups == 3 &&
              plan.items == 60,
          "a long linear layer: blocks of ATTN_LINEAR_BR rows, ATTN_LINEAR_COLS columns");

    struct { const char *what; attn_reason want; } cases[] = {
        {"dropout", ATTN_REASON_DROPOUT}, {"trace", ATTN_REASON_TRACE},
        {"weights col stride", ATTN_REASON_WEIGHTS_STRIDE},
        {"non-finite scale", ATTN_REASON_SCALE_NOT_FINITE},
        {"weights, unit stride", ATTN_REASON_TILED}};
    for (int c = 0; c < 5; c++) {
        attn_sdpa_args b = a;
        if (c == 0) b.dropout_p = 0.1;
        if (c == 1) b.weights.data = b.logits.data = (char *)buf;
        if (c == 2) b.weights = (attn_view){.data = (char *)buf, .row = 64, .col = 8};
        if (c == 3) b.scale = INFINITY;
        if (c == 4) b.weights = (attn_view){.data = (char *)buf, .row = 64, .col = 4};
        attn_plan_sdpa(&b, 6, NULL, &plan);
        check(plan.reason == cases[c].want &&
                  (plan.kernel == ATTN_KERNEL_REFERENCE) == (cases[c].want != ATTN_REASON_TILED),
              cases[c].what);
    }

    attn_sdpa_grad_args g;
    memset(&g, 0, sizeof g);
    g.fwd = a;
    attn_plan_backward(&g, 6, NULL, &plan);
    check(plan.reason == ATTN_REASON_TILED && plan.blocks[0] == 3 && plan.blocks[1] == 1 &&
              plan.shared_size == 6 * 3 * 300 * sizeof(float),
          "the tiled backward: two loops, and the stats");
    g.weights.data = (char *)buf;
    attn_plan_backward(&g, 6, NULL, &plan);
    check(plan.reason == ATTN_REASON_GIVEN_WEIGHTS && plan.shared_size == 0 &&
              plan.work_size == 2 * 7 * sizeof(double) / 64 * 64 + 64,
          "the backward with the forward's weights given: the reference");
    g.weights.data = NULL;
    g.fwd.S = 0;
    attn_plan_backward(&g, 6, NULL, &plan);
    check(plan.reason == ATTN_REASON_NO_ROWS, "the backward without keys: the reference");
    attn_set_kernel(ATTN_KERNEL_AUTO);

    /* NaN policy rule 5: the check of a gradient block */
    float m[3][4] = {{1, -2, 3, 4}, {5, 6, -7, 8}, {9, 10, 11, 12}};
    attn_mat mat = {(char *)m, 4 * sizeof(float), sizeof(float)};
    attn_mat cols = {(char *)m, 4 * sizeof(float), 2 * sizeof(float)};
    int finite = attn_policy_grad_finite(ATTN_FLOAT32, mat, 0, 3, 4);
    m[2][3] = -INFINITY;
    int inf_seen = !attn_policy_grad_finite(ATTN_FLOAT32, mat, 0, 3, 4);
    int rows_only = attn_policy_grad_finite(ATTN_FLOAT32, mat, 0, 2, 4);
    m[1][2] = NAN;
    int nan_seen = !attn_policy_grad_finite(ATTN_FLOAT32, mat, 1, 1, 4);
    int strided = attn_policy_grad_finite(ATTN_FLOAT32, cols, 0, 3, 1) &&
                  !attn_policy_grad_finite(ATTN_FLOAT32, cols, 0, 3, 2);
    check(finite && inf_seen && rows_only && nan_seen && strided,
          "the gradient check finds inf and NaN, and reads only its block");
}

/* A call of one (L x S) problem, float32, contiguous, with weights or not. */
static void one_problem(attn_sdpa_args *a, int64_t L, int64_t S, int64_t E, int64_t Ev,
                        float *q, float *k, float *v, float *out, float *w)
{
    memset(a, 0, sizeof *a);
    a->dtype = ATTN_FLOAT32;
    a->num_heads = a->num_kv_heads = 1;
    a->L = L; a->S = S; a->E = E; a->Ev = Ev;
    a->scale = 1.0 / sqrt((double)E);
    a->q = (attn_view){.data = (char *)q, .row = E * 4, .col = 4};
    a->k = (attn_view){.data = (char *)k, .row = E * 4, .col = 4};
    a->v = (attn_view){.data = (char *)v, .row = Ev * 4, .col = 4};
    a->out = (attn_view){.data = (char *)out, .row = Ev * 4, .col = 4};
    if (w) a->weights = (attn_view){.data = (char *)w, .row = S * 4, .col = 4};
}

/* NaN policy rule 6: q . k = 4e38 overflows float32, scale q . k = 2e38 does
   not; every kernel, both paths, gives weights [1, 0] and out [1]. */
static void test_qk_overflow(const char *kernel_name)
{
    float q[4] = {1e19f, 1e19f, 1e19f, 1e19f}, k[8] = {1e19f, 1e19f, 1e19f, 1e19f, 0, 0, 0, 0};
    float v[2] = {1, 2}, out[1], w[2];
    attn_sdpa_args a;
    for (int weights = 0; weights < 2; weights++) {
        out[0] = w[0] = w[1] = -1;
        one_problem(&a, 1, 2, 4, 1, q, k, v, out, weights ? w : NULL);
        attn_ran ran = {-1, -1};
        a.ran = &ran;
        int ok = attn_sdpa(&a) == ATTN_OK && out[0] == 1.0f &&
                 (!weights || (w[0] == 1.0f && w[1] == 0.0f));
        if (!ok) printf("  (kernel %s, weights %d: out %g)\n", kernel_name, weights, out[0]);
        check(ok, "rule 6: q . k overflowing float32 gives the reference's answer");
        const char *why = strcmp(kernel_name, "reference") == 0 ? "use_ref:selected"
                                                                : "use_ref:qk_overflow";
        check(ran.kernel == ATTN_KERNEL_REFERENCE && attn_reason_name(ran.reason) &&
                  strcmp(attn_reason_name(ran.reason), why) == 0,
              "attn_ran: the reference ran, and says why");
        /* the same call at a moderate size runs the selected kernel */
        float small_k[8] = {1, 1, 1, 1, 0, 0, 0, 0}, small_q[4] = {1, 1, 1, 1};
        one_problem(&a, 1, 2, 4, 1, small_q, small_k, v, out, weights ? w : NULL);
        a.ran = &ran;
        check(attn_sdpa(&a) == ATTN_OK && ran.kernel == (int)attn_get_kernel() &&
                  strcmp(attn_reason_name(ran.reason),
                         ran.kernel == ATTN_KERNEL_REFERENCE ? "use_ref:selected" : "use_tiled") == 0,
              "attn_ran: the selected kernel ran");
    }
    check(attn_reason_name(-1) == NULL && attn_reason_name(1000) == NULL,
          "attn_reason_name: NULL for what is not a reason");
}

/* The AVX-512 copy's exp (vscalef, a mask register) and the AVX2 copy's
   (exponent bits, selects) take the same rounding steps, so their flash
   outputs agree bit for bit (the products sum in the same order in both):
   scores spread so that exp's argument runs from 0 past the smallest
   normal exponent (-126, -1022: exactly 0 there), with causal's blocked
   (-inf) keys, on both dtypes. */
static void test_exp_same_bits(void)
{
    enum { L = 100, S = 150, E = 32, EV = 16 };
    if (attn_set_kernel(ATTN_KERNEL_AVX512) != ATTN_OK || attn_set_kernel(ATTN_KERNEL_AVX2) != ATTN_OK) {
        printf("(avx2 against avx512's exp: this CPU cannot run both, not run)\n");
        return;
    }
    attn_set_num_threads(1);
    for (int f32 = 0; f32 < 2; f32++) {
        const size_t es = f32 ? 4 : 8;
        const double spread = f32 ? 6.0 : 18.0; /* scores' std: ~spread^2 */
        char *q = malloc(L * E * es), *k = malloc(S * E * es), *v = malloc(S * EV * es);
        char *out[2] = {malloc(L * EV * es), malloc(L * EV * es)};
        unsigned x = 777;
        char *all[3] = {q, k, v};
        const int n[3] = {L * E, S * E, S * EV};
        for (int t = 0; t < 3; t++)
            for (int i = 0; i < n[t]; i++) {
                double u = uniform(&x) / 2.0 * (t < 2 ? spread : 1.0); /* in [-spread, spread) */
                if (f32) ((float *)all[t])[i] = (float)u;
                else ((double *)all[t])[i] = u;
            }
        int ran_tiled = 1;
        for (int kk = 0; kk < 2; kk++) {
            attn_set_kernel(kk ? ATTN_KERNEL_AVX512 : ATTN_KERNEL_AVX2);
            attn_sdpa_args a;
            one_problem(&a, L, S, E, EV, (float *)q, (float *)k, (float *)v, (float *)out[kk], NULL);
            a.dtype = f32 ? ATTN_FLOAT32 : ATTN_FLOAT64;
            a.q.row = E * (int64_t)es, a.k.row = E * (int64_t)es, a.v.row = EV * (int64_t)es;
            a.out.row = EV * (int64_t)es;
            a.q.col = a.k.col = a.v.col = a.out.col = (int64_t)es;
            a.is_causal = 1;
            attn_ran ran = {-1, -1};
            a.ran = &ran;
            ran_tiled &= attn_sdpa(&a) == ATTN_OK && ran.kernel == (int)attn_get_kernel();
        }
        check(ran_tiled && memcmp(out[0], out[1], L * EV * es) == 0,
              f32 ? "avx512's exp: the same bits as avx2's, float32"
                  : "avx512's exp: the same bits as avx2's, float64");
        free(q), free(k), free(v), free(out[0]), free(out[1]);
    }
    attn_set_kernel(ATTN_KERNEL_REFERENCE);
    attn_set_num_threads(2);
}

/* An interrupt whose poll says stop: a long call returns ATTN_EINTR soon,
   one whose poll never does runs to the end. */
static int polls;
static int poll_stop(void *ctx) { polls++; return *(int *)ctx; }

/* Results do not depend on the thread count: every kernel this build and
   CPU run gives the same bits on 1, 2 and 3 threads, with and without the
   weights (the pool's guarantee, on POSIX threads and on Win32 alike). The
   problem is large enough (over 2e7 flops) that the planner does use the
   threads asked for, which the test checks. */
static void test_threads_bit_identical(void)
{
    enum { B = 2, H = 3, L = 256, S = 240, E = 64, EV = 48 };
    size_t nq = (size_t)B * H * L * E, nk = (size_t)B * H * S * E, nv = (size_t)B * H * S * EV;
    size_t no = (size_t)B * H * L * EV, nw = (size_t)B * H * L * S;
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nv * 4);
    float *out[3], *w[3];
    uint32_t x = 12345; /* a small LCG: the same inputs on every platform */
    float *all[3] = {q, k, v};
    size_t sizes[3] = {nq, nk, nv};
    for (int t = 0; t < 3; t++)
        for (size_t i = 0; i < sizes[t]; i++) {
            x = x * 1664525u + 1013904223u;
            all[t][i] = (float)(x >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
        }
    const attn_kernel kernels[] = {ATTN_KERNEL_REFERENCE, ATTN_KERNEL_BASELINE, ATTN_KERNEL_AVX2,
                                   ATTN_KERNEL_AVX512, ATTN_KERNEL_NEON};
    int ok = 1;
    for (size_t kk = 0; kk < sizeof kernels / sizeof kernels[0]; kk++) {
        if (attn_set_kernel(kernels[kk]) != ATTN_OK) continue;
        for (int weights = 0; weights < 2; weights++) {
            for (int t = 0; t < 3; t++) {
                attn_set_num_threads(t + 1);
                out[t] = malloc(no * 4);
                w[t] = weights ? malloc(nw * 4) : NULL;
                attn_sdpa_args a;
                one_problem(&a, L, S, E, EV, q, k, v, out[t], w[t]);
                a.nbatch = 1;
                a.batch_shape[0] = B;
                a.num_heads = a.num_kv_heads = H;
                a.q.head = (int64_t)L * E * 4, a.q.batch[0] = H * a.q.head;
                a.k.head = (int64_t)S * E * 4, a.k.batch[0] = H * a.k.head;
                a.v.head = (int64_t)S * EV * 4, a.v.batch[0] = H * a.v.head;
                a.out.head = (int64_t)L * EV * 4, a.out.batch[0] = H * a.out.head;
                if (weights) a.weights.head = (int64_t)L * S * 4, a.weights.batch[0] = H * a.weights.head;
                a.is_causal = 1;
                attn_plan plan;
                attn_plan_sdpa(&a, B * H, NULL, &plan);
                if (plan.threads != t + 1) {
                    printf("  (kernel %d, %d threads asked: the plan has %d)\n",
                           (int)kernels[kk], t + 1, plan.threads);
                    ok = 0;
                }
                ok &= attn_sdpa(&a) == ATTN_OK;
            }
            for (int t = 1; t < 3; t++) {
                ok &= memcmp(out[0], out[t], no * 4) == 0;
                if (weights) ok &= memcmp(w[0], w[t], nw * 4) == 0;
            }
            for (int t = 0; t < 3; t++) {
                free(out[t]);
                free(w[t]);
            }
        }
    }
    check(ok, "every kernel: the same bits on 1, 2 and 3 threads");
    attn_set_kernel(ATTN_KERNEL_REFERENCE);
    attn_set_num_threads(2);
    free(q);
    free(k);
    free(v);
}

static void test_interrupt(void)
{
    const int64_t L = 2048, E = 64;
    float *q = calloc((size_t)(L * E), sizeof(float)), *out = malloc((size_t)(L * E) * 4);
    float *w = malloc((size_t)(L * L) * 4);
    attn_sdpa_args a;
    double full = 0.0; /* seconds the whole call took */
    /* one thread: the caller polls between the items it takes itself, and
       under valgrind (threads run one at a time) awake workers could take
       nearly all of them, leaving it none to poll between (seen once in
       CI). Stopping with workers running: tests/test_interrupt.py. */
    attn_set_num_threads(1);
    for (int stop = 0; stop < 2; stop++) {
        attn_interrupt intr = {.poll = poll_stop, .ctx = &stop};
        one_problem(&a, L, L, E, E, q, q, q, out, w);
        a.interrupt = &intr;
        polls = 0;
        double t0 = attn_seconds();
        int status = attn_sdpa(&a); /* the reference kernel (selected below): ~0.5 s */
        double s = attn_seconds() - t0;
        /* (relative to the whole call: under valgrind everything is ~50x slower) */
        if (stop) check(status == ATTN_EINTR && polls == 1 && s < 0.5 * full,
                        "an interrupt that says stop stops the call at its first poll");
        else {
            int ok = status == ATTN_OK && polls >= 1 && out[0] == 0.0f;
            if (!ok) printf("  (status %d, polls %d, out[0] %g, %.3f s)\n", status, polls,
                            (double)out[0], s);
            check(ok, "an interrupt that never says stop lets the call finish");
        }
        if (!stop) full = s;
    }
    attn_set_num_threads(2);
    free(q);
    free(out);
    free(w);
}

/* A cell the tuner's budget ran out before (a slow build: ASan, valgrind,
   an emulator): it keeps its default, the widest candidate. */
static int budget_left_out(const attn_tune_cell *c)
{
    return c->source == ATTN_TUNE_DEFAULT && attn_tune_seconds() > ATTN_TUNE_BUDGET_S;
}

/* The tuner: every cell measured, the pick rule of attn_core.h followed,
   pins and the cap obeyed by the plans, bad arguments refused. */
static void test_tuner(void)
{
    attn_tune_cell c, d;
    attn_plan plan;
    attn_sdpa_args a;
    memset(&a, 0, sizeof a);
    a.dtype = ATTN_FLOAT32;
    a.num_heads = a.num_kv_heads = 1;
    a.L = a.S = 300; a.E = a.Ev = 64;
    a.scale = 0.125;

    check(attn_tune_configure(1, ATTN_KERNEL_AUTO) == ATTN_OK, "tuning on");
    int names_ok = 1, rule_ok = 1, measured = 1;
    for (int cell = 0; cell < ATTN_TUNE_CELLS; cell++) {
        check(attn_tune_get(cell, &c) == ATTN_OK, "a cell's state");
        names_ok &= c.name != NULL;
        for (int other = 0; other < cell && names_ok; other++) {
            attn_tune_get(other, &d);
            names_ok &= strcmp(c.name, d.name) != 0;
        }
        if (c.ncandidates < 2) continue;
        /* a cell the budget left out keeps the widest */
        if (budget_left_out(&c)) {
            rule_ok &= c.kernel == c.candidates[0];
            continue;
        }
        measured &= c.source == ATTN_TUNE_MEASURED && c.seconds[0] > 0 && c.seconds[1] > 0;
        /* the widest stands unless the other is ATTN_TUNE_MARGIN faster */
        attn_kernel want = c.seconds[1] < c.seconds[0] * (1.0 - ATTN_TUNE_MARGIN)
                               ? c.candidates[1] : c.candidates[0];
        rule_ok &= c.kernel == want;
    }
    check(names_ok, "every tuner cell has a distinct name");
    check(measured, "every cell with two candidates measured, both timed");
    check(rule_ok, "every cell runs the candidate the margin rule picks");
    check(attn_tune_seconds() > 0, "the measurement's time is kept");

    /* cell 1 is sdpa_f32_e64: pinned to the narrower candidate, the plan
       of a (300 x 300, E = 64) call runs it; E = 128 (another cell) not */
    attn_tune_get(1, &c);
    check(strcmp(c.name, "sdpa_f32_e64") == 0, "cell 1 is the float32 forward, E <= 64");
    attn_kernel narrow = c.candidates[c.ncandidates - 1];
    check(attn_tune_pin(1, narrow) == ATTN_OK, "a pin");
    attn_tune_get(1, &c);
    attn_plan_sdpa(&a, 1, NULL, &plan);
    check(c.source == ATTN_TUNE_PINNED && c.kernel == narrow && plan.kernel == narrow,
          "a pinned cell's kernel runs");
    a.E = a.Ev = 128;
    attn_tune_get(2, &d);
    attn_plan_sdpa(&a, 1, NULL, &plan);
    check(plan.kernel == d.kernel, "the next cell runs its own choice");
    a.E = a.Ev = 64;
    attn_set_kernel(ATTN_KERNEL_REFERENCE);
    attn_plan_sdpa(&a, 1, NULL, &plan);
    check(plan.kernel == ATTN_KERNEL_REFERENCE, "a kernel selected overrides the tuner");
    attn_set_kernel(ATTN_KERNEL_AUTO);
    attn_tune_pin(1, ATTN_KERNEL_AUTO);
    attn_tune_get(1, &c);
    check(c.source == ATTN_TUNE_MEASURED || budget_left_out(&c),
          "unpinned: measured again (unless the budget ran out first)");

    /* the cap: candidates no wider than it, and the plans keep to them */
    if (attn_kernel_supported(ATTN_KERNEL_AVX2)) {
        check(attn_tune_configure(1, ATTN_KERNEL_AVX2) == ATTN_OK, "capped at AVX2");
        int capped = 1;
        for (int cell = 0; cell < ATTN_TUNE_CELLS; cell++) {
            attn_tune_get(cell, &c);
            capped &= c.candidates[0] == ATTN_KERNEL_AVX2 &&
                      (c.kernel == ATTN_KERNEL_AVX2 || c.kernel == ATTN_KERNEL_BASELINE);
        }
        attn_plan_sdpa(&a, 1, NULL, &plan);
        check(capped && (plan.kernel == ATTN_KERNEL_AVX2 || plan.kernel == ATTN_KERNEL_BASELINE),
              "capped at AVX2: AVX2 or the baseline, chosen by measurement");
    }

    /* off: the widest everywhere, nothing timed */
    check(attn_tune_configure(0, ATTN_KERNEL_AUTO) == ATTN_OK, "tuning off");
    int widest = 1;
    for (int cell = 0; cell < ATTN_TUNE_CELLS; cell++) {
        attn_tune_get(cell, &c);
        widest &= c.source == ATTN_TUNE_DEFAULT && c.kernel == c.candidates[0] &&
                  c.seconds[0] == 0;
    }
    attn_plan_sdpa(&a, 1, NULL, &plan);
    check(widest && plan.kernel == c.candidates[0], "tuning off: the widest kernel");

    check(attn_tune_pin(-1, narrow) == ATTN_EINVAL && attn_tune_pin(ATTN_TUNE_CELLS, narrow) ==
              ATTN_EINVAL && attn_tune_pin(0, ATTN_KERNEL_REFERENCE) == ATTN_EINVAL &&
              attn_tune_get(ATTN_TUNE_CELLS, &c) == ATTN_EINVAL &&
              attn_tune_configure(1, ATTN_KERNEL_REFERENCE) == ATTN_EINVAL,
          "the tuner refuses what is not a cell or a tiled kernel");
    attn_tune_configure(1, ATTN_KERNEL_AUTO);
}

int main(void)
{
    static const test_case cases[] = {
        /* name                  B  Hq H  L   S    E   Ev  mask       causal kT bc */
        {"one head",             1, 1, 1, 4,  4,   8,  8,  MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"L != S, Ev != E",      2, 3, 3, 5,  9,   6,  4,  MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"one token",            1, 2, 2, 1,  1,   3,  5,  MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"causal L < S",         1, 2, 2, 3,  7,   4,  4,  MASK_NONE, 1, 0, 0, 0, 0, 0, 0, 0},
        {"causal L > S",         2, 1, 1, 9,  4,   4,  2,  MASK_NONE, 1, 0, 0, 0, 0, 0, 0, 0},
        {"bool mask",            2, 2, 2, 6,  70,  5,  3,  MASK_BOOL, 0, 0, 0, 0, 0, 0, 0, 0},
        {"float mask",           1, 3, 3, 6,  130, 4,  6,  MASK_ADD,  0, 0, 0, 0, 0, 0, 0, 0},
        {"bool mask + causal",   1, 2, 2, 8,  8,   4,  4,  MASK_BOOL, 1, 0, 0, 0, 0, 0, 0, 0},
        {"gqa 4 -> 2",           2, 4, 2, 5,  6,   8,  8,  MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"mqa 3 -> 1",           1, 3, 1, 4,  5,   4,  4,  MASK_BOOL, 0, 0, 0, 0, 0, 0, 0, 0},
        {"transposed key",       2, 2, 2, 7,  65,  5,  5,  MASK_NONE, 0, 1, 0, 0, 0, 0, 0, 0},
        {"broadcast key/value",  3, 2, 2, 4,  5,   4,  3,  MASK_ADD,  0, 0, 1, 0, 0, 0, 0, 0},
        {"long keys",            1, 1, 1, 3,  300, 16, 8,  MASK_NONE, 1, 1, 0, 0, 0, 0, 0, 0},
        {"no keys",              1, 1, 1, 3,  0,   4,  4,  MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"threads, causal",      2, 3, 3, 100, 150, 32, 16, MASK_NONE, 1, 0, 0, 0, 0, 0, 0, 0},
        {"threads, bool mask",   2, 2, 1, 70, 300, 24, 40, MASK_BOOL, 0, 1, 0, 0, 0, 0, 0, 0},
        {"threads, float mask",  1, 4, 2, 65, 129, 64, 64, MASK_ADD,  0, 0, 1, 0, 0, 0, 0, 0},
        /* positions: name       B  Hq H  L   S    E   Ev  mask       causal kT bc offset window wl wr alibi */
        {"bottom-right causal",  1, 2, 2, 5,  300, 8,  8,  MASK_NONE, 1, 0, 0, 295, 0, 0, 0, 0},
        {"offset, L > BR",       1, 1, 1, 150, 400, 16, 8, MASK_NONE, 1, 0, 0, 250, 0, 0, 0, 0},
        {"window (3, 0)",        2, 2, 1, 70, 70,  8,  4,  MASK_NONE, 1, 0, 0, 0, 1, 3, 0, 0},
        {"window both sides",    1, 2, 2, 200, 260, 16, 16, MASK_NONE, 0, 1, 0, 30, 1, 70, 5, 0},
        {"window past S",        1, 1, 1, 9,  20,  4,  4,  MASK_NONE, 0, 0, 0, 40, 1, 10, 2, 0},
        {"window + bool mask",   1, 2, 2, 140, 150, 8, 8,  MASK_BOOL, 1, 0, 0, 10, 1, 64, 0, 0},
        {"alibi",                2, 3, 3, 6,  9,   4,  4,  MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 1},
        {"alibi causal offset",  1, 4, 2, 130, 300, 16, 8, MASK_NONE, 1, 0, 1, 170, 0, 0, 0, 1},
        {"alibi + float mask",   2, 2, 2, 65, 129, 8,  8,  MASK_ADD,  0, 0, 0, 0, 1, 20, 20, 1},
        /* the float mask read a tile at a time, transposed where all pairs are open */
        {"float mask + causal",  1, 2, 2, 150, 300, 8, 8,  MASK_ADD,  1, 0, 0, 100, 0, 0, 0, 0},
        {"float mask + window",  1, 2, 1, 140, 290, 8, 8,  MASK_ADD,  0, 1, 0, 60, 1, 150, 30, 0},
    };
    /* every kernel this CPU can run, on one thread and on three */
    const attn_kernel kernels[] = {ATTN_KERNEL_REFERENCE, ATTN_KERNEL_BASELINE, ATTN_KERNEL_AVX2,
                                   ATTN_KERNEL_AVX512, ATTN_KERNEL_NEON};
    const char *kernel_names[] = {"reference", "baseline", "avx2", "avx512", "neon"};
    for (size_t kk = 0; kk < sizeof kernels / sizeof kernels[0]; kk++) {
        if (attn_set_kernel(kernels[kk]) != ATTN_OK) {
            printf("(kernel %s: not supported by this CPU, not run)\n", kernel_names[kk]);
            continue;
        }
        for (int threads = 1; threads <= 3; threads += 2) {
            attn_set_num_threads(threads);
            int failed_before = n_failed;
            for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
                for (int f32 = 0; f32 < 2; f32++)
                    for (int streaming = 0; streaming < 2; streaming++)
                        run_case(&cases[c], f32, streaming);
            test_linear(kernel_names[kk]);
            test_qk_overflow(kernel_names[kk]);
            test_backward(kernel_names[kk]);
            if (n_failed > failed_before)
                printf("  (the failures above: kernel %s, %d threads)\n", kernel_names[kk], threads);
        }
    }
    attn_set_kernel(ATTN_KERNEL_REFERENCE);
    attn_set_num_threads(2);
    test_threads_bit_identical();
    test_exp_same_bits();
    test_interrupt();
    attn_set_kernel(ATTN_KERNEL_AUTO);
    attn_set_num_threads(0);
    if (attn_kernel_supported(ATTN_KERNEL_BASELINE)) {
        test_planner(); /* plans of the tiles */
        test_tuner();
    }
    else printf("(no tiled kernels in this build: the planner's tests not run)\n");
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
