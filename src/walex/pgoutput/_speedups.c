/*
 * walex.pgoutput._speedups: the one hot loop of the decoder, in C.
 *
 * read_tuple() does what decoder.read_tuple() does in Python (that version
 * stays as the reference and the fallback; the tests check that both agree
 * on real and on damaged input). Building this module is optional: without
 * a compiler walex still works, only slower.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *toast_marker = NULL;   /* walex.pgoutput.messages.UNCHANGED_TOAST */
static PyObject *tuple_type = NULL;     /* walex.pgoutput.messages.TupleData */
static PyObject *decode_error = NULL;   /* walex.errors.DecodeError */

static PyObject *
setup(PyObject *self, PyObject *args)
{
    PyObject *marker, *ttype, *err;
    if (!PyArg_ParseTuple(args, "OOO", &marker, &ttype, &err))
        return NULL;
    if (!PyType_Check(ttype) || !PyType_IsSubtype((PyTypeObject *)ttype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "tuple_type must be a tuple subclass");
        return NULL;
    }
    Py_XINCREF(marker); Py_XDECREF(toast_marker); toast_marker = marker;
    Py_XINCREF(ttype); Py_XDECREF(tuple_type); tuple_type = ttype;
    Py_XINCREF(err); Py_XDECREF(decode_error); decode_error = err;
    Py_RETURN_NONE;
}

static PyObject *
fail(const char *msg)
{
    PyErr_SetString(decode_error ? decode_error : PyExc_ValueError, msg);
    return NULL;
}

static inline int32_t
read_i32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
                     ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

/* Parse one TupleData at *ppos into a new list: bytes for 't'/'b' values,
 * None for 'n', the TOAST marker for 'u' (or, when !allow_toast, fail).
 * Counts the kinds. Returns NULL with DecodeError set on malformed data. */
static PyObject *
parse_values(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *ppos, int allow_toast,
             long *nbin, long *ntext, long *ntoast)
{
    Py_ssize_t pos = *ppos;
    if (pos < 0 || pos + 2 > len)
        return fail("tuple data runs past the end of the message");
    int ncols = (int16_t)(((uint16_t)buf[pos] << 8) | buf[pos + 1]);
    if (ncols < 0)
        return fail("negative column count in tuple data");
    pos += 2;
    PyObject *values = PyList_New(ncols);
    if (values == NULL)
        return NULL;
    *nbin = *ntext = *ntoast = 0;
    for (int i = 0; i < ncols; i++) {
        if (pos >= len)
            goto short_data;
        unsigned char kind = buf[pos];
        PyObject *item;
        if (kind == 't' || kind == 'b') {
            if (pos + 5 > len)
                goto short_data;
            int32_t size = read_i32(buf + pos + 1);
            pos += 5;
            if (size < 0 || pos + size > len)
                goto short_data;
            item = PyBytes_FromStringAndSize((const char *)buf + pos, size);
            if (item == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            pos += size;
            if (kind == 't') (*ntext)++; else (*nbin)++;
        }
        else if (kind == 'n') {
            item = Py_None;
            Py_INCREF(item);
            pos += 1;
        }
        else if (kind == 'u' && allow_toast) {
            item = toast_marker;
            Py_INCREF(item);
            pos += 1;
            (*ntoast)++;
        }
        else {
            Py_DECREF(values);
            PyObject *k = PyUnicode_FromOrdinal(kind);
            if (k != NULL) {
                PyErr_Format(decode_error ? decode_error : PyExc_ValueError,
                             "unknown tuple value kind %R in column %d", k, i);
                Py_DECREF(k);
            }
            return NULL;
        }
        PyList_SET_ITEM(values, i, item);
    }
    *ppos = pos;
    return values;
short_data:
    Py_DECREF(values);
    return fail("tuple data runs past the end of the message");
}

/* read_tuple(data: bytes, pos: int) -> (TupleData, newpos) */
static PyObject *
read_tuple(PyObject *self, PyObject *args)
{
    Py_ssize_t pos;
    PyObject *data;

    if (!PyArg_ParseTuple(args, "On", &data, &pos))
        return NULL;
    if (tuple_type == NULL)
        return fail("walex._speedups.setup() was not called");
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    Py_ssize_t start = pos + 2;
    long nbin, ntext, ntoast;
    PyObject *values = parse_values(buf, len, &pos, 1, &nbin, &ntext, &ntoast);
    if (values == NULL)
        return NULL;
    Py_ssize_t ncols = PyList_GET_SIZE(values);

    PyObject *kinds;
    if (nbin && ntext) {
        /* Rare: a row mixing text and binary values; note each column's kind. */
        kinds = PyBytes_FromStringAndSize(NULL, ncols);
        if (kinds == NULL) {
            Py_DECREF(values);
            return NULL;
        }
        char *out = PyBytes_AS_STRING(kinds);
        Py_ssize_t p = start;
        for (Py_ssize_t i = 0; i < ncols; i++) {
            unsigned char kind = buf[p];
            out[i] = (char)kind;
            p += (kind == 't' || kind == 'b') ? 5 + read_i32(buf + p + 1) : 1;
        }
    }
    else {
        kinds = PyBytes_FromStringAndSize("", 0);
        if (kinds == NULL) {
            Py_DECREF(values);
            return NULL;
        }
    }

    PyObject *fields = Py_BuildValue("(NlllN)", values, nbin, ntext, ntoast, kinds);
    if (fields == NULL)
        return NULL;
    PyObject *targs = PyTuple_Pack(1, fields);
    Py_DECREF(fields);
    if (targs == NULL)
        return NULL;
    /* tuple.__new__(TupleData, fields): no Python-level __new__ on the way. */
    PyObject *tup = PyTuple_Type.tp_new((PyTypeObject *)tuple_type, targs, NULL);
    Py_DECREF(targs);
    if (tup == NULL)
        return NULL;
    return Py_BuildValue("(Nn)", tup, pos);
}

/* The JSON loader: orjson where it gives the same answer as the standard
 * library, json.loads where it would not (integers of 19 digits or more,
 * which orjson turns into floats; numbers it refuses). See values.py. */
static PyObject *fast_loads = NULL;     /* orjson.loads */
static PyObject *fast_error = NULL;     /* orjson.JSONDecodeError */
static PyObject *slow_loads = NULL;     /* json.loads */

static PyObject *
setup_json(PyObject *self, PyObject *args)
{
    PyObject *fast, *err, *slow;
    if (!PyArg_ParseTuple(args, "OOO", &fast, &err, &slow))
        return NULL;
    Py_XINCREF(fast); Py_XDECREF(fast_loads); fast_loads = fast;
    Py_XINCREF(err); Py_XDECREF(fast_error); fast_error = err;
    Py_XINCREF(slow); Py_XDECREF(slow_loads); slow_loads = slow;
    Py_RETURN_NONE;
}

static PyObject *
json_loads(PyObject *self, PyObject *data)
{
    if (slow_loads == NULL)
        return fail("walex._speedups.setup_json() was not called");
    if (fast_loads != NULL && PyBytes_Check(data)) {
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
        Py_ssize_t n = PyBytes_GET_SIZE(data), run = 0, i;
        for (i = 0; i < n; i++) {
            if (p[i] >= '0' && p[i] <= '9') {
                if (++run >= 19)
                    break;
            }
            else
                run = 0;
        }
        if (run < 19) {
            PyObject *res = PyObject_CallOneArg(fast_loads, data);
            if (res != NULL)
                return res;
            if (!PyErr_ExceptionMatches(fast_error))
                return NULL;
            PyErr_Clear();
        }
    }
    return PyObject_CallOneArg(slow_loads, data);
}

/* ---------------------------------------------------------------------
 * row_event(): the whole hot path of a row change, frame -> walex.Event.
 *
 * Handles the common case only: an XLogData frame holding an Insert, an
 * Update (no old row, or the whole old row 'O') or a Delete ('O'), of a
 * table in *fast_map*, every value in one format, no unchanged TOAST, as
 * many values as columns. Anything else — and any value a loader refuses —
 * returns None, and the Python path (stream.py) does the work, with its
 * error handling. The result equals what the Python path makes.
 * --------------------------------------------------------------------- */
static PyObject *event_type = NULL;     /* walex.events.Event */
static PyObject *lsn_type = NULL;       /* walex.lsn.LSN */
static PyObject *no_toast = NULL;       /* frozenset() */
static PyObject *s_insert = NULL, *s_update = NULL, *s_delete = NULL;

static PyObject *
setup_events(PyObject *self, PyObject *args)
{
    PyObject *ev, *lsn, *empty;
    if (!PyArg_ParseTuple(args, "OOO", &ev, &lsn, &empty))
        return NULL;
    if (!PyType_Check(ev) || !PyType_IsSubtype((PyTypeObject *)ev, &PyTuple_Type) ||
        !PyType_Check(lsn) || !PyType_IsSubtype((PyTypeObject *)lsn, &PyLong_Type)) {
        PyErr_SetString(PyExc_TypeError, "event must be a tuple subclass, lsn an int subclass");
        return NULL;
    }
    Py_INCREF(ev); Py_XDECREF(event_type); event_type = ev;
    Py_INCREF(lsn); Py_XDECREF(lsn_type); lsn_type = lsn;
    Py_INCREF(empty); Py_XDECREF(no_toast); no_toast = empty;
    if (s_insert == NULL) {
        s_insert = PyUnicode_InternFromString("insert");
        s_update = PyUnicode_InternFromString("update");
        s_delete = PyUnicode_InternFromString("delete");
        if (!s_insert || !s_update || !s_delete)
            return NULL;
    }
    Py_RETURN_NONE;
}

/* One tuple for the fast path: a new list, or NULL with no error set when
 * the row is not for it (TOAST, mixed formats, a column count that differs
 * from the relation's, malformed data: the Python path decides). */
static PyObject *
fast_values(const unsigned char *buf, Py_ssize_t len, Py_ssize_t *ppos, Py_ssize_t ncols_expected,
            int *binary)
{
    long nbin, ntext, ntoast;
    PyObject *values = parse_values(buf, len, ppos, 0, &nbin, &ntext, &ntoast);
    if (values == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (PyList_GET_SIZE(values) != ncols_expected || (nbin && ntext)) {
        Py_DECREF(values);
        return NULL;
    }
    *binary = nbin > 0;
    return values;
}

/* load_sequence + dict: NULL with no error set when a loader refused. */
static PyObject *
fast_record(PyObject *values, int binary, PyObject *names, PyObject *load_text,
            PyObject *load_binary)
{
    PyObject *row = PyObject_CallOneArg(binary ? load_binary : load_text, values);
    if (row == NULL) {
        PyErr_Clear();  /* the Python path loads it value by value */
        return NULL;
    }
    PyObject *seq = PySequence_Fast(row, "load_sequence returned no sequence");
    Py_DECREF(row);
    if (seq == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != PyTuple_GET_SIZE(names)) {
        Py_DECREF(seq);
        return NULL;
    }
    PyObject *rec = PyDict_New();
    if (rec == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyDict_SetItem(rec, PyTuple_GET_ITEM(names, i), items[i]) < 0) {
            Py_DECREF(seq);
            Py_DECREF(rec);
            PyErr_Clear();
            return NULL;
        }
    }
    Py_DECREF(seq);
    return rec;
}

/* The event of one frame, a new reference; Py_None (new reference) when the
 * frame is not for the fast path; NULL on a real error (memory). */
static PyObject *
frame_event(PyObject *frame, PyObject *fast_map, PyObject *txn, PyObject *seq)
{
    if (event_type == NULL || !PyBytes_Check(frame) || !PyDict_Check(fast_map))
        Py_RETURN_NONE;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(frame);
    Py_ssize_t len = PyBytes_GET_SIZE(frame);
    if (len < 31 || buf[0] != 'w')
        Py_RETURN_NONE;
    unsigned char tag = buf[25];
    if (tag != 'I' && tag != 'U' && tag != 'D')
        Py_RETURN_NONE;
    uint64_t lsn = 0;
    for (int i = 1; i < 9; i++)
        lsn = (lsn << 8) | buf[i];
    uint32_t relid = ((uint32_t)buf[26] << 24) | ((uint32_t)buf[27] << 16) |
                     ((uint32_t)buf[28] << 8) | (uint32_t)buf[29];
    PyObject *key = PyLong_FromUnsignedLong(relid);
    if (key == NULL)
        return NULL;
    PyObject *fast = PyDict_GetItemWithError(fast_map, key);  /* borrowed */
    Py_DECREF(key);
    if (fast == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(fast) || PyTuple_GET_SIZE(fast) != 4)
        Py_RETURN_NONE;
    PyObject *names = PyTuple_GET_ITEM(fast, 0);
    PyObject *load_text = PyTuple_GET_ITEM(fast, 1);
    PyObject *load_binary = PyTuple_GET_ITEM(fast, 2);
    PyObject *source = PyTuple_GET_ITEM(fast, 3);
    if (!PyTuple_Check(names))
        Py_RETURN_NONE;
    Py_ssize_t ncols = PyTuple_GET_SIZE(names);

    Py_ssize_t pos = 30;
    PyObject *old_rec = NULL, *new_rec = NULL, *kind;
    int binary = 0;
    unsigned char marker = buf[pos];
    if (tag == 'I') {
        kind = s_insert;
        if (marker != 'N')
            Py_RETURN_NONE;
    }
    else if (tag == 'U') {
        kind = s_update;
        if (marker == 'K')
            Py_RETURN_NONE;     /* key columns only: the Python path */
    }
    else {
        kind = s_delete;
        if (marker != 'O')
            Py_RETURN_NONE;
    }
    if (marker == 'O') {
        pos += 1;
        PyObject *vals = fast_values(buf, len, &pos, ncols, &binary);
        if (vals == NULL)
            Py_RETURN_NONE;
        old_rec = fast_record(vals, binary, names, load_text, load_binary);
        Py_DECREF(vals);
        if (old_rec == NULL)
            Py_RETURN_NONE;
        if (tag == 'U') {
            if (pos >= len || buf[pos] != 'N') {
                Py_DECREF(old_rec);
                Py_RETURN_NONE;
            }
        }
    }
    if (tag != 'D') {
        pos += 1;   /* the 'N' */
        PyObject *vals = fast_values(buf, len, &pos, ncols, &binary);
        if (vals == NULL) {
            Py_XDECREF(old_rec);
            Py_RETURN_NONE;
        }
        new_rec = fast_record(vals, binary, names, load_text, load_binary);
        Py_DECREF(vals);
        if (new_rec == NULL) {
            Py_XDECREF(old_rec);
            Py_RETURN_NONE;
        }
    }
    if (pos != len) {   /* trailing bytes: let the Python path complain */
        Py_XDECREF(old_rec);
        Py_XDECREF(new_rec);
        Py_RETURN_NONE;
    }

    PyObject *lsn_int = PyLong_FromUnsignedLongLong(lsn);
    if (lsn_int == NULL)
        goto error;
    PyObject *lsn_args = PyTuple_Pack(1, lsn_int);
    Py_DECREF(lsn_int);
    if (lsn_args == NULL)
        goto error;
    /* int.__new__(LSN, value): what stream.py does, no range check needed. */
    PyObject *lsn_obj = PyLong_Type.tp_new((PyTypeObject *)lsn_type, lsn_args, NULL);
    Py_DECREF(lsn_args);
    if (lsn_obj == NULL)
        goto error;

    PyObject *fields = PyTuple_New(14);
    if (fields == NULL) {
        Py_DECREF(lsn_obj);
        goto error;
    }
    Py_INCREF(kind); PyTuple_SET_ITEM(fields, 0, kind);
    Py_INCREF(source); PyTuple_SET_ITEM(fields, 1, source);
    if (new_rec == NULL) { Py_INCREF(Py_None); new_rec = Py_None; }
    PyTuple_SET_ITEM(fields, 2, new_rec);
    if (old_rec == NULL) { Py_INCREF(Py_None); old_rec = Py_None; }
    PyTuple_SET_ITEM(fields, 3, old_rec);
    Py_INCREF(no_toast); PyTuple_SET_ITEM(fields, 4, no_toast);
    PyTuple_SET_ITEM(fields, 5, lsn_obj);
    Py_INCREF(seq); PyTuple_SET_ITEM(fields, 6, seq);
    Py_INCREF(txn); PyTuple_SET_ITEM(fields, 7, txn);
    Py_INCREF(Py_None); PyTuple_SET_ITEM(fields, 8, Py_None);
    Py_INCREF(Py_None); PyTuple_SET_ITEM(fields, 9, Py_None);
    Py_INCREF(Py_None); PyTuple_SET_ITEM(fields, 10, Py_None);
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) { Py_DECREF(fields); return NULL; }
    PyTuple_SET_ITEM(fields, 11, empty);
    Py_INCREF(Py_False); PyTuple_SET_ITEM(fields, 12, Py_False);
    Py_INCREF(Py_False); PyTuple_SET_ITEM(fields, 13, Py_False);
    PyObject *targs = PyTuple_Pack(1, fields);
    Py_DECREF(fields);
    if (targs == NULL)
        return NULL;
    PyObject *event = PyTuple_Type.tp_new((PyTypeObject *)event_type, targs, NULL);
    Py_DECREF(targs);
    return event;

error:
    Py_XDECREF(old_rec);
    Py_XDECREF(new_rec);
    return NULL;
}

/* row_event(frame, fast_map, txn, seq) -> Event | None
 * fast_map: {relation oid: (names tuple, load_text, load_binary, source)} */
static PyObject *
row_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "row_event(frame, fast_map, txn, seq)");
        return NULL;
    }
    return frame_event(args[0], args[1], args[2], args[3]);
}

static PyObject *s_popleft = NULL;

/* row_events(frames, fast_map, txn, seq, events, max_events, max_bytes, batch_bytes)
 *   -> (taken, batch_bytes, max_lsn, max_wal_end, last_clock)
 * Takes frames from the front of the deque *frames* while each is a row
 * change for the fast path, appending its event to *events*; stops at the
 * first other frame (left in the deque) or when the batch is full
 * (len(events) >= max_events or batch_bytes >= max_bytes). */
static PyObject *
row_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
            "row_events(frames, fast_map, txn, seq, events, max_events, max_bytes, batch_bytes)");
        return NULL;
    }
    PyObject *frames = args[0], *fast_map = args[1], *txn = args[2], *events = args[4];
    long long seq = PyLong_AsLongLong(args[3]);
    Py_ssize_t max_events = PyLong_AsSsize_t(args[5]);
    long long max_bytes = PyLong_AsLongLong(args[6]);
    long long batch_bytes = PyLong_AsLongLong(args[7]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(events)) {
        PyErr_SetString(PyExc_TypeError, "events must be a list");
        return NULL;
    }
    if (s_popleft == NULL && (s_popleft = PyUnicode_InternFromString("popleft")) == NULL)
        return NULL;
    long taken = 0;
    uint64_t max_lsn = 0, max_end = 0;
    int64_t clock = 0;
    while (PyList_GET_SIZE(events) < max_events && batch_bytes < max_bytes) {
        Py_ssize_t n = PyObject_Length(frames);
        if (n < 0)
            return NULL;
        if (n == 0)
            break;
        PyObject *frame = PySequence_GetItem(frames, 0);
        if (frame == NULL)
            return NULL;
        PyObject *seq_obj = PyLong_FromLongLong(seq);
        if (seq_obj == NULL) {
            Py_DECREF(frame);
            return NULL;
        }
        PyObject *event = frame_event(frame, fast_map, txn, seq_obj);
        Py_DECREF(seq_obj);
        if (event == NULL) {
            Py_DECREF(frame);
            return NULL;
        }
        if (event == Py_None) {
            Py_DECREF(event);
            Py_DECREF(frame);
            break;
        }
        const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(frame);
        uint64_t lsn = 0, end = 0, clk = 0;
        for (int i = 1; i < 9; i++) lsn = (lsn << 8) | buf[i];
        for (int i = 9; i < 17; i++) end = (end << 8) | buf[i];
        for (int i = 17; i < 25; i++) clk = (clk << 8) | buf[i];
        batch_bytes += PyBytes_GET_SIZE(frame);
        Py_DECREF(frame);
        if (PyList_Append(events, event) < 0) {
            Py_DECREF(event);
            return NULL;
        }
        Py_DECREF(event);
        PyObject *gone = PyObject_CallMethodNoArgs(frames, s_popleft);
        if (gone == NULL)
            return NULL;
        Py_DECREF(gone);
        if (lsn > max_lsn) max_lsn = lsn;
        if (end > max_end) max_end = end;
        clock = (int64_t)clk;
        seq++;
        taken++;
    }
    return Py_BuildValue("(lLKKL)", taken, batch_bytes, (unsigned long long)max_lsn,
                         (unsigned long long)max_end, (long long)clock);
}

static PyMethodDef methods[] = {
    {"setup_events", setup_events, METH_VARARGS, "setup_events(Event, LSN, frozenset())"},
    {"row_events", (PyCFunction)(void (*)(void))row_events, METH_FASTCALL,
     "row_events(frames, fast_map, txn, seq, events, max_events, max_bytes, batch_bytes)"},
    {"row_event", (PyCFunction)(void (*)(void))row_event, METH_FASTCALL,
     "row_event(frame, fast_map, txn, seq) -> Event | None: a row change, when simple."},
    {"setup_json", setup_json, METH_VARARGS, "setup_json(orjson_loads, orjson_error, json_loads)"},
    {"json_loads", json_loads, METH_O,
     "json_loads(data): orjson where exact, else the standard library."},
    {"setup", setup, METH_VARARGS, "setup(toast_marker, tuple_type, decode_error)"},
    {"read_tuple", read_tuple, METH_VARARGS,
     "read_tuple(data, pos) -> (TupleData, newpos): one row of pgoutput tuple data."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "walex.pgoutput._speedups",
    "The decoder's hot loop in C (optional).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
