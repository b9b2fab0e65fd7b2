/* infer.c — Python face of the inference engine, of tensor names and of
 * GGUF files: _C.Infer (one handle for the CPU and the GPU: prefill /
 * decode / greedy / sample on a KV cache), _C.Sampler, _C.tensor_names,
 * _C.gguf_open (a read-only mapping whose tensors NumPy views without a
 * copy), _C.gguf_save, and GGML block (de)quantisation. The GIL is released
 * around every engine call that computes. */
#include "py.h"
#include "../infer/engine.h"
#include <string.h>

static int parse_mode(const char *s, sj_infer_mode *m) {
    if (!strcmp(s, "fp32") || !strcmp(s, "f32") || !strcmp(s, "float32")) *m = SJ_INFER_FP32;
    else if (!strcmp(s, "bf16")) *m = SJ_INFER_BF16;
    else if (!strcmp(s, "q8") || !strcmp(s, "q8_0")) *m = SJ_INFER_Q8;
    else if (!strcmp(s, "q4") || !strcmp(s, "q4_0")) *m = SJ_INFER_Q4;
    else { PyErr_Format(PyExc_ValueError, "mode must be fp32, bf16, q8 or q4, got '%s'", s); return -1; }
    return 0;
}
static const char *mode_name(sj_infer_mode m) {
    static const char *n[] = { "fp32", "bf16", "q8", "q4" };
    return n[m];
}

/* ---- Sampler ---------------------------------------------------------------- */

typedef struct { PyObject_HEAD sj_sampler *s; } SamplerObject;

static int sampler_init(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"vocab_size", "seed", NULL};
    int V; unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|K", kwlist, &V, &seed)) return -1;
    sj_sampler_free(((SamplerObject *)self)->s);
    ((SamplerObject *)self)->s = NULL;
    sj_status st = sj_sampler_create(V, seed, &((SamplerObject *)self)->s);
    if (st) { sj_py_raise(st); return -1; }
    return 0;
}
static void sampler_dealloc(PyObject *self) {
    sj_sampler_free(((SamplerObject *)self)->s);
    Py_TYPE(self)->tp_free(self);
}
static PyTypeObject SamplerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.Sampler",
    .tp_basicsize = sizeof(SamplerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sampler(vocab_size, seed): seeded token sampling state.",
    .tp_new = PyType_GenericNew,
    .tp_init = sampler_init,
    .tp_dealloc = sampler_dealloc,
};

/* history: None or a C-contiguous int32 buffer */
static int get_history(PyObject *o, Py_buffer *v, const int32_t **p, int *n) {
    *p = NULL; *n = 0;
    if (o == Py_None) return 0;
    sj_dtype dt;
    if (sj_py_tokens(o, "history", 1, v, &dt) < 0) return -1;
    if (dt != SJ_I32) { PyBuffer_Release(v); PyErr_SetString(PyExc_TypeError, "history must be int32"); return -1; }
    *p = v->buf; *n = (int)(v->len / 4);
    return 1;
}

/* sample(logits, temperature, top_k, top_p, repetition_penalty, history) -> id */
static PyObject *sampler_sample(PyObject *self, PyObject *args) {
    PyObject *lo, *hist;
    sj_sample_params p;
    if (!PyArg_ParseTuple(args, "OfiffO", &lo, &p.temperature, &p.top_k, &p.top_p, &p.repetition_penalty, &hist)) return NULL;
    sj_sampler *s = ((SamplerObject *)self)->s;
    if (!s) { PyErr_SetString(PyExc_RuntimeError, "sampler not initialised"); return NULL; }
    Py_buffer lv, hv;
    if (PyObject_GetBuffer(lo, &lv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (!lv.format || strcmp(lv.format, "f") || lv.len != (Py_ssize_t)4 * sj_sampler_vocab(s)) {
        PyBuffer_Release(&lv);
        PyErr_SetString(PyExc_ValueError, "logits must be a float32 array of vocab_size values");
        return NULL;
    }
    const int32_t *h; int n;
    int hr = get_history(hist, &hv, &h, &n);
    if (hr < 0) { PyBuffer_Release(&lv); return NULL; }
    int32_t tok = 0;
    sj_status st;
    Py_BEGIN_ALLOW_THREADS st = sj_sample(s, lv.buf, &p, h, n, &tok);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&lv);
    if (hr) PyBuffer_Release(&hv);
    if (st) return sj_py_raise(st);
    return PyLong_FromLong(tok);
}

/* probs(logits, out, temperature, top_k, top_p, repetition_penalty, history):
 * out (vocab,) float32 gets the distribution sample() would draw from */
static PyObject *sampler_probs(PyObject *self, PyObject *args) {
    PyObject *lo, *out, *hist;
    sj_sample_params p;
    if (!PyArg_ParseTuple(args, "OOfiffO", &lo, &out, &p.temperature, &p.top_k, &p.top_p,
                          &p.repetition_penalty, &hist)) return NULL;
    sj_sampler *s = ((SamplerObject *)self)->s;
    if (!s) { PyErr_SetString(PyExc_RuntimeError, "sampler not initialised"); return NULL; }
    Py_buffer lv, ov, hv;
    if (PyObject_GetBuffer(lo, &lv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (!lv.format || strcmp(lv.format, "f") || lv.len != (Py_ssize_t)4 * sj_sampler_vocab(s)) {
        PyBuffer_Release(&lv);
        PyErr_SetString(PyExc_ValueError, "logits must be a float32 array of vocab_size values");
        return NULL;
    }
    if (sj_py_out4(out, &ov, "f", sj_sampler_vocab(s), "out must be a writable float32 array of vocab_size values") < 0) {
        PyBuffer_Release(&lv);
        return NULL;
    }
    const int32_t *h; int n;
    int hr = get_history(hist, &hv, &h, &n);
    sj_status st = SJ_OK;
    if (hr >= 0) {
        Py_BEGIN_ALLOW_THREADS st = sj_sample_probs(s, lv.buf, &p, h, n, ov.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&lv);
    PyBuffer_Release(&ov);
    if (hr < 0) return NULL;
    if (hr) PyBuffer_Release(&hv);
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *sampler_uniform(PyObject *self, PyObject *noargs) {
    sj_sampler *s = ((SamplerObject *)self)->s;
    if (!s) { PyErr_SetString(PyExc_RuntimeError, "sampler not initialised"); return NULL; }
    return PyFloat_FromDouble(sj_sampler_uniform(s));
}

/* ---- Infer ------------------------------------------------------------------- */

typedef struct { PyObject_HEAD sj_infer *h; } InferObject;
static PyTypeObject InferType;
#define H(self) (((InferObject *)(self))->h)

static PyObject *wrap_infer(sj_infer *h) {
    InferObject *o = PyObject_New(InferObject, &InferType);
    if (!o) { sj_infer_free(h); return NULL; }
    o->h = h;
    return (PyObject *)o;
}
static void infer_dealloc(PyObject *self) {
    sj_infer_free(H(self));
    PyObject_Free(self);
}

static int parse_device(const char *s, sj_device *d) {
    if (!strcmp(s, "cpu")) *d = SJ_DEVICE_CPU;
    else if (!strcmp(s, "cuda")) *d = SJ_DEVICE_CUDA;
    else { PyErr_Format(PyExc_ValueError, "device must be 'cpu' or 'cuda', got '%s'", s); return -1; }
    return 0;
}

/* infer_load_gguf(path, device, mode, max_ctx=0) */
static PyObject *py_infer_load_gguf(PyObject *self, PyObject *args) {
    PyObject *pathb; const char *dev_s, *mode_s; int max_ctx = 0;
    if (!PyArg_ParseTuple(args, "O&ss|i", PyUnicode_FSConverter, &pathb, &dev_s, &mode_s, &max_ctx)) return NULL;
    sj_device dev;
    sj_infer_mode mode;
    if (parse_device(dev_s, &dev) < 0 || parse_mode(mode_s, &mode) < 0) { Py_DECREF(pathb); return NULL; }
    sj_infer *h = NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_infer_load_gguf(PyBytes_AS_STRING(pathb), dev, mode, max_ctx, &h));
    Py_DECREF(pathb);
    if (st) return sj_py_raise(st);
    return wrap_infer(h);
}

/* infer_from_model(model_handle, device, mode, max_ctx=0) */
static PyObject *py_infer_from_model(PyObject *self, PyObject *args) {
    PyObject *mo; const char *dev_s, *mode_s; int max_ctx = 0;
    if (!PyArg_ParseTuple(args, "Oss|i", &mo, &dev_s, &mode_s, &max_ctx)) return NULL;
    sj_model *m = sj_py_model_ptr(mo);
    if (!m) return NULL;
    sj_device dev;
    sj_infer_mode mode;
    if (parse_device(dev_s, &dev) < 0 || parse_mode(mode_s, &mode) < 0) return NULL;
    sj_infer *h = NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_infer_from_model(m, dev, mode, max_ctx, &h));
    if (st) return sj_py_raise(st);
    return wrap_infer(h);
}

/* prefill(tokens int32 (n,), out=None (n, vocab) float32 writable) */
static PyObject *infer_prefill(PyObject *self, PyObject *args) {
    PyObject *to, *out = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &to, &out)) return NULL;
    sj_infer *h = H(self);
    Py_buffer tv, ov;
    sj_dtype dt;
    if (sj_py_tokens(to, "tokens", 1, &tv, &dt) < 0) return NULL;
    if (dt != SJ_I32) { PyBuffer_Release(&tv); PyErr_SetString(PyExc_TypeError, "tokens must be int32"); return NULL; }
    int n = (int)(tv.len / 4);
    float *all = NULL;
    if (out != Py_None) {
        if (sj_py_out4(out, &ov, "f", (Py_ssize_t)n * sj_infer_config(h)->vocab_size,
                       "out must be a writable float32 array of (n, vocab_size)") < 0) {
            PyBuffer_Release(&tv);
            return NULL;
        }
        all = ov.buf;
    }
    sj_status st;
    SJ_PY_CALL(st, sj_infer_prefill(h, tv.buf, n, all));
    PyBuffer_Release(&tv);
    if (all) PyBuffer_Release(&ov);
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

/* decode(token, greedy=False) -> None, or with greedy the next token (chosen
 * where the model runs: no logits leave a GPU) */
static PyObject *infer_decode(PyObject *self, PyObject *args) {
    int tok, greedy = 0;
    if (!PyArg_ParseTuple(args, "i|p", &tok, &greedy)) return NULL;
    int32_t next = 0;
    sj_status st;
    SJ_PY_CALL(st, sj_infer_decode(H(self), tok, greedy ? &next : NULL));
    if (st) return sj_py_raise(st);
    if (greedy) return PyLong_FromLong(next);
    Py_RETURN_NONE;
}

/* greedy(token, out int32 (n,)): n greedy steps (on a GPU chained on the device) */
static PyObject *infer_greedy(PyObject *self, PyObject *args) {
    int tok; PyObject *out;
    if (!PyArg_ParseTuple(args, "iO", &tok, &out)) return NULL;
    Py_buffer ov;
    if (PyObject_GetBuffer(out, &ov, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) return NULL;
    const char *f = ov.format ? ov.format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if ((strcmp(f, "i") && strcmp(f, "l")) || ov.itemsize != 4 || ov.len < 4) {
        PyBuffer_Release(&ov);
        PyErr_SetString(PyExc_ValueError, "out must be a writable, non-empty int32 array");
        return NULL;
    }
    sj_status st;
    SJ_PY_CALL(st, sj_infer_greedy(H(self), tok, (int)(ov.len / 4), ov.buf));
    PyBuffer_Release(&ov);
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

/* logits(out): the last position's logits into a float32 (vocab,) buffer */
static PyObject *infer_logits(PyObject *self, PyObject *args) {
    PyObject *out;
    if (!PyArg_ParseTuple(args, "O", &out)) return NULL;
    Py_buffer ov;
    if (sj_py_out4(out, &ov, "f", sj_infer_config(H(self))->vocab_size,
                   "out must be a writable float32 array of vocab_size values") < 0) return NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_infer_logits(H(self), ov.buf));
    PyBuffer_Release(&ov);
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

/* sample(sampler, temperature, top_k, top_p, repetition_penalty, history) on the last logits */
static PyObject *infer_sample(PyObject *self, PyObject *args) {
    PyObject *so, *hist;
    sj_sample_params p;
    if (!PyArg_ParseTuple(args, "O!fiffO", &SamplerType, &so, &p.temperature, &p.top_k, &p.top_p,
                          &p.repetition_penalty, &hist)) return NULL;
    sj_sampler *s = ((SamplerObject *)so)->s;
    if (!s) { PyErr_SetString(PyExc_RuntimeError, "sampler not initialised"); return NULL; }
    Py_buffer hv; const int32_t *hp; int n;
    int hr = get_history(hist, &hv, &hp, &n);
    if (hr < 0) return NULL;
    int32_t tok = 0;
    sj_status st;
    Py_BEGIN_ALLOW_THREADS st = sj_infer_sample(H(self), s, &p, hp, n, &tok);
    Py_END_ALLOW_THREADS
    if (hr) PyBuffer_Release(&hv);
    if (st) return sj_py_raise(st);
    return PyLong_FromLong(tok);
}

static PyObject *infer_reset(PyObject *self, PyObject *noargs) {
    sj_infer_reset(H(self));
    Py_RETURN_NONE;
}

static PyObject *infer_rewind(PyObject *self, PyObject *args) {
    int pos;
    if (!PyArg_ParseTuple(args, "i", &pos)) return NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_infer_rewind(H(self), pos));
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *infer_pos(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(sj_infer_pos(H(self)));
}

static PyObject *infer_info(PyObject *self, PyObject *noargs) {
    sj_infer *h = H(self);
    const sj_config *c = sj_infer_config(h);
    const int cuda = sj_infer_device(h) == SJ_DEVICE_CUDA;
    /* on a GPU the K/V cache is kept in the weights' mode */
    const char *kv = cuda ? mode_name(sj_infer_get_mode(h)) : sj_infer_kv_f16(h) ? "f16" : "f32";
    PyObject *d = sj_py_config_to_dict(c), *more = d ? Py_BuildValue(
        "{s:i,s:i,s:s,s:L,s:L,s:s,s:s,s:s}", "max_ctx", sj_infer_max_ctx(h), "pos", sj_infer_pos(h),
        "mode", mode_name(sj_infer_get_mode(h)), "weight_bytes", (long long)sj_infer_weight_bytes(h),
        "cache_bytes", (long long)sj_infer_cache_bytes(h), "isa", cuda ? "cuda" : sj_infer_isa(),
        "kv_dtype", kv, "device", cuda ? "cuda" : "cpu") : NULL;
    PyObject *counts = more ? Py_BuildValue("{s:L,s:L}", "params", (long long)sj_config_param_count(c),
                                            "active_params", (long long)sj_config_active_param_count(c))
                            : NULL;
    if (!counts || PyDict_Update(more, counts) < 0) Py_CLEAR(more);
    Py_XDECREF(counts);
    if (!more || PyDict_Update(d, more) < 0) Py_CLEAR(d);
    Py_XDECREF(more);
    int graphs, persistent;
    if (d && sj_infer_get_options(h, &graphs, &persistent) == SJ_OK &&
        (PyDict_SetItemString(d, "graphs", graphs ? Py_True : Py_False) < 0 ||
         PyDict_SetItemString(d, "persistent", persistent ? Py_True : Py_False) < 0))
        Py_CLEAR(d);
    return d;
}

static PyObject *infer_set_kv_f16(PyObject *self, PyObject *args) {
    int f16;
    if (!PyArg_ParseTuple(args, "p", &f16)) return NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_infer_set_kv_f16(H(self), f16));
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

/* set_options(graphs, persistent) */
static PyObject *infer_set_options(PyObject *self, PyObject *args) {
    int graphs, persistent;
    if (!PyArg_ParseTuple(args, "pp", &graphs, &persistent)) return NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_infer_set_options(H(self), graphs, persistent));
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

/* weight_gguf(name, type) -> (bytes, type, shape): our tensor `name` as the
 * GGUF file stores it: a matrix in `type`, a norm vector in F32 (what
 * llama.cpp reads), rows in GGUF order (names.c: rope_rows). CPU only. */
static PyObject *infer_weight_gguf(PyObject *self, PyObject *args) {
    const char *name; int type;
    if (!PyArg_ParseTuple(args, "si", &name, &type)) return NULL;
    const sj_infer_cpu *e = sj_infer_cpu_of(H(self));
    if (!e) {
        PyErr_SetString(PyExc_ValueError, "weights of a model on cuda are not readable: load it on the CPU to export it");
        return NULL;
    }
    int layer;
    const sj_tensor_name *row = sj_tensor_name_find(name, SJ_NAMES_OURS, &layer);
    const sj_config *c = sj_infer_config(H(self));
    const int hd = row && row->rope_rows ? c->dim / c->n_heads : 0;
    const sj_qmat *W = sj_infer_cpu_matrix(e, name);
    const float *vec = W ? NULL : sj_infer_cpu_vector(e, name);
    if (!W && !vec) { PyErr_Format(PyExc_KeyError, "no tensor '%s'", name); return NULL; }
    if (vec) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)c->dim * 4);
        if (!b) return NULL;
        float *o = (float *)PyBytes_AS_STRING(b);
        for (int i = 0; i < c->dim; i++) o[i] = vec[hd ? sj_gguf_rope_row(i, hd) : i];
        return Py_BuildValue("(Ni(i))", b, SJ_GGUF_F32, c->dim);
    }
    int be, bb;
    if (!sj_gguf_type_block(type, &be, &bb) || W->cols % be) { PyErr_Format(PyExc_ValueError, "cannot write type %d", type); return NULL; }
    int64_t rb = (int64_t)W->cols / be * bb;
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(rb * W->rows));
    if (!b) return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b);
    Py_BEGIN_ALLOW_THREADS
    for (int r = 0; r < W->rows; r++) sj_qmat_row_to_gguf(W, hd ? sj_gguf_rope_row(r, hd) : r, type, o + rb * r);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(Ni(ii))", b, type, W->cols, W->rows);
}

static PyMethodDef infer_methods[] = {
    {"set_kv_f16", infer_set_kv_f16, METH_VARARGS, "set_kv_f16(on): K/V cache as f16 (True) or f32; only with an empty cache (CPU)"},
    {"set_options", infer_set_options, METH_VARARGS, "set_options(graphs, persistent): GPU execution choices"},
    {"prefill", infer_prefill, METH_VARARGS, "prefill(tokens, out=None): append tokens (int32) to the cache; out (n, vocab) gets every position's logits"},
    {"decode", infer_decode, METH_VARARGS, "decode(token, greedy=False): one token through the model; with greedy, the next token"},
    {"greedy", infer_greedy, METH_VARARGS, "greedy(token, out): len(out) greedy steps (chained on the device on a GPU)"},
    {"logits", infer_logits, METH_VARARGS, "logits(out): copy the last logits into out (vocab,) float32"},
    {"sample", infer_sample, METH_VARARGS, "sample(sampler, temperature, top_k, top_p, repetition_penalty, history) -> id"},
    {"reset", infer_reset, METH_NOARGS, "forget the KV cache"},
    {"info", infer_info, METH_NOARGS, "config, device, mode, memory, position (and GPU options) as a dict"},
    {"pos", infer_pos, METH_NOARGS, "tokens in the KV cache"},
    {"rewind", infer_rewind, METH_VARARGS, "rewind(pos): move the position back to pos, forgetting later tokens"},
    {"weight_gguf", infer_weight_gguf, METH_VARARGS, "weight_gguf(name, type) -> (bytes, type, GGUF shape)"},
    {NULL, NULL, 0, NULL},
};
static PyTypeObject InferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.Infer",
    .tp_basicsize = sizeof(InferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Inference engine handle, CPU or GPU (use smedjan.infer).",
    .tp_dealloc = infer_dealloc,
    .tp_methods = infer_methods,
};

/* ---- tensor names ---------------------------------------------------------------- */

static int parse_names(const char *s, sj_names *n) {
    if (!strcmp(s, "ours")) *n = SJ_NAMES_OURS;
    else if (!strcmp(s, "hf")) *n = SJ_NAMES_HF;
    else if (!strcmp(s, "gguf")) *n = SJ_NAMES_GGUF;
    else { PyErr_Format(PyExc_ValueError, "spelling must be 'ours', 'hf' or 'gguf', got '%s'", s); return -1; }
    return 0;
}

/* tensor_names() -> ((ours, hf, gguf, per_layer, rope_rows), ...) */
static PyObject *py_tensor_names(PyObject *self, PyObject *noargs) {
    const sj_tensor_name *rows;
    int n = sj_tensor_names(&rows);
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t && i < n; i++) {
        const sj_tensor_name *r = &rows[i];
        PyObject *row = Py_BuildValue("(sssOO)", r->name[SJ_NAMES_OURS], r->name[SJ_NAMES_HF], r->name[SJ_NAMES_GGUF],
                                      r->per_layer ? Py_True : Py_False, r->rope_rows ? Py_True : Py_False);
        if (!row) { Py_CLEAR(t); break; }
        PyTuple_SET_ITEM(t, i, row);
    }
    return t;
}

/* tensor_name(name, from, to) -> the name in another spelling; KeyError if none */
static PyObject *py_tensor_name(PyObject *self, PyObject *args) {
    const char *name, *from_s, *to_s;
    if (!PyArg_ParseTuple(args, "sss", &name, &from_s, &to_s)) return NULL;
    sj_names from, to;
    if (parse_names(from_s, &from) < 0 || parse_names(to_s, &to) < 0) return NULL;
    char out[256];
    if (sj_tensor_name_map(name, from, to, out, sizeof out)) {
        PyErr_SetString(PyExc_KeyError, sj_last_error());
        return NULL;
    }
    return PyUnicode_FromString(out);
}

static PyMethodDef sampler_methods[] = {
    {"sample", sampler_sample, METH_VARARGS, "sample(logits, temperature, top_k, top_p, repetition_penalty, history) -> id"},
    {"probs", sampler_probs, METH_VARARGS, "probs(logits, out, temperature, top_k, top_p, repetition_penalty, history): the distribution sample() draws from"},
    {"uniform", sampler_uniform, METH_NOARGS, "the next uniform number in [0, 1) of the sampler's RNG"},
    {NULL, NULL, 0, NULL},
};

/* ---- GGUF ----------------------------------------------------------------------- */

typedef struct { PyObject_HEAD sj_gguf_file *f; const void *base; uint64_t size; } GgufObject;

static int gguf_getbuffer(PyObject *self, Py_buffer *view, int flags) {
    GgufObject *g = (GgufObject *)self;
    return PyBuffer_FillInfo(view, self, (void *)g->base, (Py_ssize_t)g->size, 1, flags);
}
static void gguf_dealloc(PyObject *self) {
    sj_gguf_close(((GgufObject *)self)->f);
    PyObject_Free(self);
}
static PyBufferProcs gguf_procs = { gguf_getbuffer, NULL };
static PyTypeObject GgufType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.GGUFFile",
    .tp_basicsize = sizeof(GgufObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mapped GGUF file (read-only); owner of tensor views.",
    .tp_dealloc = gguf_dealloc,
    .tp_as_buffer = &gguf_procs,
};

static PyObject *scalar_value(int type, const uint8_t *p) {
    switch (type) {
    case SJ_GGUF_UINT8: return PyLong_FromLong(p[0]);
    case SJ_GGUF_INT8: return PyLong_FromLong((int8_t)p[0]);
    case SJ_GGUF_BOOL: return PyBool_FromLong(p[0] != 0);
    case SJ_GGUF_UINT16: { uint16_t v; memcpy(&v, p, 2); return PyLong_FromLong(v); }
    case SJ_GGUF_INT16: { int16_t v; memcpy(&v, p, 2); return PyLong_FromLong(v); }
    case SJ_GGUF_UINT32: { uint32_t v; memcpy(&v, p, 4); return PyLong_FromUnsignedLong(v); }
    case SJ_GGUF_INT32: { int32_t v; memcpy(&v, p, 4); return PyLong_FromLong(v); }
    case SJ_GGUF_FLOAT32: { float v; memcpy(&v, p, 4); return PyFloat_FromDouble(v); }
    case SJ_GGUF_UINT64: { uint64_t v; memcpy(&v, p, 8); return PyLong_FromUnsignedLongLong(v); }
    case SJ_GGUF_INT64: { int64_t v; memcpy(&v, p, 8); return PyLong_FromLongLong(v); }
    case SJ_GGUF_FLOAT64: { double v; memcpy(&v, p, 8); return PyFloat_FromDouble(v); }
    }
    PyErr_SetString(PyExc_ValueError, "bad GGUF value type");
    return NULL;
}
static size_t scalar_size(int t) {
    switch (t) { case 0: case 1: case 7: return 1; case 2: case 3: return 2; case 4: case 5: case 6: return 4; default: return 8; }
}

/* Strings come back as str when valid UTF-8, else bytes. */
static PyObject *str_value(const char *p, uint64_t n) {
    PyObject *s = PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, NULL);
    if (!s) { PyErr_Clear(); s = PyBytes_FromStringAndSize(p, (Py_ssize_t)n); }
    return s;
}

/* gguf_open(path) -> (owner, version, {key: value}, {key: type}, [(name, type, shape, offset, nbytes)]) */
static PyObject *py_gguf_open(PyObject *self, PyObject *args) {
    PyObject *pathb;
    if (!PyArg_ParseTuple(args, "O&", PyUnicode_FSConverter, &pathb)) return NULL;
    sj_gguf_file *f = NULL;
    sj_status st;
    Py_BEGIN_ALLOW_THREADS st = sj_gguf_open(PyBytes_AS_STRING(pathb), &f);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (st) return sj_py_raise(st);
    GgufObject *g = PyObject_New(GgufObject, &GgufType);
    if (!g) { sj_gguf_close(f); return NULL; }
    g->f = f;
    g->base = NULL; g->size = 0;
    /* the whole mapping: from the first tensor's data pointer back to the start is not known
     * here, so expose [0, data end) through the tensors' absolute offsets */
    PyObject *kvd = PyDict_New(), *kvt = PyDict_New(), *tl = PyList_New(0), *res = NULL;
    if (!kvd || !kvt || !tl) goto done;
    for (int i = 0; i < sj_gguf_n_kv(f); i++) {
        const sj_gguf_kv *kv = sj_gguf_kv_at(f, i);
        PyObject *v = NULL, *ty = NULL;
        if (kv->type == SJ_GGUF_STRING) v = str_value(kv->data, kv->n);
        else if (kv->type == SJ_GGUF_ARRAY) {
            v = PyList_New((Py_ssize_t)kv->n);
            for (uint64_t j = 0; v && j < kv->n; j++) {
                PyObject *e = kv->arr_type == SJ_GGUF_STRING ? str_value(kv->strs[j], kv->str_lens[j])
                            : scalar_value(kv->arr_type, (const uint8_t *)kv->data + j * scalar_size(kv->arr_type));
                if (!e) { Py_CLEAR(v); break; }
                PyList_SET_ITEM(v, (Py_ssize_t)j, e);
            }
            ty = Py_BuildValue("(ii)", kv->type, kv->arr_type);
        } else v = scalar_value(kv->type, kv->data);
        if (!ty) ty = Py_BuildValue("(ii)", kv->type, -1);
        if (!v || !ty || PyDict_SetItemString(kvd, kv->key, v) < 0 || PyDict_SetItemString(kvt, kv->key, ty) < 0) {
            Py_XDECREF(v); Py_XDECREF(ty); goto done;
        }
        Py_DECREF(v); Py_DECREF(ty);
    }
    const uint8_t *base = NULL;
    uint64_t end = 0;
    for (int i = 0; i < sj_gguf_n_tensors(f); i++) {
        const sj_gguf_tensor *t = sj_gguf_tensor_at(f, i);
        const uint8_t *start = (const uint8_t *)t->data - t->offset;   /* data section start */
        base = start;
        if (t->offset + t->nbytes > end) end = t->offset + t->nbytes;
        PyObject *shape = PyTuple_New(t->ndim);
        for (int d = 0; shape && d < t->ndim; d++) PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(t->shape[d]));
        PyObject *row = shape ? Py_BuildValue("(siNKK)", t->name, t->type, shape, (unsigned long long)t->offset,
                                              (unsigned long long)t->nbytes) : NULL;
        if (!row || PyList_Append(tl, row) < 0) { Py_XDECREF(row); goto done; }
        Py_DECREF(row);
    }
    g->base = base; g->size = end;   /* buffer = the data section */
    res = Py_BuildValue("(OiOOO)", (PyObject *)g, sj_gguf_version(f), kvd, kvt, tl);
done:
    Py_DECREF(g); Py_XDECREF(kvd); Py_XDECREF(kvt); Py_XDECREF(tl);
    return res;
}

/* gguf_save(path, [(key, type, arr_type, value)], [(name, type, shape (ggml order), data buffer)]) */
static PyObject *py_gguf_save(PyObject *self, PyObject *args) {
    PyObject *pathb, *kvl, *tl;
    if (!PyArg_ParseTuple(args, "O&O!O!", PyUnicode_FSConverter, &pathb, &PyList_Type, &kvl, &PyList_Type, &tl)) return NULL;
    Py_ssize_t nkv = PyList_GET_SIZE(kvl), nt = PyList_GET_SIZE(tl);
    sj_gguf_kv *kv = PyMem_Calloc((size_t)nkv + 1, sizeof *kv);
    sj_gguf_tensor *t = PyMem_Calloc((size_t)nt + 1, sizeof *t);
    Py_buffer *views = PyMem_Calloc((size_t)nt + 1, sizeof *views);
    PyObject *keep = PyList_New(0), *res = NULL;
    Py_ssize_t nviews = 0;
    if (!kv || !t || !views || !keep) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < nkv; i++) {
        PyObject *it = PyList_GET_ITEM(kvl, i), *val;
        const char *key; int type, at;
        if (!PyArg_ParseTuple(it, "siiO", &key, &type, &at, &val)) goto done;
        kv[i].key = key; kv[i].type = type; kv[i].arr_type = at;
        /* values arrive pre-encoded: bytes for scalars/numeric arrays/strings; a list of bytes for string arrays */
        if (type == SJ_GGUF_ARRAY && at == SJ_GGUF_STRING) {
            if (!PyList_Check(val)) { PyErr_SetString(PyExc_TypeError, "string array must be a list of bytes"); goto done; }
            Py_ssize_t n = PyList_GET_SIZE(val);
            const char **strs = PyMem_Calloc((size_t)n + 1, sizeof(char *));
            uint64_t *lens = PyMem_Calloc((size_t)n + 1, sizeof(uint64_t));
            PyObject *cap = PyList_New(0);
            if (!strs || !lens || !cap) { PyErr_NoMemory(); goto done; }
            for (Py_ssize_t j = 0; j < n; j++) {
                PyObject *b = PyList_GET_ITEM(val, j);
                if (!PyBytes_Check(b)) { PyErr_SetString(PyExc_TypeError, "string array elements must be bytes"); goto done; }
                strs[j] = PyBytes_AS_STRING(b); lens[j] = (uint64_t)PyBytes_GET_SIZE(b);
            }
            kv[i].strs = strs; kv[i].str_lens = lens; kv[i].n = (uint64_t)n;
            Py_DECREF(cap);
        } else {
            if (!PyBytes_Check(val)) { PyErr_SetString(PyExc_TypeError, "value must be bytes"); goto done; }
            kv[i].data = PyBytes_AS_STRING(val);
            Py_ssize_t nb = PyBytes_GET_SIZE(val);
            if (type == SJ_GGUF_STRING) kv[i].n = (uint64_t)nb;
            else if (type == SJ_GGUF_ARRAY) kv[i].n = (uint64_t)(nb / (Py_ssize_t)scalar_size(at));
            else kv[i].n = 1;
        }
    }
    for (Py_ssize_t i = 0; i < nt; i++) {
        PyObject *it = PyList_GET_ITEM(tl, i), *shape, *data;
        const char *name; int type;
        if (!PyArg_ParseTuple(it, "siO!O", &name, &type, &PyTuple_Type, &shape, &data)) goto done;
        t[i].name = name; t[i].type = type; t[i].ndim = (int)PyTuple_GET_SIZE(shape);
        if (t[i].ndim < 1 || t[i].ndim > 4) { PyErr_SetString(PyExc_ValueError, "1 to 4 dimensions"); goto done; }
        for (int d = 0; d < t[i].ndim; d++) t[i].shape[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
        if (PyErr_Occurred()) goto done;
        if (PyObject_GetBuffer(data, &views[i], PyBUF_C_CONTIGUOUS) < 0) goto done;
        nviews = i + 1;
        t[i].data = views[i].buf; t[i].nbytes = (uint64_t)views[i].len;
    }
    sj_status st;
    SJ_PY_CALL(st, sj_gguf_save(PyBytes_AS_STRING(pathb), kv, (int)nkv, t, (int)nt));
    if (st) { sj_py_raise(st); goto done; }
    res = Py_None; Py_INCREF(res);
done:
    for (Py_ssize_t i = 0; i < nviews; i++) PyBuffer_Release(&views[i]);
    if (kv) for (Py_ssize_t i = 0; i < nkv; i++) { PyMem_Free((void *)kv[i].strs); PyMem_Free((void *)kv[i].str_lens); }
    PyMem_Free(kv); PyMem_Free(t); PyMem_Free(views);
    Py_XDECREF(keep);
    Py_DECREF(pathb);
    return res;
}

/* gguf_quantize(type, f32 buffer) -> bytes; gguf_dequantize(type, buffer, n) -> f32 bytes */
static PyObject *py_gguf_quantize(PyObject *self, PyObject *args) {
    int type; Py_buffer v;
    if (!PyArg_ParseTuple(args, "iy*", &type, &v)) return NULL;
    int64_t n = v.len / 4;
    int be, bb;
    if (!sj_gguf_type_block(type, &be, &bb) || n % be) { PyBuffer_Release(&v); PyErr_Format(PyExc_ValueError, "cannot quantize %lld values to type %d", (long long)n, type); return NULL; }
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n / be * bb));
    if (!b) { PyBuffer_Release(&v); return NULL; }
    sj_status st;
    Py_BEGIN_ALLOW_THREADS st = sj_gguf_quantize(type, v.buf, n, PyBytes_AS_STRING(b));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (st) { Py_DECREF(b); return sj_py_raise(st); }
    return b;
}
static PyObject *py_gguf_dequantize(PyObject *self, PyObject *args) {
    int type; Py_buffer v; long long n;
    if (!PyArg_ParseTuple(args, "iy*L", &type, &v, &n)) return NULL;
    int be, bb;
    if (n < 0 || !sj_gguf_type_block(type, &be, &bb) || n % be || v.len < n / be * bb) {
        PyBuffer_Release(&v); PyErr_SetString(PyExc_ValueError, "dequantize: bad type or size"); return NULL;
    }
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 4));
    if (!b) { PyBuffer_Release(&v); return NULL; }
    sj_status st;
    Py_BEGIN_ALLOW_THREADS st = sj_gguf_dequantize(type, v.buf, n, (float *)PyBytes_AS_STRING(b));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (st) { Py_DECREF(b); return sj_py_raise(st); }
    return b;
}

static PyObject *py_kernel_check(PyObject *self, PyObject *args) {
    unsigned long long seed = 0;
    const char *which = NULL;
    if (!PyArg_ParseTuple(args, "|Kz", &seed, &which)) return NULL;
    double err = 0;
    sj_status st;
    SJ_PY_CALL(st, SJ_ISA_PICK(sj_infer_kernel_check)(seed, which, &err));
    if (st) return sj_py_raise(st);
    return Py_BuildValue("(ds)", err, sj_infer_isa());
}

static PyMethodDef funcs[] = {
    {"infer_kernel_check", py_kernel_check, METH_VARARGS, "infer_kernel_check(seed, isa=None) -> (max relative error vs the scalar kernels of isa, or of every ISA this CPU runs; active isa)"},
    {"infer_load_gguf", py_infer_load_gguf, METH_VARARGS, "infer_load_gguf(path, device, mode, max_ctx=0) -> Infer"},
    {"infer_from_model", py_infer_from_model, METH_VARARGS, "infer_from_model(model_handle, device, mode, max_ctx=0) -> Infer"},
    {"tensor_names", py_tensor_names, METH_NOARGS, "tensor_names() -> ((ours, hf, gguf, per_layer, rope_rows), ...): the one name table"},
    {"tensor_name", py_tensor_name, METH_VARARGS, "tensor_name(name, from, to) -> name: spellings 'ours', 'hf', 'gguf'"},
    {"gguf_open", py_gguf_open, METH_VARARGS, "gguf_open(path) -> (owner, version, kv, kv_types, tensors)"},
    {"gguf_save", py_gguf_save, METH_VARARGS, "gguf_save(path, kvs, tensors)"},
    {"gguf_quantize", py_gguf_quantize, METH_VARARGS, "gguf_quantize(type, f32) -> bytes"},
    {"gguf_dequantize", py_gguf_dequantize, METH_VARARGS, "gguf_dequantize(type, data, n) -> f32 bytes"},
    {NULL, NULL, 0, NULL},
};

int sj_py_add_infer(PyObject *m) {
    SamplerType.tp_methods = sampler_methods;
    if (PyType_Ready(&InferType) < 0 || PyType_Ready(&SamplerType) < 0 || PyType_Ready(&GgufType) < 0) return -1;
    Py_INCREF(&SamplerType);
    if (PyModule_AddObject(m, "Sampler", (PyObject *)&SamplerType) < 0) return -1;
    for (PyMethodDef *d = funcs; d->ml_name; d++) {
        PyObject *fn = PyCFunction_New(d, NULL);
        if (!fn || PyModule_AddObject(m, d->ml_name, fn) < 0) return -1;
    }
    return 0;
}
