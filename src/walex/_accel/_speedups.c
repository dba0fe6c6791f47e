/*
 * walex._accel._speedups: the hot paths, in C.
 *
 * read_tuple() does what decoder.read_tuple() does in Python, row_events()
 * turns frames into Events, json_loads() parses json/jsonb values, and
 * encode_event() writes an Event's wire bytes (walex.wire.dumpb). Each
 * Python version stays as the reference and the fallback; the tests check
 * that both agree. Building this module is optional: without a compiler
 * walex still works, only slower.
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

/* ---------------------------------------------------------------------
 * run_transactions(): plain transactions, frame to Batch, in C.
 *
 * The Python assembler (transactions.py) calls this first for every frame
 * it reads outside a spooled (streamed or prepared) transaction. It takes
 * Begin, Insert/Update/Delete (through frame_event) and Commit frames of
 * plain transactions, and appends to the ready deque what the Python path
 * would: a Batch per transaction (cut at max_events or max_bytes), or the
 * commit's end LSN for a transaction with no change. It stops, leaving the
 * frame in the deque, at anything else (a Relation, a keepalive, a truncate,
 * an origin, a message, a value the fast path leaves to Python), and when a
 * trip has made enough (a full batch, or max_events events, or max_ready
 * items): several small transactions share one trip through the loop, each
 * still its own Batch. The assembler's state travels in a 7-item list:
 * [txn, seq, events, batch_bytes, received, server_wal_end, clock].
 * --------------------------------------------------------------------- */
#include <datetime.h>

static PyObject *transaction_type = NULL;   /* walex.events.Transaction */
static PyObject *batch_type = NULL;         /* walex.events.Batch */
static PyObject *pg_epoch = NULL;           /* datetime(2000, 1, 1, tzinfo=UTC) */
static PyObject *s_append = NULL;

static PyObject *
setup_transactions(PyObject *self, PyObject *args)
{
    PyObject *t, *b, *epoch;
    if (!PyArg_ParseTuple(args, "OOO", &t, &b, &epoch))
        return NULL;
    if (!PyType_Check(t) || !PyType_Check(b)) {
        PyErr_SetString(PyExc_TypeError, "setup_transactions(Transaction, Batch, epoch)");
        return NULL;
    }
    if (PyDateTimeAPI == NULL) {
        PyDateTime_IMPORT;
        if (PyDateTimeAPI == NULL)
            return NULL;
    }
    if (s_append == NULL && (s_append = PyUnicode_InternFromString("append")) == NULL)
        return NULL;
    Py_INCREF(t); Py_XDECREF(transaction_type); transaction_type = t;
    Py_INCREF(b); Py_XDECREF(batch_type); batch_type = b;
    Py_INCREF(epoch); Py_XDECREF(pg_epoch); pg_epoch = epoch;
    Py_RETURN_NONE;
}

static uint64_t
be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

static PyObject *
make_lsn(uint64_t value)
{
    return subtype_new(&PyLong_Type, lsn_type, PyLong_FromUnsignedLongLong(value));
}

/* Postgres' clock (µs since 2000-01-01 UTC) as an aware datetime: what
 * _PG_EPOCH + timedelta(microseconds=us) gives in transactions.py. */
static PyObject *
pg_datetime(int64_t us)
{
    long long days = us / 86400000000LL;
    long long rest = us % 86400000000LL;
    if (rest < 0) {
        rest += 86400000000LL;
        days -= 1;
    }
    PyObject *delta = PyDelta_FromDSU((int)days, (int)(rest / 1000000), (int)(rest % 1000000));
    if (delta == NULL)
        return NULL;
    PyObject *res = PyNumber_Add(pg_epoch, delta);
    Py_DECREF(delta);
    return res;
}

/* Batch(txn, events, last, end_lsn, size) */
static PyObject *
make_batch(PyObject *txn, PyObject *events, int last, PyObject *end_lsn, long long size)
{
    PyObject *size_obj = PyLong_FromLongLong(size);
    if (size_obj == NULL)
        return NULL;
    PyObject *args[5] = {txn, events, last ? Py_True : Py_False, end_lsn, size_obj};
    PyObject *batch = PyObject_Vectorcall(batch_type, args, 5, NULL);
    Py_DECREF(size_obj);
    return batch;
}

static PyObject *
run_transactions(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
            "run_transactions(frames, fast_map, ready, state, max_events, max_bytes, max_ready)");
        return NULL;
    }
    if (transaction_type == NULL || lsn_type == NULL || event_type == NULL)
        return fail("walex._accel._speedups: setup_transactions() was not called");
    PyObject *frames = args[0], *fast_map = args[1], *ready = args[2], *state = args[3];
    Py_ssize_t max_events = PyLong_AsSsize_t(args[4]);
    long long max_bytes = PyLong_AsLongLong(args[5]);
    Py_ssize_t max_ready = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(state) || PyList_GET_SIZE(state) != 7) {
        PyErr_SetString(PyExc_TypeError, "state must be a list of 7 items");
        return NULL;
    }
    PyObject *txn = PyList_GET_ITEM(state, 0);
    long long seq = PyLong_AsLongLong(PyList_GET_ITEM(state, 1));
    PyObject *events = PyList_GET_ITEM(state, 2);
    long long batch_bytes = PyLong_AsLongLong(PyList_GET_ITEM(state, 3));
    unsigned long long received = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(state, 4));
    unsigned long long wal_end = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(state, 5));
    long long clock = PyLong_AsLongLong(PyList_GET_ITEM(state, 6));
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(events)) {
        PyErr_SetString(PyExc_TypeError, "events must be a list");
        return NULL;
    }
    if (s_popleft == NULL && (s_popleft = PyUnicode_InternFromString("popleft")) == NULL)
        return NULL;
    Py_INCREF(txn);
    Py_INCREF(events);
    PyObject *popleft = PyObject_GetAttr(frames, s_popleft);
    PyObject *append = popleft == NULL ? NULL : PyObject_GetAttr(ready, s_append);
    if (append == NULL) {
        Py_XDECREF(popleft);
        Py_DECREF(txn);
        Py_DECREF(events);
        return NULL;
    }
    fast_cache_t cache = {0, NULL};
    long taken = 0;
    Py_ssize_t made = 0, trip_events = 0;
    int failed = 0;
    for (;;) {
        Py_ssize_t n = PyObject_Length(ready);
        if (n < 0) { failed = 1; break; }
        if (n >= max_ready || trip_events >= max_events)
            break;
        n = PyObject_Length(frames);
        if (n < 0) { failed = 1; break; }
        if (n == 0)
            break;
        PyObject *frame = PySequence_GetItem(frames, 0);
        if (frame == NULL) { failed = 1; break; }
        if (!PyBytes_Check(frame) || PyBytes_GET_SIZE(frame) < 26 ||
            PyBytes_AS_STRING(frame)[0] != 'w') {
            Py_DECREF(frame);
            break;
        }
        const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(frame);
        Py_ssize_t len = PyBytes_GET_SIZE(frame);
        unsigned char tag = buf[25];
        PyObject *item = NULL;     /* what goes to ready, if anything */
        int handled = 0;
        if (txn == Py_None) {
            if (tag == 'B' && len == 25 + 21) {
                PyObject *lsn = make_lsn(be64(buf + 26));
                PyObject *when = lsn == NULL ? NULL : pg_datetime((int64_t)be64(buf + 34));
                uint32_t xid = (uint32_t)((buf[42] << 24) | (buf[43] << 16) | (buf[44] << 8) | buf[45]);
                PyObject *xid_obj = when == NULL ? NULL : PyLong_FromUnsignedLong(xid);
                PyObject *new_txn = NULL;
                if (xid_obj != NULL) {
                    PyObject *targs[3] = {xid_obj, lsn, when};
                    new_txn = PyObject_Vectorcall(transaction_type, targs, 3, NULL);
                }
                Py_XDECREF(lsn);
                Py_XDECREF(when);
                Py_XDECREF(xid_obj);
                PyObject *new_events = new_txn == NULL ? NULL : PyList_New(0);
                if (new_events == NULL) {
                    Py_XDECREF(new_txn);
                    Py_DECREF(frame);
                    failed = 1;
                    break;
                }
                Py_SETREF(txn, new_txn);
                Py_SETREF(events, new_events);
                seq = 0;
                batch_bytes = 0;
                handled = 1;
            }
        }
        else if (tag == 'C' && len == 25 + 26) {
            PyObject *end_lsn = make_lsn(be64(buf + 35));
            if (end_lsn == NULL) { Py_DECREF(frame); failed = 1; break; }
            batch_bytes += len;
            if (seq) {
                item = make_batch(txn, events, 1, end_lsn, batch_bytes);
                Py_DECREF(end_lsn);
                if (item == NULL) { Py_DECREF(frame); failed = 1; break; }
            }
            else
                item = end_lsn;
            PyObject *new_events = PyList_New(0);
            if (new_events == NULL) { Py_DECREF(item); Py_DECREF(frame); failed = 1; break; }
            Py_SETREF(events, new_events);
            Py_INCREF(Py_None);
            Py_SETREF(txn, Py_None);
            batch_bytes = 0;
            handled = 1;
        }
        else if (tag == 'I' || tag == 'U' || tag == 'D') {
            PyObject *seq_obj = PyLong_FromLongLong(seq);
            PyObject *event = seq_obj == NULL ? NULL
                              : frame_event(frame, fast_map, txn, seq_obj, &cache);
            Py_XDECREF(seq_obj);
            if (event == NULL) { Py_DECREF(frame); failed = 1; break; }
            if (event == Py_None) {     /* not for the fast path: Python takes it */
                Py_DECREF(event);
                Py_DECREF(frame);
                break;
            }
            if (PyList_Append(events, event) < 0) {
                Py_DECREF(event); Py_DECREF(frame); failed = 1; break;
            }
            Py_DECREF(event);
            seq++;
            trip_events++;
            batch_bytes += len;
            if (PyList_GET_SIZE(events) >= max_events || batch_bytes >= max_bytes) {
                /* A full part of a large transaction: hand it on, end the trip. */
                item = make_batch(txn, events, 0, Py_None, batch_bytes);
                PyObject *new_events = item == NULL ? NULL : PyList_New(0);
                if (new_events == NULL) {
                    Py_XDECREF(item); Py_DECREF(frame); failed = 1; break;
                }
                Py_SETREF(events, new_events);
                batch_bytes = 0;
                trip_events = max_events;
            }
            handled = 1;
        }
        if (!handled) {
            Py_DECREF(frame);
            break;
        }
        /* The frame is used: take it off the deque, note the positions. */
        PyObject *gone = PyObject_CallNoArgs(popleft);
        if (gone == NULL) { Py_XDECREF(item); Py_DECREF(frame); failed = 1; break; }
        Py_DECREF(gone);
        unsigned long long lsn = be64(buf + 1), end = be64(buf + 9);
        clock = (long long)be64(buf + 17);
        if (end > wal_end) wal_end = end;
        if (lsn > received) received = lsn;
        Py_DECREF(frame);
        taken++;
        if (item != NULL) {
            PyObject *res = PyObject_CallOneArg(append, item);
            Py_DECREF(item);
            if (res == NULL) { failed = 1; break; }
            Py_DECREF(res);
            made++;
        }
    }
    Py_DECREF(popleft);
    Py_DECREF(append);
    Py_XDECREF(cache.fast);
    /* Write the state back, whatever happened: what was taken is accounted for. */
    PyObject *vals[7] = {
        txn, PyLong_FromLongLong(seq), events, PyLong_FromLongLong(batch_bytes),
        PyLong_FromUnsignedLongLong(received), PyLong_FromUnsignedLongLong(wal_end),
        PyLong_FromLongLong(clock),
    };
    int bad = 0;
    for (int i = 0; i < 7; i++) {
        if (vals[i] == NULL) { bad = 1; continue; }
        if (i == 0 || i == 2)
            Py_INCREF(vals[i]);
        PyList_SetItem(state, i, vals[i]);   /* steals */
    }
    Py_DECREF(txn);
    Py_DECREF(events);
    if (failed || bad)
        return NULL;
    return PyLong_FromLong(taken);
}

/* ---------------------------------------------------------------------
 * encode_event(): an Event to its wire bytes, the document walex.wire.dumps
 * writes (wire.to_dict encoded by json.dumps with ensure_ascii=False and
 * separators (",", ":")), UTF-8 encoded, byte for byte.
 *
 * Each value is written as json.dumps would write wire.encode_value(value).
 * The C code writes the exact types it knows (None, bool, int, str, float,
 * Decimal, datetime, date, time, timedelta, UUID, the ipaddress types, bytes,
 * bytearray, memoryview, dict, list, tuple, psycopg's Range and Multirange,
 * plain Enums); any other value goes to the fallback the caller passes
 * (wire.encode_value), whose JSON-ready answer is then written as json.dumps
 * writes it. Where the C code is unsure about the event itself (a field of
 * an unexpected type, a string json.dumps would write but UTF-8 cannot hold,
 * nesting deeper than ENC_MAX_DEPTH, an exception from Python code), it
 * returns None and the caller takes the pure-Python path, whose answer or
 * exception stands.
 * --------------------------------------------------------------------- */
#include <datetime.h>
#include <math.h>

#define ENC_OK 0
#define ENC_ERR (-1)        /* an exception is set */
#define ENC_UNSURE 1        /* this value is not for the C code: ask the fallback */
#define ENC_GIVEUP 2        /* the event is not for the C code: the Python path */
#define ENC_MAX_DEPTH 100

static PyObject *source_type = NULL;    /* walex.events.Source */
static PyObject *txn_type = NULL;       /* walex.events.Transaction */
static PyObject *decimal_type = NULL;   /* decimal.Decimal */
static PyObject *uuid_type = NULL;      /* uuid.UUID */
static PyObject *range_type = NULL;     /* psycopg.types.range.Range */
static PyObject *multirange_type = NULL;/* psycopg.types.multirange.Multirange */
static PyObject *enum_type = NULL;      /* enum.Enum */
static PyObject *ip_types = NULL;       /* the six ipaddress classes, a tuple */
static PyObject *s_schema, *s_table, *s_replica_identity, *s_primary_key, *s_xid,
    *s_commit_lsn, *s_commit_timestamp, *s_lower, *s_upper, *s_bounds, *s_isempty,
    *s_value, *s_utcoffset, *s_isoformat, *s_int;

static PyObject *
setup_wire(PyObject *self, PyObject *args)
{
    PyObject *src, *txn, *dec, *uid, *rng, *mrng, *enm, *ips;
    if (!PyArg_ParseTuple(args, "OOOOOOOO!", &src, &txn, &dec, &uid, &rng, &mrng, &enm,
                          &PyTuple_Type, &ips))
        return NULL;
    if (!PyType_Check(src) || !PyType_Check(txn) || !PyType_Check(dec) || !PyType_Check(uid) ||
        !PyType_Check(rng) || !PyType_Check(mrng) || !PyType_Check(enm)) {
        PyErr_SetString(PyExc_TypeError, "setup_wire() takes types");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ips); i++) {
        if (!PyType_Check(PyTuple_GET_ITEM(ips, i))) {
            PyErr_SetString(PyExc_TypeError, "ip_types must be a tuple of types");
            return NULL;
        }
    }
    if (PyDateTimeAPI == NULL) {
        PyDateTime_IMPORT;
        if (PyDateTimeAPI == NULL)
            return NULL;
    }
    if (s_schema == NULL) {
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
        INTERN(s_schema, "schema");
        INTERN(s_table, "table");
        INTERN(s_replica_identity, "replica_identity");
        INTERN(s_primary_key, "primary_key");
        INTERN(s_xid, "xid");
        INTERN(s_commit_lsn, "commit_lsn");
        INTERN(s_commit_timestamp, "commit_timestamp");
        INTERN(s_lower, "lower");
        INTERN(s_upper, "upper");
        INTERN(s_bounds, "bounds");
        INTERN(s_isempty, "isempty");
        INTERN(s_value, "value");
        INTERN(s_utcoffset, "utcoffset");
        INTERN(s_isoformat, "isoformat");
        INTERN(s_int, "int");
#undef INTERN
    }
    Py_INCREF(src); Py_XSETREF(source_type, src);
    Py_INCREF(txn); Py_XSETREF(txn_type, txn);
    Py_INCREF(dec); Py_XSETREF(decimal_type, dec);
    Py_INCREF(uid); Py_XSETREF(uuid_type, uid);
    Py_INCREF(rng); Py_XSETREF(range_type, rng);
    Py_INCREF(mrng); Py_XSETREF(multirange_type, mrng);
    Py_INCREF(enm); Py_XSETREF(enum_type, enm);
    Py_INCREF(ips); Py_XSETREF(ip_types, ips);
    Py_RETURN_NONE;
}

/* The output: a buffer on the C stack, moved to the heap when it fills. */
typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    int depth;
    PyObject *fallback;     /* wire.encode_value */
    char inline_buf[2048];
} wb_t;

static int
wb_grow(wb_t *w, Py_ssize_t need)
{
    if (need > PY_SSIZE_T_MAX / 2 - w->len) {
        PyErr_NoMemory();
        return ENC_ERR;
    }
    Py_ssize_t cap = w->cap * 2;
    if (cap < w->len + need)
        cap = w->len + need;
    char *buf;
    if (w->buf == w->inline_buf) {
        buf = PyMem_Malloc((size_t)cap);
        if (buf != NULL)
            memcpy(buf, w->buf, (size_t)w->len);
    }
    else {
        buf = PyMem_Realloc(w->buf, (size_t)cap);
    }
    if (buf == NULL) {
        PyErr_NoMemory();
        return ENC_ERR;
    }
    w->buf = buf;
    w->cap = cap;
    return ENC_OK;
}

/* Room for *need* more bytes. */
static inline int
wb_room(wb_t *w, Py_ssize_t need)
{
    return need <= w->cap - w->len ? ENC_OK : wb_grow(w, need);
}

static int
wb_write(wb_t *w, const char *s, Py_ssize_t n)
{
    if (wb_room(w, n) < 0)
        return ENC_ERR;
    memcpy(w->buf + w->len, s, (size_t)n);
    w->len += n;
    return ENC_OK;
}

/* A string literal: its length is known here, so the copy is inlined. */
#define WB_LIT(w, lit)                                                        \
    (wb_room((w), (Py_ssize_t)(sizeof(lit) - 1)) < 0                          \
         ? ENC_ERR                                                            \
         : (memcpy((w)->buf + (w)->len, (lit), sizeof(lit) - 1),              \
            (w)->len += (Py_ssize_t)(sizeof(lit) - 1), ENC_OK))

static inline int
wb_byte(wb_t *w, char c)
{
    if (wb_room(w, 1) < 0)
        return ENC_ERR;
    w->buf[w->len++] = c;
    return ENC_OK;
}

static const char hexdigits[] = "0123456789abcdef";

/* An int as an unsigned 64-bit number; -1 with OverflowError set when it is
 * negative or larger. (PyLong_AsUnsignedLong where long has 64 bits: the
 * long long version takes a slower, general path.) */
static inline unsigned long long
as_u64(PyObject *v)
{
#if SIZEOF_LONG >= 8
    return (unsigned long long)PyLong_AsUnsignedLong(v);
#else
    return PyLong_AsUnsignedLongLong(v);
#endif
}

/* Which ASCII characters json.dumps escapes, and how: 0 none, 1 \u00XX,
 * else the letter after the backslash. */
static char esc_ascii[128];

static void
init_esc(void)
{
    for (int c = 0; c < 0x20; c++)
        esc_ascii[c] = 1;
    esc_ascii['\b'] = 'b';
    esc_ascii['\f'] = 'f';
    esc_ascii['\n'] = 'n';
    esc_ascii['\r'] = 'r';
    esc_ascii['\t'] = 't';
    esc_ascii['"'] = '"';
    esc_ascii['\\'] = '\\';
}

static inline char *
put_esc(char *o, unsigned c)
{
    char e = esc_ascii[c];
    *o++ = '\\';
    if (e == 1) {
        *o++ = 'u';
        *o++ = '0';
        *o++ = '0';
        *o++ = hexdigits[c >> 4];
        *o++ = hexdigits[c & 0xF];
    }
    else {
        *o++ = e;
    }
    return o;
}

/* Whether any of 8 ASCII bytes is one json.dumps escapes: below 0x20, '"'
 * or '\\' (exact for bytes below 0x80: a borrow needs a byte that matches). */
static inline int
swar_escapes(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    uint64_t quote = x ^ (ones * '"'), backslash = x ^ (ones * '\\');
    return (((x - ones * 0x20) & ~x) | ((quote - ones) & ~quote) |
            ((backslash - ones) & ~backslash)) & highs ? 1 : 0;
}

/* A str as json.dumps(s, ensure_ascii=False) writes it, UTF-8 encoded.
 * A lone surrogate, which json.dumps writes and UTF-8 cannot encode, gives
 * the event up: the Python path raises what it raises. */
static int
wb_str(wb_t *w, PyObject *s)
{
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(s) < 0)
        return ENC_ERR;
#endif
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (n > (PY_SSIZE_T_MAX - 2) / 6) {
        PyErr_NoMemory();
        return ENC_ERR;
    }
    if (PyUnicode_IS_ASCII(s)) {
        const unsigned char *p = data;
        /* Mostly nothing to escape: look at 8 bytes at a time (the last
         * ones padded with 'a'), then copy the whole string. */
        Py_ssize_t i = 0;
        int clean = 1;
        for (; i + 8 <= n; i += 8) {
            uint64_t x;
            memcpy(&x, p + i, 8);
            if (swar_escapes(x)) {
                clean = 0;
                break;
            }
        }
        if (clean && i < n) {
            uint64_t x = 0x6161616161616161ULL;
            memcpy(&x, p + i, (size_t)(n - i));
            clean = !swar_escapes(x);
        }
        if (wb_room(w, n + 2) < 0)
            return ENC_ERR;
        char *o = w->buf + w->len;
        *o++ = '"';
        if (clean) {
            memcpy(o, p, (size_t)n);
            o += n;
        }
        else {
            Py_ssize_t run = 0;
            for (i = 0; i < n; i++) {
                if (esc_ascii[p[i]]) {
                    memcpy(o, p + run, (size_t)(i - run));
                    o += i - run;
                    w->len = o - w->buf;
                    if (wb_room(w, 6 + (n - i) + 1) < 0)
                        return ENC_ERR;
                    o = put_esc(w->buf + w->len, p[i]);
                    run = i + 1;
                }
            }
            memcpy(o, p + run, (size_t)(n - run));
            o += n - run;
        }
        *o++ = '"';
        w->len = o - w->buf;
        return ENC_OK;
    }
    /* Non-ASCII: at most 6 bytes out per character (an escape). */
    if (wb_room(w, 6 * n + 2) < 0)
        return ENC_ERR;
    char *o = w->buf + w->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 0x80) {
            if (esc_ascii[c])
                o = put_esc(o, c);
            else
                *o++ = (char)c;
        }
        else if (c < 0x800) {
            *o++ = (char)(0xC0 | (c >> 6));
            *o++ = (char)(0x80 | (c & 0x3F));
        }
        else if (c < 0x10000) {
            if (c >= 0xD800 && c <= 0xDFFF)
                return ENC_GIVEUP;
            *o++ = (char)(0xE0 | (c >> 12));
            *o++ = (char)(0x80 | ((c >> 6) & 0x3F));
            *o++ = (char)(0x80 | (c & 0x3F));
        }
        else {
            *o++ = (char)(0xF0 | (c >> 18));
            *o++ = (char)(0x80 | ((c >> 12) & 0x3F));
            *o++ = (char)(0x80 | ((c >> 6) & 0x3F));
            *o++ = (char)(0x80 | (c & 0x3F));
        }
    }
    *o++ = '"';
    w->len = o - w->buf;
    return ENC_OK;
}

/* Object keys (column names, jsonb keys) are the same str objects from event
 * to event: the JSON of a short one is kept in a small direct-mapped cache,
 * found again by the object's address (the cache holds a reference, so the
 * address is not reused; an exact str does not change). */
#define KEY_SLOTS 512
typedef struct {
    PyObject *key;
    Py_ssize_t len;
    char text[48];
} key_slot_t;
static key_slot_t key_cache[KEY_SLOTS];

static int
wb_key(wb_t *w, PyObject *k)
{
    key_slot_t *slot = &key_cache[((uintptr_t)k >> 4) % KEY_SLOTS];
    if (slot->key == k)
        return wb_write(w, slot->text, slot->len);
    Py_ssize_t start = w->len;
    int rc = wb_str(w, k);
    Py_ssize_t n = w->len - start;
    if (rc == ENC_OK && PyUnicode_CheckExact(k) && n <= (Py_ssize_t)sizeof(slot->text)) {
        PyObject *old = slot->key;
        Py_INCREF(k);
        slot->key = k;
        memcpy(slot->text, w->buf + start, (size_t)n);
        slot->len = n;
        Py_XDECREF(old);
    }
    return rc;
}

/* Decimal digits of an unsigned number into the end of tmp; returns the start. */
static inline char *
fmt_u64(char *end, unsigned long long v)
{
    char *p = end;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return p;
}

static int
wb_ll(wb_t *w, long long v)
{
    char tmp[24];
    char *end = tmp + sizeof(tmp);
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    char *p = fmt_u64(end, u);
    if (v < 0)
        *--p = '-';
    return wb_write(w, p, end - p);
}

/* An int (or int subclass) as json.dumps writes it: int.__repr__, any size. */
static int
wb_int(wb_t *w, PyObject *v)
{
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return ENC_ERR;
    if (!overflow)
        return wb_ll(w, x);
    PyObject *text = PyLong_Type.tp_repr(v);    /* beyond int's digit limit: ValueError */
    if (text == NULL)
        return ENC_ERR;
    int rc = wb_write(w, (const char *)PyUnicode_1BYTE_DATA(text), PyUnicode_GET_LENGTH(text));
    Py_DECREF(text);
    return rc;
}

/* float.__repr__ of a finite double. */
static int
wb_float_repr(wb_t *w, double d)
{
    char *text = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL)
        return ENC_ERR;
    int rc = wb_write(w, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return rc;
}

static inline char *
put2(char *o, int v)
{
    *o++ = (char)('0' + v / 10);
    *o++ = (char)('0' + v % 10);
    return o;
}

static inline char *
put_date(char *o, int y, int m, int d)
{
    *o++ = (char)('0' + y / 1000);
    *o++ = (char)('0' + y / 100 % 10);
    *o++ = (char)('0' + y / 10 % 10);
    *o++ = (char)('0' + y % 10);
    *o++ = '-';
    o = put2(o, m);
    *o++ = '-';
    return put2(o, d);
}

static inline char *
put_time(char *o, int h, int mi, int s, int us)
{
    o = put2(o, h);
    *o++ = ':';
    o = put2(o, mi);
    *o++ = ':';
    o = put2(o, s);
    if (us) {
        *o++ = '.';
        for (int k = 100000; k; k /= 10)
            *o++ = (char)('0' + us / k % 10);
    }
    return o;
}

/* The UTC offset isoformat() appends: tzinfo.utcoffset(arg) formatted as
 * datetime's format_utcoffset() does. Writes nothing for no offset;
 * ENC_UNSURE where isoformat() would raise or might differ. */
static int
put_offset(char *o, char **out, PyObject *tzinfo, PyObject *arg)
{
    *out = o;
    if (tzinfo == Py_None)
        return ENC_OK;
    int days, secs, us;
    if (tzinfo == PyDateTime_TimeZone_UTC) {
        days = secs = us = 0;   /* timezone.utc, a final type: always timedelta(0) */
    }
    else {
        PyObject *off = PyObject_CallMethodOneArg(tzinfo, s_utcoffset, arg);
        if (off == NULL)
            return ENC_ERR;
        if (off == Py_None) {
            Py_DECREF(off);
            return ENC_OK;
        }
        if (!PyDelta_CheckExact(off)) {
            Py_DECREF(off);
            return ENC_UNSURE;
        }
        days = PyDateTime_DELTA_GET_DAYS(off);
        secs = PyDateTime_DELTA_GET_SECONDS(off);
        us = PyDateTime_DELTA_GET_MICROSECONDS(off);
        Py_DECREF(off);
        /* Strictly within a day, or isoformat() raises. */
        if (days < -1 || days > 0 || (days == -1 && secs == 0 && us == 0))
            return ENC_UNSURE;
    }
    long long total = (long long)days * 86400000000LL + (long long)secs * 1000000LL + us;
    char sign = '+';
    if (total < 0) {
        sign = '-';
        total = -total;
    }
    us = (int)(total % 1000000);
    long long s = total / 1000000;
    int seconds = (int)(s % 60), minutes = (int)(s / 60 % 60), hours = (int)(s / 3600);
    *o++ = sign;
    o = put2(o, hours);
    *o++ = ':';
    o = put2(o, minutes);
    if (us || seconds) {
        *o++ = ':';
        o = put2(o, seconds);
    }
    if (us) {
        *o++ = '.';
        for (int k = 100000; k; k /= 10)
            *o++ = (char)('0' + us / k % 10);
    }
    *out = o;
    return ENC_OK;
}

/* isoformat() of an exact datetime, date or time, as a JSON string. */
static int
wb_isoformat(wb_t *w, PyObject *v)
{
    char tmp[80];
    char *o = tmp;
    *o++ = '"';
    if (PyDateTime_CheckExact(v)) {
        o = put_date(o, PyDateTime_GET_YEAR(v), PyDateTime_GET_MONTH(v), PyDateTime_GET_DAY(v));
        *o++ = 'T';
        o = put_time(o, PyDateTime_DATE_GET_HOUR(v), PyDateTime_DATE_GET_MINUTE(v),
                     PyDateTime_DATE_GET_SECOND(v), PyDateTime_DATE_GET_MICROSECOND(v));
        int rc = put_offset(o, &o, PyDateTime_DATE_GET_TZINFO(v), v);
        if (rc != ENC_OK)
            return rc;
    }
    else if (PyDate_CheckExact(v)) {
        o = put_date(o, PyDateTime_GET_YEAR(v), PyDateTime_GET_MONTH(v), PyDateTime_GET_DAY(v));
    }
    else {  /* time */
        o = put_time(o, PyDateTime_TIME_GET_HOUR(v), PyDateTime_TIME_GET_MINUTE(v),
                     PyDateTime_TIME_GET_SECOND(v), PyDateTime_TIME_GET_MICROSECOND(v));
        int rc = put_offset(o, &o, PyDateTime_TIME_GET_TZINFO(v), Py_None);
        if (rc != ENC_OK)
            return rc;
    }
    *o++ = '"';
    return wb_write(w, tmp, o - tmp);
}

/* wire._duration(): "P<days>DT<seconds>S", the seconds as the float
 * seconds + microseconds / 1e6 formatted "%.6f" without trailing zeros. */
static int
wb_duration(wb_t *w, PyObject *v)
{
    int days = PyDateTime_DELTA_GET_DAYS(v);
    double secs = (double)PyDateTime_DELTA_GET_SECONDS(v) +
                  (double)PyDateTime_DELTA_GET_MICROSECONDS(v) / 1000000.0;
    char *text = PyOS_double_to_string(secs, 'f', 6, 0, NULL);
    if (text == NULL)
        return ENC_ERR;
    size_t n = strlen(text);
    while (n > 0 && text[n - 1] == '0')
        n--;
    while (n > 0 && text[n - 1] == '.')
        n--;
    int rc = WB_LIT(w, "\"P");
    if (rc == ENC_OK)
        rc = wb_ll(w, days);
    if (rc == ENC_OK)
        rc = WB_LIT(w, "DT");
    if (rc == ENC_OK)
        rc = wb_write(w, text, (Py_ssize_t)n);
    if (rc == ENC_OK)
        rc = WB_LIT(w, "S\"");
    PyMem_Free(text);
    return rc;
}

/* "\\x" + hex, as a JSON string. */
static int
wb_hex(wb_t *w, const unsigned char *p, Py_ssize_t n)
{
    if (n > (PY_SSIZE_T_MAX - 6) / 2) {
        PyErr_NoMemory();
        return ENC_ERR;
    }
    if (wb_room(w, 2 * n + 5) < 0)
        return ENC_ERR;
    char *o = w->buf + w->len;
    *o++ = '"';
    *o++ = '\\';
    *o++ = '\\';
    *o++ = 'x';
    for (Py_ssize_t i = 0; i < n; i++) {
        *o++ = hexdigits[p[i] >> 4];
        *o++ = hexdigits[p[i] & 0xF];
    }
    *o++ = '"';
    w->len = o - w->buf;
    return ENC_OK;
}

/* str(uuid) of an exact UUID: its int as 32 hex digits in 8-4-4-4-12. */
static int
wb_uuid(wb_t *w, PyObject *v)
{
    PyObject *num = PyObject_GetAttr(v, s_int);
    if (num == NULL)
        return ENC_ERR;
    if (!PyLong_CheckExact(num)) {
        Py_DECREF(num);
        return ENC_UNSURE;
    }
    unsigned long long lo = PyLong_AsUnsignedLongLongMask(num);
    if (lo == (unsigned long long)-1 && PyErr_Occurred()) {
        Py_DECREF(num);
        return ENC_ERR;
    }
    PyObject *sixty_four = PyLong_FromLong(64);
    PyObject *high = sixty_four == NULL ? NULL : PyNumber_Rshift(num, sixty_four);
    Py_XDECREF(sixty_four);
    Py_DECREF(num);
    if (high == NULL)
        return ENC_ERR;
    unsigned long long hi = as_u64(high);   /* negative or too big: fails */
    Py_DECREF(high);
    if (hi == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return ENC_ERR;
        PyErr_Clear();
        return ENC_UNSURE;
    }
    char tmp[38], *o = tmp;
    *o++ = '"';
    for (int i = 0; i < 32; i++) {
        if (i == 8 || i == 12 || i == 16 || i == 20)
            *o++ = '-';
        unsigned long long half = i < 16 ? hi : lo;
        *o++ = hexdigits[(half >> (4 * (15 - i % 16))) & 0xF];
    }
    *o++ = '"';
    return wb_write(w, tmp, o - tmp);
}

static int enc_value(wb_t *w, PyObject *v);
static int enc_json(wb_t *w, PyObject *v);

/* Writes "str(text)" for an object whose str() is the answer. */
static int
wb_str_of(wb_t *w, PyObject *v)
{
    PyObject *text = PyObject_Str(v);
    if (text == NULL)
        return ENC_ERR;
    int rc = PyUnicode_CheckExact(text) ? wb_str(w, text) : enc_json(w, text);
    Py_DECREF(text);
    return rc;
}

/* An object with exact-str keys, each value by *enc* (None: the dict is
 * not for the C code). */
static int
wb_dict(wb_t *w, PyObject *d, int (*enc)(wb_t *, PyObject *), int strict_keys)
{
    if (wb_byte(w, '{') < 0)
        return ENC_ERR;
    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(d);
    PyObject *key, *val;
    int first = 1;
    while (PyDict_Next(d, &pos, &key, &val)) {
        if (strict_keys ? !PyUnicode_CheckExact(key) : !PyUnicode_Check(key))
            return strict_keys ? ENC_UNSURE : ENC_GIVEUP;
        if (!first && wb_byte(w, ',') < 0)
            return ENC_ERR;
        first = 0;
        Py_INCREF(key);
        Py_INCREF(val);     /* the value's own code may change the dict */
        int rc = wb_key(w, key);
        if (rc == ENC_OK)
            rc = wb_byte(w, ':');
        if (rc == ENC_OK)
            rc = enc(w, val);
        Py_DECREF(key);
        Py_DECREF(val);
        if (rc != ENC_OK)
            return rc;
        if (PyDict_GET_SIZE(d) != size)
            return ENC_GIVEUP;
    }
    return wb_byte(w, '}');
}

/* A list or tuple, or any iterable when *iterate*, each item by *enc*. */
static int
wb_array(wb_t *w, PyObject *seq, int (*enc)(wb_t *, PyObject *), int iterate)
{
    if (wb_byte(w, '[') < 0)
        return ENC_ERR;
    if (iterate) {
        PyObject *it = PyObject_GetIter(seq), *item;
        if (it == NULL)
            return ENC_ERR;
        int first = 1, rc = ENC_OK;
        while ((item = PyIter_Next(it)) != NULL) {
            if (!first)
                rc = wb_byte(w, ',');
            first = 0;
            if (rc == ENC_OK)
                rc = enc(w, item);
            Py_DECREF(item);
            if (rc != ENC_OK)
                break;
        }
        Py_DECREF(it);
        if (rc != ENC_OK)
            return rc;
        if (PyErr_Occurred())
            return ENC_ERR;
        return wb_byte(w, ']');
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        if (i > 0 && wb_byte(w, ',') < 0)
            return ENC_ERR;
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(item);    /* the item's own code may change the list */
        int rc = enc(w, item);
        Py_DECREF(item);
        if (rc != ENC_OK)
            return rc;
    }
    return wb_byte(w, ']');
}

/* A JSON-ready value as json.dumps writes it: what the fallback returns, and
 * the event's own fields. Anything else gives the event up. */
static int
enc_json(wb_t *w, PyObject *v)
{
    if (v == Py_None)
        return WB_LIT(w, "null");
    if (v == Py_True)
        return WB_LIT(w, "true");
    if (v == Py_False)
        return WB_LIT(w, "false");
    if (PyUnicode_Check(v))
        return wb_str(w, v);
    if (PyLong_Check(v))
        return wb_int(w, v);
    if (PyFloat_Check(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        if (isnan(d))
            return WB_LIT(w, "NaN");
        if (isinf(d))
            return d > 0 ? WB_LIT(w, "Infinity") : WB_LIT(w, "-Infinity");
        return wb_float_repr(w, d);
    }
    if (!PyList_CheckExact(v) && !PyTuple_CheckExact(v) && !PyDict_CheckExact(v))
        return ENC_GIVEUP;
    if (++w->depth > ENC_MAX_DEPTH)
        return ENC_GIVEUP;
    int rc = PyDict_CheckExact(v) ? wb_dict(w, v, enc_json, 0) : wb_array(w, v, enc_json, 0);
    w->depth--;
    return rc;
}

/* The fallback's answer for *v*, written as json.dumps writes it. */
static int
enc_fallback(wb_t *w, PyObject *v)
{
    PyObject *res = PyObject_CallOneArg(w->fallback, v);
    if (res == NULL)
        return ENC_ERR;
    int rc = enc_json(w, res);
    Py_DECREF(res);
    return rc == ENC_UNSURE ? ENC_GIVEUP : rc;
}

/* An Enum whose classes are all Enums (and object): no mixed-in type whose
 * own rule wire.encode_value would apply first. */
static int
plain_enum(PyTypeObject *tp)
{
    if (!PyType_IsSubtype(tp, (PyTypeObject *)enum_type))
        return 0;
    PyObject *mro = tp->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (base != &PyBaseObject_Type && !PyType_IsSubtype(base, (PyTypeObject *)enum_type))
            return 0;
    }
    return 1;
}

/* psycopg's Range: {"lower", "upper", "bounds", "empty"}. */
static int
wb_range(wb_t *w, PyObject *v)
{
    PyObject *lower = NULL, *upper = NULL, *bounds = NULL, *empty = NULL;
    int rc = ENC_ERR;
    if ((lower = PyObject_GetAttr(v, s_lower)) == NULL ||
        (upper = PyObject_GetAttr(v, s_upper)) == NULL ||
        (bounds = PyObject_GetAttr(v, s_bounds)) == NULL ||
        (empty = PyObject_GetAttr(v, s_isempty)) == NULL)
        goto done;
    rc = ENC_UNSURE;
    if (!PyUnicode_CheckExact(bounds) || !PyBool_Check(empty))
        goto done;
    if ((rc = WB_LIT(w, "{\"lower\":")) != ENC_OK || (rc = enc_value(w, lower)) != ENC_OK ||
        (rc = WB_LIT(w, ",\"upper\":")) != ENC_OK || (rc = enc_value(w, upper)) != ENC_OK ||
        (rc = WB_LIT(w, ",\"bounds\":")) != ENC_OK || (rc = wb_str(w, bounds)) != ENC_OK ||
        (rc = WB_LIT(w, ",\"empty\":")) != ENC_OK)
        goto done;
    rc = empty == Py_True ? WB_LIT(w, "true}") : WB_LIT(w, "false}");
done:
    Py_XDECREF(lower);
    Py_XDECREF(upper);
    Py_XDECREF(bounds);
    Py_XDECREF(empty);
    return rc;
}

/* The value as wire.encode_value makes it, written as json.dumps would:
 * ENC_UNSURE when the fallback must decide (see enc_value). */
static int
enc_value_c(wb_t *w, PyObject *v)
{
    if (v == Py_None)
        return WB_LIT(w, "null");
    if (v == Py_True)
        return WB_LIT(w, "true");
    if (v == Py_False)
        return WB_LIT(w, "false");
    /* encode_value returns an int or str (subclasses too) as it is, and
     * json.dumps writes int.__repr__ and the characters. */
    if (PyUnicode_Check(v))
        return wb_str(w, v);
    if (PyLong_Check(v))
        return wb_int(w, v);
    PyTypeObject *tp = Py_TYPE(v);
    if (tp == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(v);
        if (isnan(d))
            return WB_LIT(w, "\"NaN\"");
        if (isinf(d))
            return d > 0 ? WB_LIT(w, "\"Infinity\"") : WB_LIT(w, "\"-Infinity\"");
        return wb_float_repr(w, d);
    }
    if ((PyObject *)tp == decimal_type)
        return wb_str_of(w, v);
    if (PyDateTime_CheckExact(v) || PyDate_CheckExact(v) || PyTime_CheckExact(v))
        return wb_isoformat(w, v);
    if (PyDelta_CheckExact(v))
        return wb_duration(w, v);
    if ((PyObject *)tp == uuid_type)
        return wb_uuid(w, v);
    if (tp == &PyBytes_Type)
        return wb_hex(w, (const unsigned char *)PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    if (tp == &PyByteArray_Type)
        return wb_hex(w, (const unsigned char *)PyByteArray_AS_STRING(v),
                      PyByteArray_GET_SIZE(v));
    if (tp == &PyMemoryView_Type) {
        Py_buffer view;
        if (PyObject_GetBuffer(v, &view, PyBUF_FULL_RO) < 0) {
            PyErr_Clear();      /* released, say: bytes(value) decides */
            return ENC_UNSURE;
        }
        int rc = PyBuffer_IsContiguous(&view, 'C')
                     ? wb_hex(w, (const unsigned char *)view.buf, view.len)
                     : ENC_UNSURE;
        PyBuffer_Release(&view);
        return rc;
    }
    int rc;
    if (tp == &PyDict_Type || tp == &PyList_Type || tp == &PyTuple_Type ||
        (PyObject *)tp == range_type || (PyObject *)tp == multirange_type) {
        if (++w->depth > ENC_MAX_DEPTH)
            return ENC_GIVEUP;
        if (tp == &PyDict_Type)
            rc = wb_dict(w, v, enc_value, 1);
        else if ((PyObject *)tp == range_type)
            rc = wb_range(w, v);
        else
            rc = wb_array(w, v, enc_value, (PyObject *)tp == multirange_type);
        w->depth--;
        return rc;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ip_types); i++)
        if ((PyObject *)tp == PyTuple_GET_ITEM(ip_types, i))
            return wb_str_of(w, v);
    if (plain_enum(tp)) {
        PyObject *inner = PyObject_GetAttr(v, s_value);
        if (inner == NULL)
            return ENC_ERR;
        if (++w->depth > ENC_MAX_DEPTH)
            rc = ENC_GIVEUP;
        else
            rc = enc_value(w, inner);
        w->depth--;
        Py_DECREF(inner);
        return rc;
    }
    return ENC_UNSURE;
}

/* One value; what the C code leaves alone, the fallback decides. */
static int
enc_value(wb_t *w, PyObject *v)
{
    Py_ssize_t start = w->len;
    int rc = enc_value_c(w, v);
    if (rc != ENC_UNSURE)
        return rc;
    w->len = start;
    return enc_fallback(w, v);
}

/* str() of an LSN (an exact walex.lsn.LSN): "%X/%X" of its halves. */
static int
wb_lsn_text(wb_t *w, PyObject *v)
{
    if ((PyObject *)Py_TYPE(v) != lsn_type)
        return ENC_GIVEUP;
    unsigned long long x = as_u64(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return ENC_GIVEUP;
    }
    char tmp[20], *o = tmp;
    for (int half = 0; half < 2; half++) {
        unsigned long part = half == 0 ? (unsigned long)(x >> 32) : (unsigned long)(x & 0xFFFFFFFFu);
        char digits[8];
        int n = 0;
        do {
            digits[n++] = "0123456789ABCDEF"[part & 0xF];
            part >>= 4;
        } while (part);
        while (n)
            *o++ = digits[--n];
        if (half == 0)
            *o++ = '/';
    }
    return wb_write(w, tmp, o - tmp);
}

/* A record (wire._record): null, or an object of the values. */
static int
wb_record(wb_t *w, PyObject *rec)
{
    if (rec == Py_None)
        return WB_LIT(w, "null");
    if (!PyDict_CheckExact(rec))
        return ENC_GIVEUP;
    if (++w->depth > ENC_MAX_DEPTH)
        return ENC_GIVEUP;
    int rc = wb_dict(w, rec, enc_value, 1);
    w->depth--;
    return rc == ENC_UNSURE ? ENC_GIVEUP : rc;   /* a key that is not a str */
}

/* Event.changes, encoded: column -> [old, new] for each column of the new
 * row that the old row has with a value that compares unequal. */
static int
wb_changes(wb_t *w, PyObject *new_rec, PyObject *old_rec)
{
    if (!PyDict_CheckExact(new_rec) || !PyDict_CheckExact(old_rec))
        return ENC_GIVEUP;
    if (wb_byte(w, '{') < 0)
        return ENC_ERR;
    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(new_rec);
    PyObject *key, *val;
    int first = 1, rc = ENC_OK;
    while (PyDict_Next(new_rec, &pos, &key, &val)) {
        if (!PyUnicode_CheckExact(key))
            return ENC_GIVEUP;
        Py_INCREF(key);
        Py_INCREF(val);
        PyObject *before = PyDict_GetItemWithError(old_rec, key);
        Py_XINCREF(before);
        if (before != NULL) {
            /* old[k] != v, as Python says it: no identity shortcut (NaN). */
            PyObject *ne = PyObject_RichCompare(before, val, Py_NE);
            int differs = ne == NULL ? -1 : PyObject_IsTrue(ne);
            Py_XDECREF(ne);
            if (differs < 0)
                rc = ENC_ERR;
            else if (differs) {
                if (!first)
                    rc = wb_byte(w, ',');
                first = 0;
                if (rc == ENC_OK)
                    rc = wb_key(w, key);
                if (rc == ENC_OK)
                    rc = WB_LIT(w, ":[");
                if (rc == ENC_OK)
                    rc = enc_value(w, before);
                if (rc == ENC_OK)
                    rc = wb_byte(w, ',');
                if (rc == ENC_OK)
                    rc = enc_value(w, val);
                if (rc == ENC_OK)
                    rc = wb_byte(w, ']');
            }
        }
        else if (PyErr_Occurred()) {
            rc = ENC_ERR;
        }
        Py_XDECREF(before);
        Py_DECREF(key);
        Py_DECREF(val);
        if (rc != ENC_OK)
            return rc;
        if (PyDict_GET_SIZE(new_rec) != size)
            return ENC_GIVEUP;
    }
    return wb_byte(w, '}');
}

/* sorted(unchanged_toast). */
static int
wb_toast(wb_t *w, PyObject *toast)
{
    if (PyAnySet_CheckExact(toast) && PySet_GET_SIZE(toast) == 0)
        return WB_LIT(w, "[]");
    PyObject *names = PySequence_List(toast);
    if (names == NULL)
        return ENC_ERR;
    int rc = PyList_Sort(names) < 0 ? ENC_ERR : enc_json(w, names);
    Py_DECREF(names);
    return rc;
}

/* ,"primary_key":{k: encode_value((record or {}).get(k)) for k in pk} */
static int
wb_primary_key(wb_t *w, PyObject *pk, PyObject *record)
{
    if (record != Py_None && !PyDict_CheckExact(record))
        return ENC_GIVEUP;
    if (WB_LIT(w, ",\"primary_key\":{") < 0)
        return ENC_ERR;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pk); i++) {
        PyObject *k = PyTuple_GET_ITEM(pk, i);
        PyObject *val = Py_None;
        if (record != Py_None) {
            val = PyDict_GetItemWithError(record, k);
            if (val == NULL) {
                if (PyErr_Occurred())
                    return ENC_ERR;
                val = Py_None;
            }
        }
        if (i > 0 && wb_byte(w, ',') < 0)
            return ENC_ERR;
        int rc = wb_key(w, k);
        if (rc != ENC_OK)
            return rc;
        if (wb_byte(w, ':') < 0)
            return ENC_ERR;
        Py_INCREF(val);
        rc = enc_value(w, val);
        Py_DECREF(val);
        if (rc != ENC_OK)
            return rc;
    }
    return wb_byte(w, '}');
}

/* A message's content: text when it is UTF-8, else "\\x" + hex. */
static int
wb_content(wb_t *w, PyObject *content)
{
    if (content == Py_None)
        return WB_LIT(w, ",\"content\":\"\",\"content_encoding\":\"text\"");
    if (!PyBytes_CheckExact(content))
        return ENC_GIVEUP;
    if (WB_LIT(w, ",\"content\":") < 0)
        return ENC_ERR;
    PyObject *text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(content), PyBytes_GET_SIZE(content),
                                          NULL);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            return ENC_ERR;
        PyErr_Clear();
        if (wb_hex(w, (const unsigned char *)PyBytes_AS_STRING(content),
                   PyBytes_GET_SIZE(content)) < 0)
            return ENC_ERR;
        return WB_LIT(w, ",\"content_encoding\":\"hex\"");
    }
    int rc = wb_str(w, text);
    Py_DECREF(text);
    if (rc != ENC_OK)
        return rc;
    return WB_LIT(w, ",\"content_encoding\":\"text\"");
}

/* *key* (a literal ,"name":), then the value as json.dumps writes it. */
#define WB_FIELD(w, key, v) (WB_LIT((w), key) < 0 ? ENC_ERR : enc_json((w), (v)))

static inline void
wb_init(wb_t *w, PyObject *fallback)
{
    w->buf = w->inline_buf;
    w->len = 0;
    w->cap = (Py_ssize_t)sizeof(w->inline_buf);
    w->depth = 0;
    w->fallback = fallback;
}

static inline void
wb_free(wb_t *w)
{
    if (w->buf != w->inline_buf)
        PyMem_Free(w->buf);
}

/* What an event takes from its Source, made once per Source: the text
 * ,"schema":...,"table":... ; whether the replica identity is "full" (-1: not
 * a str, the Python path compares); the primary key (NULL: not a tuple of
 * distinct str, the Python path decides). */
typedef struct {
    PyObject *key;      /* the Source, in the cache */
    PyObject *head;     /* bytes */
    int full;
    PyObject *pk;       /* tuple */
} src_info_t;

/* What an event takes from its Transaction, made once per Transaction:
 * {"id":"<commit lsn>:  |  ,"commit_timestamp":...,"commit_lsn":"...","lsn":"
 * |  ","xid":<xid>,"seq":   (one bytes object, cut in three). */
typedef struct {
    PyObject *key;      /* the Transaction, in the cache */
    PyObject *text;     /* bytes */
    Py_ssize_t cut1, cut2;
} txn_info_t;

/* The last Source and Transaction seen: the events of a batch share them.
 * Kept only for walex's own Source and Transaction, frozen dataclasses, and
 * only while what was taken from them cannot change (exact str, int, LSN,
 * a datetime whose offset is fixed). */
static src_info_t src_cache = {NULL, NULL, -1, NULL};
static txn_info_t txn_cache = {NULL, NULL, 0, 0};

static void
src_info_clear(src_info_t *info)
{
    Py_CLEAR(info->key);
    Py_CLEAR(info->head);
    Py_CLEAR(info->pk);
}

static void
txn_info_clear(txn_info_t *info)
{
    Py_CLEAR(info->key);
    Py_CLEAR(info->text);
}

/* A tuple of distinct exact str (a repeated name would be one key). */
static int
pk_ok(PyObject *pk)
{
    if (!PyTuple_CheckExact(pk))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pk); i++) {
        PyObject *k = PyTuple_GET_ITEM(pk, i);
        if (!PyUnicode_CheckExact(k))
            return 0;
        for (Py_ssize_t j = 0; j < i; j++)
            if (PyUnicode_Compare(k, PyTuple_GET_ITEM(pk, j)) == 0)
                return 0;
    }
    return 1;
}

/* *info* for *source* (new references; the caller clears it). */
static int
src_info_get(PyObject *source, src_info_t *info)
{
    if (source == src_cache.key && source != NULL) {
        *info = src_cache;
        Py_INCREF(info->key);
        Py_INCREF(info->head);
        Py_XINCREF(info->pk);
        return ENC_OK;
    }
    *info = (src_info_t){NULL, NULL, -1, NULL};
    PyObject *schema = NULL, *table = NULL, *ident = NULL, *pk = NULL;
    wb_t tmp;
    wb_init(&tmp, NULL);
    int rc = ENC_ERR;
    if ((schema = PyObject_GetAttr(source, s_schema)) == NULL ||
        (table = PyObject_GetAttr(source, s_table)) == NULL ||
        (ident = PyObject_GetAttr(source, s_replica_identity)) == NULL ||
        (pk = PyObject_GetAttr(source, s_primary_key)) == NULL)
        goto done;
    if ((rc = WB_FIELD(&tmp, ",\"schema\":", schema)) != ENC_OK ||
        (rc = WB_FIELD(&tmp, ",\"table\":", table)) != ENC_OK)
        goto done;
    if ((info->head = PyBytes_FromStringAndSize(tmp.buf, tmp.len)) == NULL) {
        rc = ENC_ERR;
        goto done;
    }
    info->full = PyUnicode_CheckExact(ident) ? PyUnicode_CompareWithASCIIString(ident, "full") == 0
                                             : -1;
    if (pk_ok(pk)) {
        info->pk = pk;
        pk = NULL;
    }
    if ((PyObject *)Py_TYPE(source) == source_type && PyUnicode_CheckExact(schema) &&
        PyUnicode_CheckExact(table)) {
        /* The old entry is let go of last: its objects' deallocation may
         * run code that encodes (and fills the cache) again. */
        src_info_t old = src_cache;
        Py_INCREF(source);
        info->key = source;
        src_cache = *info;
        Py_INCREF(info->key);
        Py_INCREF(info->head);
        Py_XINCREF(info->pk);
        src_info_clear(&old);
    }
    rc = ENC_OK;
done:
    Py_XDECREF(schema);
    Py_XDECREF(table);
    Py_XDECREF(ident);
    Py_XDECREF(pk);
    wb_free(&tmp);
    if (rc != ENC_OK)
        src_info_clear(info);
    return rc;
}

/* *info* for *txn* (new references; the caller clears it). */
static int
txn_info_get(PyObject *txn, txn_info_t *info)
{
    if (txn == txn_cache.key && txn != NULL) {
        *info = txn_cache;
        Py_INCREF(info->key);
        Py_INCREF(info->text);
        return ENC_OK;
    }
    *info = (txn_info_t){NULL, NULL, 0, 0};
    PyObject *commit_lsn = NULL, *stamp = NULL, *xid = NULL;
    wb_t tmp;
    wb_init(&tmp, NULL);
    int rc = ENC_ERR, fixed = 0;
    if ((commit_lsn = PyObject_GetAttr(txn, s_commit_lsn)) == NULL ||
        (stamp = PyObject_GetAttr(txn, s_commit_timestamp)) == NULL ||
        (xid = PyObject_GetAttr(txn, s_xid)) == NULL)
        goto done;
    /* "id": f"{commit_lsn}:{seq}" (an LSN formats as its str) */
    if ((rc = WB_LIT(&tmp, "{\"id\":\"")) != ENC_OK ||
        (rc = wb_lsn_text(&tmp, commit_lsn)) != ENC_OK || (rc = wb_byte(&tmp, ':')) != ENC_OK)
        goto done;
    info->cut1 = tmp.len;
    /* "commit_timestamp": commit_timestamp.isoformat() */
    if ((rc = WB_LIT(&tmp, ",\"commit_timestamp\":")) != ENC_OK)
        goto done;
    Py_ssize_t start = tmp.len;
    rc = PyDateTime_CheckExact(stamp) ? wb_isoformat(&tmp, stamp) : ENC_UNSURE;
    if (rc == ENC_OK) {
        PyObject *tz = PyDateTime_DATE_GET_TZINFO(stamp);
        fixed = tz == Py_None || Py_TYPE(tz) == Py_TYPE(PyDateTime_TimeZone_UTC);
    }
    else if (rc == ENC_UNSURE) {
        tmp.len = start;
        PyObject *text = PyObject_CallMethodNoArgs(stamp, s_isoformat);
        if (text == NULL) {
            rc = ENC_ERR;
            goto done;
        }
        rc = enc_json(&tmp, text);
        Py_DECREF(text);
    }
    if (rc != ENC_OK || (rc = WB_LIT(&tmp, ",\"commit_lsn\":\"")) != ENC_OK ||
        (rc = wb_lsn_text(&tmp, commit_lsn)) != ENC_OK ||
        (rc = WB_LIT(&tmp, "\",\"lsn\":\"")) != ENC_OK)
        goto done;
    info->cut2 = tmp.len;
    if ((rc = WB_FIELD(&tmp, "\",\"xid\":", xid)) != ENC_OK ||
        (rc = WB_LIT(&tmp, ",\"seq\":")) != ENC_OK)
        goto done;
    if ((info->text = PyBytes_FromStringAndSize(tmp.buf, tmp.len)) == NULL) {
        rc = ENC_ERR;
        goto done;
    }
    if ((PyObject *)Py_TYPE(txn) == txn_type && fixed && PyLong_CheckExact(xid)) {
        txn_info_t old = txn_cache;     /* let go of last, as above */
        Py_INCREF(txn);
        info->key = txn;
        txn_cache = *info;
        Py_INCREF(info->key);
        Py_INCREF(info->text);
        txn_info_clear(&old);
    }
    rc = ENC_OK;
done:
    Py_XDECREF(commit_lsn);
    Py_XDECREF(stamp);
    Py_XDECREF(xid);
    wb_free(&tmp);
    if (rc != ENC_OK)
        txn_info_clear(info);
    return rc;
}

#define EV_TYPE 0
#define EV_SOURCE 1
#define EV_NEW 2
#define EV_OLD 3
#define EV_TOAST 4
#define EV_LSN 5
#define EV_SEQ 6
#define EV_TXN 7
#define EV_PREFIX 8
#define EV_CONTENT 9
#define EV_TRANSACTIONAL 10
#define EV_TRUNCATED 11
#define EV_CASCADE 12
#define EV_RESTART 13

/* The rest of the document, after what the source and transaction give. */
static int
enc_event_body(wb_t *w, PyObject *ev, src_info_t *src, txn_info_t *txn)
{
    PyObject *kind = PyTuple_GET_ITEM(ev, EV_TYPE), *source = PyTuple_GET_ITEM(ev, EV_SOURCE),
             *new_rec = PyTuple_GET_ITEM(ev, EV_NEW), *old_rec = PyTuple_GET_ITEM(ev, EV_OLD),
             *seq = PyTuple_GET_ITEM(ev, EV_SEQ);
    const char *frags = PyBytes_AS_STRING(txn->text);
    Py_ssize_t nfrags = PyBytes_GET_SIZE(txn->text);
    int rc;
    if ((rc = wb_write(w, frags, txn->cut1)) != ENC_OK || (rc = wb_int(w, seq)) != ENC_OK ||
        (rc = WB_FIELD(w, "\",\"type\":", kind)) != ENC_OK)
        return rc;
    if (source == Py_None)
        rc = WB_LIT(w, ",\"schema\":null,\"table\":null");
    else
        rc = wb_write(w, PyBytes_AS_STRING(src->head), PyBytes_GET_SIZE(src->head));
    if (rc != ENC_OK || (rc = WB_LIT(w, ",\"new_record\":")) != ENC_OK ||
        (rc = wb_record(w, new_rec)) != ENC_OK || (rc = WB_LIT(w, ",\"old_record\":")) != ENC_OK ||
        (rc = wb_record(w, old_rec)) != ENC_OK || (rc = WB_LIT(w, ",\"changes\":")) != ENC_OK)
        return rc;
    /* Event.changes: an update whose old row is known (REPLICA IDENTITY FULL) */
    if (PyUnicode_CompareWithASCIIString(kind, "update") != 0 || old_rec == Py_None ||
        new_rec == Py_None || source == Py_None)
        rc = WB_LIT(w, "null");
    else if (src->full < 0)
        rc = ENC_GIVEUP;
    else if (!src->full)
        rc = WB_LIT(w, "null");
    else
        rc = wb_changes(w, new_rec, old_rec);
    if (rc != ENC_OK || (rc = WB_LIT(w, ",\"unchanged_toast\":")) != ENC_OK ||
        (rc = wb_toast(w, PyTuple_GET_ITEM(ev, EV_TOAST))) != ENC_OK ||
        (rc = wb_write(w, frags + txn->cut1, txn->cut2 - txn->cut1)) != ENC_OK ||
        (rc = wb_lsn_text(w, PyTuple_GET_ITEM(ev, EV_LSN))) != ENC_OK ||
        (rc = wb_write(w, frags + txn->cut2, nfrags - txn->cut2)) != ENC_OK ||
        (rc = wb_int(w, seq)) != ENC_OK || (rc = WB_LIT(w, ",\"version\":1")) != ENC_OK)
        return rc;

    if (source != Py_None) {
        if (src->pk == NULL)
            return ENC_GIVEUP;
        rc = wb_primary_key(w, src->pk, new_rec != Py_None ? new_rec : old_rec);
        if (rc != ENC_OK)
            return rc;
    }
    if (PyUnicode_CompareWithASCIIString(kind, "message") == 0) {
        PyObject *content = PyTuple_GET_ITEM(ev, EV_CONTENT);
        /* event.content or b"": any false value is no content */
        int truth = content == Py_None ? 0 : PyObject_IsTrue(content);
        if (truth < 0)
            return ENC_ERR;
        if ((rc = wb_content(w, truth ? content : Py_None)) != ENC_OK ||
            (rc = WB_FIELD(w, ",\"prefix\":", PyTuple_GET_ITEM(ev, EV_PREFIX))) != ENC_OK ||
            (rc = WB_FIELD(w, ",\"transactional\":", PyTuple_GET_ITEM(ev, EV_TRANSACTIONAL))) !=
                ENC_OK)
            return rc;
    }
    if (PyUnicode_CompareWithASCIIString(kind, "truncate") == 0) {
        PyObject *truncated = PySequence_List(PyTuple_GET_ITEM(ev, EV_TRUNCATED));
        if (truncated == NULL)
            return ENC_ERR;
        rc = WB_FIELD(w, ",\"truncated\":", truncated);
        Py_DECREF(truncated);
        if (rc != ENC_OK ||
            (rc = WB_FIELD(w, ",\"cascade\":", PyTuple_GET_ITEM(ev, EV_CASCADE))) != ENC_OK ||
            (rc = WB_FIELD(w, ",\"restart_identity\":", PyTuple_GET_ITEM(ev, EV_RESTART))) !=
                ENC_OK)
            return rc;
    }
    return wb_byte(w, '}');
}

/* The whole document, in wire.to_dict's key order. */
static int
enc_event(wb_t *w, PyObject *ev)
{
    PyObject *kind = PyTuple_GET_ITEM(ev, EV_TYPE), *source = PyTuple_GET_ITEM(ev, EV_SOURCE);
    if (!PyUnicode_CheckExact(kind) || !PyLong_CheckExact(PyTuple_GET_ITEM(ev, EV_SEQ)))
        return ENC_GIVEUP;
    src_info_t src = {NULL, NULL, -1, NULL};
    txn_info_t txn = {NULL, NULL, 0, 0};
    int rc = txn_info_get(PyTuple_GET_ITEM(ev, EV_TXN), &txn);
    if (rc == ENC_OK && source != Py_None)
        rc = src_info_get(source, &src);
    if (rc == ENC_OK)
        rc = enc_event_body(w, ev, &src, &txn);
    src_info_clear(&src);
    txn_info_clear(&txn);
    return rc == ENC_UNSURE ? ENC_GIVEUP : rc;
}

/* encode_event(event, fallback) -> bytes | None */
static PyObject *
encode_event(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_event(event, fallback)");
        return NULL;
    }
    PyObject *ev = args[0];
    if (event_type == NULL || decimal_type == NULL || lsn_type == NULL)
        return fail("walex._accel._speedups.setup_events() and setup_wire() were not called");
    if ((PyObject *)Py_TYPE(ev) != event_type || PyTuple_GET_SIZE(ev) != 14)
        Py_RETURN_NONE;
    wb_t w;
    wb_init(&w, args[1]);
    int rc = enc_event(&w, ev);
    PyObject *res = NULL;
    if (rc == ENC_OK) {
        res = PyBytes_FromStringAndSize(w.buf, w.len);
    }
    else if (rc == ENC_GIVEUP) {
        res = Py_None;
        Py_INCREF(res);
    }
    else if (PyErr_ExceptionMatches(PyExc_Exception)) {
        /* The Python path meets the same exception, or knows better. */
        PyErr_Clear();
        res = Py_None;
        Py_INCREF(res);
    }
    wb_free(&w);
    return res;
}

static PyMethodDef methods[] = {
    {"setup_transactions", setup_transactions, METH_VARARGS,
     "setup_transactions(Transaction, Batch, pg_epoch)"},
    {"run_transactions", (PyCFunction)(void (*)(void))run_transactions, METH_FASTCALL,
     "run_transactions(frames, fast_map, ready, state, max_events, max_bytes, max_ready) -> taken"},
    {"setup_wire", setup_wire, METH_VARARGS,
     "setup_wire(Source, Transaction, Decimal, UUID, Range, Multirange, Enum, ip_types)"},
    {"encode_event", (PyCFunction)(void (*)(void))encode_event, METH_FASTCALL,
     "encode_event(event, fallback) -> bytes | None: the wire bytes of an Event "
     "(walex.wire.dumpb), or None where the Python path must decide."},
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
    init_esc();
    return PyModule_Create(&module);
}
