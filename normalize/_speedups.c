/* normalize._speedups: C fast paths of the per-tick work, each for the usual case (optional:
 * without this module the pure-Python code runs, with the same results):
 *
 * - apply_updates: normalize.book.Book.apply's instrument updates (merge, derived values, one row
 *   per position holding the instrument) when the broker sent the four Greeks or the instrument
 *   is stock-like; the model's case (Black-Scholes-Merton) stays in Python;
 * - compact_events: the DXLink codec's COMPACT rows -> event tuples (actors.tastytrade.protocol);
 * - map_events: DXLink event tuples -> InstrumentUpdates (normalize.tastytrade.map_feed).
 *
 * Each leaves to the Python code it replaces any input outside its fast path (an int where a
 * float is expected, a "NaN", a value of another type, a new instrument), having changed nothing
 * that code does not do again the same way, and that code decides (and reports) as before. The
 * tests run both on the same input and compare.
 *
 * Rules: pure. Values in, values out: no I/O, no clock, no state between calls.
 *
 * Why: after the Python-level tuning, the book, the DXLink codec and its mapper were about half of
 * the engine's CPU at 50,000 ticks/s, nearly all of it interpreter overhead on dict reads and
 * small tuples; these run the same steps in C.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* T_OBJECT_EX, READONLY: the slots of the book's records */

#define TAIL 13
#define PREFIX 10
#define ROW (PREFIX + TAIL + 6)

static PyObject *K_BID, *K_ASK, *K_LAST, *K_MARK, *K_UND, *K_IV, *K_DELTA, *K_GAMMA, *K_THETA, *K_VEGA,
    *K_RHO;
static PyObject *A_STATE, *A_FEEDS_PRICE, *A_PRICE, *A_FAN, *A_CONTRACT, *A_STOCK_LIKE, *A_UNDERLYING_RECORD,
    *A_LAST_ROW, *A_SOURCE;
static PyObject *ONE; /* 1.0: a stock's delta */

static inline PyObject *get(PyObject *state, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(state, key); /* borrowed */
    return v == NULL ? Py_None : v;
}

/* Outcome of one step: done, or not handled here (the Python code takes the event from the
 * start: merging the same values into the state again changes nothing), or a Python error. */
enum step { DONE, NOT_HANDLED, FAILED };

/* The underlying-price rule of an instrument's state (book._price); NOT_HANDLED for a bid or an
 * ask that is not a float. *price: a new reference. */
static enum step state_price(PyObject *state, PyObject **price) {
    PyObject *bid = get(state, K_BID), *ask = get(state, K_ASK);
    if (bid != Py_None && ask != Py_None) {
        if (!PyFloat_CheckExact(bid) || !PyFloat_CheckExact(ask)) {
            return NOT_HANDLED;
        }
        double b = PyFloat_AS_DOUBLE(bid), a = PyFloat_AS_DOUBLE(ask);
        if (a >= b && b > 0) {
            *price = PyFloat_FromDouble((b + a) * 0.5);
            return *price == NULL ? FAILED : DONE;
        }
    }
    PyObject *mark = get(state, K_MARK);
    *price = mark != Py_None ? mark : get(state, K_LAST);
    Py_INCREF(*price);
    return DONE;
}

/* A row holding only atomic values (str, float, int, None, date: no references to other objects)
 * can never be part of a reference cycle, so the cyclic garbage collector need not track it.
 * CPython untracks such exact tuples itself at their first collection, but never a tuple subclass
 * (GreeksSnapshot, a NamedTuple): every row stayed tracked, and each collection of the middle and
 * old generations walked all 29 items of every row still pending (a backlog of 100,000 rows and
 * more under overload: a fifth of the engine's CPU in the collector, growing with the backlog).
 * An item of a collected type keeps the row tracked, exactly as before. */
static inline void untrack_if_atomic(PyObject *row) {
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(row); k++) {
        if (PyType_IS_GC(Py_TYPE(PyTuple_GET_ITEM(row, k)))) {
            return;
        }
    }
    PyObject_GC_UnTrack(row);
}

/* Book._update once the state is merged, for an instrument with holders, when the state holds the
 * broker's four Greeks (source broker) or the instrument is stock-like (delta 1, source model):
 * the derived values and one row per (prefix, factor) of ``fan``; *last_row, *source: borrowed
 * (the row is in ``rows``). NOT_HANDLED: the model's case, or a value of an unexpected type. */
static enum step fan_out(PyObject *state, PyObject *update, int stock_like, PyObject *und_fallback, PyObject *fan,
                         PyObject *rows, PyTypeObject *row_type, PyObject *broker_src, PyObject *model_src,
                         PyObject **last_row, PyObject **source) {
    PyObject *bid = get(state, K_BID), *ask = get(state, K_ASK), *last = get(state, K_LAST);
    PyObject *delta = get(state, K_DELTA), *gamma = get(state, K_GAMMA), *theta = get(state, K_THETA);
    PyObject *vega = get(state, K_VEGA), *iv = get(state, K_IV), *rho = get(state, K_RHO);
    PyObject *mark_v = get(state, K_MARK), *und = get(state, K_UND);
    if (PyErr_Occurred()) {
        return FAILED;
    }
    if (bid != Py_None && ask != Py_None && (!PyFloat_CheckExact(bid) || !PyFloat_CheckExact(ask))) {
        return NOT_HANDLED;
    }
    PyObject *src;
    PyObject *greeks[4] = {delta, gamma, theta, vega};
    if (delta != Py_None && gamma != Py_None && theta != Py_None && vega != Py_None) {
        src = broker_src;
    } else if (stock_like) {
        greeks[0] = delta = ONE;
        src = model_src;
    } else {
        return NOT_HANDLED; /* the model fills the missing Greeks (Python) */
    }
    for (int k = 0; k < 4; k++) {
        if (greeks[k] != Py_None && !PyFloat_CheckExact(greeks[k])) {
            return NOT_HANDLED;
        }
    }
    Py_ssize_t nfan = PyTuple_GET_SIZE(fan);
    for (Py_ssize_t i = 0; i < nfan; i++) {
        PyObject *pair = PyTuple_GET_ITEM(fan, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyTuple_CheckExact(PyTuple_GET_ITEM(pair, 0)) || PyTuple_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) != PREFIX ||
            !PyFloat_CheckExact(PyTuple_GET_ITEM(pair, 1))) {
            return NOT_HANDLED;
        }
    }
    PyObject *mark; /* new reference */
    if (bid != Py_None && ask != Py_None && PyFloat_AS_DOUBLE(ask) >= PyFloat_AS_DOUBLE(bid)) {
        mark = PyFloat_FromDouble((PyFloat_AS_DOUBLE(bid) + PyFloat_AS_DOUBLE(ask)) * 0.5);
        if (mark == NULL) {
            return FAILED;
        }
    } else {
        mark = mark_v != Py_None ? mark_v : last;
        Py_INCREF(mark);
    }
    if (und == Py_None) {
        und = stock_like ? mark : und_fallback;
    }
    PyObject *tv[TAIL] = {PyTuple_GET_ITEM(update, 2), PyTuple_GET_ITEM(update, 3), bid, ask, last, mark, und, iv,
                          delta, gamma, theta, vega, rho};
    PyObject *seq = PyTuple_GET_ITEM(update, 4);
    PyObject *row = NULL;
    for (Py_ssize_t i = 0; i < nfan; i++) {
        PyObject *prefix = PyTuple_GET_ITEM(PyTuple_GET_ITEM(fan, i), 0);
        double f = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(PyTuple_GET_ITEM(fan, i), 1));
        Py_XDECREF(row); /* the list holds the previous one */
        row = row_type->tp_alloc(row_type, ROW);
        if (row == NULL) {
            goto fail;
        }
        for (int k = 0; k < PREFIX; k++) {
            PyObject *v = PyTuple_GET_ITEM(prefix, k);
            Py_INCREF(v);
            PyTuple_SET_ITEM(row, k, v);
        }
        for (int k = 0; k < TAIL; k++) {
            Py_INCREF(tv[k]);
            PyTuple_SET_ITEM(row, PREFIX + k, tv[k]);
        }
        for (int k = 0; k < 4; k++) {
            PyObject *x;
            if (greeks[k] == Py_None) {
                x = Py_None;
                Py_INCREF(x);
            } else if ((x = PyFloat_FromDouble(PyFloat_AS_DOUBLE(greeks[k]) * f)) == NULL) {
                goto fail; /* unset items are NULL: tuple dealloc skips them */
            }
            PyTuple_SET_ITEM(row, PREFIX + TAIL + k, x);
        }
        Py_INCREF(seq);
        PyTuple_SET_ITEM(row, ROW - 2, seq);
        Py_INCREF(src);
        PyTuple_SET_ITEM(row, ROW - 1, src);
        untrack_if_atomic(row);
        if (PyList_Append(rows, row) < 0) {
            goto fail;
        }
    }
    Py_DECREF(mark); /* the rows hold it */
    Py_XDECREF(row); /* the list holds it: returned borrowed */
    *last_row = row;
    *source = src;
    return DONE;
fail:
    Py_XDECREF(row);
    Py_DECREF(mark);
    return FAILED;
}

/* The book's records (_Instrument, _Contract: slotted dataclasses) are read and written through
 * their slots directly: one pointer per attribute instead of a type lookup and a descriptor call
 * (PyObject_GetAttr), about ten per update. The offsets are looked up once per apply_updates call
 * (no state between calls), from the member descriptors of the record's exact type, and used only
 * while that type is unchanged (its version tag) and keeps the generic attribute access; anything
 * else takes PyObject_GetAttr / PyObject_SetAttr as before. */
enum { S_STATE, S_FEEDS_PRICE, S_PRICE, S_FAN, S_CONTRACT, S_LAST_ROW, S_SOURCE, N_REC };
enum { S_STOCK_LIKE, S_UNDERLYING_RECORD, N_CONTRACT };
#define MAX_SLOTS 8

typedef struct {
    PyTypeObject *type; /* borrowed: only compared (instances of it are held meanwhile) */
    unsigned int tag;
    int ok;
    Py_ssize_t off[MAX_SLOTS];
} slots_t;

static int resolve_slots(slots_t *c, PyTypeObject *tp, PyObject *const *names, int n) {
    if (c->type == tp) {
        return c->ok && (tp->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) && tp->tp_version_tag == c->tag;
    }
    c->type = tp;
    c->ok = 0;
    if (tp->tp_getattro != PyObject_GenericGetAttr || tp->tp_setattro != PyObject_GenericSetAttr) {
        return 0;
    }
    for (int i = 0; i < n; i++) {
        PyObject *d = _PyType_Lookup(tp, names[i]); /* borrowed; assigns the version tag */
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)) {
            return 0;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
            return 0;
        }
        c->off[i] = m->offset;
    }
    if (!(tp->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)) {
        return 0;
    }
    c->tag = tp->tp_version_tag;
    c->ok = 1;
    return 1;
}

/* A new reference to o.<name>, from its slot when ``fast`` (an unset slot: GetAttr raises). */
static inline PyObject *attr(PyObject *o, const slots_t *c, int fast, int i, PyObject *name) {
    if (fast) {
        PyObject *v = *(PyObject **)((char *)o + c->off[i]);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
    }
    return PyObject_GetAttr(o, name);
}

static inline int set_attr(PyObject *o, const slots_t *c, int fast, int i, PyObject *name, PyObject *v) {
    if (fast) {
        PyObject **p = (PyObject **)((char *)o + c->off[i]);
        PyObject *old = *p;
        Py_INCREF(v);
        *p = v;
        Py_XDECREF(old);
        return 0;
    }
    return PyObject_SetAttr(o, name, v);
}

typedef struct {
    slots_t rec, contract;
} records_t;

/* One InstrumentUpdate, Book._update's whole work when it is the usual case. */
static enum step apply_one(PyObject *instruments, PyObject *ev, PyObject *rows, PyTypeObject *row_type,
                           PyObject *broker_src, PyObject *model_src, records_t *slots) {
    PyObject *values = PyTuple_GET_ITEM(ev, 5);
    if (!PyDict_CheckExact(values)) {
        return NOT_HANDLED;
    }
    PyObject *key = PyTuple_Pack(2, PyTuple_GET_ITEM(ev, 0), PyTuple_GET_ITEM(ev, 1));
    if (key == NULL) {
        return FAILED;
    }
    PyObject *rec = PyDict_GetItemWithError(instruments, key); /* borrowed */
    Py_DECREF(key);
    if (rec == NULL) {
        if (PyErr_Occurred()) { /* an unhashable key: the Python code reports it */
            PyErr_Clear();
        }
        return NOT_HANDLED; /* a new instrument: the Python code creates its record */
    }
    Py_INCREF(rec);
    PyObject *const rec_names[N_REC] = {A_STATE, A_FEEDS_PRICE, A_PRICE, A_FAN, A_CONTRACT, A_LAST_ROW, A_SOURCE};
    const slots_t *rs = &slots->rec;
    int fast = resolve_slots(&slots->rec, Py_TYPE(rec), rec_names, N_REC);
    enum step result = FAILED;
    PyObject *state = NULL, *fan = NULL, *contract = NULL, *stock_like = NULL, *und_rec = NULL, *und_fb = NULL;
    PyObject *price = NULL;
    state = attr(rec, rs, fast, S_STATE, A_STATE);
    if (state == NULL) {
        goto done;
    }
    if (!PyDict_CheckExact(state)) {
        result = NOT_HANDLED;
        goto done;
    }
    if (PyDict_Update(state, values) < 0) {
        goto done;
    }
    int feeds;
    PyObject *feeds_o = attr(rec, rs, fast, S_FEEDS_PRICE, A_FEEDS_PRICE);
    if (feeds_o == NULL) {
        goto done;
    }
    feeds = feeds_o == Py_True;
    Py_DECREF(feeds_o);
    if (feeds) {
        enum step s = state_price(state, &price);
        if (s != DONE) {
            result = s;
            goto done;
        }
        if (set_attr(rec, rs, fast, S_PRICE, A_PRICE, price) < 0) {
            goto done;
        }
    }
    fan = attr(rec, rs, fast, S_FAN, A_FAN);
    if (fan == NULL) {
        goto done;
    }
    if (!PyTuple_CheckExact(fan)) {
        result = NOT_HANDLED;
        goto done;
    }
    if (PyTuple_GET_SIZE(fan) == 0) { /* nobody holds it: the state is all */
        result = DONE;
        goto done;
    }
    contract = attr(rec, rs, fast, S_CONTRACT, A_CONTRACT);
    if (contract == NULL) {
        goto done;
    }
    if (contract == Py_None) {
        result = NOT_HANDLED;
        goto done;
    }
    PyObject *const contract_names[N_CONTRACT] = {A_STOCK_LIKE, A_UNDERLYING_RECORD};
    int cfast = resolve_slots(&slots->contract, Py_TYPE(contract), contract_names, N_CONTRACT);
    stock_like = attr(contract, &slots->contract, cfast, S_STOCK_LIKE, A_STOCK_LIKE);
    und_rec = attr(contract, &slots->contract, cfast, S_UNDERLYING_RECORD, A_UNDERLYING_RECORD);
    if (stock_like == NULL || und_rec == NULL) {
        goto done;
    }
    if (und_rec == Py_None) {
        und_fb = Py_None;
        Py_INCREF(und_fb);
    } else if ((und_fb = attr(und_rec, rs, fast && Py_TYPE(und_rec) == rs->type, S_PRICE, A_PRICE)) == NULL) {
        goto done;
    }
    PyObject *last_row = NULL, *source = NULL;
    result = fan_out(state, ev, stock_like == Py_True, und_fb, fan, rows, row_type, broker_src, model_src, &last_row,
                     &source);
    if (result == DONE &&
        (set_attr(rec, rs, fast, S_LAST_ROW, A_LAST_ROW, last_row) < 0 ||
         set_attr(rec, rs, fast, S_SOURCE, A_SOURCE, source) < 0)) {
        result = FAILED;
    }
done:
    if (result == FAILED && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_SystemError, "apply_updates failed without an error");
    }
    Py_XDECREF(price);
    Py_XDECREF(und_fb);
    Py_XDECREF(und_rec);
    Py_XDECREF(stock_like);
    Py_XDECREF(contract);
    Py_XDECREF(fan);
    Py_XDECREF(state);
    Py_DECREF(rec);
    return result;
}

/* apply_updates(instruments, events, start, rows, update_type, row_type, broker_src, model_src)
 * -> (next, handled): applies events[start:] while each is an ``update_type`` it handles whole
 * (see apply_one and fan_out); ``next`` is the index of the first it did not (the caller applies
 * that one in Python, then calls again), ``handled`` how many it applied. */
static PyObject *apply_updates(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "apply_updates takes 8 arguments");
        return NULL;
    }
    PyObject *instruments = args[0], *events = args[1], *rows = args[3], *update_type = args[4];
    PyObject *row_type = args[5], *broker_src = args[6], *model_src = args[7];
    Py_ssize_t start = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyDict_CheckExact(instruments) || !PyList_CheckExact(events) || !PyList_CheckExact(rows) ||
        !PyType_Check(update_type) || !PyType_Check(row_type) ||
        !PyType_IsSubtype((PyTypeObject *)row_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "apply_updates: a dict, two lists and two tuple types expected");
        return NULL;
    }
    Py_ssize_t i = start < 0 ? 0 : start, handled = 0;
    records_t slots = {{NULL, 0, 0, {0}}, {NULL, 0, 0, {0}}};
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if (Py_TYPE(ev) != (PyTypeObject *)update_type || PyTuple_GET_SIZE(ev) != 6) {
            break;
        }
        Py_INCREF(ev);
        enum step s = apply_one(instruments, ev, rows, (PyTypeObject *)row_type, broker_src, model_src, &slots);
        Py_DECREF(ev);
        if (s == FAILED) {
            return NULL;
        }
        if (s == NOT_HANDLED) {
            break;
        }
        handled++;
    }
    return Py_BuildValue("(nn)", i, handled);
}

/* ------------------------------------------------------------------------------------------
 * DXLink COMPACT rows -> event tuples (actors.tastytrade.protocol.decode_compact's clean path)
 *
 * compact_events(cls, values, width, symbol_col, numeric_cols, tail_cols, positions) -> list | None
 * values: k rows x width wire values, flat; positions: the wire column of each tuple field
 * (``width``: not carried, None). A row is clean when its symbol is a non-empty str, its numeric
 * columns hold int, float or None (exact types) and its other columns int, float, bool, None or a
 * str other than "NaN", "Infinity", "-Infinity" (what _Layout.suspect_rows accepts). All rows
 * clean: one ``cls`` tuple per row. Otherwise None: the caller's Python path checks row by row.
 */
static int is_nan_string(PyObject *v) {
    return PyUnicode_CompareWithASCIIString(v, "NaN") == 0 ||
           PyUnicode_CompareWithASCIIString(v, "Infinity") == 0 ||
           PyUnicode_CompareWithASCIIString(v, "-Infinity") == 0;
}

static int index_list(PyObject *seq, Py_ssize_t *out, Py_ssize_t max_n, Py_ssize_t *n, Py_ssize_t limit) {
    PyObject *fast = PySequence_Fast(seq, "an index sequence expected");
    if (fast == NULL) {
        return -1;
    }
    *n = PySequence_Fast_GET_SIZE(fast);
    if (*n > max_n) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many columns");
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        Py_ssize_t x = PyNumber_AsSsize_t(PySequence_Fast_GET_ITEM(fast, i), PyExc_OverflowError);
        if (x == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (x < 0 || x > limit) {
            Py_DECREF(fast);
            PyErr_SetString(PyExc_ValueError, "a column index out of range");
            return -1;
        }
        out[i] = x;
    }
    Py_DECREF(fast);
    return 0;
}

#define MAX_FIELDS 64

static PyObject *compact_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "compact_events takes 7 arguments");
        return NULL;
    }
    PyObject *cls = args[0], *values = args[1];
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type) || !PyList_CheckExact(values)) {
        PyErr_SetString(PyExc_TypeError, "compact_events: a tuple type and a list expected");
        return NULL;
    }
    Py_ssize_t width = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    Py_ssize_t symbol_col = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t numeric[MAX_FIELDS], tail[MAX_FIELDS], positions[MAX_FIELDS];
    Py_ssize_t n_numeric, n_tail, n_fields;
    if (width <= 0 || symbol_col < 0 || symbol_col >= width ||
        index_list(args[4], numeric, MAX_FIELDS, &n_numeric, width - 1) < 0 ||
        index_list(args[5], tail, MAX_FIELDS, &n_tail, width - 1) < 0 ||
        index_list(args[6], positions, MAX_FIELDS, &n_fields, width) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "compact_events: bad layout");
        }
        return NULL;
    }
    Py_ssize_t total = PyList_GET_SIZE(values);
    if (total % width) {
        PyErr_SetString(PyExc_ValueError, "compact_events: values are not whole rows");
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(values);
    for (Py_ssize_t b = 0; b < total; b += width) {
        PyObject *sym = items[b + symbol_col];
        if (!PyUnicode_CheckExact(sym) || PyUnicode_GET_LENGTH(sym) == 0) {
            Py_RETURN_NONE;
        }
        for (Py_ssize_t i = 0; i < n_numeric; i++) {
            PyObject *v = items[b + numeric[i]];
            if (!(PyFloat_CheckExact(v) || PyLong_CheckExact(v) || v == Py_None)) {
                Py_RETURN_NONE;
            }
        }
        for (Py_ssize_t i = 0; i < n_tail; i++) {
            PyObject *v = items[b + tail[i]];
            if (PyUnicode_CheckExact(v)) {
                if (is_nan_string(v)) {
                    Py_RETURN_NONE;
                }
            } else if (!(PyFloat_CheckExact(v) || PyLong_CheckExact(v) || PyBool_Check(v) || v == Py_None)) {
                Py_RETURN_NONE;
            }
        }
    }
    PyObject *out = PyList_New(total / width);
    if (out == NULL) {
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)cls;
    for (Py_ssize_t r = 0, b = 0; b < total; r++, b += width) {
        PyObject *ev = type->tp_alloc(type, n_fields);
        if (ev == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        for (Py_ssize_t k = 0; k < n_fields; k++) {
            PyObject *v = positions[k] == width ? Py_None : items[b + positions[k]];
            Py_INCREF(v);
            PyTuple_SET_ITEM(ev, k, v);
        }
        PyList_SET_ITEM(out, r, ev);
    }
    return out;
}

/* ------------------------------------------------------------------------------------------
 * DXLink event tuples -> InstrumentUpdates (normalize.tastytrade.map_feed's usual shapes)
 *
 * map_events(update_type, broker, events, symbols, received_ts, time_a, time_b, event_time, seq,
 *            value_columns, value_keys, append) -> int | None
 * time_a / time_b: the event's own time columns (time_b -1: one, time_a -1: none); event_time,
 * seq: columns or -1. Per event: its key (symbols[eventSymbol]; unknown: counted, skipped), its
 * time (the own time, the later of two, in whole milliseconds in (0, 1e13), eventTime absent or
 * 0), its sequence (an int in [0, 2**63)) and its values ({key: column}). When every event fits
 * those shapes the updates are passed to ``append`` in order and the unknown count returned;
 * otherwise None, nothing appended: the caller's Python path decides.
 */
#define MAX_MS 10000000000000LL

static PyObject *map_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "map_events takes 12 arguments");
        return NULL;
    }
    PyObject *update_type = args[0], *broker = args[1], *events = args[2], *symbols = args[3];
    PyObject *received_ts = args[4], *append = args[11];
    if (!PyType_Check(update_type) || !PyType_IsSubtype((PyTypeObject *)update_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "map_events: a tuple type expected");
        return NULL;
    }
    if (!PyList_CheckExact(events) || !PyDict_CheckExact(symbols) || !PyFloat_CheckExact(received_ts)) {
        Py_RETURN_NONE; /* another sequence or mapping, a time that is not a float: the Python path */
    }
    Py_ssize_t cols[4];
    for (int i = 0; i < 4; i++) {
        cols[i] = PyNumber_AsSsize_t(args[5 + i], PyExc_OverflowError);
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t time_a = cols[0], time_b = cols[1], event_time = cols[2], seq_col = cols[3];
    PyObject *vcols = args[9], *vkeys = args[10];
    if (!PyTuple_CheckExact(vcols) || !PyTuple_CheckExact(vkeys) || PyTuple_GET_SIZE(vcols) != PyTuple_GET_SIZE(vkeys) ||
        PyTuple_GET_SIZE(vcols) > MAX_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "map_events: value columns and keys: tuples of one length");
        return NULL;
    }
    Py_ssize_t nv = PyTuple_GET_SIZE(vcols), vidx[MAX_FIELDS], need = 1;
    for (Py_ssize_t i = 0; i < nv; i++) {
        vidx[i] = PyNumber_AsSsize_t(PyTuple_GET_ITEM(vcols, i), PyExc_OverflowError);
        if (vidx[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (vidx[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "map_events: negative column");
            return NULL;
        }
        if (vidx[i] + 1 > need) need = vidx[i] + 1;
    }
    Py_ssize_t fixed[4] = {time_a, time_b, event_time, seq_col};
    for (int i = 0; i < 4; i++) {
        if (fixed[i] + 1 > need) need = fixed[i] + 1;
    }
    Py_ssize_t n = PyList_GET_SIZE(events);
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    long long unknown = 0;
    for (Py_ssize_t e = 0; e < n; e++) {
        PyObject *ev = PyList_GET_ITEM(events, e);
        if (!PyTuple_Check(ev) || PyTuple_GET_SIZE(ev) < need) {
            goto fallback;
        }
        PyObject *sym = PyTuple_GET_ITEM(ev, 0);
        PyObject *key = PyDict_GetItemWithError(symbols, sym); /* borrowed */
        if (key == NULL) {
            if (PyErr_Occurred()) { /* an unhashable symbol: the Python path says what it does */
                PyErr_Clear();
                goto fallback;
            }
            unknown++;
            continue;
        }
        /* the time: whole milliseconds */
        if (time_a < 0) {
            goto fallback;
        }
        PyObject *ms_o = PyTuple_GET_ITEM(ev, time_a);
        if (!PyLong_CheckExact(ms_o)) {
            goto fallback;
        }
        int overflow = 0;
        long long ms = PyLong_AsLongLongAndOverflow(ms_o, &overflow);
        if (overflow || (ms == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            goto fallback;
        }
        if (time_b >= 0) {
            PyObject *other_o = PyTuple_GET_ITEM(ev, time_b);
            if (PyLong_CheckExact(other_o)) {
                long long other = PyLong_AsLongLongAndOverflow(other_o, &overflow);
                if (other == -1 && PyErr_Occurred()) {
                    PyErr_Clear();
                    goto fallback;
                }
                if (!overflow && ms < other && other < MAX_MS) {
                    ms = other;
                }
            } else if (other_o != Py_None) {
                goto fallback;
            }
        }
        if (!(0 < ms && ms < MAX_MS)) {
            goto fallback;
        }
        if (event_time >= 0) {
            PyObject *et = PyTuple_GET_ITEM(ev, event_time);
            int zero = (PyLong_CheckExact(et) && PyLong_AsLongLongAndOverflow(et, &overflow) == 0 && !overflow) ||
                       (PyFloat_CheckExact(et) && PyFloat_AS_DOUBLE(et) == 0.0);
            if (PyErr_Occurred()) {
                PyErr_Clear();
                goto fallback;
            }
            if (!zero) {
                goto fallback;
            }
        }
        /* the sequence */
        PyObject *seq = Py_None;
        if (seq_col >= 0) {
            seq = PyTuple_GET_ITEM(ev, seq_col);
            if (!PyLong_CheckExact(seq)) {
                goto fallback;
            }
            long long sv = PyLong_AsLongLongAndOverflow(seq, &overflow);
            if (overflow || sv < 0) {
                PyErr_Clear();
                goto fallback;
            }
        }
        PyObject *ts = PyFloat_FromDouble((double)ms / 1000.0);
        if (ts == NULL) {
            goto error;
        }
        PyObject *vals = PyDict_New();
        if (vals == NULL) {
            Py_DECREF(ts);
            goto error;
        }
        for (Py_ssize_t i = 0; i < nv; i++) {
            if (PyDict_SetItem(vals, PyTuple_GET_ITEM(vkeys, i), PyTuple_GET_ITEM(ev, vidx[i])) < 0) {
                Py_DECREF(ts);
                Py_DECREF(vals);
                goto error;
            }
        }
        PyTypeObject *type = (PyTypeObject *)update_type;
        PyObject *u = type->tp_alloc(type, 6);
        if (u == NULL) {
            Py_DECREF(ts);
            Py_DECREF(vals);
            goto error;
        }
        Py_INCREF(broker);
        PyTuple_SET_ITEM(u, 0, broker);
        Py_INCREF(key);
        PyTuple_SET_ITEM(u, 1, key);
        PyTuple_SET_ITEM(u, 2, ts);
        Py_INCREF(received_ts);
        PyTuple_SET_ITEM(u, 3, received_ts);
        Py_INCREF(seq);
        PyTuple_SET_ITEM(u, 4, seq);
        PyTuple_SET_ITEM(u, 5, vals);
        int rc = PyList_Append(out, u);
        Py_DECREF(u);
        if (rc < 0) {
            goto error;
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(out); i++) {
        PyObject *r = PyObject_CallOneArg(append, PyList_GET_ITEM(out, i));
        if (r == NULL) {
            goto error;
        }
        Py_DECREF(r);
    }
    Py_DECREF(out);
    return PyLong_FromLongLong(unknown);
fallback:
    Py_DECREF(out);
    Py_RETURN_NONE;
error:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"apply_updates", (PyCFunction)(void (*)(void))apply_updates, METH_FASTCALL,
     "apply_updates(instruments, events, start, rows, update_type, row_type, broker_src, model_src)\n"
     "-> (next, handled): Book.apply's usual InstrumentUpdates in C (see the module source)."},
    {"compact_events", (PyCFunction)(void (*)(void))compact_events, METH_FASTCALL,
     "compact_events(cls, values, width, symbol_col, numeric_cols, tail_cols, positions) -> list | None\n"
     "DXLink COMPACT rows as event tuples when every row is clean (see the module source)."},
    {"map_events", (PyCFunction)(void (*)(void))map_events, METH_FASTCALL,
     "map_events(update_type, broker, events, symbols, received_ts, time_a, time_b, event_time, seq,\n"
     "           value_columns, value_keys, append) -> int | None\n"
     "DXLink event tuples as InstrumentUpdates when every event has a usual shape (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "normalize._speedups", "C fast path of normalize.book (optional).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
#define INTERN(var, text)                                                                          \
    if ((var = PyUnicode_InternFromString(text)) == NULL) {                                        \
        Py_DECREF(m);                                                                              \
        return NULL;                                                                               \
    }
    INTERN(K_BID, "bid");
    INTERN(K_ASK, "ask");
    INTERN(K_LAST, "last");
    INTERN(K_MARK, "mark");
    INTERN(K_UND, "underlying_price");
    INTERN(K_IV, "iv");
    INTERN(K_DELTA, "delta");
    INTERN(K_GAMMA, "gamma");
    INTERN(K_THETA, "theta");
    INTERN(K_VEGA, "vega");
    INTERN(K_RHO, "rho");
    INTERN(A_STATE, "state");
    INTERN(A_FEEDS_PRICE, "feeds_price");
    INTERN(A_PRICE, "price");
    INTERN(A_FAN, "fan");
    INTERN(A_CONTRACT, "contract");
    INTERN(A_STOCK_LIKE, "stock_like");
    INTERN(A_UNDERLYING_RECORD, "underlying_record");
    INTERN(A_LAST_ROW, "last_row");
    INTERN(A_SOURCE, "source");
    if ((ONE = PyFloat_FromDouble(1.0)) == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
