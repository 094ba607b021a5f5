/*
 * attnpy_module.c -- the binding between CPython/NumPy and the C core.
 *
 * The only C file that includes Python.h. It follows the boundary rule of
 * csrc/README.md: Python (attnpy/) owns meanings and messages -- it converts
 * array-likes, picks defaults (the scale), decides mask polarities and
 * explains a wrong call in the caller's terms. This file checks memory safety
 * only: that every argument is an ndarray of the dtype the core reads, that
 * the shapes fit together (so no index of the core leaves a buffer), that
 * outputs are writeable, aligned and do not overlap an input, and that sizes
 * stay within the core's limits. Then it describes every buffer to the core as
 * (pointer, byte strides) without copying it, releases the GIL and calls the
 * core, which trusts what it is given.
 *
 * Arguments: each entry point (METH_FASTCALL: no tuple or dict is built per
 * call) lists its parameters in one table of (name, converter, destination),
 * see parse_args; options are keyword-only, so a
 * misspelt or missing option is a TypeError, never a silent default.
 *
 * References: the converters store borrowed references (the caller's tuple
 * and dict keep the arguments alive during the call). Every array this file
 * allocates is owned and released at the single exit label `done`.
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

#define SHAPE_BUF 512

/* "(2, 3, 4)" into buf: shapes in error messages. */
static const char *fmt_dims(const npy_intp *dims, int nd, char *buf, size_t n)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int d = 0; d < nd && used < n; d++)
        used += (size_t)snprintf(buf + used, n - used, "%s%lld", d ? ", " : "(", (long long)dims[d]);
    if (used < n) snprintf(buf + used, n - used, nd == 0 ? "()" : nd == 1 ? ",)" : ")");
    return buf;
}

static const char *fmt_shape(PyArrayObject *arr, char *buf, size_t n)
{
    return fmt_dims(PyArray_DIMS(arr), PyArray_NDIM(arr), buf, n);
}

/* a * b for a, b >= 0 into *r; 1 when it would overflow npy_intp (portable:
   MSVC has no __builtin_mul_overflow). */
static int mul_overflows(npy_intp a, npy_intp b, npy_intp *r)
{
    if (a != 0 && b > NPY_MAX_INTP / a) return 1;
    *r = a * b;
    return 0;
}

/* a * b, or -1 with a ValueError when it would overflow npy_intp. */
static npy_intp checked_mul(npy_intp a, npy_intp b, const char *what)
{
    npy_intp r;
    if (a < 0 || b < 0 || mul_overflows(a, b, &r)) {
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
 * comes from, for the error when it could not exist at all (its bytes
 * overflow a 64-bit size, and NumPy's own message would name neither). In a
 * fault-injection build each one counts as an allocation and the chosen one
 * fails as NumPy's would, with MemoryError.
 */
static int fits(int nd, const npy_intp *dims, int typenum, const char *what)
{
    char s1[SHAPE_BUF];
    npy_intp bytes = typenum == NPY_BOOL ? 1 : typenum == NPY_FLOAT ? 4 : 8;
    for (int d = 0; d < nd; d++) {
        if (dims[d] != 0 && mul_overflows(bytes, dims[d], &bytes)) {
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

/* A float array the core reads or writes: float32 or float64, native, aligned. */
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

/* An array the core reads or writes whole: of dtype typenum and exactly the
   shape dims. */
static int check_shaped(PyArrayObject *arr, const char *name, int typenum, int nd,
                        const npy_intp *dims)
{
    char s1[SHAPE_BUF], s2[SHAPE_BUF];
    if (check_float(arr, name)) return -1;
    if (PyArray_TYPE(arr) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s like query; got %s", name,
                     typenum == NPY_FLOAT ? "float32" : "float64", dtype_name(arr));
        return -1;
    }
    int same = PyArray_NDIM(arr) == nd;
    for (int d = 0; same && d < nd; d++) same = PyArray_DIM(arr, d) == dims[d];
    if (!same) {
        PyErr_Format(PyExc_ValueError, "%s must have shape %s; got %s", name,
                     fmt_dims(dims, nd, s1, SHAPE_BUF), fmt_shape(arr, s2, SHAPE_BUF));
        return -1;
    }
    return 0;
}

/* An output the core writes: shaped as above, writeable, sharing no byte
   with any of the n inputs. */
static int check_output(PyArrayObject *out, const char *name, int typenum, int nd,
                        const npy_intp *dims, PyArrayObject *const *inputs,
                        const char *const *input_names, int n)
{
    if (check_shaped(out, name, typenum, nd, dims)) return -1;
    if (!PyArray_ISWRITEABLE(out)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable; got a read-only array", name);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (may_overlap(out, inputs[i])) {
            PyErr_Format(PyExc_ValueError,
                         "%s shares memory with %s; attnpy never writes into its inputs", name,
                         input_names[i]);
            return -1;
        }
    }
    return 0;
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

/* Describe an array (already known to broadcast to nd dims) to the core:
   nbatch batch dims, then (head, row, col) when nd >= 3, else (row, col). */
static void view_of(PyArrayObject *arr, int nd, attn_view *view)
{
    npy_intp dims[NPY_MAXDIMS], strides[NPY_MAXDIMS];
    int nbatch = nd >= 3 ? nd - 3 : 0;
    pad_to(arr, nd, dims, strides);
    view->data = PyArray_BYTES(arr);
    for (int d = 0; d < nbatch; d++) view->batch[d] = strides[d];
    view->head = nd >= 3 ? strides[nd - 3] : 0;
    view->row = strides[nd - 2];
    view->col = strides[nd - 1];
}

/* A new array of shape dims, described to the core as a view. */
static PyArrayObject *new_view(int nd, const npy_intp *dims, int typenum, const char *what,
                               attn_view *view)
{
    PyArrayObject *arr = new_array(nd, dims, typenum, 0, what);
    if (arr) view_of(arr, nd, view);
    return arr;
}

/* A status from the core as a Python exception; 0 when there is none.
   ATTN_EINTR: the exception poll_signals left (KeyboardInterrupt, or what a
   signal handler raised). */
static int raise_for_status(int status)
{
    if (status == ATTN_OK) return 0;
    if (status == ATTN_ENOMEM) PyErr_NoMemory();
    else if (status == ATTN_EINTR) {
        if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
    } else
        PyErr_Format(PyExc_SystemError, "attnpy core rejected its arguments (status %d)", status);
    return -1;
}

/*
 * The GIL released around a core call that Ctrl-C can stop (attn_interrupt
 * in attn_core.h). While the core works, it calls poll_signals on this
 * thread every ATTN_POLL_MS: it takes the GIL back, lets Python run its
 * signal handlers (SIGINT's raises KeyboardInterrupt; Jupyter's interrupt
 * is a SIGINT) and releases it again. A handler's exception stops the call
 * and stays set for raise_for_status.
 */
typedef struct {
    PyThreadState *ts;
    attn_interrupt interrupt;
} released_gil;

static int poll_signals(void *ctx)
{
    released_gil *gil = ctx;
    PyEval_RestoreThread(gil->ts);
    int stop = PyErr_CheckSignals() < 0;
    gil->ts = PyEval_SaveThread();
    return stop;
}

/* Release the GIL; *slot (the call's interrupt field) points at the poll. */
static void release_gil(released_gil *gil, const attn_interrupt **slot)
{
    gil->interrupt = (attn_interrupt){.poll = poll_signals, .ctx = gil};
    *slot = &gil->interrupt;
    gil->ts = PyEval_SaveThread();
}

static void take_gil(released_gil *gil) { PyEval_RestoreThread(gil->ts); }

/* ------------------------------------------------------------------------ */
/* Arguments: one table per entry point                                      */

/* A converter checks one argument and stores it at dest; it returns 0, or
   -1 with TypeError / ValueError naming the argument. */
typedef int (*converter)(PyObject *obj, void *dest, const char *name);

typedef struct {
    const char *name;  /* the keyword, and the name in messages */
    converter convert;
    void *dest;
    int required;
} arg_spec;

#define MAX_ARGS 20

/*
 * Fill every spec from a vectorcall's arguments: nargs positional ones (the
 * first npos specs may be given by position) and the keywords named in
 * kwnames (any spec, by name), whose values follow the positional ones in
 * args. An unknown keyword, a repeated one or a missing required argument is
 * a TypeError. Arguments not given keep the value their destination was
 * initialised with. interned: the spec's names as str objects, filled on the
 * first call and kept for the module's life.
 */
static int parse_args(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      const arg_spec *spec, int n, int npos, PyObject **interned)
{
    PyObject *given[MAX_ARGS] = {NULL};
    for (int i = 0; i < n && !interned[n - 1]; i++) /* the first call: intern the names */
        if (!interned[i] && !(interned[i] = PyUnicode_InternFromString(spec[i].name)))
            return -1;
    if (nargs > npos) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes %d positional arguments but %zd were given; its options are "
                     "keyword-only", fn, npos, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) given[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t w = 0; w < nkw; w++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, w);
        /* keywords at a call site are interned: compare pointers first */
        int i = 0;
        while (i < n && interned[i] != key) i++;
        const char *name = PyUnicode_AsUTF8(key);
        if (i == n)
            for (i = 0; name && i < n && strcmp(spec[i].name, name) != 0; i++) {
            }
        if (!name || i == n) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fn,
                             key);
            return -1;
        }
        if (given[i]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn, name);
            return -1;
        }
        given[i] = args[nargs + w];
    }
    for (int i = 0; i < n; i++) {
        if (!given[i]) {
            if (!spec[i].required) continue;
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn,
                         spec[i].name);
            return -1;
        }
        if (spec[i].convert(given[i], spec[i].dest, spec[i].name) < 0) return -1;
    }
    return 0;
}

/* An ndarray, borrowed (never converted: Python converts array-likes). */
static int to_array(PyObject *obj, void *dest, const char *name)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a NumPy array; got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *(PyArrayObject **)dest = (PyArrayObject *)obj;
    return 0;
}

static int to_array_or_none(PyObject *obj, void *dest, const char *name)
{
    if (obj == Py_None) {
        *(PyArrayObject **)dest = NULL;
        return 0;
    }
    return to_array(obj, dest, name);
}

static int to_bool(PyObject *obj, void *dest, const char *name)
{
    if (!PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a bool; got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *(int *)dest = obj == Py_True;
    return 0;
}

/* A Python float (or int): Python resolves defaults such as the scale. */
static int to_double(PyObject *obj, void *dest, const char *name)
{
    double x = PyFloat_AsDouble(obj);
    if (x == -1.0 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        PyErr_Format(overflow ? PyExc_ValueError : PyExc_TypeError,
                     overflow ? "%s is out of the float range" : "%s must be a float; got %.200s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *(double *)dest = x;
    return 0;
}

static int to_count(PyObject *obj, void *dest, const char *name)
{
    long long n = PyLong_Check(obj) ? PyLong_AsLongLong(obj) : -1;
    if (n == -1 && PyErr_Occurred()) PyErr_Clear();
    if (!PyLong_Check(obj) || n < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be an int >= 0 within 64 bits", name);
        return -1;
    }
    *(int64_t *)dest = (int64_t)n;
    return 0;
}

static int to_seed(PyObject *obj, void *dest, const char *name)
{
    unsigned long long s = PyLong_Check(obj) ? PyLong_AsUnsignedLongLong(obj) : (unsigned long long)-1;
    if (!PyLong_Check(obj) || (s == (unsigned long long)-1 && PyErr_Occurred())) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be an int in [0, 2**64)", name);
        return -1;
    }
    *(uint64_t *)dest = (uint64_t)s;
    return 0;
}

/* window: None, or (left, right), two ints >= 0 within the core's extents */
typedef struct {
    int on;
    int64_t left, right;
} window_option;

static int to_window(PyObject *obj, void *dest, const char *name)
{
    window_option *w = dest;
    w->on = 0;
    if (obj == Py_None) return 0;
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2 ||
        to_count(PyTuple_GET_ITEM(obj, 0), &w->left, name) ||
        to_count(PyTuple_GET_ITEM(obj, 1), &w->right, name) || w->left > ATTN_MAX_EXTENT ||
        w->right > ATTN_MAX_EXTENT) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be None or a tuple of two ints in [0, 2**31)",
                     name);
        return -1;
    }
    w->on = 1;
    return 0;
}

/* masks: a sequence of at most two (array, kind, name) triples. kind says
   what the array means: "attend" (bool, True = attend: SDPA's polarity),
   "ignore" (bool, True = masked out: MultiheadAttention's), "add" (float of
   the query's dtype, added to the scores); name is the argument it came
   from, for the messages. */
typedef struct {
    int n;
    PyArrayObject *arr[2];
    attn_mask_kind kind[2];
    const char *name[2];
} mask_list;

static int to_masks(PyObject *obj, void *dest, const char *name)
{
    mask_list *m = dest;
    static const char *kinds[3] = {"attend", "ignore", "add"};
    static const attn_mask_kind codes[3] = {ATTN_MASK_BOOL, ATTN_MASK_BOOL_BLOCK, ATTN_MASK_ADD};
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq || PySequence_Fast_GET_SIZE(seq) > 2) goto bad;
    m->n = (int)PySequence_Fast_GET_SIZE(seq);
    for (int i = 0; i < m->n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 ||
            !PyArray_Check(PyTuple_GET_ITEM(t, 0)) || !PyUnicode_Check(PyTuple_GET_ITEM(t, 1)) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(t, 2)))
            goto bad;
        const char *kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(t, 1));
        int k = 0;
        while (kind && k < 3 && strcmp(kind, kinds[k]) != 0) k++;
        if (k == 3 || !(m->name[i] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(t, 2)))) goto bad;
        m->arr[i] = (PyArrayObject *)PyTuple_GET_ITEM(t, 0); /* borrowed from obj */
        m->kind[i] = codes[k];
    }
    Py_DECREF(seq);
    return 0;
bad:
    Py_XDECREF(seq);
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError,
                 "%s must be a sequence of at most two (array, kind, name) tuples, kind one of "
                 "'attend', 'ignore', 'add'", name);
    return -1;
}

/* grads: None, or (grad_query, grad_key, grad_value), each an array or None. */
static int to_grads(PyObject *obj, void *dest, const char *name)
{
    PyArrayObject **g = dest;
    if (obj == Py_None) return 0;
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 3) {
        PyErr_Format(PyExc_TypeError, "%s must be None or a tuple of 3 arrays or None", name);
        return -1;
    }
    static const char *names[3] = {"grads[0]", "grads[1]", "grads[2]"};
    for (int i = 0; i < 3; i++)
        if (to_array_or_none(PyTuple_GET_ITEM(obj, i), &g[i], names[i])) return -1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* scaled dot-product attention: what the forward and the backward share     */

/* Options both passes take, by name. */
typedef struct {
    double scale;
    mask_list masks;
    int64_t extra_keys;
    int is_causal, enable_gqa;
    int64_t query_offset;
    window_option window;
    PyArrayObject *alibi; /* float64 slopes, broadcastable to (..., Hq), or NULL */
    double dropout_p;
    uint64_t seed;
} sdpa_options;

#define SDPA_OPTION_SPECS(o)                                          \
    {"scale", to_double, &(o).scale, 1},                              \
    {"masks", to_masks, &(o).masks, 0},                               \
    {"extra_keys", to_count, &(o).extra_keys, 0},                     \
    {"is_causal", to_bool, &(o).is_causal, 0},                        \
    {"enable_gqa", to_bool, &(o).enable_gqa, 0},                      \
    {"query_offset", to_count, &(o).query_offset, 0},                 \
    {"window", to_window, &(o).window, 0},                            \
    {"alibi_slopes", to_array_or_none, &(o).alibi, 0},                \
    {"dropout_p", to_double, &(o).dropout_p, 0},                      \
    {"seed", to_seed, &(o).seed, 0}

/* One call, checked and described to the core (outputs not yet). */
typedef struct {
    PyArrayObject *q, *k, *v;
    int typenum, nd;
    npy_intp out_dims[NPY_MAXDIMS], w_dims[NPY_MAXDIMS];
    attn_sdpa_args a;
} sdpa_call;

/*
 * Check that query, key, value and the masks fit together: the core then
 * never indexes outside them. Fills c. Returns 0, or -1 with an exception.
 */
static int sdpa_prepare(sdpa_call *c, PyArrayObject *q, PyArrayObject *k, PyArrayObject *v,
                        const sdpa_options *o)
{
    static attn_sdpa_args zero_args;
    char s1[SHAPE_BUF], s2[SHAPE_BUF], s3[SHAPE_BUF];
    c->q = q;
    c->k = k;
    c->v = v;
    if (check_float(q, "query") || check_float(k, "key") || check_float(v, "value")) return -1;
    if (PyArray_TYPE(k) != PyArray_TYPE(q) || PyArray_TYPE(v) != PyArray_TYPE(q)) {
        PyErr_Format(PyExc_TypeError,
                     "query, key and value must have the same dtype (float32 or float64); "
                     "got query %s, key %s, value %s",
                     dtype_name(q), dtype_name(k), dtype_name(v));
        return -1;
    }
    const int typenum = PyArray_TYPE(q);
    PyArrayObject *qkv[3] = {q, k, v};
    const char *qkv_name[3] = {"query", "key", "value"};
    const char *qkv_shape[3] = {"(..., L, E)", "(..., S, E)", "(..., S, Ev)"};
    for (int i = 0; i < 3; i++) {
        if (PyArray_NDIM(qkv[i]) < 2) {
            PyErr_Format(PyExc_ValueError, "%s must be at least 2-D with shape %s; got shape %s",
                         qkv_name[i], qkv_shape[i], fmt_shape(qkv[i], s1, SHAPE_BUF));
            return -1;
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
            PyErr_Format(PyExc_ValueError, "%s is %lld; attnpy supports dimensions up to 2**31 - 1",
                         dim_names[i], (long long)dims4[i]);
            return -1;
        }
    }
    if (PyArray_DIM(k, PyArray_NDIM(k) - 1) != E) {
        PyErr_Format(PyExc_ValueError,
                     "key must have the same last dimension E as query (E=%lld); "
                     "got query %s, key %s",
                     (long long)E, fmt_shape(q, s1, SHAPE_BUF), fmt_shape(k, s2, SHAPE_BUF));
        return -1;
    }
    if (PyArray_DIM(v, PyArray_NDIM(v) - 2) != S) {
        PyErr_Format(PyExc_ValueError,
                     "value must have as many rows as key (S=%lld); got key %s, value %s",
                     (long long)S, fmt_shape(k, s1, SHAPE_BUF), fmt_shape(v, s2, SHAPE_BUF));
        return -1;
    }
    if (o->extra_keys > S) {
        PyErr_Format(PyExc_ValueError, "extra_keys (%lld) exceeds the key rows S=%lld",
                     (long long)o->extra_keys, (long long)S);
        return -1;
    }
    if (o->query_offset > ATTN_MAX_EXTENT) {
        PyErr_Format(PyExc_ValueError, "query_offset must be in [0, 2**31); got %lld",
                     (long long)o->query_offset);
        return -1;
    }
    if (!(o->dropout_p >= 0.0 && o->dropout_p <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "dropout_p must be in [0, 1]");
        return -1;
    }

    /* Broadcast the leading dims. nd: the output's ndim. Dims [0, nd-3) are
       batch dims that broadcast as in np.matmul; dim nd-3 is the head axis
       (broadcast too, unless enable_gqa maps query heads onto fewer key/value
       heads). */
    int nd = PyArray_NDIM(q);
    if (PyArray_NDIM(k) > nd) nd = PyArray_NDIM(k);
    if (PyArray_NDIM(v) > nd) nd = PyArray_NDIM(v);
    npy_intp dims[3][NPY_MAXDIMS], strides[3][NPY_MAXDIMS];
    for (int i = 0; i < 3; i++) pad_to(qkv[i], nd, dims[i], strides[i]);
    const int head_axis = nd >= 3 ? nd - 3 : -1;
    for (int d = 0; d < nd - 2; d++) {
        npy_intp n = 1;
        int gqa_heads = o->enable_gqa && d == head_axis;
        for (int i = 0; i < 3 && !gqa_heads; i++) {
            if (dims[i][d] == 1) continue;
            if (n == 1) n = dims[i][d];
            else if (dims[i][d] != n) {
                PyErr_Format(PyExc_ValueError,
                             "the leading dimensions of query %s, key %s and value %s do not "
                             "broadcast (axis %d from the end: %lld, %lld, %lld)%s",
                             fmt_shape(q, s1, SHAPE_BUF), fmt_shape(k, s2, SHAPE_BUF),
                             fmt_shape(v, s3, SHAPE_BUF), nd - d, (long long)dims[0][d],
                             (long long)dims[1][d], (long long)dims[2][d],
                             d == head_axis ? "; for grouped-query attention pass enable_gqa=True" : "");
                return -1;
            }
        }
        c->out_dims[d] = c->w_dims[d] = gqa_heads ? dims[0][d] : n;
    }
    c->out_dims[nd - 2] = c->w_dims[nd - 2] = L;
    c->out_dims[nd - 1] = Ev;
    c->w_dims[nd - 1] = S;

    npy_intp num_heads = head_axis >= 0 ? c->out_dims[head_axis] : 1, num_kv_heads = num_heads;
    if (o->enable_gqa && head_axis >= 0) {
        npy_intp Hk = dims[1][head_axis], Hv = dims[2][head_axis];
        if (Hk != Hv) {
            PyErr_Format(PyExc_ValueError,
                         "enable_gqa=True: key and value must have the same number of heads "
                         "(axis -3); got key %s, value %s",
                         fmt_shape(k, s1, SHAPE_BUF), fmt_shape(v, s2, SHAPE_BUF));
            return -1;
        }
        if (Hk == 0 ? num_heads != 0 : num_heads % Hk != 0) {
            PyErr_Format(PyExc_ValueError,
                         "enable_gqa=True needs the query heads (Hq=%lld, axis -3 of query %s) "
                         "to be a multiple of the key/value heads (H=%lld, key %s)",
                         (long long)num_heads, fmt_shape(q, s1, SHAPE_BUF), (long long)Hk,
                         fmt_shape(k, s2, SHAPE_BUF));
            return -1;
        }
        num_kv_heads = Hk;
    }
    if (num_kv_heads == 0) num_kv_heads = 1; /* no heads at all: nothing to compute */

    attn_sdpa_args *a = &c->a;
    *a = zero_args;
    a->dtype = typenum == NPY_FLOAT ? ATTN_FLOAT32 : ATTN_FLOAT64;
    a->nbatch = nd >= 3 ? nd - 3 : 0;
    for (int d = 0; d < a->nbatch; d++) a->batch_shape[d] = c->out_dims[d];
    a->num_heads = num_heads;
    a->num_kv_heads = num_kv_heads;
    a->L = L;
    a->S = S;
    a->E = E;
    a->Ev = Ev;
    a->scale = o->scale;
    a->is_causal = o->is_causal;
    a->query_offset = o->query_offset;
    a->window = o->window.on;
    a->window_left = o->window.left;
    a->window_right = o->window.right;
    a->extra_keys = o->extra_keys;
    a->dropout_p = o->dropout_p;
    a->dropout_seed = o->seed;
    view_of(q, nd, &a->q);
    view_of(k, nd, &a->k);
    view_of(v, nd, &a->v);

    /* The masks cover the first S - extra_keys keys of the weights' shape. */
    npy_intp m_dims[NPY_MAXDIMS], target[NPY_MAXDIMS];
    memcpy(target, c->w_dims, sizeof(npy_intp) * (size_t)nd);
    target[nd - 1] = S - o->extra_keys;
    attn_mask_kind *kinds[2] = {&a->mask_kind, &a->mask2_kind};
    attn_view *views[2] = {&a->mask, &a->mask2};
    for (int i = 0; i < o->masks.n; i++) {
        PyArrayObject *m = o->masks.arr[i];
        const char *name = o->masks.name[i];
        int want = o->masks.kind[i] == ATTN_MASK_ADD ? typenum : NPY_BOOL;
        if (PyArray_TYPE(m) != want || PyArray_ISBYTESWAPPED(m)) {
            PyErr_Format(PyExc_TypeError,
                         "%s must be bool or %s like query (added to the scores); got %s", name,
                         dtype_name(q), dtype_name(m));
            return -1;
        }
        if (want != NPY_BOOL && check_float(m, name)) return -1;
        int ok = PyArray_NDIM(m) <= nd;
        if (ok) pad_to(m, nd, m_dims, strides[0]);
        for (int d = 0; ok && d < nd; d++) ok = m_dims[d] == 1 || m_dims[d] == target[d];
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "%s of shape %s does not broadcast to %s = %s", name,
                         fmt_shape(m, s1, SHAPE_BUF), "the weights' shape (..., Hq, L, S)",
                         fmt_dims(target, nd, s2, SHAPE_BUF));
            return -1;
        }
        *kinds[i] = o->masks.kind[i];
        view_of(m, nd, views[i]);
    }

    /* ALiBi's slopes: float64, one per (batch..., query head) */
    if (o->alibi) {
        PyArrayObject *sl = o->alibi;
        if (PyArray_TYPE(sl) != NPY_DOUBLE || PyArray_ISBYTESWAPPED(sl) ||
            !PyArray_ISALIGNED(sl)) {
            PyErr_Format(PyExc_TypeError, "alibi_slopes must be an aligned float64 array; got %s",
                         dtype_name(sl));
            return -1;
        }
        const int nh = nd - 2; /* the output's dims before (L, Ev) */
        int ok = PyArray_NDIM(sl) <= nh;
        if (ok) pad_to(sl, nh, m_dims, strides[0]);
        for (int d = 0; ok && d < nh; d++) ok = m_dims[d] == 1 || m_dims[d] == c->out_dims[d];
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "alibi_slopes of shape %s does not broadcast to %s",
                         fmt_shape(sl, s1, SHAPE_BUF), fmt_dims(c->out_dims, nh, s2, SHAPE_BUF));
            return -1;
        }
        a->alibi.data = PyArray_BYTES(sl);
        for (int d = 0; d < a->nbatch; d++) a->alibi.batch[d] = strides[0][d];
        a->alibi.head = nh >= 1 ? strides[0][nh - 1] : 0;
    }
    c->typenum = typenum;
    c->nd = nd;
    return 0;
}

/* The inputs of one call, for the overlap checks. */
static int sdpa_inputs(const sdpa_call *c, const sdpa_options *o, PyArrayObject **in,
                       const char **names)
{
    int n = 0;
    in[n] = c->q, names[n++] = "query";
    in[n] = c->k, names[n++] = "key";
    in[n] = c->v, names[n++] = "value";
    for (int i = 0; i < o->masks.n; i++) in[n] = o->masks.arr[i], names[n++] = o->masks.name[i];
    if (o->alibi) in[n] = o->alibi, names[n++] = "alibi_slopes";
    return n;
}

/* what an sdpa call ran (attn_ran) as one int below 256: ran_name() decodes it */
#define RAN_CODE(kernel, reason) ((reason) * 8 + (kernel))

#define WEIGHTS_OF_QK \
    "the weights (..., Hq, L, S) of query and key (need_weights=False does without them)"

/* The keywords of each entry point, interned at its first call. */
static PyObject *sdpa_names[MAX_ARGS], *sdpa_backward_names[MAX_ARGS], *linear_names[MAX_ARGS];

/* sdpa(query, key, value, *, scale, masks=(), extra_keys=0, is_causal=False,
        query_offset=0, window=None, alibi_slopes=None,
        enable_gqa=False, dropout_p=0.0, seed=0, need_weights=True, trace=False,
        out=None, need_lse=False) -> (output, weights or None, stages or None)
   stages: a dict; with trace, "scores", "logits", "dropout_mask" and
   "dropped_weights"; without, "dropped_weights" alone when there are
   dropout and weights; with need_lse, "lse" too: (..., Hq, L, 1). */
static PyObject *attnpy_sdpa(PyObject *Py_UNUSED(module), PyObject *const *args,
                             Py_ssize_t nargs, PyObject *kwnames)
{
    PyArrayObject *q = NULL, *k = NULL, *v = NULL, *out = NULL;
    sdpa_options o = {.scale = NAN};
    int need_weights = 1, trace = 0, need_lse = 0;
    const arg_spec spec[] = {
        {"query", to_array, &q, 1},
        {"key", to_array, &k, 1},
        {"value", to_array, &v, 1},
        SDPA_OPTION_SPECS(o),
        {"need_weights", to_bool, &need_weights, 0},
        {"trace", to_bool, &trace, 0},
        {"out", to_array_or_none, &out, 0},
        {"need_lse", to_bool, &need_lse, 0},
    };
    enum { OUT, W, SC, LG, DM, DR, LSE, NARR };
    PyArrayObject *arr[NARR] = {NULL};
    PyObject *result = NULL, *stages = NULL;
    sdpa_call c;

    if (parse_args("sdpa", args, PyVectorcall_NARGS(nargs), kwnames, spec,
                   sizeof spec / sizeof spec[0], 3, sdpa_names) < 0 ||
        sdpa_prepare(&c, q, k, v, &o) < 0)
        return NULL;
    const int nd = c.nd, typenum = c.typenum;
    if (trace) need_weights = 1;

    /* the weights first: they are the large ones, and nothing is allocated yet */
    if (need_weights && !fits(nd, c.w_dims, typenum, WEIGHTS_OF_QK)) return NULL;
    if (out) {
        PyArrayObject *in[6];
        const char *names[6];
        int n = sdpa_inputs(&c, &o, in, names);
        if (check_output(out, "out", typenum, nd, c.out_dims, in, names, n)) return NULL;
        Py_INCREF(out);
        arr[OUT] = out;
        view_of(out, nd, &c.a.out);
    }
    else if (!(arr[OUT] = new_view(nd, c.out_dims, typenum,
                                   "the output (..., Hq, L, Ev) of query, key and value",
                                   &c.a.out)))
        goto done;
    if (need_weights && !(arr[W] = new_view(nd, c.w_dims, typenum, WEIGHTS_OF_QK, &c.a.weights)))
        goto done;
    /* with dropout, the weights after dropout are written whenever the
       weights are (what the multi-head layer returns in training); the
       trace adds the raw scores, the logits and the dropout mask */
    const int dropout = o.dropout_p > 0.0;
    if ((trace && (!(arr[SC] = new_view(nd, c.w_dims, typenum, "the trace's scores",
                                         &c.a.scores)) ||
                   !(arr[LG] = new_view(nd, c.w_dims, typenum, "the trace's logits",
                                         &c.a.logits)) ||
                   (dropout && !(arr[DM] = new_view(nd, c.w_dims, NPY_BOOL,
                                                     "the trace's dropout_mask",
                                                     &c.a.dropout_mask))))) ||
        (dropout && need_weights &&
         !(arr[DR] = new_view(nd, c.w_dims, typenum, "the weights after dropout", &c.a.dropped))))
        goto done;
    if (need_lse) { /* (..., Hq, L, 1): a view of the core's (row, col) shape */
        npy_intp lse_dims[NPY_MAXDIMS];
        memcpy(lse_dims, c.out_dims, sizeof(npy_intp) * (size_t)nd);
        lse_dims[nd - 1] = 1;
        if (!(arr[LSE] = new_view(nd, lse_dims, typenum, "the lse (..., Hq, L)", &c.a.lse)))
            goto done;
    }

    attn_ran ran = {0};
    c.a.ran = &ran;
    released_gil gil;
    release_gil(&gil, &c.a.interrupt);
    int status = attn_sdpa(&c.a);
    take_gil(&gil);
    if (raise_for_status(status)) goto done;
    if (trace && !(stages = Py_BuildValue("{sOsOsOsO}", "scores", arr[SC], "logits", arr[LG],
                                          "dropout_mask", arr[DM] ? (PyObject *)arr[DM] : Py_None,
                                          "dropped_weights",
                                          arr[DR] ? (PyObject *)arr[DR] : Py_None)))
        goto done;
    if (!trace && (arr[DR] || arr[LSE]) && !(stages = PyDict_New())) goto done;
    if (!trace && arr[DR] && PyDict_SetItemString(stages, "dropped_weights", (PyObject *)arr[DR]))
        goto done;
    if (arr[LSE] && PyDict_SetItemString(stages, "lse", (PyObject *)arr[LSE])) goto done;
    /* what ran, as one small int (CPython keeps those: no allocation);
       ran_name() spells it out */
    result = Py_BuildValue("(OOOi)", arr[OUT], arr[W] ? (PyObject *)arr[W] : Py_None,
                           stages ? stages : Py_None, RAN_CODE(ran.kernel, ran.reason));
done:
    Py_XDECREF(stages);
    for (int i = 0; i < NARR; i++) Py_XDECREF(arr[i]);
    return result;
}

/* sdpa_backward(grad_output, query, key, value, *, scale, masks=(), extra_keys=0,
                 query_offset=0, window=None, alibi_slopes=None,
                 is_causal=False, enable_gqa=False, dropout_p=0.0, seed=0,
                 weights=None, trace=False, grads=None, output=None, lse=None)
   -> (grad_query, grad_key, grad_value, grad_weights or None, grad_scores or None)
   grads: arrays shaped like query, key, value (any strides) that receive the
   gradients instead of new ones. output (..., Hq, L, Ev) and lse
   (..., Hq, L, 1): the forward's, both or neither (the saved statistics). */
static PyObject *attnpy_sdpa_backward(PyObject *Py_UNUSED(module), PyObject *const *args,
                                      Py_ssize_t nargs, PyObject *kwnames)
{
    PyArrayObject *dout = NULL, *q = NULL, *k = NULL, *v = NULL, *weights = NULL;
    PyArrayObject *given[3] = {NULL, NULL, NULL}, *saved_out = NULL, *saved_lse = NULL;
    sdpa_options o = {.scale = NAN};
    int trace = 0;
    const arg_spec spec[] = {
        {"grad_output", to_array, &dout, 1},
        {"query", to_array, &q, 1},
        {"key", to_array, &k, 1},
        {"value", to_array, &v, 1},
        SDPA_OPTION_SPECS(o),
        {"weights", to_array_or_none, &weights, 0},
        {"trace", to_bool, &trace, 0},
        {"grads", to_grads, given, 0},
        {"output", to_array_or_none, &saved_out, 0},
        {"lse", to_array_or_none, &saved_lse, 0},
    };
    enum { SQ, SK, SV, GQ, GK, GV, GW, GS, NARR };
    PyArrayObject *arr[NARR] = {NULL};
    PyObject *result = NULL, *zero = PyLong_FromLong(0);
    attn_sdpa_grad_args g;
    sdpa_call c;
    memset(&g, 0, sizeof g);

    if (parse_args("sdpa_backward", args, PyVectorcall_NARGS(nargs), kwnames, spec,
                   sizeof spec / sizeof spec[0], 4, sdpa_backward_names) < 0 ||
        sdpa_prepare(&c, q, k, v, &o) < 0)
        return NULL;
    const int nd = c.nd, typenum = c.typenum;
    attn_sdpa_args *a = &c.a;
    PyArrayObject *in[6], *read[4] = {dout}; /* what the backward reads besides in */
    const char *in_names[6], *read_names[4] = {"grad_output"};
    int n_in = sdpa_inputs(&c, &o, in, in_names), n_read = 1;
    npy_intp lse_dims[NPY_MAXDIMS];
    memcpy(lse_dims, c.out_dims, sizeof(npy_intp) * (size_t)nd);
    lse_dims[nd - 1] = 1;

    if (!saved_out != !saved_lse) {
        PyErr_SetString(PyExc_ValueError, "output and lse are given together or not at all");
        return NULL;
    }
    if (check_shaped(dout, "grad_output", typenum, nd, c.out_dims) ||
        (weights && check_shaped(weights, "weights", typenum, nd, c.w_dims)) ||
        (saved_out && (check_shaped(saved_out, "output", typenum, nd, c.out_dims) ||
                       check_shaped(saved_lse, "lse", typenum, nd, lse_dims))))
        return NULL;
    view_of(dout, nd, &g.grad_out);
    if (weights) {
        view_of(weights, nd, &g.weights);
        read_names[n_read] = "weights", read[n_read++] = weights;
    }
    if (saved_out) {
        view_of(saved_out, nd, &a->out);
        view_of(saved_lse, nd, &a->lse);
        read_names[n_read] = "output", read[n_read++] = saved_out;
        read_names[n_read] = "lse", read[n_read++] = saved_lse;
    }

    /* Per-problem gradient slabs, then the input-shaped gradients they are
       summed into. An input that is neither broadcast nor shared by several
       query heads has exactly one slab per problem: its gradient is written
       straight into place (its own C order for a new array, through the
       view of a given one) and not summed. */
    npy_intp problems = a->num_heads;
    for (int d = 0; d < a->nbatch; d++) problems *= a->batch_shape[d];
    npy_intp slab[3] = {
        checked_mul(checked_mul(problems, a->L, "the query gradient"), a->E, "the query gradient"),
        checked_mul(checked_mul(problems, a->S, "the key gradient"), a->E, "the key gradient"),
        checked_mul(checked_mul(problems, a->S, "the value gradient"), a->Ev, "the value gradient")};
    if (slab[0] < 0 || slab[1] < 0 || slab[2] < 0) return NULL;
    PyArrayObject *inputs[3] = {q, k, v};
    const char *grad_names[3] = {"the gradient of query", "the gradient of key",
                                 "the gradient of value"};
    char **slab_ptr[3] = {&g.dq, &g.dk, &g.dv};
    attn_view *direct_view[3] = {&g.grad_q, &g.grad_k, &g.grad_v};
    attn_sdpa_args r = *a; /* the reduction: q, k, v views on the gradients */
    attn_view *reduce_view[3] = {&r.q, &r.k, &r.v};
    for (int i = 0; i < 3; i++) {
        int direct = PyArray_SIZE(inputs[i]) == slab[i];
        if (given[i]) {
            /* it may share bytes with the other gradients (columns of one
               buffer, as the multi-head layer gives them), never with what
               the backward reads */
            if (check_output(given[i], grad_names[i], typenum, PyArray_NDIM(inputs[i]),
                             PyArray_DIMS(inputs[i]), in, in_names, n_in) ||
                check_output(given[i], grad_names[i], typenum, PyArray_NDIM(inputs[i]),
                             PyArray_DIMS(inputs[i]), read, read_names, n_read))
                goto done;
            Py_INCREF(given[i]);
            arr[GQ + i] = given[i];
            if (!direct && PyArray_FillWithScalar(given[i], zero) < 0) goto done;
        }
        else if (!(arr[GQ + i] = new_array(PyArray_NDIM(inputs[i]), PyArray_DIMS(inputs[i]),
                                           typenum, !direct, grad_names[i])))
            goto done;
        if (direct) {
            if (given[i]) view_of(given[i], nd, direct_view[i]);
            else *slab_ptr[i] = PyArray_BYTES(arr[GQ + i]);
            reduce_view[i]->data = NULL;
            continue;
        }
        if (!(arr[SQ + i] = new_array(1, &slab[i], typenum, 0, grad_names[i]))) goto done;
        *slab_ptr[i] = PyArray_BYTES(arr[SQ + i]);
        view_of(arr[GQ + i], nd, reduce_view[i]); /* stride 0 where the input broadcast */
    }
    if (trace && (!(arr[GW] = new_view(nd, c.w_dims, typenum,
                                       "the trace's grad_weights (..., Hq, L, S) of query and key",
                                       &g.grad_weights)) ||
                  !(arr[GS] = new_view(nd, c.w_dims, typenum,
                                       "the trace's grad_scores (..., Hq, L, S) of query and key",
                                       &g.grad_scores))))
        goto done;
    g.fwd = *a;

    released_gil gil;
    release_gil(&gil, &g.fwd.interrupt);
    int status = attn_sdpa_backward(&g);
    if (status == ATTN_OK) status = attn_sdpa_reduce_grads(&g, &r);
    take_gil(&gil);
    if (raise_for_status(status)) goto done;
    result = Py_BuildValue("(OOOOO)", arr[GQ], arr[GK], arr[GV],
                           arr[GW] ? (PyObject *)arr[GW] : Py_None,
                           arr[GS] ? (PyObject *)arr[GS] : Py_None);
done:
    Py_XDECREF(zero);
    for (int i = 0; i < NARR; i++) Py_XDECREF(arr[i]);
    return result;
}

/* ------------------------------------------------------------------------ */
/* linear                                                                    */

/* linear(x, weight, bias=None, *, out=None, accumulate=False) -> out
   out[n, m, o] (+)= bias[o] + sum_k x[n, m, k] weight[o, k], any strides:
   x (N, M, K), weight (O, K), bias (O,), out (N, M, O). */
static PyObject *attnpy_linear(PyObject *Py_UNUSED(module), PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames)
{
    PyArrayObject *x = NULL, *w = NULL, *b = NULL, *out = NULL;
    int accumulate = 0;
    const arg_spec spec[] = {
        {"x", to_array, &x, 1},
        {"weight", to_array, &w, 1},
        {"bias", to_array_or_none, &b, 0},
        {"out", to_array_or_none, &out, 0},
        {"accumulate", to_bool, &accumulate, 0},
    };
    char s1[SHAPE_BUF], s2[SHAPE_BUF];
    if (parse_args("linear", args, PyVectorcall_NARGS(nargs), kwnames, spec,
                   sizeof spec / sizeof spec[0], 3, linear_names) < 0 ||
        check_float(x, "x") || check_float(w, "weight") || (b && check_float(b, "bias")))
        return NULL;
    const int typenum = PyArray_TYPE(x);
    if (PyArray_NDIM(x) != 3 || PyArray_NDIM(w) != 2 || PyArray_DIM(w, 1) != PyArray_DIM(x, 2) ||
        PyArray_TYPE(w) != typenum ||
        (b && (PyArray_NDIM(b) != 1 || PyArray_DIM(b, 0) != PyArray_DIM(w, 0) ||
               PyArray_TYPE(b) != typenum))) {
        PyErr_Format(PyExc_ValueError,
                     "linear needs x (N, M, K), weight (O, K) and bias (O,) of one dtype; got "
                     "x %s %s, weight %s %s%s", fmt_shape(x, s1, SHAPE_BUF), dtype_name(x),
                     fmt_shape(w, s2, SHAPE_BUF), dtype_name(w), b ? " and a bias" : "");
        return NULL;
    }
    const npy_intp dims[3] = {PyArray_DIM(x, 0), PyArray_DIM(x, 1), PyArray_DIM(w, 0)};
    for (int d = 0; d < 3; d++) {
        npy_intp extent = d < 2 ? dims[d] : PyArray_DIM(x, 2);
        if (dims[d] > ATTN_MAX_EXTENT || extent > ATTN_MAX_EXTENT) {
            PyErr_SetString(PyExc_ValueError, "linear: attnpy supports dimensions up to 2**31 - 1");
            return NULL;
        }
    }
    if (accumulate && !out) {
        PyErr_SetString(PyExc_ValueError, "accumulate=True needs out");
        return NULL;
    }
    PyArrayObject *in[3] = {x, w, b};
    const char *names[3] = {"x", "weight", "bias"};
    if (out) {
        if (check_output(out, "out", typenum, 3, dims, in, names, b ? 3 : 2)) return NULL;
        Py_INCREF(out);
    }
    else if (!(out = new_array(3, dims, typenum, 0, "the output (N, M, O) of x and weight")))
        return NULL;
    attn_linear_args p = {
        .dtype = typenum == NPY_FLOAT ? ATTN_FLOAT32 : ATTN_FLOAT64,
        .N = dims[0], .M = dims[1], .K = PyArray_DIM(x, 2), .O = dims[2],
        .x = {PyArray_BYTES(x), PyArray_STRIDE(x, 0), PyArray_STRIDE(x, 1), PyArray_STRIDE(x, 2)},
        .w = {PyArray_BYTES(w), 0, PyArray_STRIDE(w, 0), PyArray_STRIDE(w, 1)},
        .y = {PyArray_BYTES(out), PyArray_STRIDE(out, 0), PyArray_STRIDE(out, 1),
              PyArray_STRIDE(out, 2)},
        .b = {b ? PyArray_BYTES(b) : NULL, b ? PyArray_STRIDE(b, 0) : 0},
        .accumulate = accumulate,
    };
    released_gil gil;
    release_gil(&gil, &p.interrupt);
    int status = attn_linear(&p);
    take_gil(&gil);
    if (raise_for_status(status)) Py_CLEAR(out);
    return (PyObject *)out;
}

/* ------------------------------------------------------------------------ */
/* threads and kernels                                                       */

/* set_num_threads(n): attnpy.set_num_threads checks n and explains. */
static PyObject *attnpy_set_num_threads(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int64_t n;
    if (to_count(arg, &n, "n") < 0) return NULL;
    if (n > ATTN_MAX_THREADS || attn_set_num_threads((int)n) != ATTN_OK) {
        PyErr_Format(PyExc_ValueError, "n must be between 1 and %d (0: the default)",
                     ATTN_MAX_THREADS);
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
    if (threads < 1 || threads > ATTN_MAX_THREADS || iters < 1) {
        PyErr_SetString(PyExc_ValueError, "fma_peak needs 1 <= threads <= MAX_THREADS and iters >= 1");
        return NULL;
    }
    double gflops;
    Py_BEGIN_ALLOW_THREADS
    gflops = attn_fma_peak_gflops(threads, (int64_t)iters);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(gflops);
}

/* by attn_kernel's value */
static const char *kernel_names[] = {"auto", "reference", "baseline", "avx2", "avx512", "neon"};

/* A kernel's name to its attn_kernel (-1 with TypeError / ValueError set);
   what names `what` in the messages. */
static int kernel_from_name(PyObject *arg, const char *what)
{
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!name) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "%s must be a str; got %.200s", what,
                         Py_TYPE(arg)->tp_name);
        return -1;
    }
    for (int k = 0; k < (int)(sizeof kernel_names / sizeof kernel_names[0]); k++)
        if (strcmp(name, kernel_names[k]) == 0) return k;
    PyErr_Format(PyExc_ValueError,
                 "%s must be 'auto', 'reference', 'baseline', 'avx2', 'avx512' or 'neon'; got %R",
                 what, arg);
    return -1;
}

static PyObject *attnpy_set_kernel(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int k = kernel_from_name(arg, "kernel");
    if (k < 0) return NULL;
    if (attn_set_kernel((attn_kernel)k) != ATTN_OK) {
        PyErr_Format(PyExc_ValueError, "kernel %s is not supported by this CPU", kernel_names[k]);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* tune_configure(enabled, cap): attnpy.set_tuning checks and explains. */
static PyObject *attnpy_tune_configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    int enabled;
    PyObject *cap_name;
    if (!PyArg_ParseTuple(args, "pO:tune_configure", &enabled, &cap_name)) return NULL;
    int cap = kernel_from_name(cap_name, "cap");
    if (cap < 0) return NULL;
    if (attn_tune_configure(enabled, (attn_kernel)cap) != ATTN_OK) {
        PyErr_Format(PyExc_ValueError, "cap must be a tiled kernel this CPU runs; got %R",
                     cap_name);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* tune_pin(cell, kernel): kernel 'auto' unpins. */
static PyObject *attnpy_tune_pin(PyObject *Py_UNUSED(module), PyObject *args)
{
    const char *cell_name;
    PyObject *kernel_name;
    if (!PyArg_ParseTuple(args, "sO:tune_pin", &cell_name, &kernel_name)) return NULL;
    int k = kernel_from_name(kernel_name, "kernel");
    if (k < 0) return NULL;
    int cell = 0;
    while (attn_tune_cell_name(cell) && strcmp(attn_tune_cell_name(cell), cell_name) != 0)
        cell++;
    if (attn_tune_pin(cell, (attn_kernel)k) != ATTN_OK) {
        PyErr_Format(PyExc_ValueError, "tune_pin needs a cell and a tiled kernel this CPU "
                     "runs; got %s, %R", cell_name, kernel_name);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* tuning(): ((cell, kernel, source, ((candidate, seconds), ...)), ...),
   measuring first (without the GIL) when a measurement is due. */
static PyObject *attnpy_tuning(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(arg))
{
    static const char *sources[] = {"default", "measured", "pinned"};
    attn_tune_cell cells[ATTN_TUNE_CELLS];
    Py_BEGIN_ALLOW_THREADS
    for (int c = 0; c < ATTN_TUNE_CELLS; c++) attn_tune_get(c, &cells[c]);
    Py_END_ALLOW_THREADS
    PyObject *result = PyTuple_New(ATTN_TUNE_CELLS);
    for (int c = 0; result && c < ATTN_TUNE_CELLS; c++) {
        const attn_tune_cell *t = &cells[c];
        PyObject *cand = PyTuple_New(t->ncandidates);
        for (int i = 0; cand && i < t->ncandidates; i++) {
            PyObject *pair = Py_BuildValue("(sd)", kernel_names[t->candidates[i]], t->seconds[i]);
            if (!pair) Py_CLEAR(cand);
            else PyTuple_SET_ITEM(cand, i, pair); /* steals pair */
        }
        PyObject *row = cand ? Py_BuildValue("(sssN)", t->name, kernel_names[t->kernel],
                                             sources[t->source], cand) /* steals cand */
                             : NULL;
        if (!row) Py_CLEAR(result);
        else PyTuple_SET_ITEM(result, c, row); /* steals row */
    }
    return result;
}

/* ran_name(code): (kernel, reason) for the code sdpa returns, e.g.
   ("avx512", "use_tiled") or ("reference", "use_ref:qk_overflow"). */
static PyObject *attnpy_ran_name(PyObject *Py_UNUSED(module), PyObject *arg)
{
    long code = PyLong_Check(arg) ? PyLong_AsLong(arg) : -1;
    if (code == -1 && PyErr_Occurred()) return NULL;
    const int kernel = (int)(code % 8);
    const char *reason = code >= 0 ? attn_reason_name((int)(code / 8)) : NULL;
    if (!reason || kernel >= (int)(sizeof kernel_names / sizeof kernel_names[0])) {
        PyErr_Format(PyExc_ValueError, "code must be one sdpa returned; got %R", arg);
        return NULL;
    }
    return Py_BuildValue("(ss)", kernel_names[kernel], reason);
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
    {"sdpa", (PyCFunction)(void (*)(void))attnpy_sdpa, METH_FASTCALL | METH_KEYWORDS,
     "sdpa(query, key, value, *, scale, masks=(), extra_keys=0, is_causal=False, "
     "enable_gqa=False, query_offset=0, window=None, alibi_slopes=None, dropout_p=0.0, "
     "seed=0, need_weights=True, trace=False, out=None, need_lse=False)\n"
     "--\n\nAttention on validated ndarrays; see attnpy.scaled_dot_product_attention. "
     "Returns (output, weights or None, trace dict or None)."},
    {"sdpa_backward", (PyCFunction)(void (*)(void))attnpy_sdpa_backward,
     METH_FASTCALL | METH_KEYWORDS,
     "sdpa_backward(grad_output, query, key, value, *, scale, masks=(), extra_keys=0, "
     "is_causal=False, enable_gqa=False, query_offset=0, window=None, alibi_slopes=None, "
     "dropout_p=0.0, seed=0, weights=None, trace=False, grads=None, output=None, lse=None)\n--\n\nThe backward pass. Returns (grad_query, grad_key, grad_value, "
     "grad_weights or None, grad_scores or None)."},
    {"linear", (PyCFunction)(void (*)(void))attnpy_linear, METH_FASTCALL | METH_KEYWORDS,
     "linear(x, weight, bias=None, *, out=None, accumulate=False)\n--\n\n"
     "x (N, M, K) @ weight (O, K).T + bias (O,) into out (N, M, O), any strides."},
    {"set_num_threads", attnpy_set_num_threads, METH_O, "Threads the core uses (0: default)."},
    {"get_num_threads", attnpy_get_num_threads, METH_NOARGS, "Threads the core uses."},
    {"set_kernel", attnpy_set_kernel, METH_O, "Force a kernel ('auto' to choose)."},
    {"get_kernel", attnpy_get_kernel, METH_NOARGS, "The kernel in use."},
    {"ran_name", attnpy_ran_name, METH_O, "(kernel, reason) of the code sdpa returns."},
    {"supported_kernels", attnpy_supported_kernels, METH_NOARGS, "Kernels this CPU runs."},
    {"fma_peak", attnpy_fma_peak, METH_VARARGS,
     "fma_peak(threads, iters): float32 FMA GFLOP/s of the selected kernel's vectors."},
    {"tune_configure", attnpy_tune_configure, METH_VARARGS,
     "tune_configure(enabled, cap): forget the tuner's measurements and pins; tune or not, "
     "with candidates no wider than cap ('auto': no cap)."},
    {"tune_pin", attnpy_tune_pin, METH_VARARGS,
     "tune_pin(cell, kernel): pin a tuner cell to a kernel ('auto' unpins)."},
    {"tuning", attnpy_tuning, METH_NOARGS,
     "((cell, kernel, source, ((candidate, seconds), ...)), ...), measured first if due."},
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
    PyObject *m = PyModule_Create(&attnpy_module);
    /* the core's limits, for the Python side's checks and messages */
    if (m && (PyModule_AddIntConstant(m, "MAX_EXTENT", (long)ATTN_MAX_EXTENT) < 0 ||
              PyModule_AddIntConstant(m, "MAX_THREADS", ATTN_MAX_THREADS) < 0 ||
              PyModule_AddIntConstant(m, "MAX_DIMS", ATTN_MAX_DIMS) < 0))
        Py_CLEAR(m);
    /* the tuner's cells, by name */
    PyObject *cells = m ? PyTuple_New(ATTN_TUNE_CELLS) : NULL;
    for (int c = 0; cells && c < ATTN_TUNE_CELLS; c++) {
        PyObject *name = PyUnicode_FromString(attn_tune_cell_name(c));
        if (!name) Py_CLEAR(cells);
        else PyTuple_SET_ITEM(cells, c, name); /* steals name */
    }
    if (m && (!cells || PyModule_AddObject(m, "TUNE_CELLS", cells) < 0)) {
        Py_XDECREF(cells); /* PyModule_AddObject steals it only when it succeeds */
        Py_CLEAR(m);
    }
    PyObject *margin = m ? PyFloat_FromDouble(ATTN_TUNE_MARGIN) : NULL;
    if (m && (!margin || PyModule_AddObject(m, "TUNE_MARGIN", margin) < 0)) {
        Py_XDECREF(margin);
        Py_CLEAR(m);
    }
    return m;
}
