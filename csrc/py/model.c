/* model.c — Python face of sj_model and sj_optimizer: config dicts in,
 * flat buffers out through the buffer protocol (zero-copy; each view keeps
 * its owner alive and is counted), engine calls with the GIL released. */
#include "py.h"
#include "../model/model.h"   /* levers, planning, accumulation (engine-internal API) */
#include <string.h>

/* ---- Buffer: a 1-D view of engine memory owned by another object ------ */

typedef struct {
    PyObject_HEAD
    PyObject *owner;          /* keeps the engine memory alive */
    void *ptr;
    Py_ssize_t n;
    sj_dtype dtype;           /* F32; optimizer state also BF16 (as uint16) or U8 */
    Py_ssize_t *exports;      /* the owner's count of live views */
} BufferObject;

static int buffer_get(PyObject *self, Py_buffer *view, int flags) {
    BufferObject *b = (BufferObject *)self;
    const Py_ssize_t size = (Py_ssize_t)sj_dtype_size(b->dtype);
    if (PyBuffer_FillInfo(view, self, b->ptr, b->n * size, 0, flags) < 0) return -1;
    if (flags & PyBUF_FORMAT) view->format = b->dtype == SJ_F32 ? "f" : size == 2 ? "H" : "B";
    view->itemsize = size;
    if (flags & PyBUF_ND) view->shape = &b->n;   /* elements (FillInfo's would be bytes) */
    (*b->exports)++;
    return 0;
}
static void buffer_release(PyObject *self, Py_buffer *view) {
    (void)view;
    (*((BufferObject *)self)->exports)--;
}
static void buffer_dealloc(PyObject *self) {
    Py_XDECREF(((BufferObject *)self)->owner);
    Py_TYPE(self)->tp_free(self);
}
static PyBufferProcs buffer_procs = { buffer_get, buffer_release };
static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A 1-D view of engine memory: float32, or uint16 (bf16 bits) or uint8 optimizer "
              "state (use numpy.frombuffer).",
    .tp_dealloc = buffer_dealloc,
    .tp_as_buffer = &buffer_procs,
};

static PyObject *buffer_new(PyObject *owner, void *ptr, Py_ssize_t n, sj_dtype dtype,
                            Py_ssize_t *exports) {
    BufferObject *b = PyObject_New(BufferObject, &BufferType);
    if (!b) return NULL;
    Py_INCREF(owner);
    b->owner = owner; b->ptr = ptr; b->n = n; b->dtype = dtype; b->exports = exports;
    return (PyObject *)b;
}

/* ---- config dicts ------------------------------------------------------ */

/* Per-layer fields go out as one value when every layer has it, else as a
 * list; rope_scaling as None or a dict of its fields. */
static PyObject *layer_field(const sj_config *c, int field) {
    #define VALUE(l) (field == 0 ? PyUnicode_FromString(sj_mixer_name(c->layers[l].mixer)) : \
                      field == 1 ? PyUnicode_FromString(sj_ffn_name(c->layers[l].ffn)) :     \
                      field == 2 ? PyUnicode_FromString(sj_qk_norm_name(c->layers[l].qk_norm)) : \
                                   PyLong_FromLong(c->layers[l].window))
    int uniform = 1;
    for (int l = 1; l < c->n_layers; l++) {
        const sj_layer *a = &c->layers[0], *b = &c->layers[l];
        uniform &= field == 0 ? a->mixer == b->mixer : field == 1 ? a->ffn == b->ffn
                 : field == 2 ? a->qk_norm == b->qk_norm : a->window == b->window;
    }
    if (uniform) return VALUE(0);
    PyObject *list = PyList_New(c->n_layers);
    for (int l = 0; list && l < c->n_layers; l++) {
        PyObject *v = VALUE(l);
        if (!v) { Py_CLEAR(list); break; }
        PyList_SET_ITEM(list, l, v);
    }
    return list;
    #undef VALUE
}

static const char *const layer_keys[] = { "mixer", "ffn", "qk_norm", "window" };

PyObject *sj_py_config_to_dict(const sj_config *c) {
    PyObject *d = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:f,s:f,s:O,s:O,s:f,s:f}", "dim", c->dim,
        "n_layers", c->n_layers, "n_heads", c->n_heads, "n_kv_heads", c->n_kv_heads, "ffn_dim",
        c->ffn_dim, "vocab_size", c->vocab_size, "max_seq_len", c->max_seq_len, "rope_theta",
        (double)c->rope_theta, "norm_eps", (double)c->norm_eps, "tied_head",
        c->untied_head ? Py_False : Py_True, "paired_heads", c->paired_heads ? Py_True : Py_False,
        "value_mix", (double)c->value_mix, "embed_skip", (double)c->embed_skip);
    if (!d) return NULL;
    for (int f = 0; f < 4; f++) {
        PyObject *v = layer_field(c, f);
        if (!v || PyDict_SetItemString(d, layer_keys[f], v)) { Py_XDECREF(v); Py_DECREF(d); return NULL; }
        Py_DECREF(v);
    }
    const sj_rope_scaling *r = &c->rope_scaling;
    PyObject *rs = r->type == SJ_ROPE_DEFAULT ? (Py_INCREF(Py_None), Py_None)
        : r->type == SJ_ROPE_LINEAR ? Py_BuildValue("{s:s,s:f}", "type", "linear", "factor",
                                                    (double)r->factor)
        : r->type == SJ_ROPE_DYNAMIC ? Py_BuildValue("{s:s,s:f,s:i}", "type", "dynamic", "factor",
                                                     (double)r->factor, "original_max_seq_len",
                                                     r->original_max_seq_len)
        : Py_BuildValue("{s:s,s:f,s:i,s:f,s:f,s:f,s:O}", "type", "yarn", "factor",
                        (double)r->factor, "original_max_seq_len", r->original_max_seq_len,
                        "beta_fast", (double)r->beta_fast, "beta_slow", (double)r->beta_slow,
                        "attention_factor", (double)r->attention_factor, "truncate",
                        r->truncate ? Py_True : Py_False);
    if (!rs || PyDict_SetItemString(d, "rope_scaling", rs)) { Py_XDECREF(rs); Py_DECREF(d); return NULL; }
    Py_DECREF(rs);
    int has_moe = 0;
    for (int l = 0; l < c->n_layers; l++) has_moe |= c->layers[l].ffn == SJ_FFN_MOE;
    const sj_moe_config *e = &c->moe;
    PyObject *mo = !has_moe ? (Py_INCREF(Py_None), Py_None)
        : Py_BuildValue("{s:i,s:i,s:i,s:i,s:s,s:O,s:f,s:f,s:f}", "n_experts", e->n_experts,
                        "top_k", e->top_k, "expert_dim", e->expert_dim, "n_shared", e->n_shared,
                        "router", sj_moe_router_name(e->router), "norm_topk",
                        e->norm_topk ? Py_True : Py_False, "aux_loss", (double)e->aux_loss,
                        "z_loss", (double)e->z_loss, "bias_update_rate", (double)e->bias_update_rate);
    if (!mo || PyDict_SetItemString(d, "moe", mo)) { Py_XDECREF(mo); Py_DECREF(d); return NULL; }
    Py_DECREF(mo);
    int has_mla = 0;
    for (int l = 0; l < c->n_layers; l++) has_mla |= c->layers[l].mixer == SJ_MIXER_MLA;
    const sj_mla *a = &c->mla;
    PyObject *mla = !has_mla ? (Py_INCREF(Py_None), Py_None)
        : Py_BuildValue("{s:i,s:i,s:i,s:i,s:i}", "q_lora_rank", a->q_lora_rank, "kv_lora_rank",
                        a->kv_lora_rank, "qk_nope_head_dim", a->qk_nope_head_dim,
                        "qk_rope_head_dim", a->qk_rope_head_dim, "v_head_dim", a->v_head_dim);
    if (!mla || PyDict_SetItemString(d, "mla", mla)) { Py_XDECREF(mla); Py_DECREF(d); return NULL; }
    Py_DECREF(mla);
    const sj_ssm_config *m = &c->ssm;
    PyObject *ssm = !m->d_state ? (Py_INCREF(Py_None), Py_None)
        : Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i}", "d_state", m->d_state, "d_conv", m->d_conv,
                        "expand", m->expand, "head_dim", m->head_dim, "n_groups", m->n_groups,
                        "chunk_size", m->chunk_size);
    if (!ssm || PyDict_SetItemString(d, "ssm", ssm)) { Py_XDECREF(ssm); Py_DECREF(d); return NULL; }
    Py_DECREF(ssm);
    const sj_linear_config *la = &c->linear;
    PyObject *lin = !la->chunk_size ? (Py_INCREF(Py_None), Py_None)
        : Py_BuildValue("{s:s,s:O,s:s,s:i}", "feature", sj_linear_feature_name(la->feature),
                        "normalize", la->normalize ? Py_True : Py_False, "decay",
                        sj_linear_decay_name(la->decay), "chunk_size", la->chunk_size);
    if (!lin || PyDict_SetItemString(d, "linear", lin)) { Py_XDECREF(lin); Py_DECREF(d); return NULL; }
    Py_DECREF(lin);
    return d;
}

static int get_int(PyObject *v, const char *key, int *out) {
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "config '%s' must be an integer", key);
        return -1;
    }
    if (x < -2147483647L || x > 2147483647L) {
        PyErr_Format(PyExc_ValueError, "config '%s' = %ld is out of range", key, x);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int get_float(PyObject *v, const char *key, float *out) {
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "config '%s' must be a number", key);
        return -1;
    }
    *out = (float)x;
    return 0;
}

static int dict_int(PyObject *d, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) { PyErr_Format(PyExc_ValueError, "config is missing '%s'", key); return -1; }
    return get_int(v, key, out);
}

static int dict_float(PyObject *d, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) { PyErr_Format(PyExc_ValueError, "config is missing '%s'", key); return -1; }
    return get_float(v, key, out);
}

/* An optional field: absent (or None) keeps *out. */
static int opt_float(PyObject *d, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    return v && v != Py_None ? get_float(v, key, out) : 0;
}
static int opt_bool(PyObject *d, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v || v == Py_None) return 0;
    int t = PyObject_IsTrue(v);
    if (t < 0) return -1;
    *out = t;
    return 0;
}

/* 0 when every key of the dict r is one of known[0..n); else ValueError
 * naming the config field, the key and the keys this build knows. */
static int known_keys(PyObject *r, const char *field, const char *const *known, int n) {
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(r, &pos, &k, &v)) {
        const char *s = PyUnicode_Check(k) ? PyUnicode_AsUTF8(k) : NULL;
        int i = 0;
        while (s && i < n && strcmp(s, known[i])) i++;
        if (s && i < n) continue;
        char list[512] = "";
        for (int j = 0; j < n; j++) {
            strncat(list, j ? ", " : "", sizeof list - strlen(list) - 1);
            strncat(list, known[j], sizeof list - strlen(list) - 1);
        }
        PyErr_Format(PyExc_ValueError, "config '%s' has field %R that this build of smedjan does "
                     "not know (it knows %s)", field, k, list);
        return -1;
    }
    return 0;
}

/* d[key] into *out when present and not None; errors name field.key. */
static int opt_int(PyObject *d, const char *field, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v || v == Py_None) return 0;
    char label[64];
    snprintf(label, sizeof label, "%s.%s", field, key);
    return get_int(v, label, out);
}

/* One layer's value of a per-layer field: a name of `names` or an int. */
static int layer_value(PyObject *v, const char *key, int l, const char *(*names)(int), int *out) {
    if (!names) return get_int(v, key, out);
    const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (!s) { PyErr_Format(PyExc_TypeError, "config '%s' must be a name or a list of names", key); return -1; }
    if ((*out = sj_option_value(names, s)) >= 0) return 0;
    char known[160] = "";
    for (int k = 0; names(k); k++)
        snprintf(known + strlen(known), sizeof known - strlen(known), "%s%s", k ? ", " : "", names(k));
    PyErr_Format(PyExc_ValueError, "config '%s' (layer %d): unknown %s '%s' (this build knows: %s)",
                 key, l, key, s, known);
    return -1;
}

/* A per-layer field: one value for every layer, or a list repeated as a
 * period (["sliding"] * 3 + ["full"]: every 4th layer differs). */
static int layer_from(PyObject *d, sj_config *c, int field) {
    const char *key = layer_keys[field];
    static const char *(*const names[])(int) = { sj_mixer_name, sj_ffn_name, sj_qk_norm_name, NULL };
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v || v == Py_None) return 0;
    int is_list = PyList_Check(v) || PyTuple_Check(v);
    Py_ssize_t p = is_list ? PySequence_Size(v) : 1;
    if (p < 1 || p > c->n_layers) {
        PyErr_Format(PyExc_ValueError, "config '%s' has %zd values; give one, or a period of 1..n_layers "
                     "(%d)", key, p, c->n_layers);
        return -1;
    }
    for (int l = 0; l < c->n_layers; l++) {
        PyObject *x = is_list ? PySequence_Fast_GET_ITEM(v, l % p) : v;
        int k;
        if (layer_value(x, key, l, names[field], &k)) return -1;
        sj_layer *y = &c->layers[l];
        if (field == 0) y->mixer = (uint8_t)(k & 0xff);
        else if (field == 1) y->ffn = (uint8_t)k;
        else if (field == 2) y->qk_norm = (uint8_t)k;
        else y->window = k;
    }
    return 0;
}

static int rope_scaling_from(PyObject *d, sj_config *c) {
    PyObject *r = PyDict_GetItemString(d, "rope_scaling");
    if (!r || r == Py_None) return 0;
    if (!PyDict_Check(r)) {
        PyErr_SetString(PyExc_TypeError, "config 'rope_scaling' must be a dict or None");
        return -1;
    }
    static const char *const known[] = { "type", "factor", "original_max_seq_len", "beta_fast",
                                         "beta_slow", "attention_factor", "truncate" };
    if (known_keys(r, "rope_scaling", known, 7)) return -1;
    sj_rope_scaling *rs = &c->rope_scaling;
    *rs = (sj_rope_scaling){ .beta_fast = 32, .beta_slow = 1, .truncate = 1 };
    PyObject *t = PyDict_GetItemString(r, "type");
    const char *ts = t && PyUnicode_Check(t) ? PyUnicode_AsUTF8(t) : NULL;
    if (!ts || (rs->type = sj_option_value(sj_rope_type_name, ts)) < 0) {
        PyErr_Format(PyExc_ValueError, "config 'rope_scaling' type %R is unknown (this build knows "
                     "default, linear, dynamic, yarn)", t ? t : Py_None);
        return -1;
    }
    if (opt_int(r, "rope_scaling", "original_max_seq_len", &rs->original_max_seq_len)) return -1;
    return opt_float(r, "factor", &rs->factor) || opt_float(r, "beta_fast", &rs->beta_fast) ||
           opt_float(r, "beta_slow", &rs->beta_slow) ||
           opt_float(r, "attention_factor", &rs->attention_factor) ||
           opt_bool(r, "truncate", &rs->truncate) ? -1 : 0;
}

/* moe: None, or a dict of sj_moe_config's fields; absent ones take the
 * defaults (no shared experts, softmax router without renormalisation, no
 * auxiliary losses, no bias balancing). */
static int moe_from(PyObject *d, sj_config *c) {
    PyObject *r = PyDict_GetItemString(d, "moe");
    if (!r || r == Py_None) return 0;
    if (!PyDict_Check(r)) {
        PyErr_SetString(PyExc_TypeError, "config 'moe' must be a dict or None");
        return -1;
    }
    static const char *const known[] = { "n_experts", "top_k", "expert_dim", "n_shared", "router",
                                         "norm_topk", "aux_loss", "z_loss", "bias_update_rate" };
    if (known_keys(r, "moe", known, 9)) return -1;
    sj_moe_config *e = &c->moe;
    int *const ints[] = { &e->n_experts, &e->top_k, &e->expert_dim, &e->n_shared };
    for (int i = 0; i < 4; i++)   /* known's first four */
        if (opt_int(r, "moe", known[i], ints[i])) return -1;
    PyObject *t = PyDict_GetItemString(r, "router");
    if (t && t != Py_None) {
        const char *ts = PyUnicode_Check(t) ? PyUnicode_AsUTF8(t) : NULL;
        if (!ts || (e->router = sj_option_value(sj_moe_router_name, ts)) < 0) {
            PyErr_Format(PyExc_ValueError, "config 'moe.router' %R is unknown (this build knows "
                         "softmax, sigmoid)", t);
            return -1;
        }
    }
    return opt_bool(r, "norm_topk", &e->norm_topk) || opt_float(r, "aux_loss", &e->aux_loss) ||
           opt_float(r, "z_loss", &e->z_loss) ||
           opt_float(r, "bias_update_rate", &e->bias_update_rate) ? -1 : 0;
}

/* mla: None, or a dict of sj_mla's fields; what it leaves out takes
 * DeepSeek-V3's proportions to the head size hd = dim / n_heads: q_lora_rank 0,
 * kv_lora_rank 4 hd, qk_nope_head_dim hd, qk_rope_head_dim hd / 2, v_head_dim hd. */
static int mla_from(PyObject *d, sj_config *c) {
    static const char *const known[] = { "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                         "qk_rope_head_dim", "v_head_dim" };
    const int hd = c->n_heads > 0 ? c->dim / c->n_heads : 0;
    sj_mla *a = &c->mla;
    *a = (sj_mla){ 0, 4 * hd, hd, hd / 4 * 2, hd };
    int *fields[] = { &a->q_lora_rank, &a->kv_lora_rank, &a->qk_nope_head_dim,
                      &a->qk_rope_head_dim, &a->v_head_dim };
    PyObject *r = PyDict_GetItemString(d, "mla");
    if (!r || r == Py_None) return 0;
    if (!PyDict_Check(r)) {
        PyErr_SetString(PyExc_TypeError, "config 'mla' must be a dict or None");
        return -1;
    }
    if (known_keys(r, "mla", known, 5)) return -1;
    for (int i = 0; i < 5; i++)
        if (opt_int(r, "mla", known[i], fields[i])) return -1;
    return 0;
}

/* The ssm field (Mamba-2 layers): None, or a dict of its fields; the
 * canonical form has every field (defaults: mamba_ssm's) wherever a layer is
 * a Mamba-2 mixer or the dict is given, else none. */
static int ssm_from(PyObject *d, sj_config *c) {
    PyObject *r = PyDict_GetItemString(d, "ssm");
    int used = 0;
    for (int l = 0; l < c->n_layers; l++) used |= c->layers[l].mixer == SJ_MIXER_MAMBA2;
    if ((!r || r == Py_None) && !used) return 0;
    if (r && r != Py_None && !PyDict_Check(r)) {
        PyErr_SetString(PyExc_TypeError, "config 'ssm' must be a dict or None");
        return -1;
    }
    static const char *const known[] = { "d_state", "d_conv", "expand", "head_dim", "n_groups",
                                         "chunk_size" };
    sj_ssm_config *m = &c->ssm;
    *m = (sj_ssm_config){ .d_state = 128, .d_conv = 4, .expand = 2, .head_dim = 64, .n_groups = 1,
                          .chunk_size = 64 };
    int *const fields[] = { &m->d_state, &m->d_conv, &m->expand, &m->head_dim, &m->n_groups,
                            &m->chunk_size };
    if (!r || r == Py_None) return 0;
    if (known_keys(r, "ssm", known, 6)) return -1;
    for (int i = 0; i < 6; i++)
        if (opt_int(r, "ssm", known[i], fields[i])) return -1;
    return 0;
}

/* The linear field (linear attention layers): None, or a dict; canonical
 * (every field, defaults: identity, not normalised, no decay, chunks of 64)
 * wherever a layer is a linear mixer or the dict is given. */
static int linear_from(PyObject *d, sj_config *c) {
    PyObject *r = PyDict_GetItemString(d, "linear");
    int used = 0;
    for (int l = 0; l < c->n_layers; l++) used |= c->layers[l].mixer == SJ_MIXER_LINEAR;
    if ((!r || r == Py_None) && !used) return 0;
    c->linear = (sj_linear_config){ .chunk_size = 64 };
    if (!r || r == Py_None) return 0;
    if (!PyDict_Check(r)) {
        PyErr_SetString(PyExc_TypeError, "config 'linear' must be a dict or None");
        return -1;
    }
    static const char *const known[] = { "feature", "normalize", "decay", "chunk_size" };
    if (known_keys(r, "linear", known, 4)) return -1;
    static const char *(*const names[2])(int) = { sj_linear_feature_name, sj_linear_decay_name };
    int *const kinds[2] = { &c->linear.feature, &c->linear.decay };
    for (int i = 0; i < 2; i++) {
        PyObject *v = PyDict_GetItemString(r, i ? "decay" : "feature");
        if (!v || v == Py_None) continue;
        const char *val = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
        if (!val || (*kinds[i] = sj_option_value(names[i], val)) < 0) {
            PyErr_Format(PyExc_ValueError, "config 'linear.%s' %R is unknown (this build knows %s)",
                         i ? "decay" : "feature", v, i ? "none, gated" : "identity, elu1");
            return -1;
        }
    }
    return opt_bool(r, "normalize", &c->linear.normalize) ||
           opt_int(r, "linear", "chunk_size", &c->linear.chunk_size) ? -1 : 0;
}

static const char *const config_keys[] = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len",
    "rope_theta", "norm_eps", "rope_scaling", "tied_head", "paired_heads", "value_mix",
    "embed_skip", "mixer", "ffn", "qk_norm", "window", "moe", "mla", "ssm", "linear",
};

int sj_py_config_from_dict(PyObject *d, sj_config *c) {
    if (!PyDict_Check(d)) { PyErr_SetString(PyExc_TypeError, "config must be a dict"); return -1; }
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d, &pos, &k, &v)) {
        const char *s = PyUnicode_Check(k) ? PyUnicode_AsUTF8(k) : NULL;
        int ok = 0;
        for (size_t i = 0; s && i < sizeof config_keys / sizeof config_keys[0]; i++)
            ok |= !strcmp(s, config_keys[i]);
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "config names option %R that this build of smedjan "
                         "does not know", k);
            return -1;
        }
    }
    memset(c, 0, sizeof *c);
    int tied = 1;
    if (dict_int(d, "dim", &c->dim) || dict_int(d, "n_layers", &c->n_layers) ||
        dict_int(d, "n_heads", &c->n_heads) || dict_int(d, "n_kv_heads", &c->n_kv_heads) ||
        dict_int(d, "ffn_dim", &c->ffn_dim) || dict_int(d, "vocab_size", &c->vocab_size) ||
        dict_int(d, "max_seq_len", &c->max_seq_len) ||
        dict_float(d, "rope_theta", &c->rope_theta) || dict_float(d, "norm_eps", &c->norm_eps) ||
        opt_bool(d, "tied_head", &tied) || opt_bool(d, "paired_heads", &c->paired_heads) ||
        opt_float(d, "value_mix", &c->value_mix) || opt_float(d, "embed_skip", &c->embed_skip) ||
        rope_scaling_from(d, c) || moe_from(d, c))
        return -1;
    c->untied_head = !tied;
    if (c->n_layers < 1 || c->n_layers > SJ_MAX_LAYERS) {
        PyErr_Format(PyExc_ValueError, "n_layers must be in 1..%d, got %d", SJ_MAX_LAYERS, c->n_layers);
        return -1;
    }
    for (int f = 0; f < 4; f++)
        if (layer_from(d, c, f)) return -1;
    if (mla_from(d, c) || ssm_from(d, c) || linear_from(d, c)) return -1;
    sj_status s = sj_config_validate(c);
    if (s) { sj_py_raise(s); return -1; }
    return 0;
}

static PyObject *py_preset(PyObject *self, PyObject *args) {
    const char *name; int vocab;
    if (!PyArg_ParseTuple(args, "si", &name, &vocab)) return NULL;
    sj_config c;
    sj_status s = sj_config_preset(name, vocab, &c);
    return s ? sj_py_raise(s) : sj_py_config_to_dict(&c);
}

static PyObject *py_preset_names(PyObject *self, PyObject *noargs) {
    PyObject *l = PyList_New(sj_preset_count());
    for (int i = 0; l && i < sj_preset_count(); i++)
        PyList_SET_ITEM(l, i, PyUnicode_FromString(sj_preset_name(i)));
    return l;
}

static PyObject *py_ffn_dim_for(PyObject *self, PyObject *args) {
    int dim; double mult;
    if (!PyArg_ParseTuple(args, "id", &dim, &mult)) return NULL;
    return PyLong_FromLong(sj_ffn_dim_for(dim, mult));
}

/* The engine's reading of a config dict: validated, defaults filled, each
 * per-layer field one value or one per layer. */
static PyObject *py_config_canonical(PyObject *self, PyObject *d) {
    sj_config c;
    if (sj_py_config_from_dict(d, &c)) return NULL;
    return sj_py_config_to_dict(&c);
}

/* RoPE for a config and a run of seq_len positions, as every kernel applies
 * it: (inv_freq as a list, mscale), the f32 values widened. */
static PyObject *py_rope_freqs(PyObject *self, PyObject *args) {
    PyObject *d;
    int seq_len;
    if (!PyArg_ParseTuple(args, "Oi", &d, &seq_len)) return NULL;
    sj_config c;
    if (sj_py_config_from_dict(d, &c)) return NULL;
    sj_rope r;
    sj_status s = sj_rope_init(&r, &c, seq_len);
    if (s) return sj_py_raise(s);
    PyObject *inv = PyList_New(r.n_pairs);
    for (int i = 0; inv && i < r.n_pairs; i++) {
        PyObject *v = PyFloat_FromDouble(r.inv_freq[i]);
        if (!v) { Py_CLEAR(inv); break; }
        PyList_SET_ITEM(inv, i, v);
    }
    return inv ? Py_BuildValue("(Nd)", inv, (double)r.mscale) : NULL;
}

static PyObject *py_param_count(PyObject *self, PyObject *args) {
    PyObject *d;
    int active = 0;
    if (!PyArg_ParseTuple(args, "O|p", &d, &active)) return NULL;
    sj_config c;
    if (sj_py_config_from_dict(d, &c)) return NULL;
    return PyLong_FromLongLong(active ? sj_config_active_param_count(&c) : sj_config_param_count(&c));
}

static PyObject *py_lr_at(PyObject *self, PyObject *args) {
    sj_train_config tc = {0};
    long long step;
    if (!PyArg_ParseTuple(args, "ffiiL", &tc.max_lr, &tc.min_lr, &tc.warmup_steps,
                          &tc.total_steps, &step)) return NULL;
    return PyFloat_FromDouble(sj_lr_at(&tc, step));
}

/* ---- Model --------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sj_model *m;
    Py_ssize_t exports;
} ModelObject;

/* The compute dtype's name in the Python API. */
static const char *dtype_name(sj_dtype t) {
    return t == SJ_BF16 ? "bf16" : t == SJ_F16 ? "fp16" : "fp32";
}

/* "cpu"/"cuda" and "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16"
 * -> engine enums. */
static int parse_device(const char *dev, const char *dtype, sj_device *d, sj_dtype *t) {
    if (!strcmp(dev, "cpu")) *d = SJ_DEVICE_CPU;
    else if (!strcmp(dev, "cuda") || !strcmp(dev, "cuda:0") || !strcmp(dev, "gpu")) *d = SJ_DEVICE_CUDA;
    else if (!strcmp(dev, "cpu-staged")) *d = SJ_DEVICE_CPU_STAGED;   /* testing */
    else { PyErr_Format(PyExc_ValueError, "device must be 'cpu' or 'cuda', got '%s'", dev); return -1; }
    if (!dtype || !strcmp(dtype, "fp32") || !strcmp(dtype, "float32")) *t = SJ_F32;
    else if (!strcmp(dtype, "bf16") || !strcmp(dtype, "bfloat16")) *t = SJ_BF16;
    else if (!strcmp(dtype, "fp16") || !strcmp(dtype, "float16")) *t = SJ_F16;
    else {
        PyErr_Format(PyExc_ValueError, "dtype must be 'fp32', 'bf16' or 'fp16', got '%s'", dtype);
        return -1;
    }
    return 0;
}

static int model_init(PyObject *self, PyObject *args, PyObject *kw) {
    ModelObject *mo = (ModelObject *)self;
    static char *kwlist[] = {"config", "seed", "device", "dtype", NULL};
    PyObject *d; unsigned long long seed = 0;
    const char *dev = "cpu", *dts = "fp32";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Kss", kwlist, &d, &seed, &dev, &dts)) return -1;
    sj_config c;
    if (sj_py_config_from_dict(d, &c)) return -1;
    sj_device device; sj_dtype dtype;
    if (parse_device(dev, dts, &device, &dtype)) return -1;
    if (mo->m) { PyErr_SetString(PyExc_RuntimeError, "Model already initialised"); return -1; }
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_model_create_ex(&c, seed, device, dtype, &mo->m);
    Py_END_ALLOW_THREADS
    if (s) { sj_py_raise(s); return -1; }
    return 0;
}

static void model_dealloc(PyObject *self) {
    sj_model_free(((ModelObject *)self)->m);
    Py_TYPE(self)->tp_free(self);
}

#define MODEL(self) (((ModelObject *)(self))->m)
#define NEED_MODEL(self) \
    if (!MODEL(self)) { PyErr_SetString(PyExc_RuntimeError, "Model not initialised"); return NULL; }

static PyObject *model_config(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    return sj_py_config_to_dict(sj_model_config(MODEL(self)));
}

static PyObject *model_tensors(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    int n = sj_model_n_tensors(MODEL(self));
    PyObject *l = PyList_New(n);
    for (int i = 0; l && i < n; i++) {
        const sj_tensor_info *t = sj_model_tensor(MODEL(self), i);
        PyObject *shape = t->ndim == 2 ? Py_BuildValue("(LL)", t->shape[0], t->shape[1])
                                       : Py_BuildValue("(L)", t->shape[0]);
        PyList_SET_ITEM(l, i, Py_BuildValue("(sNLi)", t->name, shape, t->offset, t->decay));
    }
    return l;
}

/* Host memory: a Buffer for numpy.frombuffer; device memory: a DeviceTensor. */
static PyObject *flat_view(PyObject *owner, sj_model *m, void *p, int64_t n, sj_dtype dtype,
                           Py_ssize_t *exports, sj_model *notify) {
    if (!p) { PyErr_SetString(PyExc_RuntimeError, "model has no buffers (a move failed)"); return NULL; }
    if (sj_model_device(m) != SJ_DEVICE_CUDA) return buffer_new(owner, p, n, dtype, exports);
    return sj_py_device_tensor(owner, p, 1, &n, dtype, exports, notify);
}

static PyObject *model_params(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    int64_t n;
    float *p = sj_model_params(MODEL(self), &n);
    return flat_view(self, MODEL(self), p, n, SJ_F32, &((ModelObject *)self)->exports, MODEL(self));
}

static PyObject *model_grads(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_model_need_grads(MODEL(self));   /* first use allocates */
    Py_END_ALLOW_THREADS
    if (s) return sj_py_raise(s);
    int64_t n;
    float *p = sj_model_grads(MODEL(self), &n);
    return flat_view(self, MODEL(self), p, n, SJ_F32, &((ModelObject *)self)->exports, NULL);
}

/* holds() -> (gradients, 16-bit compute copy): whether the model holds them
 * (a train step adds into held gradients, else keeps its own in its arena;
 * forward runs without the copy cast each weight on use) */
static PyObject *model_holds(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    const sj_model *m = MODEL(self);
    return Py_BuildValue("(OO)", m->grads ? Py_True : Py_False,
                         m->params_act && m->params_act != m->params ? Py_True : Py_False);
}

/* to(device, dtype): refused while views of the old buffers are alive. */
static PyObject *model_to(PyObject *self, PyObject *args) {
    NEED_MODEL(self);
    const char *dev, *dts = NULL;
    if (!PyArg_ParseTuple(args, "s|s", &dev, &dts)) return NULL;
    sj_device device; sj_dtype dtype;
    if (!dts) dts = dtype_name(sj_model_dtype(MODEL(self)));
    if (parse_device(dev, dts, &device, &dtype)) return NULL;
    if (device != SJ_DEVICE_CUDA && dtype != SJ_F32) dtype = SJ_F32;   /* bf16, fp16: GPU modes */
    Py_ssize_t n = ((ModelObject *)self)->exports;
    if (n && (device != sj_model_device(MODEL(self)) || dtype != sj_model_dtype(MODEL(self))))
        return PyErr_Format(PyExc_BufferError, "model.to: %zd views of its parameters/gradients "
                            "are still alive; drop them first", n);
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_model_to(MODEL(self), device, dtype);
    Py_END_ALLOW_THREADS
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static PyObject *model_device(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    sj_device d = sj_model_device(MODEL(self));
    return PyUnicode_FromString(d == SJ_DEVICE_CUDA ? "cuda" : d == SJ_DEVICE_CPU_STAGED ? "cpu-staged" : "cpu");
}

static PyObject *model_dtype(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    return PyUnicode_FromString(dtype_name(sj_model_dtype(MODEL(self))));
}

static PyObject *model_params_updated(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_model_params_updated(MODEL(self));
    Py_END_ALLOW_THREADS
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static PyObject *model_set_graphs(PyObject *self, PyObject *arg) {
    NEED_MODEL(self);
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    sj_model_set_graphs(MODEL(self), on);
    Py_RETURN_NONE;
}

static PyObject *model_zero_grad(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    sj_model_zero_grad(MODEL(self));
    Py_RETURN_NONE;
}

static PyObject *model_memory(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    return Py_BuildValue("(LL)", sj_model_bytes(MODEL(self)), sj_model_peak_bytes(MODEL(self)));
}

static PyObject *model_reset_peak(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    sj_model_reset_peak(MODEL(self));
    Py_RETURN_NONE;
}

/* set_levers(gradient_checkpointing, fused_ce, ce_rows, memory_limit, fp16_activations,
 * cheap_recompute, cast_on_use, sparse_loss, label_bucket_sizes): Model.set_levers' names */
static PyObject *model_set_levers(PyObject *self, PyObject *args, PyObject *kw) {
    NEED_MODEL(self);
    static char *kwlist[] = {"gradient_checkpointing", "fused_ce", "ce_rows", "memory_limit",
                             "fp16_activations", "cheap_recompute", "cast_on_use", "sparse_loss", "label_bucket_sizes",
                             NULL};
    int ck = 0, fce = 0, rows = 0, f16 = 0, cheap = 0, cast = 0, sparse = 0;
    long long limit = 0;
    PyObject *buckets_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|ppiLppppO", kwlist, &ck, &fce, &rows, &limit, &f16,
                                     &cheap, &cast, &sparse, &buckets_o))
        return NULL;
    sj_levers lv = { .gradient_checkpointing = ck, .cheap_recompute = cheap, .fused_ce = fce, .ce_rows = rows,
                     .fp16_activations = f16, .memory_limit = (int64_t)limit, .cast_on_use = cast,
                     .sparse_loss = sparse };
    if (buckets_o && buckets_o != Py_None) {
        PyObject *b = PySequence_Fast(buckets_o, "label_bucket_sizes must be a sequence of ints");
        if (!b) return NULL;
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(b);
        if (n > SJ_MAX_LABEL_BUCKETS) {
            Py_DECREF(b);
            return PyErr_Format(PyExc_ValueError, "label_bucket_sizes: at most %d buckets, got %zd",
                                (int)SJ_MAX_LABEL_BUCKETS, n);
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            const long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(b, i));
            if (v == -1 && PyErr_Occurred()) { Py_DECREF(b); return NULL; }
            if (v < 1 || v > INT32_MAX) {
                Py_DECREF(b);
                return PyErr_Format(PyExc_ValueError, "label_bucket_sizes must be positive, got %ld", v);
            }
            lv.label_bucket_sizes[i] = (int)v;
        }
        lv.n_label_bucket_sizes = (int)n;
        Py_DECREF(b);
    }
    sj_status s = sj_model_set_levers(MODEL(self), &lv);
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static PyObject *model_levers(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    const sj_levers *lv = &MODEL(self)->lv;
    PyObject *buckets = PyList_New(lv->n_label_bucket_sizes);
    for (int i = 0; buckets && i < lv->n_label_bucket_sizes; i++) {
        PyObject *v = PyLong_FromLong(lv->label_bucket_sizes[i]);
        if (!v) { Py_CLEAR(buckets); break; }
        PyList_SET_ITEM(buckets, i, v);
    }
    if (!buckets) return NULL;
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:i,s:L,s:O,s:O,s:N}",
                         "gradient_checkpointing", lv->gradient_checkpointing ? Py_True : Py_False,
                         "cheap_recompute", lv->cheap_recompute ? Py_True : Py_False,
                         "cast_on_use", lv->cast_on_use ? Py_True : Py_False,
                         "fused_ce", lv->fused_ce ? Py_True : Py_False, "ce_rows", lv->ce_rows,
                         "memory_limit", (long long)lv->memory_limit,
                         "fp16_activations", lv->fp16_activations ? Py_True : Py_False,
                         "sparse_loss", lv->sparse_loss ? Py_True : Py_False,
                         "label_bucket_sizes", buckets);
}

/* plan_bytes(B, T, mode, labels=-1) -> (arena_bytes, kept_bytes); mode 0 logits, 1 loss,
 * 2 backward (into the model's gradients), 3 train step (its own gradients);
 * labels: label positions per batch for the sparse loss (-1: every position) */
static PyObject *model_plan_bytes(PyObject *self, PyObject *args) {
    NEED_MODEL(self);
    int B, T, mode;
    long long labels = -1;
    if (!PyArg_ParseTuple(args, "iii|L", &B, &T, &mode, &labels)) return NULL;
    if (mode < 0 || mode > 3) { PyErr_SetString(PyExc_ValueError, "mode must be 0, 1, 2 or 3"); return NULL; }
    int64_t arena = 0, kept = 0;
    sj_status s;
    SJ_PY_CALL(s, sj_model_plan_census(MODEL(self), B, T, (sj_run_mode)mode, labels, &arena,
                                       &kept, NULL, NULL));
    if (s) return sj_py_raise(s);
    return Py_BuildValue("(LL)", (long long)arena, (long long)kept);
}

/* plan_census(B, T, mode, labels=-1) -> {"nodes": {op: count}, "in_place": {op: steps}}
 * (tests: what the planned tape records, and which steps write in place) */
static PyObject *model_plan_census(PyObject *self, PyObject *args) {
    NEED_MODEL(self);
    int B, T, mode;
    long long labels = -1;
    if (!PyArg_ParseTuple(args, "iii|L", &B, &T, &mode, &labels)) return NULL;
    if (mode < 0 || mode > 3) { PyErr_SetString(PyExc_ValueError, "mode must be 0, 1, 2 or 3"); return NULL; }
    int nodes[SJ_OP__COUNT], in_place[SJ_OP__COUNT];
    sj_status s;
    SJ_PY_CALL(s, sj_model_plan_census(MODEL(self), B, T, (sj_run_mode)mode, labels, NULL, NULL,
                                       nodes, in_place));
    if (s) return sj_py_raise(s);
    PyObject *dn = PyDict_New(), *di = PyDict_New();
    for (int o = 0; dn && di && o < SJ_OP__COUNT; o++) {
        PyObject *a = PyLong_FromLong(nodes[o]), *b = PyLong_FromLong(in_place[o]);
        int bad = !a || !b || PyDict_SetItemString(dn, sj_ops[o].name, a) < 0 ||
                  PyDict_SetItemString(di, sj_ops[o].name, b) < 0;
        Py_XDECREF(a); Py_XDECREF(b);
        if (bad) { Py_CLEAR(dn); }
    }
    if (!dn || !di) { Py_XDECREF(dn); Py_XDECREF(di); return NULL; }
    return Py_BuildValue("{s:N,s:N}", "nodes", dn, "in_place", di);
}

/* plans() -> {"cached": [(B, T, mode, label_rows), ...], "recorded": tapes recorded so far}
 * (tests: shapes reused across batches) */
static PyObject *model_plans(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    const sj_model *m = MODEL(self);
    PyObject *cached = PyList_New(0);
    for (int i = 0; cached && i < SJ_MAX_PLANS; i++) {
        const sj_plan *p = &m->plans[i];
        if (!p->used) continue;
        PyObject *t = Py_BuildValue("(iiii)", p->B, p->T, (int)p->mode, p->label_rows);
        if (!t || PyList_Append(cached, t) < 0) Py_CLEAR(cached);
        Py_XDECREF(t);
    }
    if (!cached) return NULL;
    return Py_BuildValue("{s:N,s:L}", "cached", cached, "recorded", (long long)m->plans_recorded);
}

/* fixed_bytes(mode, optimizer_bytes) -> what the use holds besides its
 * arena (sj_model_fixed_bytes; mode as plan_bytes) */
static PyObject *model_fixed_bytes(PyObject *self, PyObject *args) {
    NEED_MODEL(self);
    int mode;
    long long optimizer;
    if (!PyArg_ParseTuple(args, "iL", &mode, &optimizer)) return NULL;
    if (mode < 0 || mode > 3) { PyErr_SetString(PyExc_ValueError, "mode must be 0, 1, 2 or 3"); return NULL; }
    return PyLong_FromLongLong(sj_model_fixed_bytes(MODEL(self), (sj_run_mode)mode, optimizer));
}

/* params_finite(i=-1) -> whether tensor i's (-1: every) parameter is finite */
static PyObject *model_params_finite(PyObject *self, PyObject *args) {
    NEED_MODEL(self);
    int i = -1, finite = 0;
    if (!PyArg_ParseTuple(args, "|i", &i)) return NULL;
    sj_status s;
    SJ_PY_CALL(s, sj_model_params_finite(MODEL(self), i, &finite));
    if (s) return sj_py_raise(s);
    return PyBool_FromLong(finite);
}

static PyObject *model_exports(PyObject *self, PyObject *noargs) {
    return PyLong_FromSsize_t(((ModelObject *)self)->exports);
}

/* forward(tokens (B, T), out (B, T, V) float32 writable) */
static PyObject *model_forward(PyObject *self, PyObject *args) {
    NEED_MODEL(self);
    PyObject *tok_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OO", &tok_obj, &out_obj)) return NULL;
    Py_buffer tok, out;
    sj_dtype dt;
    if (sj_py_tokens(tok_obj, "tokens", 2, &tok, &dt) < 0) return NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&tok);
        return NULL;
    }
    int B = (int)tok.shape[0], T = (int)tok.shape[1], V = sj_model_config(MODEL(self))->vocab_size;
    if (out.itemsize != 4 || strcmp(out.format, "f") != 0 ||
        out.len != (Py_ssize_t)B * T * V * 4) {
        PyBuffer_Release(&tok); PyBuffer_Release(&out);
        PyErr_Format(PyExc_ValueError, "out: expected float32 of %d*%d*%d elements", B, T, V);
        return NULL;
    }
    sj_status s;
    SJ_PY_CALL(s, sj_model_forward(MODEL(self), tok.buf, dt, B, T, out.buf));
    PyBuffer_Release(&tok); PyBuffer_Release(&out);
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

/* forward_device(tokens) -> DeviceTensor (B, T, V) of the compute dtype,
 * valid until the model's next call (it lives in the activation arena). */
static PyObject *model_forward_device(PyObject *self, PyObject *tok_obj) {
    NEED_MODEL(self);
    Py_buffer tok;
    sj_dtype dt, ldt;
    if (sj_py_tokens(tok_obj, "tokens", 2, &tok, &dt) < 0) return NULL;
    int64_t shape[3] = { tok.shape[0], tok.shape[1], sj_model_config(MODEL(self))->vocab_size };
    void *p = NULL;
    sj_status s;
    SJ_PY_CALL(s, sj_model_forward_device(MODEL(self), tok.buf, dt, (int)shape[0], (int)shape[1], &p, &ldt));
    PyBuffer_Release(&tok);
    if (s) return sj_py_raise(s);
    return sj_py_device_tensor(self, p, 3, shape, ldt, NULL, NULL);
}

static int token_pair(PyObject *a, PyObject *b, Py_buffer *ta, Py_buffer *tb, sj_dtype *dt) {
    sj_dtype db;
    if (sj_py_tokens(a, "tokens", 2, ta, dt) < 0) return -1;
    if (sj_py_tokens(b, "targets", 2, tb, &db) < 0) { PyBuffer_Release(ta); return -1; }
    if (db != *dt || ta->shape[0] != tb->shape[0] || ta->shape[1] != tb->shape[1]) {
        PyErr_Format(PyExc_ValueError,
                     "targets must have the dtype and shape of tokens (%zd, %zd), got (%zd, %zd)",
                     ta->shape[0], ta->shape[1], tb->shape[0], tb->shape[1]);
        PyBuffer_Release(ta); PyBuffer_Release(tb);
        return -1;
    }
    return 0;
}

static PyObject *model_loss(PyObject *self, PyObject *args, PyObject *kw) {
    NEED_MODEL(self);
    static char *kwlist[] = {"tokens", "targets", "ignore_index", "backward", "denom", NULL};
    PyObject *a, *b; int ignore = -1, backward = 0; long long denom = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|ipL", kwlist, &a, &b, &ignore, &backward,
                                     &denom))
        return NULL;
    Py_buffer ta, tb; sj_dtype dt;
    if (token_pair(a, b, &ta, &tb, &dt) < 0) return NULL;
    float loss = 0;
    sj_status s;
    SJ_PY_CALL(s, sj_model_loss_ex(MODEL(self), ta.buf, tb.buf, dt, (int)ta.shape[0],
                                   (int)ta.shape[1], ignore, backward, (int64_t)denom, &loss));
    PyBuffer_Release(&ta); PyBuffer_Release(&tb);
    if (s) return sj_py_raise(s);
    return PyFloat_FromDouble(loss);
}

/* The MoE layers' last-forward statistics: None without MoE layers, else a
 * list over the MoE layers of (aux, z, [tokens per expert]). */
static PyObject *model_moe_stats(PyObject *self, PyObject *noargs) {
    NEED_MODEL(self);
    int per;
    const float *st = sj_model_moe_stats(MODEL(self), &per);
    if (!st) Py_RETURN_NONE;
    const sj_config *c = sj_model_config(MODEL(self));
    PyObject *out = PyList_New(0);
    for (int l = 0; out && l < c->n_layers; l++) {
        if (c->layers[l].ffn != SJ_FFN_MOE) continue;
        const float *s = st + (int64_t)per * l;
        PyObject *load = PyList_New(per - 2);
        for (int e = 0; load && e < per - 2; e++) PyList_SET_ITEM(load, e, PyFloat_FromDouble(s[2 + e]));
        PyObject *row = load ? Py_BuildValue("(ddN)", (double)s[0], (double)s[1], load) : NULL;
        if (!row || PyList_Append(out, row)) { Py_XDECREF(row); Py_CLEAR(out); break; }
        Py_DECREF(row);
    }
    return out;
}

static PyMethodDef model_methods[] = {
    {"moe_stats", model_moe_stats, METH_NOARGS,
     "moe_stats() -> None | [(aux_loss, z_loss, [tokens per expert])] per MoE layer, last forward"},
    {"config", model_config, METH_NOARGS, "config() -> dict"},
    {"tensors", model_tensors, METH_NOARGS, "tensors() -> [(name, shape, offset, decay)]"},
    {"params", model_params, METH_NOARGS, "params() -> Buffer over the flat parameters"},
    {"grads", model_grads, METH_NOARGS, "grads() -> Buffer over the flat gradients (made, zeroed, on first use)"},
    {"holds", model_holds, METH_NOARGS, "holds() -> (gradients, 16-bit compute copy) exist"},
    {"zero_grad", model_zero_grad, METH_NOARGS, "zero_grad()"},
    {"to", model_to, METH_VARARGS, "to(device, dtype=None): move to 'cpu' or 'cuda'"},
    {"device", model_device, METH_NOARGS, "device() -> 'cpu' | 'cuda'"},
    {"dtype", model_dtype, METH_NOARGS, "dtype() -> 'fp32' | 'bf16' | 'fp16'"},
    {"params_updated", model_params_updated, METH_NOARGS,
     "params_updated(): refresh the bf16/fp16 compute copy after writing parameters"},
    {"set_graphs", model_set_graphs, METH_O, "set_graphs(bool): capture train steps as CUDA graphs"},
    {"memory", model_memory, METH_NOARGS, "memory() -> (bytes, peak_bytes)"},
    {"reset_peak", model_reset_peak, METH_NOARGS, "reset_peak(): peak_bytes = bytes now"},
    {"set_levers", (PyCFunction)(void (*)(void))model_set_levers, METH_VARARGS | METH_KEYWORDS,
     "set_levers(gradient_checkpointing=False, fused_ce=False, ce_rows=0, memory_limit=0, "
     "fp16_activations=False, cheap_recompute=False, cast_on_use=False, sparse_loss=False, label_bucket_sizes=())"},
    {"levers", model_levers, METH_NOARGS, "levers() -> dict"},
    {"plan_bytes", model_plan_bytes, METH_VARARGS,
     "plan_bytes(B, T, mode, labels=-1) -> (arena_bytes, kept_bytes), allocating nothing"},
    {"plan_census", model_plan_census, METH_VARARGS,
     "plan_census(B, T, mode, labels=-1) -> {'nodes': {op: n}, 'in_place': {op: steps}} (tests)"},
    {"plans", model_plans, METH_NOARGS,
     "plans() -> {'cached': [(B, T, mode, label_rows)], 'recorded': n} (tests)"},
    {"fixed_bytes", model_fixed_bytes, METH_VARARGS,
     "fixed_bytes(mode, optimizer_bytes) -> bytes a use holds besides its arena"},
    {"params_finite", model_params_finite, METH_VARARGS,
     "params_finite(i=-1) -> every value of tensor i (-1: all) is finite"},
    {"exports", model_exports, METH_NOARGS, "exports() -> live buffer views"},
    {"forward", model_forward, METH_VARARGS, "forward(tokens, out)"},
    {"forward_device", model_forward_device, METH_O,
     "forward_device(tokens) -> DeviceTensor of logits, valid until the next call"},
    {"loss", (PyCFunction)(void (*)(void))model_loss, METH_VARARGS | METH_KEYWORDS,
     "loss(tokens, targets, ignore_index=-1, backward=False) -> float"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine model handle (use smedjan.Model).",
    .tp_new = PyType_GenericNew,
    .tp_init = model_init,
    .tp_dealloc = model_dealloc,
    .tp_methods = model_methods,
};

sj_model *sj_py_model_ptr(PyObject *o) {
    if (!PyObject_TypeCheck(o, &ModelType)) {
        PyErr_Format(PyExc_TypeError, "expected an engine model handle (smedjan._C.Model), got %s",
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    if (!((ModelObject *)o)->m) PyErr_SetString(PyExc_ValueError, "model handle is not initialised");
    return ((ModelObject *)o)->m;
}

/* ---- Optimizer ----------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    sj_optimizer *o;
    PyObject *model;
    Py_ssize_t exports;
    int view_place;       /* device*8 + dtype of the model when views were made */
} OptimizerObject;

static int model_place(PyObject *model) {
    sj_model *m = ((ModelObject *)model)->m;
    return (int)sj_model_device(m) * 8 + (int)sj_model_dtype(m);
}

/* The moments follow the model to its new device at the next step; views of
 * the old ones must be gone by then. */
static int opt_views_ok(PyObject *self) {
    OptimizerObject *op = (OptimizerObject *)self;
    if (op->exports && op->view_place != model_place(op->model)) {
        PyErr_Format(PyExc_BufferError, "optimizer: the model moved but %zd views of the optimizer "
                     "state on its old device are alive; drop them first", op->exports);
        return -1;
    }
    return 0;
}

#define OPT(self) (((OptimizerObject *)(self))->o)

static const char *const OPTIM_KINDS[SJ_OPTIM__COUNT] = {
    [SJ_OPTIM_ADAMW] = "adamw", [SJ_OPTIM_LION] = "lion", [SJ_OPTIM_SGD] = "sgd",
    [SJ_OPTIM_ADAFACTOR] = "adafactor", [SJ_OPTIM_MUON] = "muon",
};

static int optim_kind(const char *name, sj_optim_kind *out) {
    for (int k = 0; k < SJ_OPTIM__COUNT; k++)
        if (!strcmp(name, OPTIM_KINDS[k])) { *out = (sj_optim_kind)k; return 0; }
    PyErr_Format(PyExc_ValueError, "optimizer must be one of adamw, lion, sgd, adafactor, muon; "
                 "got '%s'", name);
    return -1;
}

static int state_dtype_of(const char *name, sj_state_dtype *out) {
    static const char *const NAMES[SJ_STATE__COUNT] = { "fp32", "bf16", "8bit" };
    for (int k = 0; k < SJ_STATE__COUNT; k++)
        if (!strcmp(name, NAMES[k])) { *out = (sj_state_dtype)k; return 0; }
    PyErr_Format(PyExc_ValueError, "optim_state_dtype must be one of fp32, bf16, 8bit; got '%s'",
                 name);
    return -1;
}

/* groups: None, or one (lr_mult, weight_decay) per model tensor. */
static int param_groups(PyObject *seq, sj_model *m, sj_param_group **out) {
    *out = NULL;
    if (seq == Py_None) return 0;
    PyObject *f = PySequence_Fast(seq, "groups must be a sequence of (lr_mult, weight_decay)");
    if (!f) return -1;
    const int n = sj_model_n_tensors(m);
    if (PySequence_Fast_GET_SIZE(f) != n) {
        PyErr_Format(PyExc_ValueError, "groups: %zd entries for %d tensors",
                     PySequence_Fast_GET_SIZE(f), n);
        Py_DECREF(f);
        return -1;
    }
    sj_param_group *g = PyMem_Calloc((size_t)n, sizeof *g);
    for (int i = 0; g && i < n; i++)
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(f, i), "ff", &g[i].lr_mult,
                              &g[i].weight_decay)) {
            PyMem_Free(g);
            g = NULL;
        }
    Py_DECREF(f);
    if (!g) { if (!PyErr_Occurred()) PyErr_NoMemory(); return -1; }
    *out = g;
    return 0;
}

static int opt_init(PyObject *self, PyObject *args, PyObject *kw) {
    OptimizerObject *op = (OptimizerObject *)self;
    static char *kwlist[] = {"model", "lr", "min_lr", "warmup", "steps", "beta1", "beta2",
                             "eps", "weight_decay", "clip", "kind", "momentum", "dampening",
                             "nesterov", "beta2_decay", "eps2", "d", "ns_steps", "ns_a", "ns_b",
                             "ns_c", "ns_eps", "match_rms_adamw", "adamw_lr", "groups",
                             "state_dtype", "state_seed", NULL};
    PyObject *model, *groups_o = Py_None;
    const char *kind = "adamw", *state_dtype = "fp32";
    unsigned long long state_seed = 0;
    sj_train_config tc = { 3e-4f, 3e-5f, 0, 1, 0.9, 0.95, 1e-8f, 0.1f, 1.0f };
    tc.beta2_decay = -0.8f; tc.eps2 = 1e-3f; tc.d = 1.0f;
    tc.ns_steps = 5; tc.ns_a = 3.4445f; tc.ns_b = -4.7750f; tc.ns_c = 2.0315f; tc.ns_eps = 1e-7f;
    tc.adamw_lr = 3e-4f;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|ffiiddfffsddpfffiffffpfOsK", kwlist,
                                     &ModelType, &model, &tc.max_lr, &tc.min_lr,
                                     &tc.warmup_steps, &tc.total_steps, &tc.beta1, &tc.beta2,
                                     &tc.eps, &tc.weight_decay, &tc.clip, &kind, &tc.momentum,
                                     &tc.dampening, &tc.nesterov, &tc.beta2_decay, &tc.eps2,
                                     &tc.d, &tc.ns_steps, &tc.ns_a, &tc.ns_b, &tc.ns_c,
                                     &tc.ns_eps, &tc.match_rms_adamw, &tc.adamw_lr, &groups_o,
                                     &state_dtype, &state_seed))
        return -1;
    tc.state_seed = state_seed;
    if (!MODEL(model)) { PyErr_SetString(PyExc_RuntimeError, "Model not initialised"); return -1; }
    if (op->o) { PyErr_SetString(PyExc_RuntimeError, "Optimizer already initialised"); return -1; }
    sj_param_group *groups;
    if (optim_kind(kind, &tc.kind) < 0 || state_dtype_of(state_dtype, &tc.state_dtype) < 0 ||
        param_groups(groups_o, MODEL(model), &groups) < 0)
        return -1;
    sj_status s = sj_optimizer_create(MODEL(model), &tc, groups, &op->o);
    PyMem_Free(groups);
    if (s) { sj_py_raise(s); return -1; }
    Py_INCREF(model);
    op->model = model;
    return 0;
}

/* optimizer_state_bytes(model, kind, momentum, state_dtype="fp32") -> bytes of
 * that optimizer's state and scratch for the model (sj_optimizer_plan_bytes) */
static PyObject *py_optimizer_state_bytes(PyObject *self, PyObject *args) {
    PyObject *model;
    const char *kind, *state_dtype = "fp32";
    sj_train_config tc = { 1e-3f, 0.0f, 0, 1, 0.9, 0.95, 1e-8f, 0.0f, 0.0f };
    tc.d = 1.0f; tc.ns_steps = 5;
    if (!PyArg_ParseTuple(args, "O!sd|s", &ModelType, &model, &kind, &tc.momentum, &state_dtype))
        return NULL;
    sj_model *m = MODEL(model);
    if (!m || optim_kind(kind, &tc.kind) < 0 || state_dtype_of(state_dtype, &tc.state_dtype) < 0)
        return NULL;
    int64_t bytes;
    sj_status s = sj_optimizer_plan_bytes(m, &tc, &bytes);
    if (s) return sj_py_raise(s);
    return PyLong_FromLongLong(bytes);
}

static void opt_dealloc(PyObject *self) {
    OptimizerObject *op = (OptimizerObject *)self;
    sj_optimizer_free(op->o);
    Py_XDECREF(op->model);
    Py_TYPE(self)->tp_free(self);
}

#define NEED_OPT(self) \
    if (!OPT(self)) { PyErr_SetString(PyExc_RuntimeError, "Optimizer not initialised"); return NULL; }

static PyObject *opt_step(PyObject *self, PyObject *noargs) {
    NEED_OPT(self);
    if (opt_views_ok(self)) return NULL;
    float norm, lr;
    sj_status s;
    SJ_PY_CALL(s, sj_optimizer_step(OPT(self), &norm, &lr));
    if (s) return sj_py_raise(s);
    sj_skip_state st;
    sj_optimizer_skip_state(OPT(self), &st);
    return Py_BuildValue("(ffO)", norm, lr, st.skipped ? Py_True : Py_False);
}

static PyObject *opt_train_step(PyObject *self, PyObject *args) {
    NEED_OPT(self);
    PyObject *a, *b;
    if (!PyArg_ParseTuple(args, "OO", &a, &b)) return NULL;
    if (opt_views_ok(self)) return NULL;
    Py_buffer ta, tb; sj_dtype dt;
    if (token_pair(a, b, &ta, &tb, &dt) < 0) return NULL;
    float loss, norm, lr;
    sj_status s;
    SJ_PY_CALL(s, sj_train_step(OPT(self), ta.buf, tb.buf, dt, (int)ta.shape[0],
                                (int)ta.shape[1], &loss, &norm, &lr));
    PyBuffer_Release(&ta); PyBuffer_Release(&tb);
    if (s) return sj_py_raise(s);
    sj_skip_state st;
    sj_optimizer_skip_state(OPT(self), &st);
    return Py_BuildValue("(fffLO)", loss, norm, lr, (long long)st.tokens,
                         st.skipped ? Py_True : Py_False);
}

static PyObject *opt_state(PyObject *self, PyObject *args) {
    NEED_OPT(self);
    int which;
    if (!PyArg_ParseTuple(args, "i", &which)) return NULL;
    const int count = sj_optimizer_n_states(OPT(self));
    if (which < 0 || which >= count)
        return PyErr_Format(PyExc_ValueError, "state %d out of range [0, %d)", which, count);
    if (opt_views_ok(self)) return NULL;
    ((OptimizerObject *)self)->view_place = model_place(((OptimizerObject *)self)->model);
    int64_t n;
    sj_dtype dtype;
    void *p;
    Py_BEGIN_ALLOW_THREADS p = sj_optimizer_state(OPT(self), which, &dtype, &n);
    Py_END_ALLOW_THREADS
    if (!p) return sj_py_raise(SJ_ERR_RUNTIME);
    return flat_view(self, MODEL(((OptimizerObject *)self)->model), p, n, dtype,
                     &((OptimizerObject *)self)->exports, NULL);
}

static PyObject *opt_state_names(PyObject *self, PyObject *noargs) {
    NEED_OPT(self);
    const int count = sj_optimizer_n_states(OPT(self));
    PyObject *l = PyList_New(count);
    for (int i = 0; l && i < count; i++) {
        PyObject *name = PyUnicode_FromString(sj_optimizer_state_name(OPT(self), i));
        if (!name) { Py_CLEAR(l); break; }
        PyList_SET_ITEM(l, i, name);
    }
    return l;
}

static PyObject *opt_get_step(PyObject *self, void *closure) {
    NEED_OPT(self);
    return PyLong_FromLongLong(sj_optimizer_step_count(OPT(self)));
}

static int opt_set_step(PyObject *self, PyObject *v, void *closure) {
    long long x = v ? PyLong_AsLongLong(v) : -1;
    if (x < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "step must be >= 0");
        return -1;
    }
    sj_optimizer_set_step(OPT(self), x);
    return 0;
}

/* skips() -> (skipped_steps, skip_run); set_skips(skipped_steps, skip_run) */
static PyObject *opt_skips(PyObject *self, PyObject *noargs) {
    NEED_OPT(self);
    sj_skip_state st;
    sj_optimizer_skip_state(OPT(self), &st);
    return Py_BuildValue("(LL)", (long long)st.skipped_steps, (long long)st.skip_run);
}

static PyObject *opt_set_skips(PyObject *self, PyObject *args) {
    NEED_OPT(self);
    long long total, run;
    if (!PyArg_ParseTuple(args, "LL", &total, &run)) return NULL;
    sj_status s = sj_optimizer_set_skips(OPT(self), total, run);
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static PyMethodDef opt_methods[] = {
    {"step", opt_step, METH_NOARGS,
     "step() -> (grad_norm, lr, skipped): clip, update, zero grads"},
    {"train_step", opt_train_step, METH_VARARGS,
     "train_step(tokens, targets) -> (loss, grad_norm, lr, tokens, skipped)"},
    {"skips", opt_skips, METH_NOARGS,
     "skips() -> (skipped_steps, skip_run): updates skipped in all, and in a row (non-finite)"},
    {"set_skips", opt_set_skips, METH_VARARGS, "set_skips(skipped_steps, skip_run) (resume)"},
    {"state", opt_state, METH_VARARGS,
     "state(i) -> view of the i-th state buffer (float32; uint16 bf16 bits; uint8 codes)"},
    {"state_names", opt_state_names, METH_NOARGS,
     "state_names() -> [str]: the state buffers' names, in order"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef opt_getset[] = {
    {"step_count", opt_get_step, opt_set_step, "optimizer steps taken", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject OptimizerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.Optimizer",
    .tp_basicsize = sizeof(OptimizerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine optimizer + schedule + clipping (use smedjan.Trainer).",
    .tp_new = PyType_GenericNew,
    .tp_init = opt_init,
    .tp_dealloc = opt_dealloc,
    .tp_methods = opt_methods,
    .tp_getset = opt_getset,
};

static PyObject *py_inplace_check(PyObject *self, PyObject *args) {
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "K", &seed)) return NULL;
    double diff = 0;
    int in_place[SJ_OP__COUNT];
    sj_status s = sj_tape_inplace_check(seed, &diff, in_place);
    if (s) return sj_py_raise(s);
    PyObject *d = PyDict_New();
    for (int o = 0; d && o < SJ_OP__COUNT; o++) {
        PyObject *v = PyLong_FromLong(in_place[o]);
        if (!v || PyDict_SetItemString(d, sj_ops[o].name, v) < 0) Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d ? Py_BuildValue("(dN)", diff, d) : NULL;
}

static PyObject *py_gradcheck(PyObject *self, PyObject *args) {
    const char *op; unsigned long long seed; int accumulate;
    if (!PyArg_ParseTuple(args, "sKp", &op, &seed, &accumulate)) return NULL;
    double err = 0; char detail[256];
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_op_gradcheck(op, seed, accumulate, &err, detail, sizeof detail);
    Py_END_ALLOW_THREADS
    if (s) return sj_py_raise(s);
    return Py_BuildValue("(ds)", err, detail);
}

static PyMethodDef functions[] = {
    {"tape_inplace_check", py_inplace_check, METH_VARARGS,
     "tape_inplace_check(seed) -> (max_abs_diff, {op: steps in place})"},
    {"op_gradcheck", py_gradcheck, METH_VARARGS,
     "op_gradcheck(op, seed, accumulate) -> (max_rel_err, detail)"},
    {"preset", py_preset, METH_VARARGS, "preset(name, vocab_size) -> config dict"},
    {"preset_names", py_preset_names, METH_NOARGS, "preset_names() -> [str]"},
    {"ffn_dim_for", py_ffn_dim_for, METH_VARARGS, "ffn_dim_for(dim, mult) -> int"},
    {"param_count", py_param_count, METH_VARARGS,
     "param_count(config, active=False) -> int (active: what one token's forward reads)"},
    {"config_canonical", py_config_canonical, METH_O, "config_canonical(config) -> dict"},
    {"rope_freqs", py_rope_freqs, METH_VARARGS,
     "rope_freqs(config, seq_len) -> ([inv_freq], mscale): RoPE as the kernels apply it"},
    {"lr_at", py_lr_at, METH_VARARGS, "lr_at(max_lr, min_lr, warmup, steps, step) -> float"},
    {"optimizer_state_bytes", py_optimizer_state_bytes, METH_VARARGS,
     "optimizer_state_bytes(model, kind, momentum, state_dtype='fp32') -> bytes of its state "
     "and scratch"},
    {NULL, NULL, 0, NULL},
};

int sj_py_add_model(PyObject *m) {
    if (PyType_Ready(&BufferType) < 0 || PyType_Ready(&ModelType) < 0 ||
        PyType_Ready(&OptimizerType) < 0)
        return -1;
    Py_INCREF(&ModelType);
    Py_INCREF(&OptimizerType);
    Py_INCREF(&BufferType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0 ||
        PyModule_AddObject(m, "Optimizer", (PyObject *)&OptimizerType) < 0 ||
        PyModule_AddObject(m, "Buffer", (PyObject *)&BufferType) < 0)
        return -1;
    return PyModule_AddFunctions(m, functions);
}
