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

/* read_tuple(data: bytes, pos: int) -> (TupleData, newpos) */
static PyObject *
read_tuple(PyObject *self, PyObject *args)
{
    const unsigned char *buf;
    Py_ssize_t len, pos;
    PyObject *data;

    if (!PyArg_ParseTuple(args, "On", &data, &pos))
        return NULL;
    if (tuple_type == NULL)
        return fail("walex._speedups.setup() was not called");
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return NULL;
    }
    buf = (const unsigned char *)PyBytes_AS_STRING(data);
    len = PyBytes_GET_SIZE(data);
    if (pos < 0 || pos + 2 > len)
        return fail("tuple data runs past the end of the message");

    int ncols = (int16_t)(((uint16_t)buf[pos] << 8) | buf[pos + 1]);
    if (ncols < 0)
        return fail("negative column count in tuple data");
    Py_ssize_t start = pos + 2;
    pos = start;

    PyObject *values = PyList_New(ncols);
    if (values == NULL)
        return NULL;
    long nbin = 0, ntext = 0, ntoast = 0;

    for (int i = 0; i < ncols; i++) {
        if (pos >= len) {
            Py_DECREF(values);
            return fail("tuple data runs past the end of the message");
        }
        unsigned char kind = buf[pos];
        PyObject *item;
        if (kind == 't' || kind == 'b') {
            if (pos + 5 > len) {
                Py_DECREF(values);
                return fail("tuple data runs past the end of the message");
            }
            int32_t size = read_i32(buf + pos + 1);
            pos += 5;
            if (size < 0 || pos + size > len) {
                Py_DECREF(values);
                return fail("tuple data runs past the end of the message");
            }
            item = PyBytes_FromStringAndSize((const char *)buf + pos, size);
            if (item == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            pos += size;
            if (kind == 't') ntext++; else nbin++;
        }
        else if (kind == 'n') {
            item = Py_None;
            Py_INCREF(item);
            pos += 1;
        }
        else if (kind == 'u') {
            item = toast_marker;
            Py_INCREF(item);
            pos += 1;
            ntoast++;
        }
        else {
            Py_DECREF(values);
            PyErr_Format(decode_error ? decode_error : PyExc_ValueError,
                         "unknown tuple value kind %R in column %d",
                         PyUnicode_FromOrdinal(kind), i);
            return NULL;
        }
        PyList_SET_ITEM(values, i, item);
    }

    PyObject *kinds;
    if (nbin && ntext) {
        kinds = PyBytes_FromStringAndSize(NULL, ncols);
        if (kinds == NULL) {
            Py_DECREF(values);
            return NULL;
        }
        char *out = PyBytes_AS_STRING(kinds);
        Py_ssize_t p = start;
        for (int i = 0; i < ncols; i++) {
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

static PyMethodDef methods[] = {
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
    "The decoder's hot loop in C (optional).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
