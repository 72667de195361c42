/* db._speedups: the writer's per-row work in C (optional; db.batch, db.encode and db.latency fall
 * back to their pure-Python code when this module is absent): the binary COPY rows of
 * greeks_history (copy_rows, below), and per batch the rows by column (transpose), the
 * finiteness check (all_finite), the position ids (position_ids), the newest row per position
 * (newest_indexes) and the distinct receive times (count_values), each described where defined.
 *
 * Rules: pure. Values in, values out: no I/O, no clock, no state between calls.
 *
 * copy_rows(columns, start, end) takes the 17 columns of db.encode.HISTORY_COLUMNS (the position
 * ids as the tenth, the Greeks source as its text "broker" / "model" / None) and returns the rows
 * start..end-1 as PostgreSQL binary COPY rows (no signature, no trailer), in input order, exactly
 * the bytes db.encode's Python encoder packs for each row. It handles the values the engine
 * produces (float times in [0, 9e9) seconds, floats, None where a column may be NULL, int
 * sequence numbers and position ids); for anything else (an int where a float is expected, a
 * value a column cannot hold, a missing required value) it returns None and the caller encodes
 * the chunk in Python, which decides exactly as before (the same bytes, or BatchDataError).
 *
 * Why: the per-row Python work of the COPY stream (struct packing per NULL pattern, time
 * conversion) was about an eighth of the engine's CPU at 50,000 ticks/s; this is one pass in C.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum kind { K_TS, K_F8, K_I8, K_I4, K_F4, K_CHAR };

#define NCOLS 17
/* HISTORY_COLUMNS: event_ts, received_ts, quantity, bid, ask, last, mark, underlying_price, seq,
 * position_id, iv, delta, gamma, theta, vega, rho, greeks_source */
static const enum kind LAYOUT[NCOLS] = {
    K_TS, K_TS, K_F8, K_F8, K_F8, K_F8, K_F8, K_F8, K_I8,
    K_I4, K_F4, K_F4, K_F4, K_F4, K_F4, K_F4, K_CHAR,
};
static const int REQUIRED[NCOLS] = {1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0};
/* 2 (field count) + 17 lengths + the widest values: 9 x 8 + 4 + 6 x 4 + 1 */
#define MAX_ROW (2 + NCOLS * 4 + 9 * 8 + 4 + 6 * 4 + 1)

/* db.encode: 2000-01-01 in microseconds since 1970, the round-half-to-even constant, the fast
 * path's bound. The arithmetic below is pg_timestamp_us's fast path, operation for operation in
 * IEEE double (the module is built with -ffp-contract=off: no fused multiply-add). */
static const double PG_EPOCH_US_F = 946684800.0 * 1000000.0;
static const double RNE = 6755399441055744.0;
static const double FAST_MAX_S = 9.0e9;

static inline unsigned char *put_u16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
    return p + 2;
}

static inline unsigned char *put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
    return p + 4;
}

static inline unsigned char *put_u64(unsigned char *p, uint64_t v) {
    p = put_u32(p, (uint32_t)(v >> 32));
    return put_u32(p, (uint32_t)v);
}

static PyObject *copy_rows(PyObject *self, PyObject *args) {
    PyObject *columns;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "Onn:copy_rows", &columns, &start, &end)) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(columns, "copy_rows: columns must be a sequence");
    if (fast == NULL) {
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(fast) != NCOLS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "copy_rows: %d columns expected", NCOLS);
        return NULL;
    }
    PyObject *cols[NCOLS] = {NULL};
    PyObject **items[NCOLS];
    PyObject *result = NULL;
    PyObject *out = NULL;
    int fallback = 0;
    Py_ssize_t n = 0;
    for (int c = 0; c < NCOLS; c++) {
        cols[c] = PySequence_Fast(PySequence_Fast_GET_ITEM(fast, c), "copy_rows: a column must be a sequence");
        if (cols[c] == NULL) {
            goto done;
        }
        items[c] = PySequence_Fast_ITEMS(cols[c]);
        if (PySequence_Fast_GET_SIZE(cols[c]) < end) {
            fallback = 1;
        }
    }
    if (start < 0 || end < start) {
        fallback = 1;
    }
    if (fallback) {
        goto done;
    }
    n = end - start;
    if (n > PY_SSIZE_T_MAX / MAX_ROW) {
        fallback = 1;
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, n * MAX_ROW);
    if (out == NULL) {
        goto done;
    }
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *p = base;
    for (Py_ssize_t r = start; r < end && !fallback; r++) {
        p = put_u16(p, NCOLS);
        for (int c = 0; c < NCOLS; c++) {
            PyObject *v = items[c][r];
            if (v == Py_None) {
                if (REQUIRED[c]) {
                    fallback = 1;
                    break;
                }
                p = put_u32(p, 0xFFFFFFFFu);
                continue;
            }
            switch (LAYOUT[c]) {
            case K_TS: {
                if (!PyFloat_CheckExact(v)) {
                    fallback = 1;
                    break;
                }
                double ts = PyFloat_AS_DOUBLE(v);
                if (!(0.0 <= ts && ts < FAST_MAX_S)) {
                    fallback = 1;
                    break;
                }
                double frac = fmod(ts, 1.0); /* Python's ts % 1.0 for ts >= 0 */
                double us = (ts - frac) * 1e6 + (((frac * 1e6) + RNE) - RNE) - PG_EPOCH_US_F;
                p = put_u32(p, 8);
                p = put_u64(p, (uint64_t)(int64_t)us);
                break;
            }
            case K_F8: {
                if (!PyFloat_CheckExact(v)) {
                    fallback = 1;
                    break;
                }
                double d = PyFloat_AS_DOUBLE(v);
                uint64_t bits;
                memcpy(&bits, &d, 8);
                p = put_u32(p, 8);
                p = put_u64(p, bits);
                break;
            }
            case K_I8: {
                if (!PyLong_CheckExact(v)) {
                    fallback = 1;
                    break;
                }
                int overflow = 0;
                long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
                if (overflow || (x == -1 && PyErr_Occurred())) {
                    PyErr_Clear();
                    fallback = 1;
                    break;
                }
                p = put_u32(p, 8);
                p = put_u64(p, (uint64_t)x);
                break;
            }
            case K_I4: {
                if (!PyLong_CheckExact(v)) {
                    fallback = 1;
                    break;
                }
                int overflow = 0;
                long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
                if (overflow || (x == -1 && PyErr_Occurred()) || x < INT32_MIN || x > INT32_MAX) {
                    PyErr_Clear();
                    fallback = 1;
                    break;
                }
                p = put_u32(p, 4);
                p = put_u32(p, (uint32_t)(int32_t)x);
                break;
            }
            case K_F4: {
                if (!PyFloat_CheckExact(v)) {
                    fallback = 1;
                    break;
                }
                double d = PyFloat_AS_DOUBLE(v);
                float f = (float)d;
                if (isinf(f) && !isinf(d)) { /* struct's OverflowError: Python raises for it */
                    fallback = 1;
                    break;
                }
                uint32_t bits;
                memcpy(&bits, &f, 4);
                p = put_u32(p, 4);
                p = put_u32(p, bits);
                break;
            }
            case K_CHAR: {
                if (!PyUnicode_CheckExact(v)) {
                    fallback = 1;
                    break;
                }
                if (PyUnicode_CompareWithASCIIString(v, "broker") == 0) {
                    p = put_u32(p, 1);
                    *p++ = 'b';
                } else if (PyUnicode_CompareWithASCIIString(v, "model") == 0) {
                    p = put_u32(p, 1);
                    *p++ = 'm';
                } else { /* SOURCE_CHARS.get: an unknown text is NULL */
                    p = put_u32(p, 0xFFFFFFFFu);
                }
                break;
            }
            }
            if (fallback) {
                break;
            }
        }
    }
    if (!fallback) {
        if (_PyBytes_Resize(&out, (Py_ssize_t)(p - base)) == 0) {
            result = out;
        }
        out = NULL; /* _PyBytes_Resize consumed it on failure */
    }
done:
    Py_XDECREF(out);
    for (int c = 0; c < NCOLS; c++) {
        Py_XDECREF(cols[c]);
    }
    Py_DECREF(fast);
    if (result == NULL && fallback && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return result;
}

/* -- the writer's per-batch columns ----------------------------------------------------------
 * transpose(rows, nfields): db.batch.transpose's zip(*rows) (a list of nfields tuples, field i of
 * every row in the i-th), read straight from the row tuples; None unless ``rows`` is a non-empty
 * list of tuples of exactly nfields items (the caller then zips in Python).
 */
static PyObject *transpose(PyObject *self, PyObject *args) {
    PyObject *rows;
    Py_ssize_t nfields;
    if (!PyArg_ParseTuple(args, "O!n:transpose", &PyList_Type, &rows, &nfields)) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(rows);
    if (n == 0 || nfields <= 0) {
        Py_RETURN_NONE;
    }
    PyObject *out = PyList_New(nfields);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t f = 0; f < nfields; f++) {
        PyObject *col = PyTuple_New(n);
        if (col == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, f, col);
    }
    /* Checked and copied in one pass that runs no Python code (the allocations above could
     * have: a garbage collection). A tuple left partly filled is freed safely. */
    PyObject **cols = PySequence_Fast_ITEMS(out);
    if (PyList_GET_SIZE(rows) != n) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != nfields) {
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
        PyObject **items = &PyTuple_GET_ITEM(row, 0);
        for (Py_ssize_t f = 0; f < nfields; f++) {
            PyObject *v = items[f];
            Py_INCREF(v);
            PyTuple_SET_ITEM(cols[f], r, v);
        }
    }
    return out;
}

/* all_finite(columns): True when every value of every column is None, an int that a float can
 * hold, or a finite float: what db.batch.clean_rows's one sum over the batch decides (a NaN, an
 * infinity or anything else: False, and the caller looks row by row). */
static PyObject *all_finite(PyObject *self, PyObject *columns) {
    PyObject *fast = PySequence_Fast(columns, "all_finite: columns must be a sequence");
    if (fast == NULL) {
        return NULL;
    }
    int ok = 1;
    Py_ssize_t ncols = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t c = 0; c < ncols && ok; c++) {
        PyObject *col = PySequence_Fast_GET_ITEM(fast, c);
        if (!PyTuple_CheckExact(col) && !PyList_CheckExact(col)) {
            ok = 0;
            break;
        }
        Py_ssize_t n = PySequence_Fast_GET_SIZE(col);
        PyObject **items = PySequence_Fast_ITEMS(col);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = items[i];
            if (PyFloat_CheckExact(v)) {
                if (!isfinite(PyFloat_AS_DOUBLE(v))) {
                    ok = 0;
                    break;
                }
            } else if (v == Py_None) {
                continue;
            } else if (PyLong_Check(v)) {
                double d = PyLong_AsDouble(v);
                if (d == -1.0 && PyErr_Occurred()) {
                    PyErr_Clear();
                    ok = 0;
                    break;
                }
            } else {
                ok = 0;
                break;
            }
        }
    }
    Py_DECREF(fast);
    return PyBool_FromLong(ok);
}

/* position_ids(rows, nkey, positions): ``positions.get(row[:nkey])`` for every row (the ids of
 * db.encode.Dimensions: None for an unknown key), without the list of key tuples; None unless
 * ``rows`` is a list of tuples of at least nkey items. */
static PyObject *position_ids(PyObject *self, PyObject *args) {
    PyObject *rows, *positions;
    Py_ssize_t nkey;
    if (!PyArg_ParseTuple(args, "O!nO!:position_ids", &PyList_Type, &rows, &nkey, &PyDict_Type, &positions)) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(rows);
    if (nkey <= 0 || !PyDict_CheckExact(positions)) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) < nkey) {
            Py_RETURN_NONE;
        }
    }
    /* Hold the rows: a key's __hash__ or __eq__ (Python code) could change the list meanwhile. */
    PyObject *held = PyList_GetSlice(rows, 0, n);
    if (held == NULL) {
        return NULL;
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        Py_DECREF(held);
        return NULL;
    }
    /* The rows of one position usually share their identity objects (the book builds them from
     * one prefix), so a row whose nkey items are the very objects of an earlier row's has its
     * id: a small cache of row indexes by those pointers, checked before building a key. The
     * objects stay alive (``held``), so equal pointers mean the same objects. */
    Py_ssize_t cap = 64;
    while (cap < 2 * n && cap < 8192) {
        cap <<= 1;
    }
    Py_ssize_t *cache = PyMem_Malloc((size_t)cap * sizeof(Py_ssize_t));
    if (cache == NULL) {
        Py_DECREF(held);
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t c = 0; c < cap; c++) {
        cache[c] = -1;
    }
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject **items = &PyTuple_GET_ITEM(PyList_GET_ITEM(held, r), 0);
        size_t h = 0;
        for (Py_ssize_t k = 0; k < nkey; k++) {
            h = (h ^ ((size_t)items[k] >> 4)) * (size_t)0x100000001B3ull;
        }
        h = (h ^ (h >> 29)) & (size_t)(cap - 1);
        Py_ssize_t seen = cache[h];
        if (seen >= 0) {
            PyObject **prev = &PyTuple_GET_ITEM(PyList_GET_ITEM(held, seen), 0);
            Py_ssize_t k = 0;
            while (k < nkey && prev[k] == items[k]) {
                k++;
            }
            if (k == nkey) {
                PyObject *id = PyList_GET_ITEM(out, seen);
                Py_INCREF(id);
                PyList_SET_ITEM(out, r, id);
                continue;
            }
        }
        PyObject *key = PyTuple_GetSlice(PyList_GET_ITEM(held, r), 0, nkey);
        if (key == NULL) {
            goto fail;
        }
        PyObject *id = PyDict_GetItemWithError(positions, key); /* borrowed */
        Py_DECREF(key);
        if (id == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            id = Py_None;
        }
        Py_INCREF(id);
        PyList_SET_ITEM(out, r, id);
        cache[h] = r;
    }
    PyMem_Free(cache);
    Py_DECREF(held);
    return out;
fail:
    PyMem_Free(cache);
    Py_DECREF(held);
    Py_DECREF(out); /* the items not set yet are NULL: freed safely */
    return NULL;
}

/* newest_indexes(event_ts, received_ts, position_ids): db.encode.newest_indexes in one pass.
 * Python's version sorts the row indexes by (event_ts, received_ts) (stably) and keeps, per
 * position, the last index in that order, the positions in the order of their first index in
 * it. Here: per position the greatest (event_ts, received_ts, index) and the least, then the
 * positions sorted by the least: the same list. None unless every time is a finite float and
 * every position id an int (the caller then sorts in Python). */
typedef struct {
    long long key;
    double min_ev, min_rc, max_ev, max_rc;
    Py_ssize_t min_i, max_i;
    int used;
} slot_t;

static int by_first(const void *a, const void *b) {
    const slot_t *x = *(const slot_t *const *)a, *y = *(const slot_t *const *)b;
    if (x->min_ev != y->min_ev) {
        return x->min_ev < y->min_ev ? -1 : 1;
    }
    if (x->min_rc != y->min_rc) {
        return x->min_rc < y->min_rc ? -1 : 1;
    }
    return x->min_i < y->min_i ? -1 : (x->min_i > y->min_i);
}

static PyObject *newest_indexes(PyObject *self, PyObject *args) {
    PyObject *ev_seq, *rc_seq, *pid_seq;
    if (!PyArg_ParseTuple(args, "OOO:newest_indexes", &ev_seq, &rc_seq, &pid_seq)) {
        return NULL;
    }
    PyObject *evf = NULL, *rcf = NULL, *pidf = NULL, *out = NULL;
    slot_t *table = NULL;
    slot_t **order = NULL;
    int fallback = 0;
    evf = PySequence_Fast(ev_seq, "newest_indexes: event times must be a sequence");
    rcf = evf ? PySequence_Fast(rc_seq, "newest_indexes: receive times must be a sequence") : NULL;
    pidf = rcf ? PySequence_Fast(pid_seq, "newest_indexes: position ids must be a sequence") : NULL;
    if (pidf == NULL) {
        goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(pidf);
    if (PySequence_Fast_GET_SIZE(evf) != n || PySequence_Fast_GET_SIZE(rcf) != n) {
        fallback = 1; /* Python's zip(strict=True) says what is wrong */
        goto done;
    }
    PyObject **ev = PySequence_Fast_ITEMS(evf), **rc = PySequence_Fast_ITEMS(rcf);
    PyObject **pid = PySequence_Fast_ITEMS(pidf);
    Py_ssize_t cap = 8;
    while (cap < 2 * n) {
        cap <<= 1;
    }
    table = PyMem_Calloc((size_t)cap, sizeof(slot_t));
    order = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(slot_t *));
    if (table == NULL || order == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyFloat_CheckExact(ev[i]) || !PyFloat_CheckExact(rc[i]) || !PyLong_CheckExact(pid[i])) {
            fallback = 1;
            goto done;
        }
        double e = PyFloat_AS_DOUBLE(ev[i]), r = PyFloat_AS_DOUBLE(rc[i]);
        int overflow = 0;
        long long k = PyLong_AsLongLongAndOverflow(pid[i], &overflow);
        if (!isfinite(e) || !isfinite(r) || overflow || (k == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            fallback = 1;
            goto done;
        }
        size_t h = ((size_t)(unsigned long long)k * 0x9E3779B97F4A7C15ull) & (size_t)(cap - 1);
        slot_t *s;
        for (;;) {
            s = &table[h];
            if (!s->used || s->key == k) {
                break;
            }
            h = (h + 1) & (size_t)(cap - 1);
        }
        if (!s->used) {
            s->used = 1;
            s->key = k;
            s->min_ev = s->max_ev = e;
            s->min_rc = s->max_rc = r;
            s->min_i = s->max_i = i;
            order[used++] = s;
            continue;
        }
        /* rows in index order: a tie goes to the later row for the newest, the earlier for the first */
        if (e > s->max_ev || (e == s->max_ev && r >= s->max_rc)) {
            s->max_ev = e;
            s->max_rc = r;
            s->max_i = i;
        }
        if (e < s->min_ev || (e == s->min_ev && r < s->min_rc)) {
            s->min_ev = e;
            s->min_rc = r;
            s->min_i = i;
        }
    }
    qsort(order, (size_t)used, sizeof(slot_t *), by_first);
    out = PyList_New(used);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t j = 0; j < used; j++) {
        PyObject *x = PyLong_FromSsize_t(order[j]->max_i);
        if (x == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, j, x);
    }
done:
    PyMem_Free(table);
    PyMem_Free(order);
    Py_XDECREF(evf);
    Py_XDECREF(rcf);
    Py_XDECREF(pidf);
    if (fallback) {
        Py_XDECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* count_values(values): collections.Counter(values) as a plain dict, for values that come in
 * runs (the receive times of a batch: one per broker frame): a run of identical objects, or of
 * equal floats, costs one dictionary update instead of one per value. */
static PyObject *count_values(PyObject *self, PyObject *values) {
    /* A tuple (a copy of anything else): the dictionary updates below may run a value's __eq__,
     * which must not be able to change what is being counted. */
    PyObject *fast = PySequence_Tuple(values);
    if (fast == NULL) {
        return NULL;
    }
    PyObject *counts = PyDict_New();
    if (counts == NULL) {
        Py_DECREF(fast);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Py_ssize_t i = 0;
    while (i < n) {
        PyObject *v = items[i];
        Py_ssize_t j = i + 1;
        if (PyFloat_CheckExact(v)) {
            double d = PyFloat_AS_DOUBLE(v);
            while (j < n && (items[j] == v || (PyFloat_CheckExact(items[j]) && PyFloat_AS_DOUBLE(items[j]) == d))) {
                j++;
            }
        } else {
            while (j < n && items[j] == v) {
                j++;
            }
        }
        /* v is held by ``fast`` (a tuple we own a reference to) */
        PyObject *old = PyDict_GetItemWithError(counts, v);
        if (old == NULL && PyErr_Occurred()) {
            goto fail;
        }
        Py_ssize_t prev = old == NULL ? 0 : PyLong_AsSsize_t(old);
        if (prev == -1 && PyErr_Occurred()) {
            goto fail;
        }
        PyObject *total = PyLong_FromSsize_t(prev + (j - i));
        if (total == NULL) {
            goto fail;
        }
        int rc = PyDict_SetItem(counts, v, total);
        Py_DECREF(total);
        if (rc < 0) {
            goto fail;
        }
        i = j;
    }
    Py_DECREF(fast);
    return counts;
fail:
    Py_DECREF(fast);
    Py_DECREF(counts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS,
     "copy_rows(columns, start, end) -> bytes | None: the binary COPY rows start..end-1 of the 17\n"
     "greeks_history columns, or None when a value is outside the fast path (encode in Python)."},
    {"transpose", transpose, METH_VARARGS,
     "transpose(rows, nfields) -> list[tuple] | None: zip(*rows) of a list of nfields-tuples."},
    {"all_finite", all_finite, METH_O,
     "all_finite(columns) -> bool: every value None, a float-sized int or a finite float."},
    {"position_ids", position_ids, METH_VARARGS,
     "position_ids(rows, nkey, positions) -> list | None: positions.get(row[:nkey]) per row."},
    {"count_values", count_values, METH_O,
     "count_values(values) -> dict: collections.Counter(values) as a dict, a run of equal values at once."},
    {"newest_indexes", newest_indexes, METH_VARARGS,
     "newest_indexes(event_ts, received_ts, position_ids) -> list[int] | None: the index of each\n"
     "position's newest row, as db.encode.newest_indexes orders them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "db._speedups", "C fast paths of db.encode (optional).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
