/*
 * attnpy_module.c -- the binding between CPython/NumPy and the C core.
 *
 * The only C file that includes Python.h. Its job, in order: parse the
 * arguments, validate shapes, dtypes and layouts (with messages that name the
 * argument, what was expected and what was given), allocate the outputs,
 * describe every buffer to the core as (pointer, byte strides) without
 * copying it, release the GIL and call the core.
 *
 * References: every PyArrayObject * below is owned (a new reference) and is
 * released at the single exit label `done`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "attn_core.h"

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */

/* "(2, 3, 4)" into buf: shapes in error messages. */
static const char *fmt_dims(const npy_intp *dims, int nd, char *buf, size_t n)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int d = 0; d < nd && used < n; d++)
        used += (size_t)snprintf(buf + used, n - used, "%s%ld", d ? ", " : "(", (long)dims[d]);
    if (used < n) snprintf(buf + used, n - used, nd == 0 ? "()" : nd == 1 ? ",)" : ")");
    return buf;
}

static const char *fmt_shape(PyArrayObject *arr, char *buf, size_t n)
{
    return fmt_dims(PyArray_DIMS(arr), PyArray_NDIM(arr), buf, n);
}

#define SHAPE_BUF 512
#define ATTN_MAX_EXTENT ((npy_intp)INT32_MAX)

/* a * b, or -1 with a ValueError when it would overflow npy_intp. */
static npy_intp checked_mul(npy_intp a, npy_intp b, const char *what)
{
    npy_intp r;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) {
        PyErr_Format(PyExc_ValueError, "%s would hold more elements than fit in memory", what);
        return -1;
    }
    return r;
}

static const char *dtype_name(PyArrayObject *arr)
{
    switch (PyArray_TYPE(arr)) {
    case NPY_FLOAT: return "float32";
    case NPY_DOUBLE: return "float64";
    case NPY_BOOL: return "bool";
    default: return PyArray_DESCR(arr)->typeobj->tp_name;
    }
}

/*
 * Every array the binding allocates comes from here: a new array of shape
 * dims, zero-filled or not. `what` names it and the arguments its shape
 * comes from, for the error when it could not exist at all (fits: its bytes
 * overflow a 64-bit size, and NumPy's own message would name neither). In a
 * fault-injection build each one counts as an allocation and the chosen one
 * fails as NumPy's would, with MemoryError.
 */
static int fits(int nd, const npy_intp *dims, int typenum, const char *what)
{
    char s1[SHAPE_BUF];
    /* bytes = itemsize * prod(dims), over the nonzero dims as NumPy counts */
    npy_intp bytes = typenum == NPY_BOOL ? 1 : typenum == NPY_FLOAT ? 4 : 8;
    for (int d = 0; d < nd; d++) {
        if (dims[d] != 0 && __builtin_mul_overflow(bytes, dims[d], &bytes)) {
            PyErr_Format(PyExc_ValueError,
                         "%s would have shape %s: more bytes than any memory holds",
                         what, fmt_dims(dims, nd, s1, SHAPE_BUF));
            return 0;
        }
    }
    return 1;
}

static PyArrayObject *new_array(int nd, const npy_intp *dims, int typenum, int zero,
                                const char *what)
{
    if (!fits(nd, dims, typenum, what)) return NULL;
#ifdef ATTN_FAULT_INJECTION
    if (attn_fault_next()) return (PyArrayObject *)PyErr_NoMemory();
#endif
    return (PyArrayObject *)(zero ? PyArray_ZEROS(nd, dims, typenum, 0)
                                  : PyArray_EMPTY(nd, dims, typenum, 0));
}

/* A conversion or cast that allocates: counted like new_array. */
static int conversion_fails(void)
{
#ifdef ATTN_FAULT_INJECTION
    if (attn_fault_next()) {
        PyErr_NoMemory();
        return 1;
    }
#endif
    return 0;
}

/*
 * obj as an array, as a new reference.
 * An ndarray is taken as it is: never copied, never cast. Anything else (a
 * list, a scalar) is converted; integer and bool array-likes are cast to
 * `cast_to` so that attention on [[1, 0], [0, 1]] works as a student expects.
 */
static PyArrayObject *as_array(PyObject *obj, const char *name, int cast_to)
{
    if (PyArray_Check(obj)) {
        Py_INCREF(obj);
        return (PyArrayObject *)obj;
    }
    PyArrayObject *arr = conversion_fails() ? NULL : (PyArrayObject *)PyArray_FROM_O(obj);
    if (!arr) {
        /* only a failed conversion is a TypeError; MemoryError, KeyboardInterrupt
           and the like go through as they are */
        if (!PyErr_ExceptionMatches(PyExc_TypeError) && !PyErr_ExceptionMatches(PyExc_ValueError))
            return NULL;
        PyErr_Format(PyExc_TypeError, "%s must be an array of float32 or float64; could not convert %.200s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (cast_to >= 0 && (PyArray_ISINTEGER(arr) || PyArray_ISBOOL(arr) || PyArray_ISFLOAT(arr)) &&
        PyArray_TYPE(arr) != cast_to) {
        PyArrayObject *cast =
            conversion_fails() ? NULL : (PyArrayObject *)PyArray_Cast(arr, cast_to);
        Py_DECREF(arr);
        return cast;
    }
    return arr;
}

/* A query/key/value/out array: float32 or float64, native byte order, aligned. */
static int check_float(PyArrayObject *arr, const char *name)
{
    int t = PyArray_TYPE(arr);
    if (t != NPY_FLOAT && t != NPY_DOUBLE) {
        PyErr_Format(PyExc_TypeError,
                     "%s has dtype %s; supported dtypes are float32 and float64",
                     name, dtype_name(arr));
        return -1;
    }
    if (PyArray_ISBYTESWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError,
                     "%s has non-native byte order; supported dtypes are native float32 and float64",
                     name);
        return -1;
    }
    if (!PyArray_ISALIGNED(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s is not aligned for %s (its buffer or strides are not a multiple of %d bytes); "
                     "attnpy reads arrays in place and does not copy them",
                     name, dtype_name(arr), (int)PyArray_ITEMSIZE(arr));
        return -1;
    }
    return 0;
}

/* [lo, hi): the bytes an array can touch. */
static void byte_extent(PyArrayObject *arr, const char **lo, const char **hi)
{
    const char *base = PyArray_BYTES(arr);
    *lo = *hi = base;
    if (PyArray_SIZE(arr) == 0) return;
    for (int d = 0; d < PyArray_NDIM(arr); d++) {
        npy_intp span = PyArray_STRIDE(arr, d) * (PyArray_DIM(arr, d) - 1);
        if (span < 0) *lo += span;
        else *hi += span;
    }
    *hi += PyArray_ITEMSIZE(arr);
}

static int may_overlap(PyArrayObject *a, PyArrayObject *b)
{
    const char *alo, *ahi, *blo, *bhi;
    if (!a || !b) return 0;
    byte_extent(a, &alo, &ahi);
    byte_extent(b, &blo, &bhi);
    return alo < bhi && blo < ahi;
}

/*
 * An array's dims and strides right-aligned to nd dims: leading 1s with
 * stride 0 are prepended, and every size-1 dim gets stride 0, so that a
 * broadcast dim and a real one of size 1 look the same to the core.
 */
static void pad_to(PyArrayObject *arr, int nd, npy_intp *dims, npy_intp *strides)
{
    int pad = nd - PyArray_NDIM(arr);
    for (int d = 0; d < nd; d++) {
        dims[d] = d < pad ? 1 : PyArray_DIM(arr, d - pad);
        strides[d] = (d < pad || dims[d] == 1) ? 0 : PyArray_STRIDE(arr, d - pad);
    }
}

/* Describe a padded array to the core: nbatch batch dims, then (head, row, col)
   when nd >= 3, else (row, col) with a head stride of 0. */
static void fill_view(attn_view *view, char *data, const npy_intp *strides, int nd)
{
    int nbatch = nd >= 3 ? nd - 3 : 0;
    view->data = data;
    for (int d = 0; d < nbatch; d++) view->batch[d] = strides[d];
    view->head = nd >= 3 ? strides[nd - 3] : 0;
    view->row = strides[nd - 2];
    view->col = strides[nd - 1];
}

/* How get_shaped treats its argument. */
enum {
    SHAPED_ALLOW_NONE = 1, /* None gives NULL (an absent parameter) */
    SHAPED_CONVERT = 2,    /* array-likes are converted (ndarrays never are) */
    SHAPED_WRITEABLE = 4   /* it will be written: must be a writeable ndarray */
};

/*
 * An argument that must be an array of dtype typenum and exactly the shape
 * dims (nd of them): a new reference in *out, NULL for an allowed None.
 * Returns 0, or -1 with TypeError / ValueError naming the argument.
 */
static int get_shaped(PyObject *obj, const char *name, int typenum, int nd,
                      const npy_intp *dims, int flags, PyArrayObject **out)
{
    char s1[SHAPE_BUF], s2[SHAPE_BUF];
    *out = NULL;
    if (obj == Py_None) {
        if (flags & SHAPED_ALLOW_NONE) return 0;
        PyErr_Format(PyExc_TypeError, "%s is required; got None", name);
        return -1;
    }
    if (!PyArray_Check(obj) && !(flags & SHAPED_CONVERT)) {
        PyErr_Format(PyExc_TypeError, "%s must be a NumPy array; got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (!(*out = as_array(obj, name, typenum)) || check_float(*out, name)) goto fail;
    if (PyArray_TYPE(*out) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s like query; got %s", name,
                     typenum == NPY_FLOAT ? "float32" : "float64", dtype_name(*out));
        goto fail;
    }
    int same = PyArray_NDIM(*out) == nd;
    for (int d = 0; same && d < nd; d++) same = PyArray_DIM(*out, d) == dims[d];
    if (!same) {
        PyErr_Format(PyExc_ValueError, "%s must have shape %s; got %s", name,
                     fmt_dims(dims, nd, s1, SHAPE_BUF), fmt_shape(*out, s2, SHAPE_BUF));
        goto fail;
    }
    if ((flags & SHAPED_WRITEABLE) && !PyArray_ISWRITEABLE(*out)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        goto fail;
    }
    return 0;
fail:
    Py_CLEAR(*out);
    return -1;
}

/*
 * A float argument (a Python float, int or anything with __float__) into *x.
 * Returns 0, or -1 with TypeError (not a number: "name must be <expect>") or
 * ValueError (an int beyond the float range, which float() refuses with
 * OverflowError).
 */
static int float_arg(PyObject *obj, const char *name, const char *expect, double *x)
{
    *x = PyFloat_AsDouble(obj);
    if (!(*x == -1.0 && PyErr_Occurred())) return 0;
    if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s is out of the float range (a %.200s too large for "
                     "a float)", name, Py_TYPE(obj)->tp_name);
    }
    else {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be %s; got %.200s", name, expect,
                     Py_TYPE(obj)->tp_name);
    }
    return -1;
}

/* A status from the core as a Python exception; 0 when there is none. */
static int raise_for_status(int status)
{
    if (status == ATTN_OK) return 0;
    if (status == ATTN_ENOMEM) PyErr_NoMemory();
    else PyErr_Format(PyExc_SystemError, "attnpy core rejected its arguments (status %d)", status);
    return -1;
}

/*
 * A mask argument, as a new reference: bool, or the inputs' float dtype,
 * broadcastable to target (nd dims; target_desc names them in messages).
 * true_attends gives the bool polarity: 1 = SDPA's (True = attend), 0 =
 * MultiheadAttention's (True = masked out). Fills *kind and the padded strides.
 */
static PyArrayObject *get_mask(PyObject *obj, const char *name, int typenum, int nd,
                               const npy_intp *target, const char *target_desc,
                               int true_attends, attn_mask_kind *kind, npy_intp *strides)
{
    char s1[SHAPE_BUF], s2[SHAPE_BUF];
    npy_intp dims[NPY_MAXDIMS];
    PyArrayObject *mask = as_array(obj, name, -1);
    if (!mask) return NULL;
    if (!PyArray_Check(obj) && (PyArray_ISINTEGER(mask) || PyArray_ISCOMPLEX(mask) ||
                                PyArray_TYPE(mask) == NPY_OBJECT)) {
        PyErr_Format(PyExc_TypeError,
                     "%s given as a list of %s is ambiguous: give bools (True = %s) or floats "
                     "(added to the scores)",
                     name, dtype_name(mask), true_attends ? "attend" : "masked out");
        goto fail;
    }
    if (!PyArray_Check(obj) && PyArray_TYPE(mask) != NPY_BOOL) {
        /* a float list: cast to the inputs' dtype */
        Py_SETREF(mask, conversion_fails() ? NULL : (PyArrayObject *)PyArray_Cast(mask, typenum));
        if (!mask) return NULL;
    }
    if (PyArray_TYPE(mask) != NPY_BOOL && PyArray_TYPE(mask) != typenum) {
        PyErr_Format(PyExc_TypeError,
                     "%s must be bool (True = %s) or %s like query (added to the scores); got %s",
                     name, true_attends ? "attend" : "masked out",
                     typenum == NPY_FLOAT ? "float32" : "float64", dtype_name(mask));
        goto fail;
    }
    if (PyArray_TYPE(mask) != NPY_BOOL && check_float(mask, name)) goto fail;
    int ok = PyArray_NDIM(mask) <= nd;
    if (ok) {
        pad_to(mask, nd, dims, strides);
        for (int d = 0; d < nd; d++)
            if (dims[d] != 1 && dims[d] != target[d]) ok = 0;
    }
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s of shape %s does not broadcast to %s = %s", name,
                     fmt_shape(mask, s1, SHAPE_BUF), target_desc,
                     fmt_dims(target, nd, s2, SHAPE_BUF));
        goto fail;
    }
    *kind = PyArray_TYPE(mask) != NPY_BOOL ? ATTN_MASK_ADD
            : true_attends               ? ATTN_MASK_BOOL
                                         : ATTN_MASK_BOOL_BLOCK;
    return mask;
fail:
    Py_DECREF(mask);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* scaled_dot_product_attention and its backward pass                        */

/* One call's inputs, validated and described: what the forward and the
   backward share. The arrays are owned (released by sdpa_clear). */
typedef struct {
    PyArrayObject *q, *k, *v, *mask;
    int typenum, nd;
    npy_intp out_dims[NPY_MAXDIMS], w_dims[NPY_MAXDIMS];
    attn_sdpa_args a; /* sizes, scale, causal, q/k/v/mask views; no outputs yet */
} sdpa_call;

static void sdpa_clear(sdpa_call *c)
{
    Py_CLEAR(c->q);
    Py_CLEAR(c->k);
    Py_CLEAR(c->v);
    Py_CLEAR(c->mask);
}

/*
 * Parse and validate query, key, value, attn_mask, is_causal, scale and
 * enable_gqa exactly as torch's SDPA takes them; fill c. Returns 0, or -1
 * with an exception set (and c cleared).
 */
static int sdpa_prepare(sdpa_call *c, PyObject *query_o, PyObject *key_o, PyObject *value_o,
                        PyObject *mask_o, int is_causal, PyObject *scale_o, int enable_gqa)
{
    static attn_sdpa_args zero_args;
    PyArrayObject *q = NULL, *k = NULL, *v = NULL, *mask = NULL;
    char s1[SHAPE_BUF], s2[SHAPE_BUF], s3[SHAPE_BUF];
    c->q = c->k = c->v = c->mask = NULL;

    double scale = NAN;
    if (scale_o != Py_None && float_arg(scale_o, "scale", "a float or None", &scale)) goto fail;

    /* --- query, key, value ------------------------------------------------ */
    /* Array-likes are converted to the dtype of the first float ndarray given. */
    int cast_to = NPY_DOUBLE;
    PyObject *qkv_o[3] = {query_o, key_o, value_o};
    for (int i = 2; i >= 0; i--)
        if (PyArray_Check(qkv_o[i]) && (PyArray_TYPE((PyArrayObject *)qkv_o[i]) == NPY_FLOAT ||
                                        PyArray_TYPE((PyArrayObject *)qkv_o[i]) == NPY_DOUBLE))
            cast_to = PyArray_TYPE((PyArrayObject *)qkv_o[i]);

    if (!(q = as_array(query_o, "query", cast_to)) || !(k = as_array(key_o, "key", cast_to)) ||
        !(v = as_array(value_o, "value", cast_to)))
        goto fail;
    if (check_float(q, "query") || check_float(k, "key") || check_float(v, "value")) goto fail;
    if (PyArray_TYPE(k) != PyArray_TYPE(q) || PyArray_TYPE(v) != PyArray_TYPE(q)) {
        PyErr_Format(PyExc_TypeError,
                     "query, key and value must have the same dtype (float32 or float64); "
                     "got query %s, key %s, value %s",
                     dtype_name(q), dtype_name(k), dtype_name(v));
        goto fail;
    }
    const int typenum = PyArray_TYPE(q);
    PyArrayObject *qkv[3] = {q, k, v};
    const char *qkv_name[3] = {"query", "key", "value"};
    const char *qkv_shape[3] = {"(..., L, E)", "(..., S, E)", "(..., S, Ev)"};
    for (int i = 0; i < 3; i++) {
        if (PyArray_NDIM(qkv[i]) < 2) {
            PyErr_Format(PyExc_ValueError,
                         "%s must be at least 2-D with shape %s; got shape %s", qkv_name[i],
                         qkv_shape[i], fmt_shape(qkv[i], s1, SHAPE_BUF));
            goto fail;
        }
    }
    const npy_intp L = PyArray_DIM(q, PyArray_NDIM(q) - 2), E = PyArray_DIM(q, PyArray_NDIM(q) - 1);
    const npy_intp S = PyArray_DIM(k, PyArray_NDIM(k) - 2);
    const npy_intp Ev = PyArray_DIM(v, PyArray_NDIM(v) - 1);
    /* sizes the core multiplies together stay far from overflowing 64 bits */
    const npy_intp dims4[4] = {L, E, S, Ev};
    const char *dim_names[4] = {"L (query rows)", "E", "S (key rows)", "Ev"};
    for (int i = 0; i < 4; i++) {
        if (dims4[i] > ATTN_MAX_EXTENT) {
            PyErr_Format(PyExc_ValueError,
                         "%s is %ld; attnpy supports dimensions up to 2**31 - 1",
                         dim_names[i], (long)dims4[i]);
            goto fail;
        }
    }
    if (PyArray_DIM(k, PyArray_NDIM(k) - 1) != E) {
        PyErr_Format(PyExc_ValueError,
                     "key must have the same last dimension E as query (E=%ld); "
                     "got query %s, key %s",
                     (long)E, fmt_shape(q, s1, SHAPE_BUF), fmt_shape(k, s2, SHAPE_BUF));
        goto fail;
    }
    if (PyArray_DIM(v, PyArray_NDIM(v) - 2) != S) {
        PyErr_Format(PyExc_ValueError,
                     "value must have as many rows as key (S=%ld); got key %s, value %s",
                     (long)S, fmt_shape(k, s1, SHAPE_BUF), fmt_shape(v, s2, SHAPE_BUF));
        goto fail;
    }

    /* --- broadcast the leading dims ---------------------------------------- */
    /* nd: the output's ndim. Dims [0, nd-3) are batch dims that broadcast as
       in np.matmul; dim nd-3 is the head axis (broadcast too, unless
       enable_gqa maps query heads onto fewer key/value heads). */
    int nd = PyArray_NDIM(q);
    if (PyArray_NDIM(k) > nd) nd = PyArray_NDIM(k);
    if (PyArray_NDIM(v) > nd) nd = PyArray_NDIM(v);
    npy_intp dims[3][NPY_MAXDIMS], strides[3][NPY_MAXDIMS];
    for (int i = 0; i < 3; i++) pad_to(qkv[i], nd, dims[i], strides[i]);

    npy_intp out_dims[NPY_MAXDIMS], w_dims[NPY_MAXDIMS];
    const int nbatch = nd >= 3 ? nd - 3 : 0;
    const int head_axis = nd >= 3 ? nd - 3 : -1;
    for (int d = 0; d < nd - 2; d++) {
        npy_intp n = 1;
        int gqa_heads = enable_gqa && d == head_axis;
        for (int i = 0; i < 3; i++) {
            if (gqa_heads) break;
            if (dims[i][d] == 1) continue;
            if (n == 1) n = dims[i][d];
            else if (dims[i][d] != n) {
                PyErr_Format(PyExc_ValueError,
                             "the leading dimensions of query %s, key %s and value %s do not "
                             "broadcast (axis %d from the end: %ld, %ld, %ld)%s",
                             fmt_shape(q, s1, SHAPE_BUF), fmt_shape(k, s2, SHAPE_BUF),
                             fmt_shape(v, s3, SHAPE_BUF), nd - d, (long)dims[0][d],
                             (long)dims[1][d], (long)dims[2][d],
                             d == head_axis ? "; for grouped-query attention pass enable_gqa=True" : "");
                goto fail;
            }
        }
        out_dims[d] = w_dims[d] = gqa_heads ? dims[0][d] : n;
    }
    out_dims[nd - 2] = w_dims[nd - 2] = L;
    out_dims[nd - 1] = Ev;
    w_dims[nd - 1] = S;

    npy_intp num_heads = head_axis >= 0 ? out_dims[head_axis] : 1;
    npy_intp num_kv_heads = num_heads;
    if (enable_gqa && head_axis >= 0) {
        npy_intp Hk = dims[1][head_axis], Hv = dims[2][head_axis];
        if (Hk != Hv) {
            PyErr_Format(PyExc_ValueError,
                         "enable_gqa=True: key and value must have the same number of heads "
                         "(axis -3); got key %s, value %s",
                         fmt_shape(k, s1, SHAPE_BUF), fmt_shape(v, s2, SHAPE_BUF));
            goto fail;
        }
        if (Hk == 0 ? num_heads != 0 : num_heads % Hk != 0) {
            PyErr_Format(PyExc_ValueError,
                         "enable_gqa=True needs the query heads (Hq=%ld, axis -3 of query %s) "
                         "to be a multiple of the key/value heads (H=%ld, key %s)",
                         (long)num_heads, fmt_shape(q, s1, SHAPE_BUF), (long)Hk,
                         fmt_shape(k, s2, SHAPE_BUF));
            goto fail;
        }
        num_kv_heads = Hk;
    }
    if (num_kv_heads == 0) num_kv_heads = 1; /* no heads at all: nothing to compute */

    /* --- the mask --------------------------------------------------------- */
    npy_intp m_strides[NPY_MAXDIMS];
    attn_mask_kind mask_kind = ATTN_MASK_NONE;
    if (mask_o != Py_None) {
        if (is_causal) {
            PyErr_SetString(PyExc_ValueError,
                            "attn_mask and is_causal=True cannot both be given (torch raises "
                            "too); pass the causal mask in attn_mask (see attnpy.causal_mask) "
                            "or use is_causal alone");
            goto fail;
        }
        if (!(mask = get_mask(mask_o, "attn_mask", typenum, nd, w_dims,
                              "the weights' shape (..., Hq, L, S)", 1, &mask_kind, m_strides)))
            goto fail;
    }

    c->q = q;
    c->k = k;
    c->v = v;
    c->mask = mask;
    c->typenum = typenum;
    c->nd = nd;
    memcpy(c->out_dims, out_dims, sizeof out_dims);
    memcpy(c->w_dims, w_dims, sizeof w_dims);
    attn_sdpa_args *a = &c->a;
    *a = zero_args;
    a->dtype = typenum == NPY_FLOAT ? ATTN_FLOAT32 : ATTN_FLOAT64;
    a->nbatch = nbatch;
    for (int d = 0; d < nbatch; d++) a->batch_shape[d] = out_dims[d];
    a->num_heads = num_heads;
    a->num_kv_heads = num_kv_heads;
    a->L = L;
    a->S = S;
    a->E = E;
    a->Ev = Ev;
    a->scale = scale_o == Py_None ? 1.0 / sqrt((double)E) : scale;
    /* E = 0 (1/sqrt(0) = inf here): the core knows q k^T is then 0 */
    a->is_causal = is_causal;
    fill_view(&a->q, PyArray_BYTES(q), strides[0], nd);
    fill_view(&a->k, PyArray_BYTES(k), strides[1], nd);
    fill_view(&a->v, PyArray_BYTES(v), strides[2], nd);
    if (mask) {
        a->mask_kind = mask_kind;
        fill_view(&a->mask, PyArray_BYTES(mask), m_strides, nd);
    }
    return 0;

fail:
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(mask);
    return -1;
}

#define WEIGHTS_OF_QK \
    "the weights (..., Hq, L, S) of query and key (need_weights=False does without them)"
#define MHA_WEIGHTS \
    "the attention weights (N, num_heads, L, S) of query and key (need_weights=False " \
    "does without them)"

/* A freshly allocated array of shape dims described as a core view. */
static PyArrayObject *new_view(int nd, const npy_intp *dims, int typenum, int zero,
                               const char *what, attn_view *view)
{
    PyArrayObject *arr = new_array(nd, dims, typenum, zero, what);
    if (arr) {
        npy_intp padded[NPY_MAXDIMS], strides[NPY_MAXDIMS];
        pad_to(arr, nd, padded, strides);
        fill_view(view, PyArray_BYTES(arr), strides, nd);
    }
    return arr;
}

static PyObject *
attnpy_sdpa(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                             "scale", "enable_gqa", "need_weights", "out", NULL};
    PyObject *query_o, *key_o, *value_o, *mask_o = Py_None, *dropout_o = Py_None,
             *scale_o = Py_None, *out_o = Py_None;
    int is_causal = 0, enable_gqa = 0, need_weights = 1;
    sdpa_call c = {0};
    PyArrayObject *out = NULL, *weights = NULL;
    PyObject *result = NULL;
    char s1[SHAPE_BUF], s2[SHAPE_BUF];

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|OOpOp$pO:scaled_dot_product_attention",
                                     kwlist, &query_o, &key_o, &value_o, &mask_o, &dropout_o,
                                     &is_causal, &scale_o, &enable_gqa, &need_weights, &out_o))
        return NULL;

    if (dropout_o != Py_None) {
        double p;
        if (float_arg(dropout_o, "dropout_p", "a float", &p)) return NULL;
        if (p != 0.0) {
            PyErr_Format(PyExc_ValueError,
                         "dropout_p must be 0.0 here; got %R. Dropout on the attention weights "
                         "is available through attnpy.MultiheadAttention (dropout=..., seed=...)",
                         dropout_o);
            return NULL;
        }
    }
    if (sdpa_prepare(&c, query_o, key_o, value_o, mask_o, is_causal, scale_o, enable_gqa) < 0)
        return NULL;
    const int nd = c.nd, typenum = c.typenum;

    /* --- outputs ------------------------------------------------------------ */
    /* the weights first: they are the large ones, and nothing is allocated yet */
    if (need_weights && !fits(nd, c.w_dims, typenum, WEIGHTS_OF_QK)) goto done;
    if (out_o != Py_None) {
        if (!PyArray_Check(out_o)) {
            PyErr_Format(PyExc_TypeError, "out must be a NumPy array; got %.200s",
                         Py_TYPE(out_o)->tp_name);
            goto done;
        }
        out = (PyArrayObject *)out_o;
        Py_INCREF(out);
        if (PyArray_TYPE(out) != typenum || PyArray_ISBYTESWAPPED(out)) {
            PyErr_Format(PyExc_TypeError, "out must have dtype %s like query; got %s",
                         dtype_name(c.q), dtype_name(out));
            goto done;
        }
        int same = PyArray_NDIM(out) == nd;
        for (int d = 0; same && d < nd; d++) same = PyArray_DIM(out, d) == c.out_dims[d];
        if (!same) {
            PyErr_Format(PyExc_ValueError, "out must have the output's shape %s; got %s",
                         fmt_dims(c.out_dims, nd, s1, SHAPE_BUF), fmt_shape(out, s2, SHAPE_BUF));
            goto done;
        }
        if (!PyArray_IS_C_CONTIGUOUS(out) || !PyArray_ISALIGNED(out)) {
            PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous, aligned array");
            goto done;
        }
        if (!PyArray_ISWRITEABLE(out)) {
            PyErr_SetString(PyExc_ValueError, "out must be writeable; got a read-only array");
            goto done;
        }
        PyArrayObject *inputs[4] = {c.q, c.k, c.v, c.mask};
        const char *names[4] = {"query", "key", "value", "attn_mask"};
        for (int i = 0; i < 4; i++) {
            if (may_overlap(out, inputs[i])) {
                PyErr_Format(PyExc_ValueError,
                             "out shares memory with %s; attnpy never writes into its inputs",
                             names[i]);
                goto done;
            }
        }
        npy_intp o_strides[NPY_MAXDIMS];
        pad_to(out, nd, c.out_dims, o_strides);
        fill_view(&c.a.out, PyArray_BYTES(out), o_strides, nd);
    }
    else if (!(out = new_view(nd, c.out_dims, typenum, 0, "the output (..., Hq, L, Ev) of query, key and value", &c.a.out))) {
        goto done;
    }
    if (need_weights &&
        !(weights = new_view(nd, c.w_dims, typenum, 0, WEIGHTS_OF_QK, &c.a.weights)))
        goto done;

    int status;
    Py_BEGIN_ALLOW_THREADS
    status = attn_sdpa(&c.a);
    Py_END_ALLOW_THREADS
    if (raise_for_status(status)) goto done;
    result = Py_BuildValue("(OO)", out, weights ? (PyObject *)weights : Py_None);

done:
    sdpa_clear(&c);
    Py_XDECREF(out);
    Py_XDECREF(weights);
    return result;
}

/* A view of an array already checked to have nd dims (stride 0 on size 1). */
static void view_of_checked(PyArrayObject *arr, int nd, attn_view *view)
{
    npy_intp padded[NPY_MAXDIMS], strides[NPY_MAXDIMS];
    pad_to(arr, nd, padded, strides);
    fill_view(view, PyArray_BYTES(arr), strides, nd);
}

static PyObject *
attnpy_sdpa_backward(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"grad_output", "query", "key", "value", "attn_mask", "is_causal",
                             "scale", "enable_gqa", "weights", "trace", NULL};
    PyObject *dout_o, *query_o, *key_o, *value_o, *mask_o = Py_None, *scale_o = Py_None,
             *weights_o = Py_None;
    int is_causal = 0, enable_gqa = 0, want_trace = 0;
    sdpa_call c = {0};
    enum { DOUT, W, DQF, DKF, DVF, GQ, GK, GV, GW, GS, NARR };
    PyArrayObject *arr[NARR] = {NULL};
    PyObject *result = NULL;
    attn_sdpa_grad_args g;
    memset(&g, 0, sizeof g);

    if (!PyArg_ParseTupleAndKeywords(args, kwargs,
                                     "OOOO|OpOp$Op:scaled_dot_product_attention_backward", kwlist,
                                     &dout_o, &query_o, &key_o, &value_o, &mask_o, &is_causal,
                                     &scale_o, &enable_gqa, &weights_o, &want_trace))
        return NULL;
    if (sdpa_prepare(&c, query_o, key_o, value_o, mask_o, is_causal, scale_o, enable_gqa) < 0)
        return NULL;
    const int nd = c.nd, typenum = c.typenum;
    attn_sdpa_args *a = &c.a;

    if (get_shaped(dout_o, "grad_output", typenum, nd, c.out_dims, SHAPED_CONVERT, &arr[DOUT]) ||
        get_shaped(weights_o, "weights", typenum, nd, c.w_dims,
                   SHAPED_CONVERT | SHAPED_ALLOW_NONE, &arr[W]))
        goto done;
    view_of_checked(arr[DOUT], nd, &g.grad_out);
    if (arr[W]) view_of_checked(arr[W], nd, &g.weights);

    /* Per-problem gradients, then the input-shaped ones they are summed into.
       An input that is neither broadcast nor shared by several query heads
       has exactly one slab per problem, in its own C order: its gradient is
       written in place and not summed. */
    npy_intp problems = a->num_heads;
    for (int d = 0; d < a->nbatch; d++) problems *= a->batch_shape[d];
    npy_intp slab[3] = {checked_mul(checked_mul(problems, a->L, "the query gradient"), a->E,
                                    "the query gradient"),
                        checked_mul(checked_mul(problems, a->S, "the key gradient"), a->E,
                                    "the key gradient"),
                        checked_mul(checked_mul(problems, a->S, "the value gradient"), a->Ev,
                                    "the value gradient")};
    if (slab[0] < 0 || slab[1] < 0 || slab[2] < 0) goto done;
    PyArrayObject *inputs[3] = {c.q, c.k, c.v};
    const char *qkv_grad_names[3] = {"the gradient of query", "the gradient of key",
                                     "the gradient of value"};
    char **dst[3] = {&g.dq, &g.dk, &g.dv};
    attn_sdpa_args r = *a; /* the reduction: q, k, v views on the gradients */
    attn_view *rv[3] = {&r.q, &r.k, &r.v};
    for (int i = 0; i < 3; i++) {
        int direct = PyArray_SIZE(inputs[i]) == slab[i];
        PyArrayObject *grad =
            new_array(PyArray_NDIM(inputs[i]), PyArray_DIMS(inputs[i]), typenum, !direct,
                      qkv_grad_names[i]);
        if (!(arr[GQ + i] = grad)) goto done;
        if (direct) {
            *dst[i] = PyArray_BYTES(grad);
            rv[i]->data = NULL;
            continue;
        }
        if (!(arr[DQF + i] = new_array(1, &slab[i], typenum, 0, qkv_grad_names[i]))) goto done;
        *dst[i] = PyArray_BYTES(arr[DQF + i]);
        npy_intp padded[NPY_MAXDIMS], strides[NPY_MAXDIMS];
        pad_to(grad, nd, padded, strides); /* stride 0 where the input broadcast */
        fill_view(rv[i], PyArray_BYTES(grad), strides, nd);
    }
    if (want_trace && (!(arr[GW] = new_view(nd, c.w_dims, typenum, 0, "the trace's grad_weights (..., Hq, L, S) of query and key", &g.grad_weights)) ||
                       !(arr[GS] = new_view(nd, c.w_dims, typenum, 0, "the trace's grad_scores (..., Hq, L, S) of query and key", &g.grad_scores))))
        goto done;
    g.fwd = *a;

    int status;
    Py_BEGIN_ALLOW_THREADS
    status = attn_sdpa_backward(&g);
    if (status == ATTN_OK) status = attn_sdpa_reduce_grads(&g, &r);
    Py_END_ALLOW_THREADS
    if (raise_for_status(status)) goto done;
    result = Py_BuildValue("(OOOOO)", arr[GQ], arr[GK], arr[GV],
                           arr[GW] ? (PyObject *)arr[GW] : Py_None,
                           arr[GS] ? (PyObject *)arr[GS] : Py_None);
done:
    sdpa_clear(&c);
    for (int i = 0; i < NARR; i++) Py_XDECREF(arr[i]);
    return result;
}

/* ------------------------------------------------------------------------ */
/* multihead_attention                                                       */

static attn_view3 view3_of(PyArrayObject *arr)
{
    attn_view3 v = {NULL, 0, 0, 0};
    if (!arr) return v;
    int nd = PyArray_NDIM(arr);
    v.data = PyArray_BYTES(arr);
    v.batch = nd == 3 ? PyArray_STRIDE(arr, 0) : 0;
    v.row = PyArray_STRIDE(arr, nd - 2);
    v.col = PyArray_STRIDE(arr, nd - 1);
    return v;
}

static attn_vec vec_of(PyArrayObject *arr)
{
    attn_vec v = {NULL, 0};
    if (arr) {
        v.data = PyArray_BYTES(arr);
        v.stride = PyArray_STRIDE(arr, 0);
    }
    return v;
}

/* (N, H, L, S') arrays as core views. */
static attn_view view4_of(PyArrayObject *arr)
{
    attn_view v;
    memset(&v, 0, sizeof v);
    if (!arr) return v;
    v.data = PyArray_BYTES(arr);
    v.batch[0] = PyArray_STRIDE(arr, 0);
    v.head = PyArray_STRIDE(arr, 1);
    v.row = PyArray_STRIDE(arr, 2);
    v.col = PyArray_STRIDE(arr, 3);
    return v;
}

/* The multi-head layer's inputs, parameters and masks, validated: what the
   forward and the backward share. Arrays owned, released by mha_clear. */
enum { Q, K, V, WQ, WK, WV, BQ, BK, BV, WO, BO, BIASK, BIASV, NIN };

typedef struct {
    PyArrayObject *in[NIN], *mask, *kpm;
    int typenum;
    npy_intp N, L, S, S2, D, Dv, out_dim;
    attn_mha_args m; /* sizes, inputs, parameters, masks, scale, dropout; no buffers */
} mha_call;

static void mha_clear(mha_call *c)
{
    for (int i = 0; i < NIN; i++) Py_CLEAR(c->in[i]);
    Py_CLEAR(c->mask);
    Py_CLEAR(c->kpm);
}

static int mha_prepare(mha_call *c, PyObject *o[NIN], Py_ssize_t H, Py_ssize_t Hkv,
                       int add_zero_attn, PyObject *attn_mask_o, PyObject *kpm_o,
                       int true_attends, int is_causal, PyObject *scale_o, double dropout_p,
                       unsigned long long seed)
{
    PyArrayObject **in = c->in, *mask = NULL, *kpm = NULL;
    char s1[SHAPE_BUF], s2[SHAPE_BUF];
    memset(c, 0, sizeof *c);

    /* --- inputs (N, L, qdim), (N, S, kdim), (N, S, vdim) ---------------------- */
    int cast_to = PyArray_Check(o[Q]) ? PyArray_TYPE((PyArrayObject *)o[Q]) : NPY_DOUBLE;
    const char *names[3] = {"query", "key", "value"};
    for (int i = Q; i <= V; i++) {
        if (!(in[i] = as_array(o[i], names[i], cast_to)) || check_float(in[i], names[i])) goto fail;
        if (PyArray_NDIM(in[i]) != 3) {
            PyErr_Format(PyExc_ValueError, "%s must be 3-D (N, length, features) here; got %s",
                         names[i], fmt_shape(in[i], s1, SHAPE_BUF));
            goto fail;
        }
    }
    const int typenum = PyArray_TYPE(in[Q]);
    if (PyArray_TYPE(in[K]) != typenum || PyArray_TYPE(in[V]) != typenum) {
        PyErr_Format(PyExc_TypeError,
                     "query, key and value must have the same dtype; got query %s, key %s, value %s",
                     dtype_name(in[Q]), dtype_name(in[K]), dtype_name(in[V]));
        goto fail;
    }
    const npy_intp N = PyArray_DIM(in[Q], 0), L = PyArray_DIM(in[Q], 1);
    const npy_intp qdim = PyArray_DIM(in[Q], 2);
    const npy_intp S = PyArray_DIM(in[K], 1), kdim = PyArray_DIM(in[K], 2);
    const npy_intp vdim = PyArray_DIM(in[V], 2);
    const npy_intp sizes[6] = {N, L, qdim, S, kdim, vdim};
    for (int i = 0; i < 6; i++) {
        if (sizes[i] > ATTN_MAX_EXTENT) {
            PyErr_Format(PyExc_ValueError,
                         "query, key and value dimensions must be at most 2**31 - 1; got %ld",
                         (long)sizes[i]);
            goto fail;
        }
    }
    if (PyArray_DIM(in[K], 0) != N || PyArray_DIM(in[V], 0) != N || PyArray_DIM(in[V], 1) != S) {
        PyErr_Format(PyExc_ValueError,
                     "key and value must have the batch size of query (N=%ld) and the same "
                     "length S; got key %s, value %s",
                     (long)N, fmt_shape(in[K], s1, SHAPE_BUF), fmt_shape(in[V], s2, SHAPE_BUF));
        goto fail;
    }

    /* --- parameters -------------------------------------------------------- */
    if (H <= 0 || Hkv <= 0 || H % Hkv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "num_heads (%zd) must be a positive multiple of num_kv_heads (%zd)", H, Hkv);
        goto fail;
    }
    PyArrayObject *wq_probe = PyArray_Check(o[WQ]) ? (PyArrayObject *)o[WQ] : NULL;
    PyArrayObject *wv_probe = PyArray_Check(o[WV]) ? (PyArrayObject *)o[WV] : NULL;
    if (!wq_probe || !wv_probe || PyArray_NDIM(wq_probe) != 2 || PyArray_NDIM(wv_probe) != 2 ||
        PyArray_DIM(wq_probe, 0) % H != 0 || PyArray_DIM(wv_probe, 0) % Hkv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "q_proj_weight and v_proj_weight must be 2-D arrays whose rows divide into "
                     "num_heads=%zd and num_kv_heads=%zd heads",
                     H, Hkv);
        goto fail;
    }
    const npy_intp D = PyArray_DIM(wq_probe, 0) / H, Dv = PyArray_DIM(wv_probe, 0) / Hkv;
    const int has_out = o[WO] != Py_None;
    const npy_intp out_dim = has_out && PyArray_Check(o[WO]) && PyArray_NDIM((PyArrayObject *)o[WO]) == 2
                                 ? PyArray_DIM((PyArrayObject *)o[WO], 0) : H * Dv;
    /* the projections' widths are dimensions of the outputs too: the same limit */
    const npy_intp widths[3] = {PyArray_DIM(wq_probe, 0), PyArray_DIM(wv_probe, 0), out_dim};
    const char *width_names[3] = {"q_proj_weight rows (num_heads * head_dim)",
                                  "v_proj_weight rows (num_kv_heads * head_dim_v)",
                                  "out_proj.weight rows"};
    for (int i = 0; i < 3; i++) {
        if (widths[i] > ATTN_MAX_EXTENT) {
            PyErr_Format(PyExc_ValueError,
                         "%s is %ld; attnpy supports dimensions up to 2**31 - 1",
                         width_names[i], (long)widths[i]);
            goto fail;
        }
    }
    if (get_shaped(o[WQ], "q_proj_weight", typenum, 2, (npy_intp[]){H * D, qdim}, SHAPED_CONVERT, &in[WQ]) ||
        get_shaped(o[WK], "k_proj_weight", typenum, 2, (npy_intp[]){Hkv * D, kdim}, SHAPED_CONVERT, &in[WK]) ||
        get_shaped(o[WV], "v_proj_weight", typenum, 2, (npy_intp[]){Hkv * Dv, vdim}, SHAPED_CONVERT, &in[WV]) ||
        get_shaped(o[BQ], "q bias (in_proj_bias[:E])", typenum, 1, (npy_intp[]){H * D}, SHAPED_CONVERT | SHAPED_ALLOW_NONE, &in[BQ]) ||
        get_shaped(o[BK], "k bias (in_proj_bias)", typenum, 1, (npy_intp[]){Hkv * D}, SHAPED_CONVERT | SHAPED_ALLOW_NONE, &in[BK]) ||
        get_shaped(o[BV], "v bias (in_proj_bias)", typenum, 1, (npy_intp[]){Hkv * Dv}, SHAPED_CONVERT | SHAPED_ALLOW_NONE, &in[BV]) ||
        get_shaped(o[WO], "out_proj.weight", typenum, 2, (npy_intp[]){out_dim, H * Dv}, SHAPED_CONVERT | SHAPED_ALLOW_NONE, &in[WO]) ||
        get_shaped(o[BO], "out_proj.bias", typenum, 1, (npy_intp[]){out_dim}, SHAPED_CONVERT | SHAPED_ALLOW_NONE, &in[BO]) ||
        get_shaped(o[BIASK], "bias_k", typenum, 1, (npy_intp[]){Hkv * D}, SHAPED_CONVERT | SHAPED_ALLOW_NONE, &in[BIASK]) ||
        get_shaped(o[BIASV], "bias_v", typenum, 1, (npy_intp[]){Hkv * Dv}, SHAPED_CONVERT | SHAPED_ALLOW_NONE, &in[BIASV]))
        goto fail;
    if (!in[WO] && in[BO]) {
        PyErr_SetString(PyExc_ValueError, "out_proj.bias given without out_proj.weight");
        goto fail;
    }
    if (!in[BIASK] != !in[BIASV]) {
        PyErr_SetString(PyExc_ValueError, "bias_k and bias_v must be given together (add_bias_kv)");
        goto fail;
    }
    if (!(dropout_p >= 0.0 && dropout_p <= 1.0)) {
        char num[64];
        snprintf(num, sizeof num, "%g", dropout_p);
        PyErr_Format(PyExc_ValueError, "dropout must be in [0, 1]; got %s", num);
        goto fail;
    }
    double scale = 1.0 / sqrt((double)D);
    if (scale_o != Py_None && float_arg(scale_o, "scale", "a float or None", &scale)) goto fail;
    if (D == 0) scale = 1.0; /* zero-width heads: scores are exactly 0 (see sdpa_prepare) */

    /* --- masks, as (N, H, L, S) ---------------------------------------------- */
    npy_intp target[4] = {N, H, L, S}, m_strides[NPY_MAXDIMS], k_strides[NPY_MAXDIMS];
    attn_mask_kind mask_kind = ATTN_MASK_NONE, kpm_kind = ATTN_MASK_NONE;
    if (attn_mask_o != Py_None &&
        !(mask = get_mask(attn_mask_o, "attn_mask", typenum, 4, target, "(N, num_heads, L, S)",
                          true_attends, &mask_kind, m_strides)))
        goto fail;
    if (kpm_o != Py_None &&
        !(kpm = get_mask(kpm_o, "key_padding_mask", typenum, 4, target, "(N, 1, 1, S)",
                         true_attends, &kpm_kind, k_strides)))
        goto fail;

    c->mask = mask;
    c->kpm = kpm;
    c->typenum = typenum;
    c->N = N;
    c->L = L;
    c->S = S;
    c->S2 = S + (in[BIASK] ? 1 : 0) + (add_zero_attn ? 1 : 0);
    c->D = D;
    c->Dv = Dv;
    c->out_dim = out_dim;
    attn_mha_args *m = &c->m;
    m->dtype = typenum == NPY_FLOAT ? ATTN_FLOAT32 : ATTN_FLOAT64;
    m->N = N; m->L = L; m->S = S;
    m->qdim = qdim; m->kdim = kdim; m->vdim = vdim;
    m->num_heads = H; m->num_kv_heads = Hkv;
    m->head_dim = D; m->head_dim_v = Dv; m->out_dim = out_dim;
    m->query = view3_of(in[Q]); m->key = view3_of(in[K]); m->value = view3_of(in[V]);
    m->w_q = view3_of(in[WQ]); m->w_k = view3_of(in[WK]); m->w_v = view3_of(in[WV]);
    m->w_out = view3_of(in[WO]);
    m->b_q = vec_of(in[BQ]); m->b_k = vec_of(in[BK]); m->b_v = vec_of(in[BV]);
    m->b_out = vec_of(in[BO]);
    m->bias_k = vec_of(in[BIASK]); m->bias_v = vec_of(in[BIASV]);
    m->add_zero_attn = add_zero_attn;
    m->attn.scale = scale;
    m->attn.is_causal = is_causal;
    m->attn.dropout_p = dropout_p;
    m->attn.dropout_seed = (uint64_t)seed;
    if (mask) {
        m->attn.mask_kind = mask_kind;
        fill_view(&m->attn.mask, PyArray_BYTES(mask), m_strides, 4);
    }
    if (kpm) {
        m->attn.mask2_kind = kpm_kind;
        fill_view(&m->attn.mask2, PyArray_BYTES(kpm), k_strides, 4);
    }
    return 0;

fail:
    c->mask = mask;
    c->kpm = kpm;
    mha_clear(c);
    return -1;
}

#define MHA_KWLIST "query", "key", "value", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_out", \
                   "b_out", "bias_k", "bias_v", "num_heads", "num_kv_heads", "add_zero_attn", \
                   "attn_mask", "key_padding_mask", "mask_true_attends", "is_causal", "scale", \
                   "dropout_p", "seed"
#define MHA_FORMAT "OOOOOOOOOOOOOnnpOOppOdK"

/*
 * The multi-head layer (attnpy.MultiheadAttention and attnpy.self_attention
 * call this after putting the inputs in (N, L, E) order, as views).
 * Returns (output, weights or None, trace dict or None).
 */
static PyObject *
attnpy_mha(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {MHA_KWLIST, "need_weights", "trace", NULL};
    PyObject *o[NIN], *attn_mask_o, *kpm_o, *scale_o;
    Py_ssize_t H, Hkv;
    int add_zero_attn, true_attends, is_causal, need_weights, want_trace;
    double dropout_p;
    unsigned long long seed;
    mha_call c;
    enum { PQ, PK, PV, CONCAT, OUT, WEIGHTS, SCORES, LOGITS, DMASK, DROPPED, NOUT };
    PyArrayObject *buf[NOUT] = {NULL};
    PyObject *result = NULL, *trace = NULL;

    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, MHA_FORMAT "pp:multihead_attention", kwlist, &o[Q], &o[K], &o[V],
            &o[WQ], &o[WK], &o[WV], &o[BQ], &o[BK], &o[BV], &o[WO], &o[BO], &o[BIASK],
            &o[BIASV], &H, &Hkv, &add_zero_attn, &attn_mask_o, &kpm_o, &true_attends,
            &is_causal, &scale_o, &dropout_p, &seed, &need_weights, &want_trace))
        return NULL;
    if (mha_prepare(&c, o, H, Hkv, add_zero_attn, attn_mask_o, kpm_o, true_attends, is_causal,
                    scale_o, dropout_p, seed) < 0)
        return NULL;
    const int typenum = c.typenum;
    const npy_intp N = c.N, L = c.L, S2 = c.S2, D = c.D, Dv = c.Dv, out_dim = c.out_dim;
    PyArrayObject **in = c.in;
    attn_mha_args m = c.m;

    /* --- buffers the core writes ------------------------------------------------ */
    npy_intp dq[3] = {N, L, H * D}, dk[3] = {N, S2, Hkv * D}, dv[3] = {N, S2, Hkv * Dv};
    npy_intp dc[3] = {N, L, H * Dv}, dout[3] = {N, L, out_dim}, dw[4] = {N, H, L, S2};
    const int want_maps = need_weights || want_trace, dropout = dropout_p > 0.0;
    if (want_maps && !fits(4, dw, typenum, MHA_WEIGHTS)) goto done; /* before any allocation */
    if (!(buf[PQ] = new_array(3, dq, typenum, 0, "the projected query (N, L, num_heads * D)")) ||
        !(buf[PK] = new_array(3, dk, typenum, 0, "the projected key (N, S, num_kv_heads * D)")) ||
        !(buf[PV] = new_array(3, dv, typenum, 0, "the projected value (N, S, num_kv_heads * Dv)")) ||
        !(buf[CONCAT] = new_array(3, dc, typenum, 0, "the heads' output (N, L, num_heads * Dv) of query")) ||
        (in[WO] && !(buf[OUT] = new_array(3, dout, typenum, 0, "the output (N, L, out_dim) of query"))) ||
        (want_maps && !(buf[WEIGHTS] = new_array(4, dw, typenum, 0, MHA_WEIGHTS))) ||
        (want_maps && dropout &&
         !(buf[DROPPED] = new_array(4, dw, typenum, 0, MHA_WEIGHTS))) ||
        (want_trace && !(buf[SCORES] = new_array(4, dw, typenum, 0, MHA_WEIGHTS))) ||
        (want_trace && !(buf[LOGITS] = new_array(4, dw, typenum, 0, MHA_WEIGHTS))) ||
        (want_trace && dropout &&
         !(buf[DMASK] = new_array(4, dw, NPY_BOOL, 0, MHA_WEIGHTS))))
        goto done;
    if (!in[WO]) {
        buf[OUT] = buf[CONCAT];
        Py_INCREF(buf[OUT]);
    }

    /* --- describe and run --------------------------------------------------------- */
    m.q = view3_of(buf[PQ]); m.k = view3_of(buf[PK]); m.v = view3_of(buf[PV]);
    m.concat = view3_of(buf[CONCAT]); m.out = view3_of(buf[OUT]);
    m.attn.weights = view4_of(buf[WEIGHTS]);
    m.attn.scores = view4_of(buf[SCORES]);
    m.attn.logits = view4_of(buf[LOGITS]);
    m.attn.dropout_mask = view4_of(buf[DMASK]);
    m.attn.dropped = view4_of(buf[DROPPED]);

    int status;
    Py_BEGIN_ALLOW_THREADS
    status = attn_mha(&m);
    Py_END_ALLOW_THREADS
    if (raise_for_status(status)) goto done;

    if (want_trace) {
        PyObject *none = Py_None;
        trace = Py_BuildValue(
            "{sOsOsOsOsOsOsOsOsOsO}", "q", buf[PQ], "k", buf[PK], "v", buf[PV], "scores",
            buf[SCORES], "logits", buf[LOGITS], "weights", buf[WEIGHTS], "dropout_mask",
            buf[DMASK] ? (PyObject *)buf[DMASK] : none, "dropped_weights",
            buf[DROPPED] ? (PyObject *)buf[DROPPED] : none, "concat", buf[CONCAT], "output",
            buf[OUT]);
        if (!trace) goto done;
    }
    PyObject *weights_out = !need_weights ? Py_None
                            : dropout    ? (PyObject *)buf[DROPPED]
                                         : (PyObject *)buf[WEIGHTS];
    result = Py_BuildValue("(OOO)", buf[OUT], weights_out, trace ? trace : Py_None);

done:
    mha_clear(&c);
    for (int i = 0; i < NOUT; i++) Py_XDECREF(buf[i]);
    Py_XDECREF(trace);
    return result;
}

/*
 * The multi-head layer's backward pass: the forward's arguments, its trace
 * buffers (q, k, v, concat as (N, rows, features), weights (N, H, L, S')),
 * grad_output (N, L, out_dim), and arrays that receive the parameters'
 * gradients (None: not wanted). Returns (grad_query, grad_key, grad_value).
 */
static PyObject *
attnpy_mha_backward(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {MHA_KWLIST, "grad_output", "q", "k", "v", "concat", "weights",
                             "grad_w_q", "grad_w_k", "grad_w_v", "grad_b_q", "grad_b_k",
                             "grad_b_v", "grad_w_out", "grad_b_out", "grad_bias_k",
                             "grad_bias_v", NULL};
    PyObject *o[NIN], *attn_mask_o, *kpm_o, *scale_o;
    Py_ssize_t H, Hkv;
    int add_zero_attn, true_attends, is_causal;
    double dropout_p;
    unsigned long long seed;
    enum { DOUT, TQ, TK, TV, TC, TW, NT };
    enum { GWQ, GWK, GWV, GBQ, GBK, GBV, GWO, GBO, GBIASK, GBIASV, NG };
    enum { GQUERY, GKEY, GVALUE, DQ, DK, DV, DC, HK, HV, NBUF };
    PyObject *t_o[NT], *g_o[NG];
    PyArrayObject *t[NT] = {NULL}, *pg[NG] = {NULL}, *buf[NBUF] = {NULL};
    PyObject *result = NULL;
    mha_call c;
    attn_mha_grad_args g;
    memset(&g, 0, sizeof g);

    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, MHA_FORMAT "OOOOOOOOOOOOOOOO:multihead_attention_backward", kwlist,
            &o[Q], &o[K], &o[V], &o[WQ], &o[WK], &o[WV], &o[BQ], &o[BK], &o[BV], &o[WO], &o[BO],
            &o[BIASK], &o[BIASV], &H, &Hkv, &add_zero_attn, &attn_mask_o, &kpm_o, &true_attends,
            &is_causal, &scale_o, &dropout_p, &seed, &t_o[DOUT], &t_o[TQ], &t_o[TK], &t_o[TV],
            &t_o[TC], &t_o[TW], &g_o[GWQ], &g_o[GWK], &g_o[GWV], &g_o[GBQ], &g_o[GBK],
            &g_o[GBV], &g_o[GWO], &g_o[GBO], &g_o[GBIASK], &g_o[GBIASV]))
        return NULL;
    if (mha_prepare(&c, o, H, Hkv, add_zero_attn, attn_mask_o, kpm_o, true_attends, is_causal,
                    scale_o, dropout_p, seed) < 0)
        return NULL;
    const int typenum = c.typenum;
    const npy_intp N = c.N, L = c.L, S = c.S, S2 = c.S2, D = c.D, Dv = c.Dv;
    attn_mha_args *m = &g.fwd;
    *m = c.m;

    /* the forward's buffers and grad_output */
    npy_intp d_out[3] = {N, L, c.in[WO] ? c.out_dim : H * Dv}, d_q[3] = {N, L, H * D},
             d_k[3] = {N, S2, Hkv * D}, d_v[3] = {N, S2, Hkv * Dv}, d_c[3] = {N, L, H * Dv},
             d_w[4] = {N, H, L, S2};
    const npy_intp *t_dims[NT] = {d_out, d_q, d_k, d_v, d_c, d_w};
    const char *t_names[NT] = {"grad_output", "trace q", "trace k", "trace v", "trace concat",
                               "trace weights"};
    for (int i = 0; i < NT; i++)
        if (get_shaped(t_o[i], t_names[i], typenum, i == TW ? 4 : 3, t_dims[i], 0, &t[i]))
            goto done;
    g.grad_out = view3_of(t[DOUT]);
    m->q = view3_of(t[TQ]);
    m->k = view3_of(t[TK]);
    m->v = view3_of(t[TV]);
    m->concat = view3_of(t[TC]);
    m->attn.weights = view4_of(t[TW]);

    /* the parameters' gradients: each like its parameter, or None */
    const char *g_names[NG] = {"grad_w_q", "grad_w_k", "grad_w_v", "grad_b_q", "grad_b_k",
                               "grad_b_v", "grad_w_out", "grad_b_out", "grad_bias_k",
                               "grad_bias_v"};
    const int of_param[NG] = {WQ, WK, WV, BQ, BK, BV, WO, BO, BIASK, BIASV};
    for (int i = 0; i < NG; i++) {
        if (g_o[i] == Py_None) continue;
        PyArrayObject *param = c.in[of_param[i]];
        if (!param) {
            PyErr_Format(PyExc_ValueError, "%s given for a parameter the layer does not have",
                         g_names[i]);
            goto done;
        }
        if (get_shaped(g_o[i], g_names[i], typenum, PyArray_NDIM(param), PyArray_DIMS(param),
                       SHAPED_WRITEABLE, &pg[i]))
            goto done;
    }
    if (!pg[GBIASK] != !pg[GBIASV]) {
        PyErr_SetString(PyExc_ValueError, "grad_bias_k and grad_bias_v must be given together");
        goto done;
    }
    /* the gradients are written: none may share memory with what is read, or
       with each other */
    for (int i = 0; i < NG; i++) {
        if (!pg[i]) continue;
        for (int j = 0; j < NIN; j++)
            if (may_overlap(pg[i], c.in[j])) {
                PyErr_Format(PyExc_ValueError, "%s shares memory with an input or parameter",
                             g_names[i]);
                goto done;
            }
        for (int j = 0; j < NT; j++)
            if (may_overlap(pg[i], t[j])) {
                PyErr_Format(PyExc_ValueError, "%s shares memory with %s", g_names[i],
                             t_names[j]);
                goto done;
            }
        for (int j = 0; j < i; j++)
            if (may_overlap(pg[i], pg[j])) {
                PyErr_Format(PyExc_ValueError, "%s shares memory with %s", g_names[i],
                             g_names[j]);
                goto done;
            }
    }
    g.grad_w_q = view3_of(pg[GWQ]); g.grad_w_k = view3_of(pg[GWK]); g.grad_w_v = view3_of(pg[GWV]);
    g.grad_w_out = view3_of(pg[GWO]);
    g.grad_b_q = vec_of(pg[GBQ]); g.grad_b_k = vec_of(pg[GBK]); g.grad_b_v = vec_of(pg[GBV]);
    g.grad_b_out = vec_of(pg[GBO]);
    g.grad_bias_k = vec_of(pg[GBIASK]); g.grad_bias_v = vec_of(pg[GBIASV]);

    /* outputs and workspaces */
    npy_intp d_gq[3] = {N, L, m->qdim}, d_gk[3] = {N, S, m->kdim}, d_gv[3] = {N, S, m->vdim};
    /* slabs, for GQA only */
    npy_intp hk = checked_mul(checked_mul(checked_mul(N, H, "the key slabs"), S2, "the key slabs"),
                              D, "the key slabs");
    npy_intp hv = checked_mul(checked_mul(checked_mul(N, H, "the value slabs"), S2,
                                          "the value slabs"), Dv, "the value slabs");
    if (hk < 0 || hv < 0) goto done;
    const int shared_kv = Hkv != H;
    if (!(buf[GQUERY] = new_array(3, d_gq, typenum, 1, "the gradient of query")) ||
        !(buf[GKEY] = new_array(3, d_gk, typenum, 1, "the gradient of key")) ||
        !(buf[GVALUE] = new_array(3, d_gv, typenum, 1, "the gradient of value")) ||
        !(buf[DQ] = new_array(3, d_q, typenum, 0, "the gradient of the projected query")) ||
        !(buf[DK] = new_array(3, d_k, typenum, 0, "the gradient of the projected key")) ||
        !(buf[DV] = new_array(3, d_v, typenum, 0, "the gradient of the projected value")) ||
        !(buf[DC] = new_array(3, d_c, typenum, 0, "the gradient of the heads' output")) ||
        (shared_kv && !(buf[HK] = new_array(1, &hk, typenum, 0, "the key slabs"))) ||
        (shared_kv && !(buf[HV] = new_array(1, &hv, typenum, 0, "the value slabs"))))
        goto done;
    g.grad_query = view3_of(buf[GQUERY]);
    g.grad_key = view3_of(buf[GKEY]);
    g.grad_value = view3_of(buf[GVALUE]);
    g.dq = view3_of(buf[DQ]);
    g.dk = view3_of(buf[DK]);
    g.dv = view3_of(buf[DV]);
    g.dconcat = view3_of(buf[DC]);
    g.dk_heads = shared_kv ? PyArray_BYTES(buf[HK]) : NULL;
    g.dv_heads = shared_kv ? PyArray_BYTES(buf[HV]) : NULL;

    int status;
    Py_BEGIN_ALLOW_THREADS
    status = attn_mha_backward(&g);
    Py_END_ALLOW_THREADS
    if (raise_for_status(status)) goto done;
    result = Py_BuildValue("(OOO)", buf[GQUERY], buf[GKEY], buf[GVALUE]);
done:
    mha_clear(&c);
    for (int i = 0; i < NT; i++) Py_XDECREF(t[i]);
    for (int i = 0; i < NG; i++) Py_XDECREF(pg[i]);
    for (int i = 0; i < NBUF; i++) Py_XDECREF(buf[i]);
    return result;
}

/* ------------------------------------------------------------------------ */
/* threads and kernels                                                       */

static PyObject *attnpy_set_num_threads(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        if (overflow) /* an int, just far out of range */
            PyErr_SetString(PyExc_ValueError, "n must be between 1 and 256 (0: the default); "
                            "got an int beyond the C long range");
        else
            PyErr_Format(PyExc_TypeError, "n must be an int; got %.200s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    if (n < 0 || n > 256 || attn_set_num_threads((int)n) != ATTN_OK) {
        PyErr_Format(PyExc_ValueError, "n must be between 1 and 256 (0: the default); got %ld", n);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *attnpy_get_num_threads(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg))
{
    return PyLong_FromLong(attn_get_num_threads());
}

static PyObject *attnpy_fma_peak(PyObject *Py_UNUSED(module), PyObject *args)
{
    int threads;
    long long iters;
    if (!PyArg_ParseTuple(args, "iL:fma_peak", &threads, &iters)) return NULL;
    if (threads < 1 || threads > 256 || iters < 1) {
        PyErr_SetString(PyExc_ValueError, "fma_peak needs 1 <= threads <= 256 and iters >= 1");
        return NULL;
    }
    double gflops;
    Py_BEGIN_ALLOW_THREADS
    gflops = attn_fma_peak_gflops(threads, (int64_t)iters);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(gflops);
}

static const char *kernel_names[] = {"auto", "reference", "baseline", "avx2", "avx512"};

static PyObject *attnpy_set_kernel(PyObject *Py_UNUSED(module), PyObject *arg)
{
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!name) {
        PyErr_Format(PyExc_TypeError, "kernel must be a str; got %.200s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    for (int k = 0; k < (int)(sizeof kernel_names / sizeof kernel_names[0]); k++) {
        if (strcmp(name, kernel_names[k]) != 0) continue;
        if (attn_set_kernel((attn_kernel)k) != ATTN_OK) {
            PyErr_Format(PyExc_ValueError, "kernel %s is not supported by this CPU", name);
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyErr_Format(PyExc_ValueError,
                 "kernel must be 'auto', 'reference', 'baseline', 'avx2' or 'avx512'; got %R", arg);
    return NULL;
}

static PyObject *attnpy_get_kernel(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg))
{
    return PyUnicode_FromString(kernel_names[attn_get_kernel()]);
}

static PyObject *attnpy_supported_kernels(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg))
{
    PyObject *list = PyList_New(0);
    for (int k = 1; list && k < (int)(sizeof kernel_names / sizeof kernel_names[0]); k++) {
        if (!attn_kernel_supported((attn_kernel)k)) continue;
        PyObject *name = PyUnicode_FromString(kernel_names[k]);
        if (!name || PyList_Append(list, name) < 0) Py_CLEAR(list);
        Py_XDECREF(name);
    }
    return list;
}

#ifdef ATTN_FAULT_INJECTION
/* _fail_alloc(n): the n-th allocation from now fails (0: none). Returns
   (allocations counted since the last call, the core's blocks still live). */
static PyObject *attnpy_fail_alloc(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "n must be >= 0; got %lld", n);
        return NULL;
    }
    int64_t live;
    int64_t counted = attn_fault_inject((int64_t)n, &live);
    return Py_BuildValue("(LL)", (long long)counted, (long long)live);
}
#endif

/* ------------------------------------------------------------------------ */

static PyMethodDef attnpy_methods[] = {
    {"scaled_dot_product_attention", (PyCFunction)(void (*)(void))attnpy_sdpa,
     METH_VARARGS | METH_KEYWORDS,
     "scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, "
     "is_causal=False, scale=None, enable_gqa=False, *, need_weights=True, out=None)\n"
     "--\n\nThe C entry point; see attnpy.scaled_dot_product_attention. "
     "Returns (output, weights or None)."},
    {"scaled_dot_product_attention_backward",
     (PyCFunction)(void (*)(void))attnpy_sdpa_backward, METH_VARARGS | METH_KEYWORDS,
     "The backward pass; see attnpy.scaled_dot_product_attention_backward. Returns "
     "(grad_query, grad_key, grad_value, grad_weights or None, grad_scores or None)."},
    {"multihead_attention", (PyCFunction)(void (*)(void))attnpy_mha, METH_VARARGS | METH_KEYWORDS,
     "The multi-head layer on (N, L, E) inputs; see attnpy.MultiheadAttention. "
     "Returns (output, weights or None, trace dict or None)."},
    {"multihead_attention_backward", (PyCFunction)(void (*)(void))attnpy_mha_backward,
     METH_VARARGS | METH_KEYWORDS,
     "The multi-head layer's backward pass; see attnpy.MultiheadAttention.backward. "
     "Returns (grad_query, grad_key, grad_value)."},
    {"set_num_threads", attnpy_set_num_threads, METH_O, "Threads the core uses (0: default)."},
    {"get_num_threads", attnpy_get_num_threads, METH_NOARGS, "Threads the core uses."},
    {"set_kernel", attnpy_set_kernel, METH_O, "Force a kernel ('auto' to choose)."},
    {"get_kernel", attnpy_get_kernel, METH_NOARGS, "The kernel in use."},
    {"supported_kernels", attnpy_supported_kernels, METH_NOARGS, "Kernels this CPU runs."},
    {"fma_peak", attnpy_fma_peak, METH_VARARGS,
     "fma_peak(threads, iters): float32 FMA GFLOP/s of the selected kernel's vectors."},
#ifdef ATTN_FAULT_INJECTION
    {"_fail_alloc", attnpy_fail_alloc, METH_O,
     "Fault-injection builds only: _fail_alloc(n) makes the n-th allocation from now fail "
     "(0: none); returns (allocations counted since the last call, core blocks live)."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef attnpy_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "attnpy._core",
    .m_doc = "attnpy's C core: attention on NumPy buffers, without copies.",
    .m_size = -1,
    .m_methods = attnpy_methods,
};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    return PyModule_Create(&attnpy_module);
}
