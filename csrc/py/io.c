/* io.c — Python face of the io layer: safetensors save/load, token files,
 * bin2d sample files (writer, reader and batch loader), crc32. Loaded tensors
 * are zero-copy memoryviews into a private (copy-on-write) mapping owned by a
 * SafetensorsFile object; every view keeps that object, hence the mapping,
 * alive. Token files are read with pread() (TokenReader), never through a
 * mapping. Paths may be str or os.PathLike. */
#include "py.h"
#include "../core/core.h"   /* sj_crc32, exposed for tests */
#include <string.h>

/* ---- SafetensorsFile: owner of a mapped file ---------------------------- */

typedef struct {
    PyObject_HEAD
    sj_st_file *f;
} StFileObject;

static int stfile_getbuffer(PyObject *self, Py_buffer *view, int flags) {
    uint64_t size;
    void *p = sj_safetensors_bytes(((StFileObject *)self)->f, &size);
    return PyBuffer_FillInfo(view, self, p, (Py_ssize_t)size, 0, flags);
}
static void stfile_dealloc(PyObject *self) {
    sj_safetensors_close(((StFileObject *)self)->f);
    Py_TYPE(self)->tp_free(self);
}
static PyBufferProcs stfile_procs = { stfile_getbuffer, NULL };
static PyTypeObject StFileType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.SafetensorsFile",
    .tp_basicsize = sizeof(StFileObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mapped safetensors file (private copy-on-write); owner of loaded tensor views.",
    .tp_dealloc = stfile_dealloc,
    .tp_as_buffer = &stfile_procs,
};

static PyObject *shape_tuple(const int64_t *shape, int ndim) {
    PyObject *t = PyTuple_New(ndim);
    for (int d = 0; t && d < ndim; d++) {
        PyObject *v = PyLong_FromLongLong(shape[d]);
        if (!v) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, d, v);
    }
    return t;
}

/* safetensors_load(path, verify=True) -> (metadata, [(name, dtype, shape, memoryview)]) */
static PyObject *py_st_load(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "verify", NULL};
    PyObject *pathb = NULL;
    int verify = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|p", kwlist, PyUnicode_FSConverter, &pathb, &verify))
        return NULL;
    sj_st_file *f = NULL;
    sj_status s;
    const char *path = PyBytes_AS_STRING(pathb);
    Py_BEGIN_ALLOW_THREADS s = sj_safetensors_open(path, verify, &f);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (s) return sj_py_raise(s);
    StFileObject *fo = PyObject_New(StFileObject, &StFileType);
    if (!fo) { sj_safetensors_close(f); return NULL; }
    fo->f = f;
    PyObject *meta = PyDict_New(), *list = PyList_New(0), *whole = NULL, *res = NULL;
    int gc_was_on = 0;
    (void)gc_was_on;
    if (!meta || !list) goto done;
    for (int i = 0; i < sj_safetensors_n_meta(f); i++) {
        const sj_st_meta *m = sj_safetensors_meta(f, i);
        PyObject *v = PyUnicode_FromString(m->value);
        if (!v || PyDict_SetItemString(meta, m->key, v) < 0) { Py_XDECREF(v); goto done; }
        Py_DECREF(v);
    }
    whole = PyMemoryView_FromObject((PyObject *)fo);
    if (!whole) goto done;
#if PY_VERSION_HEX >= 0x030A0000
    /* Millions of new tuples and views would each push the cyclic GC into
     * another pass over all of them; none can form a cycle. */
    gc_was_on = PyGC_Disable();
#endif
    for (int i = 0; i < sj_safetensors_n_tensors(f); i++) {
        const sj_st_tensor *t = sj_safetensors_tensor(f, i);
        PyObject *sl, *view = NULL, *item = NULL;
        PyObject *lo = PyLong_FromUnsignedLongLong(t->offset);
        PyObject *hi = PyLong_FromUnsignedLongLong(t->offset + t->nbytes);
        sl = (lo && hi) ? PySlice_New(lo, hi, NULL) : NULL;
        Py_XDECREF(lo); Py_XDECREF(hi);
        if (sl) view = PyObject_GetItem(whole, sl);
        Py_XDECREF(sl);
        if (view) item = Py_BuildValue("(ssNN)", t->name, t->dtype, shape_tuple(t->shape, t->ndim), view);
        if (!item || PyList_Append(list, item) < 0) { Py_XDECREF(item); goto done; }
        Py_DECREF(item);
    }
    res = PyTuple_Pack(2, meta, list);
done:
#if PY_VERSION_HEX >= 0x030A0000
    if (gc_was_on) PyGC_Enable();
#endif
    Py_XDECREF(whole);
    Py_XDECREF(meta);
    Py_XDECREF(list);
    Py_DECREF(fo);
    return res;
}

/* safetensors_save(path, [(name, dtype, shape, buffer)], metadata=None) */
static PyObject *py_st_save(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "tensors", "metadata", NULL};
    PyObject *pathb = NULL, *tens = NULL, *metaobj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O|O", kwlist, PyUnicode_FSConverter, &pathb,
                                     &tens, &metaobj))
        return NULL;
    const char *path = PyBytes_AS_STRING(pathb);
    PyObject *seq = NULL, *items = NULL, *res = NULL;
    sj_st_tensor *t = NULL;
    sj_st_meta *meta = NULL;
    sj_st_writer *w = NULL;
    Py_ssize_t n = 0, n_meta = 0;

    /* A tuple copy: buffer exporters run Python code that could mutate a list. */
    seq = PySequence_Check(tens) ? PySequence_Tuple(tens) : NULL;
    if (!seq) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "tensors must be a list of (name, dtype, shape, buffer)");
        }
        goto done;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    if (n > 0x7fffffff) { PyErr_SetString(PyExc_ValueError, "too many tensors"); goto done; }
    t = PyMem_Calloc((size_t)n + 1, sizeof *t);
    if (!t) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i), *shape;
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 4) {
            PyErr_Format(PyExc_TypeError, "tensors[%zd] must be a tuple (name, dtype, shape, buffer)", i);
            goto done;
        }
        if (!(t[i].name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(it, 0))) ||
            !(t[i].dtype = PyUnicode_AsUTF8(PyTuple_GET_ITEM(it, 1))))
            goto done;
        shape = PySequence_Fast(PyTuple_GET_ITEM(it, 2), "shape must be a sequence of ints");
        if (!shape) goto done;
        Py_ssize_t nd = PySequence_Fast_GET_SIZE(shape);
        if (nd > SJ_ST_MAX_DIMS) {
            PyErr_Format(PyExc_ValueError, "%s: tensor '%s' has %zd dimensions (at most %d)", path,
                         t[i].name, nd, SJ_ST_MAX_DIMS);
            Py_DECREF(shape);
            goto done;
        }
        t[i].ndim = (int)nd;
        for (Py_ssize_t d = 0; d < nd; d++) {
            t[i].shape[d] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(shape, d));
            if (t[i].shape[d] == -1 && PyErr_Occurred()) { Py_DECREF(shape); goto done; }
        }
        Py_DECREF(shape);
    }
    if (metaobj != Py_None) {
        if (!PyDict_Check(metaobj)) { PyErr_SetString(PyExc_TypeError, "metadata must be a dict of str -> str"); goto done; }
        items = PyDict_Items(metaobj);   /* holds the strings alive */
        if (!items) goto done;
        n_meta = PyList_GET_SIZE(items);
        meta = PyMem_Calloc((size_t)n_meta + 1, sizeof *meta);
        if (!meta) { PyErr_NoMemory(); goto done; }
        for (Py_ssize_t i = 0; i < n_meta; i++) {
            PyObject *kv = PyList_GET_ITEM(items, i);
            PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1);
            if (!PyUnicode_Check(k) || !PyUnicode_Check(v)) {
                PyErr_Format(PyExc_TypeError, "metadata must map str -> str (entry %R: %R)", k, v);
                goto done;
            }
            if (!(meta[i].key = PyUnicode_AsUTF8(k)) || !(meta[i].value = PyUnicode_AsUTF8(v))) goto done;
        }
    }
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_st_writer_open(path, t, (int)n, meta, (int)n_meta, &w);
    Py_END_ALLOW_THREADS
    if (s) { sj_py_raise(s); w = NULL; goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *obj = PyTuple_GET_ITEM(PySequence_Fast_GET_ITEM(seq, i), 3);
        Py_buffer view;
        if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: tensor '%s': data must be a C-contiguous buffer, got %s",
                         path, t[i].name, Py_TYPE(obj)->tp_name);
            goto done;
        }
        uint64_t need = sj_st_dtype_size(t[i].dtype);
        for (int d = 0; d < t[i].ndim; d++) need *= (uint64_t)t[i].shape[d];   /* checked by open */
        if ((uint64_t)view.len != need) {
            PyErr_Format(PyExc_ValueError, "%s: tensor '%s': buffer holds %zd bytes but shape and "
                         "dtype %s need %llu", path, t[i].name, view.len, t[i].dtype,
                         (unsigned long long)need);
            PyBuffer_Release(&view);
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS s = sj_st_writer_write(w, view.buf, (uint64_t)view.len);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&view);
        if (s) { sj_py_raise(s); goto done; }
    }
    Py_BEGIN_ALLOW_THREADS s = sj_st_writer_close(w);
    Py_END_ALLOW_THREADS
    w = NULL;
    if (s) { sj_py_raise(s); goto done; }
    res = Py_None;
    Py_INCREF(res);
done:
    if (w) sj_st_writer_abort(w);   /* removes the temp file; path untouched */
    PyMem_Free(t);
    PyMem_Free(meta);
    Py_XDECREF(items);
    Py_XDECREF(seq);
    Py_DECREF(pathb);
    return res;
}

/* ---- TokenWriter ---------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sj_tokens_writer *w;
    int width;
} TokWriterObject;

static int tokw_init(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "width", NULL};
    TokWriterObject *o = (TokWriterObject *)self;
    PyObject *pathb = NULL;
    int width;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&i", kwlist, PyUnicode_FSConverter, &pathb, &width))
        return -1;
    if (o->w) { Py_DECREF(pathb); PyErr_SetString(PyExc_RuntimeError, "TokenWriter already open"); return -1; }
    sj_status s;
    const char *path = PyBytes_AS_STRING(pathb);
    Py_BEGIN_ALLOW_THREADS s = sj_tokens_writer_open(path, width, &o->w);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (s) { o->w = NULL; sj_py_raise(s); return -1; }
    o->width = width;
    return 0;
}

static void tokw_dealloc(PyObject *self) {
    sj_tokens_writer_abort(((TokWriterObject *)self)->w);
    Py_TYPE(self)->tp_free(self);
}

#define NEED_WRITER(o) \
    if (!(o)->w) { PyErr_SetString(PyExc_ValueError, "TokenWriter is closed"); return NULL; }

static PyObject *tokw_append(PyObject *self, PyObject *arg) {
    TokWriterObject *o = (TokWriterObject *)self;
    NEED_WRITER(o);
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    const char *f = v.format ? v.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    int ok = v.itemsize == o->width && (strcmp(f, "H") == 0 || strcmp(f, "I") == 0 || strcmp(f, "L") == 0);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "append: expected a C-contiguous uint%d array, got format '%s' "
                     "(%zd-byte items)", o->width * 8, v.format ? v.format : "B", v.itemsize);
        PyBuffer_Release(&v);
        return NULL;
    }
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_tokens_writer_append(o->w, v.buf, v.len / v.itemsize);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static PyObject *tokw_close(PyObject *self, PyObject *noargs) {
    TokWriterObject *o = (TokWriterObject *)self;
    NEED_WRITER(o);
    int64_t count = 0;
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_tokens_writer_close(o->w, &count);
    Py_END_ALLOW_THREADS
    o->w = NULL;
    if (s) return sj_py_raise(s);
    return PyLong_FromLongLong(count);
}

static PyObject *tokw_abort(PyObject *self, PyObject *noargs) {
    TokWriterObject *o = (TokWriterObject *)self;
    sj_tokens_writer_abort(o->w);
    o->w = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef tokw_methods[] = {
    {"append", tokw_append, METH_O, "append(uint16|uint32 array): add tokens"},
    {"close", tokw_close, METH_NOARGS, "close() -> token count: write the count, fsync, rename"},
    {"abort", tokw_abort, METH_NOARGS, "abort(): remove the temporary file"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TokWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.TokenWriter",
    .tp_basicsize = sizeof(TokWriterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TokenWriter(path, width): streaming atomic token-file writer (use smedjan.data.write_tokens).",
    .tp_new = PyType_GenericNew,
    .tp_init = tokw_init,
    .tp_dealloc = tokw_dealloc,
    .tp_methods = tokw_methods,
};

/* ---- SampleWriter --------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sj_samples_writer *w;
} SampleWriterObject;

static int samw_init(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "stride", "pad_id", "labels", NULL};
    SampleWriterObject *o = (SampleWriterObject *)self;
    PyObject *pathb = NULL;
    unsigned int stride, pad_id;
    int labels;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&IIp", kwlist, PyUnicode_FSConverter, &pathb, &stride,
                                     &pad_id, &labels))
        return -1;
    if (o->w) {
        Py_DECREF(pathb);
        PyErr_SetString(PyExc_RuntimeError, "SampleWriter already open");
        return -1;
    }
    sj_status s;
    const char *path = PyBytes_AS_STRING(pathb);
    Py_BEGIN_ALLOW_THREADS s = sj_samples_writer_open(path, stride, pad_id, labels, &o->w);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (s) { o->w = NULL; sj_py_raise(s); return -1; }
    return 0;
}

static void samw_dealloc(PyObject *self) {
    sj_samples_writer_abort(((SampleWriterObject *)self)->w);
    Py_TYPE(self)->tp_free(self);
}

/* A C-contiguous buffer of `itemsize`-byte unsigned integers (any of the
 * format codes in `codes`), or a TypeError naming `what`. */
static int unsigned_buffer(PyObject *obj, Py_buffer *v, Py_ssize_t itemsize, const char *codes,
                           const char *what) {
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (v->itemsize != itemsize || strlen(f) != 1 || !strchr(codes, *f)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous %zd-byte unsigned array, got format "
                     "'%s' (%zd-byte items)", what, itemsize, v->format ? v->format : "B", v->itemsize);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

static PyObject *samw_append(PyObject *self, PyObject *args) {
    SampleWriterObject *o = (SampleWriterObject *)self;
    if (!o->w) { PyErr_SetString(PyExc_ValueError, "SampleWriter is closed"); return NULL; }
    PyObject *tok_obj, *lab_obj = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &tok_obj, &lab_obj)) return NULL;
    Py_buffer tok, lab = {0};
    if (unsigned_buffer(tok_obj, &tok, 4, "IL", "append: tokens") < 0) return NULL;
    if (lab_obj != Py_None && unsigned_buffer(lab_obj, &lab, 1, "B?", "append: labels") < 0) {
        PyBuffer_Release(&tok);
        return NULL;
    }
    Py_ssize_t n = tok.len / 4;
    if (lab.buf && lab.len != n) {
        PyErr_Format(PyExc_ValueError, "append: %zd tokens but %zd labels", n, lab.len);
    } else if (n > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "append: a row of %zd tokens is too long", n);
    } else {
        sj_status s;
        Py_BEGIN_ALLOW_THREADS s = sj_samples_writer_append(o->w, tok.buf, (uint32_t)n, lab.buf);
        Py_END_ALLOW_THREADS
        if (s) sj_py_raise(s);
    }
    PyBuffer_Release(&tok);
    if (lab.buf) PyBuffer_Release(&lab);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *samw_close(PyObject *self, PyObject *noargs) {
    SampleWriterObject *o = (SampleWriterObject *)self;
    if (!o->w) { PyErr_SetString(PyExc_ValueError, "SampleWriter is closed"); return NULL; }
    int64_t rows = 0;
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_samples_writer_close(o->w, &rows);
    Py_END_ALLOW_THREADS
    o->w = NULL;
    if (s) return sj_py_raise(s);
    return PyLong_FromLongLong(rows);
}

static PyObject *samw_abort(PyObject *self, PyObject *noargs) {
    SampleWriterObject *o = (SampleWriterObject *)self;
    sj_samples_writer_abort(o->w);
    o->w = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef samw_methods[] = {
    {"append", samw_append, METH_VARARGS,
     "append(tokens uint32 array, labels uint8|bool array or None): add one row"},
    {"close", samw_close, METH_NOARGS, "close() -> rows: write lengths and label index, fsync, rename"},
    {"abort", samw_abort, METH_NOARGS, "abort(): remove the temporary file"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SampleWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.SampleWriter",
    .tp_basicsize = sizeof(SampleWriterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SampleWriter(path, stride, pad_id, labels): streaming atomic bin2d writer "
              "(use smedjan.data.write_samples).",
    .tp_new = PyType_GenericNew,
    .tp_init = samw_init,
    .tp_dealloc = samw_dealloc,
    .tp_methods = samw_methods,
};

/* ---- TokenReader ---------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sj_tokens_reader *r;
} TokReaderObject;

static int tokr_init(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", NULL};
    TokReaderObject *o = (TokReaderObject *)self;
    PyObject *pathb = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&", kwlist, PyUnicode_FSConverter, &pathb)) return -1;
    if (o->r) { Py_DECREF(pathb); PyErr_SetString(PyExc_RuntimeError, "TokenReader already open"); return -1; }
    sj_status s;
    const char *path = PyBytes_AS_STRING(pathb);
    Py_BEGIN_ALLOW_THREADS s = sj_tokens_open(path, &o->r);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (s) { o->r = NULL; sj_py_raise(s); return -1; }
    return 0;
}

static void tokr_dealloc(PyObject *self) {
    sj_tokens_close(((TokReaderObject *)self)->r);
    Py_TYPE(self)->tp_free(self);
}

#define NEED_READER(o) \
    if (!(o)->r) { PyErr_SetString(PyExc_ValueError, "TokenReader is not open"); return NULL; }

/* A C-contiguous buffer of `itemsize`-byte integers whose format code is
 * one of `codes`; writable when asked. */
static int int_buffer(PyObject *obj, Py_buffer *v, int writable, Py_ssize_t itemsize, const char *codes,
                      const char *what) {
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (v->itemsize != itemsize || strlen(f) != 1 || !strchr(codes, *f)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous%s array of %zd-byte integers, got format "
                     "'%s' (%zd-byte items)", what, writable ? " writable" : "", itemsize,
                     v->format ? v->format : "B", v->itemsize);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* read(first, out): len(out) tokens from token `first` into out (items of the file's width). */
static PyObject *tokr_read(PyObject *self, PyObject *args) {
    TokReaderObject *o = (TokReaderObject *)self;
    NEED_READER(o);
    long long first;
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "LO", &first, &obj)) return NULL;
    Py_buffer v;
    if (int_buffer(obj, &v, 1, (Py_ssize_t)sj_tokens_reader_info(o->r)->width, "HIL", "read") < 0) return NULL;
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_tokens_read(o->r, first, v.len / v.itemsize, v.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

/* read_windows(starts, length, x, y=None): int32 windows (see sj_tokens_read_windows). */
static PyObject *tokr_read_windows(PyObject *self, PyObject *args) {
    TokReaderObject *o = (TokReaderObject *)self;
    NEED_READER(o);
    PyObject *so, *xo, *yo = Py_None, *res = NULL;
    long long len;
    if (!PyArg_ParseTuple(args, "OLO|O", &so, &len, &xo, &yo)) return NULL;
    Py_buffer sv, xv, yv;
    int have_y = yo != Py_None;
    if (int_buffer(so, &sv, 0, 8, "qlQL", "read_windows: starts") < 0) return NULL;
    if (int_buffer(xo, &xv, 1, 4, "il", "read_windows: x") < 0) { PyBuffer_Release(&sv); return NULL; }
    if (have_y && int_buffer(yo, &yv, 1, 4, "il", "read_windows: y") < 0) goto done_x;
    Py_ssize_t n = sv.len / 8;
    if (len < 1 || xv.len / 4 != n * len || (have_y && yv.len != xv.len)) {
        PyErr_Format(PyExc_ValueError, "read_windows: %zd windows of %lld tokens need x%s of %lld int32 "
                     "each, got %zd%s", n, len, have_y ? " and y" : "", (long long)n * len, xv.len / 4,
                     have_y ? " and a y of another size" : "");
        goto done;
    }
    sj_status s;
    Py_BEGIN_ALLOW_THREADS
    s = sj_tokens_read_windows(o->r, sv.buf, n, len, xv.buf, have_y ? yv.buf : NULL);
    Py_END_ALLOW_THREADS
    if (s) { sj_py_raise(s); goto done; }
    res = Py_None;
    Py_INCREF(res);
done:
    if (have_y) PyBuffer_Release(&yv);
done_x:
    PyBuffer_Release(&xv);
    PyBuffer_Release(&sv);
    return res;
}

static PyObject *tokr_fileno(PyObject *self, PyObject *noargs) {
    TokReaderObject *o = (TokReaderObject *)self;
    NEED_READER(o);
    return PyLong_FromLong(sj_tokens_reader_fd(o->r));
}

static PyObject *tokr_get(PyObject *self, void *which) {
    TokReaderObject *o = (TokReaderObject *)self;
    NEED_READER(o);
    const sj_tokens_info *i = sj_tokens_reader_info(o->r);
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromUnsignedLong(i->version);
    case 1: return PyLong_FromUnsignedLong(i->width);
    default: return PyLong_FromLongLong(i->count);
    }
}

static PyGetSetDef tokr_getset[] = {
    {"version", tokr_get, NULL, "format version (1)", (void *)0},
    {"width", tokr_get, NULL, "bytes per token (2 or 4)", (void *)1},
    {"count", tokr_get, NULL, "tokens in the file", (void *)2},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef tokr_methods[] = {
    {"read", tokr_read, METH_VARARGS, "read(first, out): len(out) tokens from token `first` into out"},
    {"read_windows", tokr_read_windows, METH_VARARGS,
     "read_windows(starts: int64[n], length, x: int32[n, length], y=None): x[i] = tokens[starts[i]:][:length], "
     "y[i] the same shifted by one"},
    {"fileno", tokr_fileno, METH_NOARGS, "fileno() -> the open descriptor (owned by the reader)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TokReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.TokenReader",
    .tp_basicsize = sizeof(TokReaderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TokenReader(path): a validated token file read with pread(); a file cut short after "
              "open is an OSError, never a SIGBUS (use smedjan.data.TokenFile).",
    .tp_new = PyType_GenericNew,
    .tp_init = tokr_init,
    .tp_dealloc = tokr_dealloc,
    .tp_methods = tokr_methods,
    .tp_getset = tokr_getset,
};

/* ---- SampleFile and SampleLoader (bin2d) -------------------------------- */

typedef struct {
    PyObject_HEAD
    sj_samples *f;
} SampleFileObject;

static int sfile_init(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"path", "load", "vocab_size", NULL};
    SampleFileObject *o = (SampleFileObject *)self;
    PyObject *pathb = NULL;
    const char *load = "memory";
    long long vocab = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&|sL", kwlist, PyUnicode_FSConverter, &pathb, &load, &vocab))
        return -1;
    if (o->f) { Py_DECREF(pathb); PyErr_SetString(PyExc_RuntimeError, "SampleFile already open"); return -1; }
    sj_samples_load mode = SJ_SAMPLES_MEMORY;
    if (strcmp(load, "mmap") == 0) mode = SJ_SAMPLES_MMAP;
    else if (strcmp(load, "memory") != 0) {
        PyErr_Format(PyExc_ValueError, "%s: load must be 'memory' or 'mmap', got '%s'", PyBytes_AS_STRING(pathb), load);
        Py_DECREF(pathb);
        return -1;
    }
    sj_status s;
    const char *path = PyBytes_AS_STRING(pathb);
    Py_BEGIN_ALLOW_THREADS s = sj_samples_open(path, mode, vocab, &o->f);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (s) { o->f = NULL; sj_py_raise(s); return -1; }
    return 0;
}

static void sfile_dealloc(PyObject *self) {
    sj_samples_close(((SampleFileObject *)self)->f);
    Py_TYPE(self)->tp_free(self);
}

#define NEED_SAMPLES(o) \
    if (!(o)->f) { PyErr_SetString(PyExc_ValueError, "SampleFile is not open"); return NULL; }

static PyObject *sfile_get(PyObject *self, void *which) {
    SampleFileObject *o = (SampleFileObject *)self;
    NEED_SAMPLES(o);
    const sj_samples_info *i = sj_samples_file_info(o->f);
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromUnsignedLong(i->version);
    case 1: return PyLong_FromUnsignedLong(i->stride);
    case 2: return PyLong_FromLongLong(i->n_rows);
    case 3: return PyLong_FromLongLong(i->n_spans);
    case 4: return PyLong_FromUnsignedLong(i->flags);
    default: return PyLong_FromUnsignedLong(i->pad_id);
    }
}

static PyGetSetDef sfile_getset[] = {
    {"version", sfile_get, NULL, "format version (1)", (void *)0},
    {"stride", sfile_get, NULL, "tokens per row", (void *)1},
    {"n_rows", sfile_get, NULL, "rows (samples)", (void *)2},
    {"n_spans", sfile_get, NULL, "label spans", (void *)3},
    {"flags", sfile_get, NULL, "bit 0: a label index", (void *)4},
    {"pad_id", sfile_get, NULL, "the id padding positions hold", (void *)5},
    {NULL, NULL, NULL, NULL, NULL},
};

/* index() -> (lengths, span_start, spans) as bytes (host order; None, None
 * without a label index). */
static PyObject *sfile_index(PyObject *self, PyObject *noargs) {
    SampleFileObject *o = (SampleFileObject *)self;
    NEED_SAMPLES(o);
    const sj_samples_info *i = sj_samples_file_info(o->f);
    PyObject *lengths = PyBytes_FromStringAndSize((const char *)sj_samples_lengths(o->f), (Py_ssize_t)(4 * i->n_rows));
    if (!lengths) return NULL;
    if (!sj_samples_span_start(o->f)) return Py_BuildValue("(NOO)", lengths, Py_None, Py_None);
    return Py_BuildValue("(NNN)", lengths,
                         PyBytes_FromStringAndSize((const char *)sj_samples_span_start(o->f),
                                                   (Py_ssize_t)(8 * (i->n_rows + 1))),
                         PyBytes_FromStringAndSize((const char *)sj_samples_spans(o->f),
                                                   (Py_ssize_t)(8 * i->n_spans)));
}

/* batch(rows: int64[B], x: int32[B, T], y: int32[B, T]) -> labels */
static PyObject *sfile_batch(PyObject *self, PyObject *args) {
    SampleFileObject *o = (SampleFileObject *)self;
    NEED_SAMPLES(o);
    PyObject *ro, *xo, *yo, *res = NULL;
    if (!PyArg_ParseTuple(args, "OOO", &ro, &xo, &yo)) return NULL;
    Py_buffer rv, xv, yv;
    if (int_buffer(ro, &rv, 0, 8, "qlQL", "batch: rows") < 0) return NULL;
    if (int_buffer(xo, &xv, 1, 4, "il", "batch: x") < 0) { PyBuffer_Release(&rv); return NULL; }
    if (int_buffer(yo, &yv, 1, 4, "il", "batch: y") < 0) goto done_x;
    Py_ssize_t B = rv.len / 8;
    if (B < 1 || B > INT_MAX || xv.len != yv.len || xv.len % (4 * B) || xv.len / (4 * B) > INT_MAX ||
        xv.len == 0) {
        PyErr_Format(PyExc_ValueError, "batch: %zd rows need x and y of the same size, a multiple of the "
                     "row count (got %zd and %zd int32)", B, xv.len / 4, yv.len / 4);
        goto done;
    }
    int T = (int)(xv.len / (4 * B));
    int64_t labels = 0;
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_samples_batch(o->f, rv.buf, (int)B, T, xv.buf, yv.buf, &labels);
    Py_END_ALLOW_THREADS
    if (s) { sj_py_raise(s); goto done; }
    res = PyLong_FromLongLong(labels);
done:
    PyBuffer_Release(&yv);
done_x:
    PyBuffer_Release(&xv);
    PyBuffer_Release(&rv);
    return res;
}

static PyMethodDef sfile_methods[] = {
    {"index", sfile_index, METH_NOARGS, "index() -> (lengths, span_start, spans) as bytes (None without labels)"},
    {"batch", sfile_batch, METH_VARARGS,
     "batch(rows: int64[B] (-1: padding), x: int32[B, T], y: int32[B, T]) -> label count"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SampleFileType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.SampleFile",
    .tp_basicsize = sizeof(SampleFileObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SampleFile(path, load='memory'|'mmap', vocab_size=0): a validated bin2d file "
              "(use smedjan.data.SampleFile).",
    .tp_new = PyType_GenericNew,
    .tp_init = sfile_init,
    .tp_dealloc = sfile_dealloc,
    .tp_methods = sfile_methods,
    .tp_getset = sfile_getset,
};

typedef struct {
    PyObject_HEAD
    sj_sample_loader *l;
    PyObject *file;              /* the SampleFile it reads: kept alive */
    int batch_size;
    int busy;                    /* a call is running with the GIL released */
} SampleLoaderObject;

static int sload_init(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"file", "rows", "batch_size", "seq_len", "bucket_sizes", "shuffle_buffer",
                             "seed", "prefetch_batches", NULL};
    SampleLoaderObject *o = (SampleLoaderObject *)self;
    PyObject *fo, *ro, *bo = Py_None;
    int batch_size, seq_len, prefetch = 0;
    long long shuffle = 0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!Oii|OLKi", kwlist, &SampleFileType, &fo, &ro, &batch_size,
                                     &seq_len, &bo, &shuffle, &seed, &prefetch))
        return -1;
    if (o->l) { PyErr_SetString(PyExc_RuntimeError, "SampleLoader already open"); return -1; }
    if (!((SampleFileObject *)fo)->f) { PyErr_SetString(PyExc_ValueError, "SampleFile is not open"); return -1; }
    int buckets[64], n_buckets = 0;
    if (bo != Py_None) {
        PyObject *seq = PySequence_Fast(bo, "bucket_sizes must be a sequence of ints");
        if (!seq) return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n > 64) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "at most 64 bucket sizes"); return -1; }
        for (Py_ssize_t i = 0; i < n; i++) {
            long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
            if (v == -1 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
            if (v < 1 || v > INT_MAX) {
                Py_DECREF(seq);
                PyErr_Format(PyExc_ValueError, "bucket_sizes[%zd] is %ld, expected an integer >= 1", i, v);
                return -1;
            }
            buckets[n_buckets++] = (int)v;
        }
        Py_DECREF(seq);
    }
    Py_buffer rv;
    if (int_buffer(ro, &rv, 0, 8, "qlQL", "SampleLoader: rows") < 0) return -1;
    sj_sample_loader_config c = { batch_size, seq_len, n_buckets ? buckets : NULL, n_buckets, shuffle,
                                  (uint64_t)seed, prefetch, rv.buf, (int64_t)(rv.len / 8) };
    sj_status s;
    sj_samples *f = ((SampleFileObject *)fo)->f;
    Py_BEGIN_ALLOW_THREADS s = sj_sample_loader_open(f, &c, &o->l);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&rv);
    if (s) { o->l = NULL; sj_py_raise(s); return -1; }
    Py_INCREF(fo);
    o->file = fo;
    o->batch_size = batch_size;
    return 0;
}

static void sload_close_handle(SampleLoaderObject *o) {
    sj_sample_loader *l = o->l;
    o->l = NULL;
    Py_BEGIN_ALLOW_THREADS sj_sample_loader_close(l);   /* joins the prefetch thread */
    Py_END_ALLOW_THREADS
}

static void sload_dealloc(PyObject *self) {
    SampleLoaderObject *o = (SampleLoaderObject *)self;
    if (o->l) sload_close_handle(o);
    Py_XDECREF(o->file);
    Py_TYPE(self)->tp_free(self);
}

/* Open and not in use by another Python thread (its call runs without the GIL). */
static int sload_ready(SampleLoaderObject *o) {
    if (!o->l) { PyErr_SetString(PyExc_ValueError, "SampleLoader is closed"); return 0; }
    if (o->busy) { PyErr_SetString(PyExc_RuntimeError, "SampleLoader is in use by another thread"); return 0; }
    return 1;
}

static PyObject *sload_peek(PyObject *self, PyObject *noargs) {
    SampleLoaderObject *o = (SampleLoaderObject *)self;
    if (!sload_ready(o)) return NULL;
    int T = 0;
    sj_status s;
    o->busy = 1;
    SJ_PY_CALL(s, sj_sample_loader_peek(o->l, &T));
    o->busy = 0;
    if (s) return sj_py_raise(s);
    return PyLong_FromLong(T);
}

/* next(x, y) -> (labels, epoch, index); x, y: int32 (B, T) with T from peek(). */
static PyObject *sload_next(PyObject *self, PyObject *args) {
    SampleLoaderObject *o = (SampleLoaderObject *)self;
    if (!sload_ready(o)) return NULL;
    PyObject *xo, *yo, *res = NULL;
    if (!PyArg_ParseTuple(args, "OO", &xo, &yo)) return NULL;
    Py_buffer xv, yv;
    if (int_buffer(xo, &xv, 1, 4, "il", "next: x") < 0) return NULL;
    if (int_buffer(yo, &yv, 1, 4, "il", "next: y") < 0) { PyBuffer_Release(&xv); return NULL; }
    Py_ssize_t per_row = xv.len / 4 / o->batch_size;
    if (xv.len != yv.len || xv.len % (4 * o->batch_size) || per_row < 1 || per_row > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "next: x and y must both hold batch_size (%d) x T int32, got %zd and %zd",
                     o->batch_size, xv.len / 4, yv.len / 4);
        goto done;
    }
    int64_t labels = 0, epoch = 0, index = 0;
    sj_status s;
    o->busy = 1;
    SJ_PY_CALL(s, sj_sample_loader_next(o->l, (int)per_row, xv.buf, yv.buf, &labels, &epoch, &index));
    o->busy = 0;
    if (s) { sj_py_raise(s); goto done; }
    res = Py_BuildValue("(LLL)", (long long)labels, (long long)epoch, (long long)index);
done:
    PyBuffer_Release(&yv);
    PyBuffer_Release(&xv);
    return res;
}

static PyObject *sload_seek(PyObject *self, PyObject *args) {
    SampleLoaderObject *o = (SampleLoaderObject *)self;
    if (!sload_ready(o)) return NULL;
    long long epoch, batch;
    if (!PyArg_ParseTuple(args, "LL", &epoch, &batch)) return NULL;
    sj_status s;
    o->busy = 1;
    SJ_PY_CALL(s, sj_sample_loader_seek(o->l, epoch, batch));
    o->busy = 0;
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static PyObject *sload_close(PyObject *self, PyObject *noargs) {
    SampleLoaderObject *o = (SampleLoaderObject *)self;
    if (o->busy) { PyErr_SetString(PyExc_RuntimeError, "SampleLoader is in use by another thread"); return NULL; }
    if (o->l) sload_close_handle(o);
    Py_RETURN_NONE;
}

static PyObject *sload_epoch_batches(PyObject *self, void *closure) {
    SampleLoaderObject *o = (SampleLoaderObject *)self;
    if (!o->l) { PyErr_SetString(PyExc_ValueError, "SampleLoader is closed"); return NULL; }
    return PyLong_FromLongLong(sj_sample_loader_epoch_batches(o->l));
}

static PyGetSetDef sload_getset[] = {
    {"epoch_batches", sload_epoch_batches, NULL, "batches in every epoch", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef sload_methods[] = {
    {"peek", sload_peek, METH_NOARGS, "peek() -> T of the next batch"},
    {"next", sload_next, METH_VARARGS,
     "next(x, y) -> (labels, epoch, index): the next batch into int32 (batch_size, T) arrays"},
    {"seek", sload_seek, METH_VARARGS, "seek(epoch, batch): continue from there"},
    {"close", sload_close, METH_NOARGS, "close(): stop and join the prefetch thread, free the buffers"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SampleLoaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.SampleLoader",
    .tp_basicsize = sizeof(SampleLoaderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SampleLoader(file, rows, batch_size, seq_len, bucket_sizes=None, shuffle_buffer=0, seed=0, "
              "prefetch_batches=0): batches in a deterministic schedule (use smedjan.data.SampleBatches).",
    .tp_new = PyType_GenericNew,
    .tp_init = sload_init,
    .tp_dealloc = sload_dealloc,
    .tp_methods = sload_methods,
    .tp_getset = sload_getset,
};

/* tokens_inspect(path) -> (version, width, count) */
static PyObject *py_tokens_inspect(PyObject *self, PyObject *arg) {
    PyObject *pathb = NULL;
    if (!PyUnicode_FSConverter(arg, &pathb)) return NULL;
    sj_tokens_info info;
    sj_status s;
    const char *path = PyBytes_AS_STRING(pathb);
    Py_BEGIN_ALLOW_THREADS s = sj_tokens_inspect(path, &info);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (s) return sj_py_raise(s);
    return Py_BuildValue("(IIL)", info.version, info.width, (long long)info.count);
}

static PyObject *py_crc32(PyObject *self, PyObject *args) {
    Py_buffer v;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &v, &crc)) return NULL;
    uint32_t r;
    Py_BEGIN_ALLOW_THREADS r = sj_crc32(crc, v.buf, (size_t)v.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(r);
}

static PyObject *py_st_dtype_size(PyObject *self, PyObject *arg) {
    const char *s = PyUnicode_AsUTF8(arg);
    if (!s) return NULL;
    return PyLong_FromSize_t(sj_st_dtype_size(s));
}

static PyMethodDef functions[] = {
    {"safetensors_load", (PyCFunction)(void (*)(void))py_st_load, METH_VARARGS | METH_KEYWORDS,
     "safetensors_load(path, verify=True) -> (metadata, [(name, dtype, shape, memoryview)])\n"
     "The views are zero-copy, writable (copy-on-write) and keep the mapping alive."},
    {"safetensors_save", (PyCFunction)(void (*)(void))py_st_save, METH_VARARGS | METH_KEYWORDS,
     "safetensors_save(path, [(name, dtype, shape, buffer)], metadata=None): atomic write, "
     "adds crc32:<name> metadata"},
    {"tokens_inspect", py_tokens_inspect, METH_O, "tokens_inspect(path) -> (version, width, count)"},
    {"crc32", py_crc32, METH_VARARGS, "crc32(data, crc=0) -> int (as zlib.crc32)"},
    {"st_dtype_size", py_st_dtype_size, METH_O, "st_dtype_size(name) -> bytes per element (0 unknown)"},
    {NULL, NULL, 0, NULL},
};

int sj_py_add_io(PyObject *m) {
    if (PyType_Ready(&StFileType) < 0 || PyType_Ready(&TokWriterType) < 0 ||
        PyType_Ready(&TokReaderType) < 0 || PyType_Ready(&SampleWriterType) < 0 ||
        PyType_Ready(&SampleFileType) < 0 || PyType_Ready(&SampleLoaderType) < 0) return -1;
    Py_INCREF(&TokWriterType);
    if (PyModule_AddObject(m, "TokenWriter", (PyObject *)&TokWriterType) < 0) return -1;
    Py_INCREF(&SampleWriterType);
    if (PyModule_AddObject(m, "SampleWriter", (PyObject *)&SampleWriterType) < 0) return -1;
    Py_INCREF(&TokReaderType);
    if (PyModule_AddObject(m, "TokenReader", (PyObject *)&TokReaderType) < 0) return -1;
    Py_INCREF(&SampleFileType);
    if (PyModule_AddObject(m, "SampleFile", (PyObject *)&SampleFileType) < 0) return -1;
    Py_INCREF(&SampleLoaderType);
    if (PyModule_AddObject(m, "SampleLoader", (PyObject *)&SampleLoaderType) < 0) return -1;
    PyModule_AddIntConstant(m, "TOKENS_HEADER_BYTES", SJ_TOKENS_HEADER_BYTES);
    PyModule_AddIntConstant(m, "SAMPLES_HEADER_BYTES", SJ_SAMPLES_HEADER_BYTES);
    return PyModule_AddFunctions(m, functions);
}
