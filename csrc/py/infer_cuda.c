/* infer_cuda.c — Python face of the GPU inference engine: _C.CudaInfer,
 * with the methods of _C.Infer that smedjan.infer drives (prefill, decode,
 * logits, reset, info, pos) plus the device-side greedy paths. Sampling
 * with temperature happens in smedjan.infer on the logits copied out. The
 * GIL is released around every engine call that computes. */
#include "py.h"
#include <string.h>

typedef struct { PyObject_HEAD sj_cuinfer *g; } CudaInferObject;
static PyTypeObject CudaInferType;

/* q8 / q4 parse, and the engine refuses them with the reason */
static int parse_gpu_mode(const char *s, sj_infer_mode *m) { return sj_py_infer_mode(s, "fp32 or bf16 on the GPU", m); }

static PyObject *wrap(sj_cuinfer *g) {
    CudaInferObject *o = PyObject_New(CudaInferObject, &CudaInferType);
    if (!o) { sj_cuinfer_free(g); return NULL; }
    o->g = g;
    return (PyObject *)o;
}
static void cuinfer_dealloc(PyObject *self) {
    sj_cuinfer_free(((CudaInferObject *)self)->g);
    PyObject_Free(self);
}
#define G(self) (((CudaInferObject *)(self))->g)

static PyObject *py_load_gguf(PyObject *self, PyObject *args) {
    PyObject *pathb; const char *mode_s; int max_ctx = 0;
    if (!PyArg_ParseTuple(args, "O&s|i", PyUnicode_FSConverter, &pathb, &mode_s, &max_ctx)) return NULL;
    sj_infer_mode mode;
    if (parse_gpu_mode(mode_s, &mode) < 0) { Py_DECREF(pathb); return NULL; }
    sj_cuinfer *g = NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_cuinfer_load_gguf(PyBytes_AS_STRING(pathb), mode, max_ctx, &g));
    Py_DECREF(pathb);
    if (st) return sj_py_raise(st);
    return wrap(g);
}

static PyObject *py_from_model(PyObject *self, PyObject *args) {
    PyObject *mo; const char *mode_s; int max_ctx = 0;
    if (!PyArg_ParseTuple(args, "Os|i", &mo, &mode_s, &max_ctx)) return NULL;
    sj_model *m = sj_py_model_ptr(mo);
    if (!m) return NULL;
    sj_infer_mode mode;
    if (parse_gpu_mode(mode_s, &mode) < 0) return NULL;
    sj_cuinfer *g = NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_cuinfer_from_model(m, mode, max_ctx, &g));
    if (st) return sj_py_raise(st);
    return wrap(g);
}

/* prefill(tokens int32 (n,), out=None (n, vocab) float32) */
static PyObject *cuinfer_prefill(PyObject *self, PyObject *args) {
    PyObject *to, *out = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &to, &out)) return NULL;
    Py_buffer tv, ov;
    sj_dtype dt;
    if (sj_py_tokens(to, "tokens", 1, &tv, &dt) < 0) return NULL;
    if (dt != SJ_I32) { PyBuffer_Release(&tv); PyErr_SetString(PyExc_TypeError, "tokens must be int32"); return NULL; }
    int n = (int)(tv.len / 4);
    float *all = NULL;
    if (out != Py_None) {
        if (sj_py_out4(out, &ov, "f", (Py_ssize_t)n * sj_cuinfer_config(G(self))->vocab_size,
                       "out must be a writable float32 array of (n, vocab_size)") < 0) {
            PyBuffer_Release(&tv);
            return NULL;
        }
        all = ov.buf;
    }
    sj_status st;
    SJ_PY_CALL(st, sj_cuinfer_prefill(G(self), tv.buf, n, all));
    PyBuffer_Release(&tv);
    if (all) PyBuffer_Release(&ov);
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *cuinfer_decode(PyObject *self, PyObject *args) {
    int tok;
    if (!PyArg_ParseTuple(args, "i", &tok)) return NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_cuinfer_decode(G(self), tok, NULL));
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

/* decode_greedy(token) -> the greedy next token, chosen on the device */
static PyObject *cuinfer_decode_greedy(PyObject *self, PyObject *args) {
    int tok;
    if (!PyArg_ParseTuple(args, "i", &tok)) return NULL;
    int32_t next = 0;
    sj_status st;
    SJ_PY_CALL(st, sj_cuinfer_decode(G(self), tok, &next));
    if (st) return sj_py_raise(st);
    return PyLong_FromLong(next);
}

/* greedy(token, out int32 (n,)): n steps chained on the device */
static PyObject *cuinfer_greedy(PyObject *self, PyObject *args) {
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
    SJ_PY_CALL(st, sj_cuinfer_greedy(G(self), tok, (int)(ov.len / 4), ov.buf));
    PyBuffer_Release(&ov);
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *cuinfer_logits(PyObject *self, PyObject *args) {
    PyObject *out;
    if (!PyArg_ParseTuple(args, "O", &out)) return NULL;
    Py_buffer ov;
    if (sj_py_out4(out, &ov, "f", sj_cuinfer_config(G(self))->vocab_size,
                   "out must be a writable float32 array of vocab_size values") < 0) return NULL;
    sj_status st;
    SJ_PY_CALL(st, sj_cuinfer_logits(G(self), ov.buf));
    PyBuffer_Release(&ov);
    if (st) return sj_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *cuinfer_reset(PyObject *self, PyObject *noargs) {
    sj_cuinfer_reset(G(self));
    Py_RETURN_NONE;
}
static PyObject *cuinfer_pos(PyObject *self, PyObject *noargs) {
    return PyLong_FromLong(sj_cuinfer_pos(G(self)));
}

static PyObject *cuinfer_info(PyObject *self, PyObject *noargs) {
    sj_cuinfer *g = G(self);
    const sj_config *c = sj_cuinfer_config(g);
    int graphs, persistent;
    sj_cuinfer_get_options(g, &graphs, &persistent);
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:f,s:f,s:i,s:i,s:s,s:L,s:L,s:s,s:s,s:O,s:O}",
                         "dim", c->dim, "n_layers", c->n_layers, "n_heads", c->n_heads,
                         "n_kv_heads", c->n_kv_heads, "ffn_dim", c->ffn_dim, "vocab_size", c->vocab_size,
                         "max_seq_len", c->max_seq_len, "rope_theta", c->rope_theta, "norm_eps", c->norm_eps,
                         "max_ctx", sj_cuinfer_max_ctx(g), "pos", sj_cuinfer_pos(g),
                         "mode", sj_cuinfer_mode(g) == SJ_INFER_BF16 ? "bf16" : "fp32",
                         "weight_bytes", (long long)sj_cuinfer_weight_bytes(g),
                         "cache_bytes", (long long)sj_cuinfer_cache_bytes(g),
                         "isa", "cuda", "device", "cuda",
                         "graphs", graphs ? Py_True : Py_False,
                         "persistent", persistent ? Py_True : Py_False);
}

/* set_options(graphs, persistent) */
static PyObject *cuinfer_set_options(PyObject *self, PyObject *args) {
    int graphs, persistent;
    if (!PyArg_ParseTuple(args, "pp", &graphs, &persistent)) return NULL;
    sj_cuinfer_set_options(G(self), graphs, persistent);
    Py_RETURN_NONE;
}

static PyMethodDef cuinfer_methods[] = {
    {"prefill", cuinfer_prefill, METH_VARARGS, "prefill(tokens, out=None): append tokens (int32); out (n, vocab) gets every position's logits"},
    {"decode", cuinfer_decode, METH_VARARGS, "decode(token): one token through the model"},
    {"decode_greedy", cuinfer_decode_greedy, METH_VARARGS, "decode_greedy(token) -> next: one token, greedy choice on the device"},
    {"greedy", cuinfer_greedy, METH_VARARGS, "greedy(token, out): len(out) greedy steps chained on the device"},
    {"logits", cuinfer_logits, METH_VARARGS, "logits(out): the last logits into out (vocab,) float32"},
    {"reset", cuinfer_reset, METH_NOARGS, "forget the KV cache"},
    {"info", cuinfer_info, METH_NOARGS, "config, mode, memory, position and options as a dict"},
    {"pos", cuinfer_pos, METH_NOARGS, "tokens in the KV cache"},
    {"set_options", cuinfer_set_options, METH_VARARGS, "set_options(graphs, persistent)"},
    {NULL, NULL, 0, NULL},
};
static PyTypeObject CudaInferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.CudaInfer",
    .tp_basicsize = sizeof(CudaInferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GPU inference engine handle (use smedjan.infer with device='cuda').",
    .tp_dealloc = cuinfer_dealloc,
    .tp_methods = cuinfer_methods,
};

static PyMethodDef funcs[] = {
    {"cuda_infer_load_gguf", py_load_gguf, METH_VARARGS, "cuda_infer_load_gguf(path, mode, max_ctx=0) -> CudaInfer"},
    {"cuda_infer_from_model", py_from_model, METH_VARARGS, "cuda_infer_from_model(model_handle, mode, max_ctx=0) -> CudaInfer"},
    {NULL, NULL, 0, NULL},
};

int sj_py_add_infer_cuda(PyObject *m) {
    if (PyType_Ready(&CudaInferType) < 0) return -1;
    for (PyMethodDef *d = funcs; d->ml_name; d++) {
        PyObject *fn = PyCFunction_New(d, NULL);
        if (!fn || PyModule_AddObject(m, d->ml_name, fn) < 0) return -1;
    }
    return 0;
}
