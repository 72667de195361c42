/* db._speedups: the binary COPY rows of greeks_history in C (optional; db.encode falls back to
 * its pure-Python encoder when this module is absent).
 *
 * Rules: pure. Values in, bytes out: no I/O, no clock, no state between calls.
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

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS,
     "copy_rows(columns, start, end) -> bytes | None: the binary COPY rows start..end-1 of the 17\n"
     "greeks_history columns, or None when a value is outside the fast path (encode in Python)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "db._speedups", "C fast paths of db.encode (optional).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
