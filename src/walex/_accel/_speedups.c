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

/* base.__new__(type, value) for a subclass *type* of the built-in *base*
 * (tuple, int): no Python-level __new__ on the way. Steals *value*. */
static PyObject *
subtype_new(PyTypeObject *base, PyObject *type, PyObject *value)
{
    if (value == NULL)
        return NULL;
    PyObject *args = PyTuple_Pack(1, value);
    Py_DECREF(value);
    if (args == NULL)
        return NULL;
    PyObject *res = base->tp_new((PyTypeObject *)type, args, NULL);
    Py_DECREF(args);
    return res;
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
        return fail("walex._accel._speedups.setup() was not called");
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

    PyObject *tup = subtype_new(
        &PyTuple_Type, tuple_type,
        Py_BuildValue("(NlllN)", values, nbin, ntext, ntoast, kinds));
    if (tup == NULL)
        return NULL;
    return Py_BuildValue("(Nn)", tup, pos);
}

/* ---------------------------------------------------------------------
 * A JSON parser for the text Postgres sends for json and jsonb.
 *
 * It builds exactly what json.loads builds (dict, list, str, int, float,
 * True, False, None; an object's repeated key keeps its first place and its
 * last value) for documents in the strict JSON grammar. It gives up — returns
 * NULL with no error set — on anything else: a syntax error, an escape it
 * does not handle (\u of a surrogate), bytes that are not UTF-8, NaN or
 * Infinity, nesting deeper than JP_MAX_DEPTH, a failed allocation. The caller
 * then asks the standard library, whose answer (or exception) stands.
 * Numbers go through the same functions as json.loads: int() for integers
 * (PyLong_FromString), float() for the rest (PyOS_string_to_double).
 * --------------------------------------------------------------------- */
#define JP_MAX_DEPTH 200

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
    int depth;
} jp_t;

static PyObject *jp_value(jp_t *s);

static inline void
jp_ws(jp_t *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t'))
        s->p++;
}

static inline int
jp_hex(unsigned char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Object keys repeat from document to document: the str of a short ASCII
 * key without escapes is kept in a small direct-mapped cache, found again by
 * its bytes, so that it is neither decoded nor hashed again. */
#define JP_KEYS 512
#define JP_KEY_MAX 32
static PyObject *jp_keys[JP_KEYS];

/* A str of the UTF-8 bytes start[0:n]; NULL (error set) when not UTF-8. */
static PyObject *
jp_text(const unsigned char *start, Py_ssize_t n, int ascii)
{
    if (ascii && n > 1) {
        PyObject *res = PyUnicode_New(n, 127);
        if (res != NULL)
            memcpy(PyUnicode_1BYTE_DATA(res), start, (size_t)n);
        return res;
    }
    return PyUnicode_DecodeUTF8((const char *)start, n, NULL);
}

/* An ASCII key, from the cache when it is there. */
static PyObject *
jp_key(const unsigned char *start, Py_ssize_t n)
{
    if (n > JP_KEY_MAX)
        return jp_text(start, n, 1);
    uint32_t h = 2166136261u;           /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ start[i]) * 16777619u;
    PyObject **slot = &jp_keys[h % JP_KEYS];
    PyObject *hit = *slot;
    /* An ASCII str keeps its characters as these very bytes. */
    if (hit != NULL && PyUnicode_GET_LENGTH(hit) == n &&
        memcmp(PyUnicode_1BYTE_DATA(hit), start, (size_t)n) == 0) {
        Py_INCREF(hit);
        return hit;
    }
    PyObject *key = jp_text(start, n, 1);
    if (key == NULL || PyObject_Hash(key) == -1) {
        Py_XDECREF(key);
        return NULL;
    }
    Py_INCREF(key);
    Py_XSETREF(*slot, key);
    return key;
}

/* The str of the escaped string text start[0:end]; NULL when it holds what
 * the parser leaves to the standard library (an escape it does not know, a
 * \u of a surrogate, bytes that are not UTF-8) or on a failed allocation. */
static PyObject *
jp_unescape(const unsigned char *start, const unsigned char *end)
{
    /* Unescaped, the text is never longer than escaped: \uXXXX (6 bytes)
     * becomes at most 3 bytes of UTF-8, every other escape 1 byte. */
    char *buf = PyMem_Malloc((size_t)(end - start) + 1);
    if (buf == NULL)
        return NULL;
    PyObject *res = NULL;
    char *o = buf;
    for (const unsigned char *r = start; r < end; r++) {
        if (*r != '\\') {
            *o++ = (char)*r;
            continue;
        }
        r++;
        switch (*r) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            if (end - r < 5)
                goto done;
            int cp = 0;
            for (int k = 1; k <= 4; k++) {
                int h = jp_hex(r[k]);
                if (h < 0)
                    goto done;
                cp = (cp << 4) | h;
            }
            if (cp >= 0xD800 && cp <= 0xDFFF)
                goto done;
            if (cp < 0x80) {
                *o++ = (char)cp;
            }
            else if (cp < 0x800) {
                *o++ = (char)(0xC0 | (cp >> 6));
                *o++ = (char)(0x80 | (cp & 0x3F));
            }
            else {
                *o++ = (char)(0xE0 | (cp >> 12));
                *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *o++ = (char)(0x80 | (cp & 0x3F));
            }
            r += 4;
            break;
        }
        default:
            goto done;
        }
    }
    res = PyUnicode_DecodeUTF8(buf, o - buf, NULL);
done:
    PyMem_Free(buf);
    return res;
}

/* The string whose opening quote is at s->p; *is_key*: an object's key. */
static PyObject *
jp_string(jp_t *s, int is_key)
{
    const unsigned char *start = s->p + 1, *q = start, *end = s->end;
    int escaped = 0, ascii = 1;
    for (;;) {
        if (q >= end)
            return NULL;
        unsigned char c = *q;
        if (c == '"')
            break;
        if (c < 0x20)
            return NULL;            /* json.loads refuses raw control characters */
        if (c == '\\') {
            escaped = 1;
            if (q + 1 >= end)
                return NULL;
            q += 2;                 /* the escaped character is never the end */
            continue;
        }
        ascii &= c < 0x80;
        q++;
    }
    PyObject *res = escaped ? jp_unescape(start, q)
                    : is_key && ascii ? jp_key(start, q - start)
                    : jp_text(start, q - start, ascii);
    if (res == NULL) {
        PyErr_Clear();
        return NULL;
    }
    s->p = q + 1;
    return res;
}

static inline int
jp_digit(const unsigned char *q, const unsigned char *end)
{
    return q < end && *q >= '0' && *q <= '9';
}

static PyObject *
jp_number(jp_t *s)
{
    const unsigned char *start = s->p, *q = s->p, *end = s->end;
    int is_float = 0;
    if (q < end && *q == '-')
        q++;
    if (!jp_digit(q, end))
        return NULL;                /* NaN, Infinity, -Infinity: not JSON */
    if (*q == '0')
        q++;
    else
        while (jp_digit(q, end)) q++;
    if (q < end && *q == '.') {
        q++;
        if (!jp_digit(q, end))
            return NULL;
        while (jp_digit(q, end)) q++;
        is_float = 1;
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < end && (*q == '+' || *q == '-'))
            q++;
        if (!jp_digit(q, end))
            return NULL;
        while (jp_digit(q, end)) q++;
        is_float = 1;
    }
    Py_ssize_t n = q - start;
    s->p = q;
    if (!is_float && n <= 18) {
        const unsigned char *d = start;
        int neg = *d == '-';
        long long v = 0;
        for (d += neg; d < q; d++)
            v = v * 10 + (*d - '0');
        return PyLong_FromLongLong(neg ? -v : v);
    }
    char small[64];
    char *text = n < (Py_ssize_t)sizeof(small) ? small : PyMem_Malloc((size_t)n + 1);
    if (text == NULL)
        return NULL;
    memcpy(text, start, (size_t)n);
    text[n] = '\0';
    PyObject *res;
    if (is_float) {
        char *stop;
        double d = PyOS_string_to_double(text, &stop, NULL);
        res = (d == -1.0 && PyErr_Occurred()) || stop != text + n ? NULL : PyFloat_FromDouble(d);
    }
    else {
        res = PyLong_FromString(text, NULL, 10);
    }
    if (text != small)
        PyMem_Free(text);
    if (res == NULL)
        PyErr_Clear();              /* e.g. beyond int's digit limit: json.loads says */
    return res;
}

/* Skips *c* and the whitespace after it if it is next; says whether it was. */
static inline int
jp_take(jp_t *s, unsigned char c)
{
    if (s->p >= s->end || *s->p != c)
        return 0;
    s->p++;
    jp_ws(s);
    return 1;
}

/* One member "key": value of an object into *obj*; 0, or -1 to give up. */
static int
jp_member(jp_t *s, PyObject *obj)
{
    if (s->p >= s->end || *s->p != '"')
        return -1;
    PyObject *key = jp_string(s, 1);
    if (key == NULL)
        return -1;
    jp_ws(s);
    PyObject *val = jp_take(s, ':') ? jp_value(s) : NULL;
    int rc = val == NULL ? -1 : PyDict_SetItem(obj, key, val);
    Py_DECREF(key);
    Py_XDECREF(val);
    return rc;
}

/* An object or an array, its opening bracket at s->p. */
static PyObject *
jp_container(jp_t *s)
{
    int is_object = *s->p == '{';
    unsigned char close = is_object ? '}' : ']';
    PyObject *res = is_object ? PyDict_New() : PyList_New(0);
    if (res == NULL)
        return NULL;
    s->p++;
    jp_ws(s);
    if (jp_take(s, close))
        return res;
    for (;;) {
        int rc;
        if (is_object) {
            rc = jp_member(s, res);
        }
        else {
            PyObject *val = jp_value(s);
            rc = val == NULL ? -1 : PyList_Append(res, val);
            Py_XDECREF(val);
        }
        if (rc < 0)
            break;
        jp_ws(s);
        if (jp_take(s, ','))
            continue;
        if (s->p < s->end && *s->p == close) {
            s->p++;
            return res;
        }
        break;
    }
    Py_DECREF(res);
    return NULL;
}

static inline int
jp_word(jp_t *s, const char *word, Py_ssize_t n)
{
    if (s->end - s->p < n || memcmp(s->p, word, (size_t)n) != 0)
        return 0;
    s->p += n;
    return 1;
}

/* A value at s->p (no whitespace before it). */
static PyObject *
jp_value(jp_t *s)
{
    if (s->p >= s->end)
        return NULL;
    PyObject *res;
    switch (*s->p) {
    case '"':
        return jp_string(s, 0);
    case '{':
    case '[':
        if (++s->depth > JP_MAX_DEPTH)
            return NULL;
        res = jp_container(s);
        s->depth--;
        return res;
    case 't':
        if (jp_word(s, "true", 4)) Py_RETURN_TRUE;
        return NULL;
    case 'f':
        if (jp_word(s, "false", 5)) Py_RETURN_FALSE;
        return NULL;
    case 'n':
        if (jp_word(s, "null", 4)) Py_RETURN_NONE;
        return NULL;
    default:
        return jp_number(s);
    }
}

/* The document in buf[0:len], or NULL with no error set when the standard
 * library must decide. */
static PyObject *
jp_parse(const unsigned char *buf, Py_ssize_t len)
{
    jp_t s = {buf, buf + len, 0};
    jp_ws(&s);
    PyObject *res = jp_value(&s);
    if (res == NULL) {
        PyErr_Clear();
        return NULL;
    }
    jp_ws(&s);
    if (s.p != s.end) {
        Py_DECREF(res);
        return NULL;
    }
    return res;
}

/* The JSON loader: the parser above; where it gives up, orjson where it
 * gives the same answer as the standard library, json.loads where it would
 * not (integers of 19 digits or more, which orjson turns into floats; numbers
 * it refuses). See values.py. */
static PyObject *fast_loads = NULL;     /* orjson.loads */
static PyObject *fast_error = NULL;     /* orjson.JSONDecodeError */
static PyObject *slow_loads = NULL;     /* json.loads */

static PyObject *
setup_json(PyObject *self, PyObject *args)
{
    PyObject *fast, *err, *slow;
    if (!PyArg_ParseTuple(args, "OOO", &fast, &err, &slow))
        return NULL;
    if (fast == Py_None || err == Py_None)
        fast = err = NULL;      /* no orjson: the parser here, then json.loads */
    Py_XINCREF(fast); Py_XDECREF(fast_loads); fast_loads = fast;
    Py_XINCREF(err); Py_XDECREF(fast_error); fast_error = err;
    Py_XINCREF(slow); Py_XDECREF(slow_loads); slow_loads = slow;
    Py_RETURN_NONE;
}

static PyObject *
json_loads(PyObject *self, PyObject *data)
{
    if (slow_loads == NULL)
        return fail("walex._accel._speedups.setup_json() was not called");
    if (PyBytes_Check(data)) {
        PyObject *res = jp_parse((const unsigned char *)PyBytes_AS_STRING(data),
                                 PyBytes_GET_SIZE(data));
        if (res != NULL)
            return res;
    }
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

/* jsonb in binary format: a version byte (1), then the text. */
static PyObject *
jsonb_loads(PyObject *self, PyObject *data)
{
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "jsonb_loads() takes bytes");
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n < 1 || p[0] != 1) {
        PyErr_Format(PyExc_ValueError, "unknown jsonb binary format: version %d",
                     n < 1 ? -1 : (int)(unsigned char)p[0]);
        return NULL;
    }
    PyObject *res = jp_parse((const unsigned char *)p + 1, n - 1);
    if (res != NULL)
        return res;
    PyObject *text = PyBytes_FromStringAndSize(p + 1, n - 1);
    if (text == NULL)
        return NULL;
    res = json_loads(self, text);
    Py_DECREF(text);
    return res;
}

/* ---------------------------------------------------------------------
 * row_event(): the whole hot path of a row change, frame -> walex.Event.
 *
 * Handles the common case only: an XLogData frame holding an Insert, an
 * Update (no old row, or the whole old row 'O') or a Delete ('O'), of a
 * table in *fast_map*, every value in one format, no unchanged TOAST, as
 * many values as columns. Anything else — and any value a loader refuses —
 * returns None, and the Python path (transactions.py) does the work, with its
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

/* load_sequence + dict: NULL with no error set when a loader refused.
 * The dict starts as a copy of *template* (the column names, each -> None):
 * copying it and replacing the values costs less than growing a new dict. */
static PyObject *
fast_record(PyObject *values, int binary, PyObject *names, PyObject *template,
            PyObject *load_text, PyObject *load_binary)
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
    PyObject *rec = PyDict_Copy(template);
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
/* The fast_map entry of the last relation seen, so that a run of changes to
 * one table looks it up once. Holds strong references; reset per call. */
typedef struct {
    uint32_t relid;
    PyObject *fast;
} fast_cache_t;

static PyObject *
frame_event(PyObject *frame, PyObject *fast_map, PyObject *txn, PyObject *seq,
            fast_cache_t *cache)
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
    PyObject *fast;     /* borrowed */
    if (cache != NULL && cache->fast != NULL && cache->relid == relid) {
        fast = cache->fast;
    }
    else {
        PyObject *key = PyLong_FromUnsignedLong(relid);
        if (key == NULL)
            return NULL;
        fast = PyDict_GetItemWithError(fast_map, key);
        Py_DECREF(key);
        if (fast == NULL) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;
        }
        if (cache != NULL) {
            Py_INCREF(fast);
            Py_XSETREF(cache->fast, fast);
            cache->relid = relid;
        }
    }
    if (!PyTuple_Check(fast) || PyTuple_GET_SIZE(fast) != 5)
        Py_RETURN_NONE;
    PyObject *names = PyTuple_GET_ITEM(fast, 0);
    PyObject *load_text = PyTuple_GET_ITEM(fast, 1);
    PyObject *load_binary = PyTuple_GET_ITEM(fast, 2);
    PyObject *source = PyTuple_GET_ITEM(fast, 3);
    PyObject *template = PyTuple_GET_ITEM(fast, 4);
    if (!PyTuple_Check(names) || !PyDict_CheckExact(template))
        Py_RETURN_NONE;
    Py_ssize_t ncols = PyTuple_GET_SIZE(names);
    if (PyDict_GET_SIZE(template) != ncols)
        Py_RETURN_NONE;     /* names must be distinct: they are a table's columns */

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
        old_rec = fast_record(vals, binary, names, template, load_text, load_binary);
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
        new_rec = fast_record(vals, binary, names, template, load_text, load_binary);
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

    /* int.__new__(LSN, value): what transactions.py does, no range check needed. */
    PyObject *lsn_obj = subtype_new(&PyLong_Type, lsn_type, PyLong_FromUnsignedLongLong(lsn));
    if (lsn_obj == NULL)
        goto error;

    /* What tuple.__new__(Event, fields) makes, without the temporary tuple. */
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        Py_DECREF(lsn_obj);
        goto error;
    }
    PyObject *fields = ((PyTypeObject *)event_type)->tp_alloc((PyTypeObject *)event_type, 14);
    if (fields == NULL) {
        Py_DECREF(empty);
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
    PyTuple_SET_ITEM(fields, 11, empty);
    Py_INCREF(Py_False); PyTuple_SET_ITEM(fields, 12, Py_False);
    Py_INCREF(Py_False); PyTuple_SET_ITEM(fields, 13, Py_False);
    return fields;

error:
    Py_XDECREF(old_rec);
    Py_XDECREF(new_rec);
    return NULL;
}

/* row_event(frame, fast_map, txn, seq) -> Event | None
 * fast_map: {relation oid: (names tuple, load_text, load_binary, source, template dict)} */
static PyObject *
row_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "row_event(frame, fast_map, txn, seq)");
        return NULL;
    }
    return frame_event(args[0], args[1], args[2], args[3], NULL);
}

static PyObject *s_popleft = NULL, *s_appendleft = NULL;

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
    if (s_appendleft == NULL &&
        (s_appendleft = PyUnicode_InternFromString("appendleft")) == NULL)
        return NULL;
    PyObject *popleft = PyObject_GetAttr(frames, s_popleft);
    if (popleft == NULL)
        return NULL;
    fast_cache_t cache = {0, NULL};
    long taken = 0;
    uint64_t max_lsn = 0, max_end = 0;
    int64_t clock = 0;
    int failed = 0;
    while (PyList_GET_SIZE(events) < max_events && batch_bytes < max_bytes) {
        Py_ssize_t n = PyObject_Length(frames);
        if (n < 0) {
            failed = 1;
            break;
        }
        if (n == 0)
            break;
        /* Take the frame; put it back if it is not for the fast path. */
        PyObject *frame = PyObject_CallNoArgs(popleft);
        if (frame == NULL) {
            failed = 1;
            break;
        }
        PyObject *seq_obj = PyLong_FromLongLong(seq);
        PyObject *event = seq_obj == NULL ? NULL
                          : frame_event(frame, fast_map, txn, seq_obj, &cache);
        Py_XDECREF(seq_obj);
        if (event == NULL || event == Py_None) {
            /* Back in front, so that nothing is lost, even on an error (kept
             * aside while appendleft runs; the first error is the one raised). */
            PyObject *etype = NULL, *evalue = NULL, *etb = NULL;
            if (event == NULL)
                PyErr_Fetch(&etype, &evalue, &etb);
            PyObject *back = PyObject_CallMethodOneArg(frames, s_appendleft, frame);
            Py_DECREF(frame);
            if (event == NULL) {
                if (back == NULL)
                    PyErr_Clear();
                Py_XDECREF(back);
                PyErr_Restore(etype, evalue, etb);
                failed = 1;
                break;
            }
            Py_DECREF(event);
            if (back == NULL) {
                failed = 1;
                break;
            }
            Py_DECREF(back);
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
            failed = 1;
            break;
        }
        Py_DECREF(event);
        if (lsn > max_lsn) max_lsn = lsn;
        if (end > max_end) max_end = end;
        clock = (int64_t)clk;
        seq++;
        taken++;
    }
    Py_DECREF(popleft);
    Py_XDECREF(cache.fast);
    if (failed)
        return NULL;
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
     "json_loads(data): the parser here; where it gives up, orjson where exact, "
     "else the standard library."},
    {"jsonb_loads", jsonb_loads, METH_O,
     "jsonb_loads(data): a binary jsonb value (version byte 1, then the text)."},
    {"setup", setup, METH_VARARGS, "setup(toast_marker, tuple_type, decode_error)"},
    {"read_tuple", read_tuple, METH_VARARGS,
     "read_tuple(data, pos) -> (TupleData, newpos): one row of pgoutput tuple data."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "walex._accel._speedups",
    "The decoder's hot loop in C (optional).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
