/* tokenizer.c — Python face of the engine's byte-level BPE: the types
 * _C.Tokenizer and _C.BpeTrainer, and _C.tokenizer_load. Glue only: turn
 * Python objects into byte buffers, call the engine with the GIL released,
 * and hand ids back as bytearrays that NumPy views without a copy
 * (np.frombuffer), so no NumPy C-API is needed. */
#include "py.h"
#include <string.h>

typedef struct { PyObject_HEAD sj_tokenizer *t; } TokObject;
typedef struct { PyObject_HEAD sj_bpe_trainer *tr; } TrainerObject;

static PyTypeObject TokType;

static PyObject *tok_wrap(sj_tokenizer *t) {
    TokObject *o = PyObject_New(TokObject, &TokType);
    if (!o) { sj_tokenizer_free(t); return NULL; }
    o->t = t;
    return (PyObject *)o;
}

/* The UTF-8 (str) or raw bytes of a text; borrowed from obj. */
static int text_bytes(PyObject *obj, const char **p, Py_ssize_t *n) {
    if (PyUnicode_Check(obj)) {
        *p = PyUnicode_AsUTF8AndSize(obj, n);
        return *p ? 0 : -1;
    }
    if (PyBytes_Check(obj)) {
        *p = PyBytes_AS_STRING(obj);
        *n = PyBytes_GET_SIZE(obj);
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "expected str or bytes, got %s", Py_TYPE(obj)->tp_name);
    return -1;
}

/* modes: None or bytes of one sj_special_mode per special token. */
static int special_modes(sj_tokenizer *t, PyObject *modes, const uint8_t **out) {
    *out = NULL;
    if (modes == Py_None) return 0;
    if (!PyBytes_Check(modes) || PyBytes_GET_SIZE(modes) != sj_tokenizer_n_special(t)) {
        PyErr_Format(PyExc_ValueError, "special modes: expected bytes of length %d",
                     sj_tokenizer_n_special(t));
        return -1;
    }
    *out = (const uint8_t *)PyBytes_AS_STRING(modes);
    for (int i = 0; i < sj_tokenizer_n_special(t); i++)
        if ((*out)[i] > SJ_SPECIAL_REFUSE) {
            PyErr_SetString(PyExc_ValueError, "special modes: values must be 0, 1 or 2");
            return -1;
        }
    return 0;
}

/* Tokenizer(tokens: list[bytes], special: list[bool], merges: list[(int, int)]) */
static int tok_init(TokObject *self, PyObject *args, PyObject *kw) {
    PyObject *tokens, *special, *merges;
    static char *kwlist[] = {"tokens", "special", "merges", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO", kwlist, &tokens, &special, &merges)) return -1;
    PyObject *tk = PySequence_Fast(tokens, "tokens must be a sequence of bytes");
    PyObject *sp = tk ? PySequence_Fast(special, "special must be a sequence of bools") : NULL;
    PyObject *mg = sp ? PySequence_Fast(merges, "merges must be a sequence of (int, int)") : NULL;
    int64_t *off = NULL;
    uint8_t *flags = NULL, *data = NULL;
    int32_t *mr = NULL;
    int rc = -1;
    if (!mg) goto done;
    Py_ssize_t nv = PySequence_Fast_GET_SIZE(tk), nm = PySequence_Fast_GET_SIZE(mg);
    if (PySequence_Fast_GET_SIZE(sp) != nv) {
        PyErr_SetString(PyExc_ValueError, "tokens and special differ in length");
        goto done;
    }
    if (nv > INT32_MAX / 2 || nm > INT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "vocabulary too large");
        goto done;
    }
    off = PyMem_Malloc(((size_t)nv + 1) * sizeof *off);
    flags = PyMem_Malloc((size_t)nv + 1);
    mr = PyMem_Malloc(((size_t)nm * 2 + 1) * sizeof *mr);
    if (!off || !flags || !mr) { PyErr_NoMemory(); goto done; }
    off[0] = 0;
    for (Py_ssize_t i = 0; i < nv; i++) {
        PyObject *b = PySequence_Fast_GET_ITEM(tk, i);
        if (!PyBytes_Check(b)) {
            PyErr_Format(PyExc_TypeError, "tokens[%zd]: expected bytes, got %s", i, Py_TYPE(b)->tp_name);
            goto done;
        }
        off[i + 1] = off[i] + PyBytes_GET_SIZE(b);
        int f = PyObject_IsTrue(PySequence_Fast_GET_ITEM(sp, i));
        if (f < 0) goto done;
        flags[i] = (uint8_t)f;
    }
    data = PyMem_Malloc((size_t)off[nv] + 1);
    if (!data) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < nv; i++)
        memcpy(data + off[i], PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(tk, i)), (size_t)(off[i + 1] - off[i]));
    for (Py_ssize_t i = 0; i < nm; i++) {
        PyObject *pr = PySequence_Fast_GET_ITEM(mg, i);
        int a, b;
        if (!PyTuple_Check(pr) || !PyArg_ParseTuple(pr, "ii", &a, &b)) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "merges[%zd]: expected a tuple of two ints", i);
            }
            goto done;
        }
        mr[2 * i] = a;
        mr[2 * i + 1] = b;
    }
    sj_tokenizer *t = NULL;
    sj_status s = sj_tokenizer_create((int)nv, data, off, flags, (int)nm, mr, &t);
    if (s) { sj_py_raise(s); goto done; }
    sj_tokenizer_free(self->t);
    self->t = t;
    rc = 0;
done:
    Py_XDECREF(tk); Py_XDECREF(sp); Py_XDECREF(mg);
    PyMem_Free(off); PyMem_Free(flags); PyMem_Free(data); PyMem_Free(mr);
    return rc;
}

static void tok_dealloc(TokObject *self) {
    sj_tokenizer_free(self->t);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define NEED_T(self) do { if (!(self)->t) { \
    PyErr_SetString(PyExc_ValueError, "tokenizer is not initialised"); return NULL; } } while (0)

/* encode(text, modes=None) -> bytearray of int32 ids */
static PyObject *tok_encode(TokObject *self, PyObject *args) {
    PyObject *text, *modes = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &text, &modes)) return NULL;
    NEED_T(self);
    const char *p;
    Py_ssize_t n;
    const uint8_t *md;
    if (text_bytes(text, &p, &n) < 0 || special_modes(self->t, modes, &md) < 0) return NULL;
    PyObject *out = PyByteArray_FromStringAndSize(NULL, (n + 1) * 4);
    if (!out) return NULL;
    size_t k = 0;
    sj_status s;
    Py_INCREF(text);
    SJ_PY_CALL(s, sj_tokenizer_encode(self->t, (const uint8_t *)p, (size_t)n, md,
                                      (int32_t *)PyByteArray_AS_STRING(out), &k));
    Py_DECREF(text);
    if (s) { Py_DECREF(out); return sj_py_raise(s); }
    if (PyByteArray_Resize(out, (Py_ssize_t)k * 4) < 0) { Py_DECREF(out); return NULL; }
    return out;
}

/* encode_batch(texts, modes=None) -> (bytearray int32 ids, bytearray int64 offsets) */
static PyObject *tok_encode_batch(TokObject *self, PyObject *args) {
    PyObject *texts, *modes = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &texts, &modes)) return NULL;
    NEED_T(self);
    const uint8_t *md;
    if (special_modes(self->t, modes, &md) < 0) return NULL;
    PyObject *tup = PySequence_Tuple(texts);   /* a private copy: the list may change while we run */
    if (!tup) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(tup);
    const uint8_t **ptrs = PyMem_Malloc(((size_t)n + 1) * sizeof *ptrs);
    size_t *lens = PyMem_Malloc(((size_t)n + 1) * sizeof *lens);
    PyObject *ids = NULL, *offs = NULL, *res = NULL;
    if (!ptrs || !lens) { PyErr_NoMemory(); goto done; }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *p;
        Py_ssize_t l;
        if (text_bytes(PyTuple_GET_ITEM(tup, i), &p, &l) < 0) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            if (et && PyErr_GivenExceptionMatches(et, PyExc_UnicodeError)) {
                /* Its constructor takes five arguments: keep the error, which names the text. */
                PyErr_Restore(et, ev, tb);
                goto done;
            }
            PyErr_Format(et ? et : PyExc_TypeError, "texts[%zd]: %S", i, ev ? ev : Py_None);
            Py_XDECREF(et); Py_XDECREF(ev); Py_XDECREF(tb);
            goto done;
        }
        ptrs[i] = (const uint8_t *)p;
        lens[i] = (size_t)l;
        total += (size_t)l;
    }
    ids = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(total + 1) * 4);
    offs = PyByteArray_FromStringAndSize(NULL, (n + 1) * 8);
    if (!ids || !offs) goto done;
    sj_status s;
    SJ_PY_CALL(s, sj_tokenizer_encode_batch(self->t, n, ptrs, lens, md,
                                            (int32_t *)PyByteArray_AS_STRING(ids),
                                            (int64_t *)PyByteArray_AS_STRING(offs)));
    if (s) { sj_py_raise(s); goto done; }
    int64_t used = ((int64_t *)PyByteArray_AS_STRING(offs))[n];
    if (PyByteArray_Resize(ids, (Py_ssize_t)used * 4) < 0) goto done;
    res = PyTuple_Pack(2, ids, offs);
done:
    Py_XDECREF(ids); Py_XDECREF(offs);
    Py_DECREF(tup);
    PyMem_Free(ptrs); PyMem_Free(lens);
    return res;
}

/* decode(ids: int32/uint16 buffer) -> bytes */
static PyObject *tok_decode(TokObject *self, PyObject *arg) {
    NEED_T(self);
    Py_buffer v;
    sj_dtype dt;
    if (sj_py_tokens(arg, "ids", 1, &v, &dt) < 0) return NULL;
    size_t n = (size_t)(v.len / v.itemsize);
    int32_t *ids = (int32_t *)v.buf, *tmp = NULL;
    if (dt == SJ_U16) {
        tmp = PyMem_Malloc((n + 1) * sizeof *tmp);
        if (!tmp) { PyBuffer_Release(&v); return PyErr_NoMemory(); }
        for (size_t i = 0; i < n; i++) tmp[i] = ((const uint16_t *)v.buf)[i];
        ids = tmp;
    }
    size_t len;
    PyObject *out = NULL;
    sj_status s = sj_tokenizer_decoded_len(self->t, ids, n, &len);
    if (s) sj_py_raise(s);
    else if ((out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len)) != NULL)
        sj_tokenizer_decode(self->t, ids, n, (uint8_t *)PyBytes_AS_STRING(out));
    PyMem_Free(tmp);
    PyBuffer_Release(&v);
    return out;
}

static PyObject *tok_token(TokObject *self, PyObject *arg) {
    NEED_T(self);
    long id = PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    size_t len;
    int sp;
    const uint8_t *b = id < INT32_MIN || id > INT32_MAX ? NULL : sj_tokenizer_token(self->t, (int)id, &len, &sp);
    if (!b) return PyErr_Format(PyExc_ValueError, "token id %ld is not in 0..%d", id,
                                sj_tokenizer_vocab_size(self->t) - 1);
    return Py_BuildValue("(y#O)", (const char *)b, (Py_ssize_t)len, sp ? Py_True : Py_False);
}

static PyObject *tok_lookup(TokObject *self, PyObject *arg) {
    NEED_T(self);
    if (!PyBytes_Check(arg)) return PyErr_Format(PyExc_TypeError, "expected bytes");
    return PyLong_FromLong(sj_tokenizer_lookup(self->t, (const uint8_t *)PyBytes_AS_STRING(arg),
                                               (size_t)PyBytes_GET_SIZE(arg)));
}

static PyObject *tok_merges(TokObject *self, PyObject *unused) {
    (void)unused;
    NEED_T(self);
    int n = sj_tokenizer_n_merges(self->t);
    PyObject *l = PyList_New(n);
    for (int r = 0; l && r < n; r++) {
        int32_t m[3];
        sj_tokenizer_merge(self->t, r, m);
        PyObject *tp = Py_BuildValue("(iii)", m[0], m[1], m[2]);
        if (!tp) { Py_DECREF(l); return NULL; }
        PyList_SET_ITEM(l, r, tp);
    }
    return l;
}

static PyObject *tok_special_ids(TokObject *self, PyObject *unused) {
    (void)unused;
    NEED_T(self);
    int n = sj_tokenizer_n_special(self->t);
    PyObject *l = PyList_New(n);
    for (int i = 0; l && i < n; i++) PyList_SET_ITEM(l, i, PyLong_FromLong(sj_tokenizer_special_id(self->t, i)));
    return l;
}

static PyObject *tok_vocab_size(TokObject *self, PyObject *unused) {
    (void)unused;
    NEED_T(self);
    return PyLong_FromLong(sj_tokenizer_vocab_size(self->t));
}

static PyObject *tok_save(TokObject *self, PyObject *arg) {
    NEED_T(self);
    PyObject *path;
    if (!PyUnicode_FSConverter(arg, &path)) return NULL;
    sj_status s;
    SJ_PY_CALL(s, sj_tokenizer_save(self->t, PyBytes_AS_STRING(path)));
    Py_DECREF(path);
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static PyObject *py_tokenizer_load(PyObject *mod, PyObject *arg) {
    (void)mod;
    PyObject *path;
    if (!PyUnicode_FSConverter(arg, &path)) return NULL;
    sj_tokenizer *t = NULL;
    sj_status s;
    SJ_PY_CALL(s, sj_tokenizer_load(PyBytes_AS_STRING(path), &t));
    Py_DECREF(path);
    if (s) return sj_py_raise(s);
    return tok_wrap(t);
}

static PyMethodDef tok_methods[] = {
    {"encode", (PyCFunction)tok_encode, METH_VARARGS, "encode(text, modes=None) -> bytearray of int32"},
    {"encode_batch", (PyCFunction)tok_encode_batch, METH_VARARGS,
     "encode_batch(texts, modes=None) -> (bytearray int32 ids, bytearray int64 offsets)"},
    {"decode", (PyCFunction)tok_decode, METH_O, "decode(ids) -> bytes"},
    {"token", (PyCFunction)tok_token, METH_O, "token(id) -> (bytes, is_special)"},
    {"lookup", (PyCFunction)tok_lookup, METH_O, "lookup(bytes) -> id or -1"},
    {"merges", (PyCFunction)tok_merges, METH_NOARGS, "merges() -> [(left, right, result)]"},
    {"special_ids", (PyCFunction)tok_special_ids, METH_NOARGS, "special token ids, in id order"},
    {"vocab_size", (PyCFunction)tok_vocab_size, METH_NOARGS, "number of tokens"},
    {"save", (PyCFunction)tok_save, METH_O, "save(path)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TokType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.Tokenizer",
    .tp_basicsize = sizeof(TokObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tokenizer(tokens, special, merges): the engine's byte-level BPE",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tok_init,
    .tp_dealloc = (destructor)tok_dealloc,
    .tp_methods = tok_methods,
};

/* ---- trainer ----------------------------------------------------------- */

static int trainer_init(TrainerObject *self, PyObject *args, PyObject *kw) {
    PyObject *specials;
    static char *kwlist[] = {"special", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O", kwlist, &specials)) return -1;
    PyObject *sq = PySequence_Fast(specials, "special must be a sequence of bytes");
    if (!sq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sq);
    const uint8_t **p = PyMem_Malloc(((size_t)n + 1) * sizeof *p);
    size_t *l = PyMem_Malloc(((size_t)n + 1) * sizeof *l);
    int rc = -1;
    if (!p || !l) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PySequence_Fast_GET_ITEM(sq, i);
        if (!PyBytes_Check(b)) { PyErr_Format(PyExc_TypeError, "special[%zd]: expected bytes", i); goto done; }
        p[i] = (const uint8_t *)PyBytes_AS_STRING(b);
        l[i] = (size_t)PyBytes_GET_SIZE(b);
    }
    sj_bpe_trainer *tr;
    sj_status s = sj_bpe_trainer_create((int)n, p, l, &tr);
    if (s) { sj_py_raise(s); goto done; }
    sj_bpe_trainer_free(self->tr);
    self->tr = tr;
    rc = 0;
done:
    Py_DECREF(sq);
    PyMem_Free(p); PyMem_Free(l);
    return rc;
}

static void trainer_dealloc(TrainerObject *self) {
    sj_bpe_trainer_free(self->tr);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define NEED_TR(self) do { if (!(self)->tr) { \
    PyErr_SetString(PyExc_ValueError, "trainer is not initialised"); return NULL; } } while (0)

static PyObject *trainer_feed(TrainerObject *self, PyObject *texts) {
    NEED_TR(self);
    PyObject *tup = PySequence_Tuple(texts);
    if (!tup) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(tup);
    const uint8_t **p = PyMem_Malloc(((size_t)n + 1) * sizeof *p);
    size_t *l = PyMem_Malloc(((size_t)n + 1) * sizeof *l);
    PyObject *res = NULL;
    if (!p || !l) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *s;
        Py_ssize_t k;
        if (text_bytes(PyTuple_GET_ITEM(tup, i), &s, &k) < 0) goto done;
        p[i] = (const uint8_t *)s;
        l[i] = (size_t)k;
    }
    sj_status s;
    SJ_PY_CALL(s, sj_bpe_trainer_feed(self->tr, n, p, l));
    if (s) sj_py_raise(s);
    else res = PyLong_FromLongLong(sj_bpe_trainer_n_words(self->tr));
done:
    Py_DECREF(tup);
    PyMem_Free(p); PyMem_Free(l);
    return res;
}

static PyObject *trainer_last_cut(TrainerObject *self, PyObject *buf) {
    NEED_TR(self);
    if (!PyBytes_Check(buf)) {
        PyErr_Format(PyExc_TypeError, "last_cut: expected bytes, got %s", Py_TYPE(buf)->tp_name);
        return NULL;
    }
    return PyLong_FromSize_t(sj_bpe_trainer_last_cut(self->tr, (const uint8_t *)PyBytes_AS_STRING(buf),
                                                     (size_t)PyBytes_GET_SIZE(buf)));
}

static PyObject *trainer_begin(TrainerObject *self, PyObject *args) {
    int vocab;
    long long minf = 0;
    if (!PyArg_ParseTuple(args, "i|L", &vocab, &minf)) return NULL;
    NEED_TR(self);
    int todo = 0;
    sj_status s;
    SJ_PY_CALL(s, sj_bpe_trainer_begin(self->tr, vocab, (int64_t)minf, &todo));
    if (s) return sj_py_raise(s);
    return PyLong_FromLong(todo);
}

static PyObject *trainer_step(TrainerObject *self, PyObject *args) {
    int k;
    if (!PyArg_ParseTuple(args, "i", &k)) return NULL;
    NEED_TR(self);
    int done = 0;
    sj_status s;
    SJ_PY_CALL(s, sj_bpe_trainer_step(self->tr, k, &done));
    if (s) return sj_py_raise(s);
    return PyLong_FromLong(done);
}

static PyObject *trainer_finish(TrainerObject *self, PyObject *unused) {
    (void)unused;
    NEED_TR(self);
    sj_tokenizer *t = NULL;
    sj_status s;
    SJ_PY_CALL(s, sj_bpe_trainer_finish(self->tr, &t));
    if (s) return sj_py_raise(s);
    return tok_wrap(t);
}

static PyMethodDef trainer_methods[] = {
    {"feed", (PyCFunction)trainer_feed, METH_O, "feed(texts) -> distinct pre-tokens so far"},
    {"last_cut", (PyCFunction)trainer_last_cut, METH_O,
     "last_cut(buf) -> where a document may be cut, counting as the whole would (0: nowhere)"},
    {"begin", (PyCFunction)trainer_begin, METH_VARARGS, "begin(vocab_size, min_frequency=0) -> merges to do"},
    {"step", (PyCFunction)trainer_step, METH_VARARGS, "step(k) -> merges done (< k: finished)"},
    {"finish", (PyCFunction)trainer_finish, METH_NOARGS, "finish() -> Tokenizer"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TrainerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.BpeTrainer",
    .tp_basicsize = sizeof(TrainerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BpeTrainer(special): byte-level BPE training",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)trainer_init,
    .tp_dealloc = (destructor)trainer_dealloc,
    .tp_methods = trainer_methods,
};

static PyMethodDef mod_methods[] = {
    {"tokenizer_load", py_tokenizer_load, METH_O, "tokenizer_load(path) -> Tokenizer"},
    {NULL, NULL, 0, NULL},
};

int sj_py_add_tokenizer(PyObject *m) {
    if (PyType_Ready(&TokType) < 0 || PyType_Ready(&TrainerType) < 0) return -1;
    Py_INCREF(&TokType);
    if (PyModule_AddObject(m, "Tokenizer", (PyObject *)&TokType) < 0) { Py_DECREF(&TokType); return -1; }
    Py_INCREF(&TrainerType);
    if (PyModule_AddObject(m, "BpeTrainer", (PyObject *)&TrainerType) < 0) { Py_DECREF(&TrainerType); return -1; }
    return PyModule_AddFunctions(m, mod_methods);
}
