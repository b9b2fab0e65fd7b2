/* cuda.c — GPU memory in Python: DeviceTensor (a view of engine device
 * memory that keeps its owner alive, exports DLPack by hand-built
 * DLManagedTensor capsules so torch.from_dlpack views it without a copy,
 * and copies to/from NumPy), device queries, and kernel hooks that run one
 * backend kernel on host arrays for the tests (uploaded, run, downloaded).
 * Nothing here launches work behind the engine's back except the hooks. */
#include "py.h"
#include "../ops/backend.h"
#include <stdlib.h>
#include <string.h>
#ifdef SJ_HAVE_CUDA
#include "../../cuda/sj_cuda.h"
#endif

/* ---- DLPack (https://dmlc.github.io/dlpack), the ABI by hand ----------- */

typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;
typedef struct { uint32_t major, minor; } DLPackVersion;
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;
enum { kDLCPU = 1, kDLCUDA = 2 };
enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 };

/* ---- DeviceTensor ------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *owner;        /* keeps the engine memory alive */
    void *ptr;
    int ndim;
    int64_t shape[4];
    sj_dtype dtype;
    Py_ssize_t *exports;    /* the owner's count of live views */
    sj_model *notify;       /* parameters: refresh the compute copy after writes */
} DeviceTensorObject;

static PyTypeObject DeviceTensorType;

static int64_t dt_numel(const DeviceTensorObject *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

PyObject *sj_py_device_tensor(PyObject *owner, void *ptr, int ndim, const int64_t *shape,
                              sj_dtype dtype, Py_ssize_t *exports, sj_model *notify) {
    DeviceTensorObject *t = PyObject_New(DeviceTensorObject, &DeviceTensorType);
    if (!t) return NULL;
    Py_INCREF(owner);
    t->owner = owner; t->ptr = ptr; t->ndim = ndim; t->dtype = dtype;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->exports = exports; t->notify = notify;
    if (exports) (*exports)++;
    return (PyObject *)t;
}

static void dt_dealloc(PyObject *self) {
    DeviceTensorObject *t = (DeviceTensorObject *)self;
    if (t->exports) (*t->exports)--;
    Py_XDECREF(t->owner);
    Py_TYPE(self)->tp_free(self);
}

static const char *np_name(sj_dtype d) {
    return d == SJ_F32 ? "float32" : d == SJ_F16 ? "float16" : d == SJ_I32 ? "int32"
           : d == SJ_U8 ? "uint8" : "uint16";
}

static PyObject *dt_shape_tuple(const DeviceTensorObject *t) {
    PyObject *s = PyTuple_New(t->ndim);
    for (int i = 0; s && i < t->ndim; i++) PyTuple_SET_ITEM(s, i, PyLong_FromLongLong(t->shape[i]));
    return s;
}

/* numpy.empty(shape, dtype), filled from the device. */
static PyObject *dt_numpy(PyObject *self, PyObject *noargs) {
    DeviceTensorObject *t = (DeviceTensorObject *)self;
    PyObject *np = PyImport_ImportModule("numpy");
    if (!np) return NULL;
    PyObject *shape = dt_shape_tuple(t);
    PyObject *arr = shape ? PyObject_CallMethod(np, "empty", "(Os)", shape, np_name(t->dtype)) : NULL;
    Py_XDECREF(shape);
    Py_DECREF(np);
    if (!arr) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) { Py_DECREF(arr); return NULL; }
    sj_status s;
    Py_BEGIN_ALLOW_THREADS s = sj_cuda_memcpy(view.buf, t->ptr, (size_t)view.len, 1);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (s) { Py_DECREF(arr); return sj_py_raise(s); }
    return arr;
}

static PyObject *dt_array(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dtype", "copy", NULL};
    PyObject *dtype = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO", kwlist, &dtype, &copy)) return NULL;
    if (copy == Py_False) {
        PyErr_SetString(PyExc_ValueError, "a DeviceTensor cannot be viewed as NumPy without a copy");
        return NULL;
    }
    PyObject *a = dt_numpy(self, NULL);
    if (!a || dtype == Py_None) return a;
    PyObject *b = PyObject_CallMethod(a, "astype", "(O)", dtype);
    Py_DECREF(a);
    return b;
}

/* copy_from(array): host -> device, same number of elements, converted to
 * this tensor's dtype by NumPy first. */
static PyObject *dt_copy_from(PyObject *self, PyObject *src) {
    DeviceTensorObject *t = (DeviceTensorObject *)self;
    PyObject *np = PyImport_ImportModule("numpy");
    if (!np) return NULL;
    PyObject *shape = dt_shape_tuple(t);
    PyObject *a = PyObject_CallMethod(np, "asarray", "(Os)", src, np_name(t->dtype));
    PyObject *b = a && shape ? PyObject_CallMethod(np, "broadcast_to", "(OO)", a, shape) : NULL;
    PyObject *c = b ? PyObject_CallMethod(np, "ascontiguousarray", "(O)", b) : NULL;
    Py_XDECREF(a); Py_XDECREF(b); Py_XDECREF(shape); Py_DECREF(np);
    if (!c) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(c, &view, PyBUF_C_CONTIGUOUS) < 0) { Py_DECREF(c); return NULL; }
    sj_status s;
    Py_BEGIN_ALLOW_THREADS
    s = sj_cuda_memcpy(t->ptr, view.buf, (size_t)view.len, 0);
    if (s == SJ_OK && t->notify) s = sj_model_params_updated(t->notify);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_DECREF(c);
    if (s) return sj_py_raise(s);
    Py_RETURN_NONE;
}

static int dt_ass_subscript(PyObject *self, PyObject *key, PyObject *value) {
    int full = key == Py_Ellipsis;
    if (PySlice_Check(key)) {
        PySliceObject *sl = (PySliceObject *)key;
        full = sl->start == Py_None && sl->stop == Py_None && sl->step == Py_None;
    }
    if (!full || !value) {
        PyErr_SetString(PyExc_TypeError, "DeviceTensor supports only whole assignment: t[:] = array "
                        "(use view() for parts, or torch.from_dlpack(t) for anything else)");
        return -1;
    }
    PyObject *r = dt_copy_from(self, value);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* view(offset, shape): a sub-tensor at an element offset, sharing the owner. */
static PyObject *dt_view(PyObject *self, PyObject *args) {
    DeviceTensorObject *t = (DeviceTensorObject *)self;
    long long off; PyObject *shape;
    if (!PyArg_ParseTuple(args, "LO", &off, &shape)) return NULL;
    PyObject *seq = PySequence_Fast(shape, "shape must be a sequence");
    if (!seq) return NULL;
    int nd = (int)PySequence_Fast_GET_SIZE(seq);
    int64_t sh[4], n = 1;
    if (nd < 1 || nd > 4) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "1 to 4 dims"); return NULL; }
    for (int i = 0; i < nd; i++) {
        sh[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        n *= sh[i];
    }
    Py_DECREF(seq);
    if (PyErr_Occurred()) return NULL;
    if (off < 0 || n < 0 || off + n > dt_numel(t)) {
        PyErr_Format(PyExc_ValueError, "view [%lld, %lld) is outside the tensor's %lld elements",
                     off, off + (long long)n, (long long)dt_numel(t));
        return NULL;
    }
    return sj_py_device_tensor(t->owner, (char *)t->ptr + off * (int64_t)sj_dtype_size(t->dtype), nd,
                               sh, t->dtype, t->exports, t->notify);
}

static void dl_deleter(DLManagedTensor *m) {
    PyGILState_STATE st = PyGILState_Ensure();
    Py_XDECREF((PyObject *)m->manager_ctx);
    PyGILState_Release(st);
    free(m);
}
static void dl_deleter_v(DLManagedTensorVersioned *m) {
    PyGILState_STATE st = PyGILState_Ensure();
    Py_XDECREF((PyObject *)m->manager_ctx);
    PyGILState_Release(st);
    free(m);
}
/* A capsule nobody consumed still owns its tensor. */
static void capsule_free(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        if (m && m->deleter) m->deleter(m);
    } else if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m && m->deleter) m->deleter(m);
    }
    PyErr_Clear();
}

static void fill_dl(DLTensor *d, DeviceTensorObject *t, int64_t *shape, int64_t *strides) {
    d->data = t->ptr;
    d->device = (DLDevice){ kDLCUDA, 0 };
    d->ndim = t->ndim;
    d->dtype = (DLDataType){ t->dtype == SJ_F32 || t->dtype == SJ_BF16 || t->dtype == SJ_F16
                                 ? (uint8_t)(t->dtype == SJ_BF16 ? kDLBfloat : kDLFloat)
                                 : (uint8_t)(t->dtype == SJ_I32 ? kDLInt : kDLUInt),
                             (uint8_t)(8 * sj_dtype_size(t->dtype)), 1 };
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) { shape[i] = t->shape[i]; strides[i] = st; st *= t->shape[i]; }
    d->shape = shape;
    d->strides = strides;
    d->byte_offset = 0;
}

/* __dlpack__(stream=None, max_version=None, dl_device=None, copy=None). The
 * engine's work is complete when its calls return, so any stream may read. */
static PyObject *dt_dlpack(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *maxv = Py_None, *dev = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OOOO", kwlist, &stream, &maxv, &dev, &copy))
        return NULL;
    (void)stream;
    if (copy == Py_True) {
        PyErr_SetString(PyExc_BufferError, "DeviceTensor.__dlpack__: copy=True is not supported");
        return NULL;
    }
    if (dev != Py_None) {
        int ty = -1, id = -1;
        if (!PyArg_ParseTuple(dev, "ii", &ty, &id)) return NULL;
        if (ty != kDLCUDA || id != 0) {
            PyErr_SetString(PyExc_BufferError, "DeviceTensor lives on (kDLCUDA, 0)");
            return NULL;
        }
    }
    DeviceTensorObject *t = (DeviceTensorObject *)self;
    int versioned = 0;
    if (maxv != Py_None) {
        long major = PyLong_AsLong(PyTuple_Check(maxv) && PyTuple_GET_SIZE(maxv) > 0
                                       ? PyTuple_GET_ITEM(maxv, 0) : maxv);
        if (major == -1 && PyErr_Occurred()) return NULL;
        versioned = major >= 1;
    }
    if (versioned) {
        DLManagedTensorVersioned *m = calloc(1, sizeof *m + 8 * sizeof(int64_t));
        if (!m) return PyErr_NoMemory();
        int64_t *sh = (int64_t *)(m + 1);
        m->version = (DLPackVersion){ 1, 0 };
        m->manager_ctx = self;
        m->deleter = dl_deleter_v;
        m->flags = 0;
        fill_dl(&m->dl_tensor, t, sh, sh + 4);
        Py_INCREF(self);
        PyObject *cap = PyCapsule_New(m, "dltensor_versioned", capsule_free);
        if (!cap) dl_deleter_v(m);
        return cap;
    }
    DLManagedTensor *m = calloc(1, sizeof *m + 8 * sizeof(int64_t));
    if (!m) return PyErr_NoMemory();
    int64_t *sh = (int64_t *)(m + 1);
    m->manager_ctx = self;
    m->deleter = dl_deleter;
    fill_dl(&m->dl_tensor, t, sh, sh + 4);
    Py_INCREF(self);
    PyObject *cap = PyCapsule_New(m, "dltensor", capsule_free);
    if (!cap) dl_deleter(m);
    return cap;
}

static PyObject *dt_dlpack_device(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("(ii)", kDLCUDA, 0);
}

static PyObject *dt_get_shape(PyObject *self, void *c) { return dt_shape_tuple((DeviceTensorObject *)self); }
static PyObject *dt_get_dtype(PyObject *self, void *c) {
    sj_dtype d = ((DeviceTensorObject *)self)->dtype;
    return PyUnicode_FromString(d == SJ_BF16 ? "bfloat16" : np_name(d));   /* numpy(): raw uint16 bits */
}
static PyObject *dt_get_ndim(PyObject *self, void *c) { return PyLong_FromLong(((DeviceTensorObject *)self)->ndim); }
static PyObject *dt_get_size(PyObject *self, void *c) { return PyLong_FromLongLong(dt_numel((DeviceTensorObject *)self)); }
static PyObject *dt_get_device(PyObject *self, void *c) { return PyUnicode_FromString("cuda"); }
static PyObject *dt_get_ptr(PyObject *self, void *c) {
    return PyLong_FromVoidPtr(((DeviceTensorObject *)self)->ptr);
}
static Py_ssize_t dt_len(PyObject *self) { return (Py_ssize_t)((DeviceTensorObject *)self)->shape[0]; }

static PyObject *dt_repr(PyObject *self) {
    DeviceTensorObject *t = (DeviceTensorObject *)self;
    PyObject *s = dt_shape_tuple(t);
    PyObject *r = PyUnicode_FromFormat("DeviceTensor(shape=%R, dtype=%s, device='cuda')", s, np_name(t->dtype));
    Py_XDECREF(s);
    return r;
}

static PyMethodDef dt_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))dt_dlpack, METH_VARARGS | METH_KEYWORDS,
     "DLPack capsule viewing this memory (no copy)"},
    {"__dlpack_device__", dt_dlpack_device, METH_NOARGS, "(kDLCUDA, 0)"},
    {"numpy", dt_numpy, METH_NOARGS, "numpy() -> a host copy"},
    {"__array__", (PyCFunction)(void (*)(void))dt_array, METH_VARARGS | METH_KEYWORDS, "host copy"},
    {"copy_from", dt_copy_from, METH_O, "copy_from(array): host -> device"},
    {"view", dt_view, METH_VARARGS, "view(offset, shape) -> DeviceTensor"},
    {NULL, NULL, 0, NULL},
};
static PyGetSetDef dt_getset[] = {
    {"shape", dt_get_shape, NULL, "shape", NULL},
    {"dtype", dt_get_dtype, NULL, "NumPy dtype name", NULL},
    {"ndim", dt_get_ndim, NULL, "number of dims", NULL},
    {"size", dt_get_size, NULL, "number of elements", NULL},
    {"device", dt_get_device, NULL, "'cuda'", NULL},
    {"data_ptr", dt_get_ptr, NULL, "device address", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};
static PyMappingMethods dt_mapping = { dt_len, NULL, dt_ass_subscript };

static PyTypeObject DeviceTensorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "smedjan._C.DeviceTensor",
    .tp_basicsize = sizeof(DeviceTensorObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A view of engine GPU memory: torch.from_dlpack(t) (no copy), t.numpy() (copy).",
    .tp_dealloc = dt_dealloc,
    .tp_repr = dt_repr,
    .tp_methods = dt_methods,
    .tp_getset = dt_getset,
    .tp_as_mapping = &dt_mapping,
};

/* ---- device queries ------------------------------------------------------ */

static PyObject *py_cuda_info(PyObject *self, PyObject *noargs) {
    int n = sj_cuda_device_count();
    PyObject *names = PyList_New(0);
    for (int i = 0; names && i < n; i++) {
        PyObject *s = PyUnicode_FromString(sj_cuda_device_name(i));
        PyList_Append(names, s);
        Py_XDECREF(s);
    }
    return Py_BuildValue("{s:O,s:i,s:N}", "compiled", sj_cuda_compiled() ? Py_True : Py_False,
                         "devices", n, "names", names);
}

static PyObject *py_cuda_memory(PyObject *self, PyObject *args) {
    int reset = 0;
    if (!PyArg_ParseTuple(args, "|p", &reset)) return NULL;
#ifdef SJ_HAVE_CUDA
    if (reset) sj_cuda_reset_peak();
    return Py_BuildValue("(LL)", (long long)sj_cuda_bytes_in_use(), (long long)sj_cuda_peak_bytes());
#else
    return Py_BuildValue("(ii)", 0, 0);
#endif
}

/* ---- kernel hooks for tests --------------------------------------------- */

#ifdef SJ_HAVE_CUDA
static PyObject *py_attention_variant(PyObject *self, PyObject *args) {
    int v;
    if (!PyArg_ParseTuple(args, "i", &v)) return NULL;
    sj_cuda_set_attention_variant(v);
    Py_RETURN_NONE;
}
#endif

/* One argument of a hooked kernel: host array in, device buffer, maybe out. */
typedef struct { const char *name; char kind; Py_buffer view; void *dev; float *stage; int64_t n; } harg;

static void *hctx[2];   /* per backend.device: a CUDA stream is no CPU context */

/* Upload arrays[name] ('a': act dtype from f32, 'f': f32, 't': int32). */
static int hupload(const sj_backend *be, PyObject *arrays, harg *a) {
    PyObject *o = PyDict_GetItemString(arrays, a->name);
    if (!o) { PyErr_Format(PyExc_KeyError, "cuda_op: missing array '%s'", a->name); return -1; }
    if (PyObject_GetBuffer(o, &a->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    a->n = a->view.len / 4;
    if (a->view.itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "cuda_op: '%s' must be float32 or int32", a->name);
        return -1;
    }
    const size_t esz = a->kind == 'a' ? sj_dtype_size(be->act_dtype) : 4;
    a->dev = be->alloc(esz * (size_t)a->n + 256, a->name);
    a->stage = a->dev && a->kind == 'a' ? be->alloc(4 * (size_t)a->n + 256, a->name) : NULL;
    if (!a->dev || (a->kind == 'a' && !a->stage)) { sj_py_raise(SJ_ERR_NOMEM); return -1; }
    if (a->kind == 'a') {
        be->from_host(a->stage, a->view.buf, 4 * (size_t)a->n);
        be->convert(a->dev, be->act_dtype, a->stage, SJ_F32, a->n);
    } else {
        be->from_host(a->dev, a->view.buf, 4 * (size_t)a->n);
    }
    return 0;
}

static PyObject *hdownload(const sj_backend *be, harg *a) {
    PyObject *np = PyImport_ImportModule("numpy");
    if (!np) return NULL;
    PyObject *arr = PyObject_CallMethod(np, "empty", "(Ls)", (long long)a->n,
                                        a->kind == 't' ? "int32" : "float32");
    Py_DECREF(np);
    if (!arr) return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(arr, &v, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) { Py_DECREF(arr); return NULL; }
    if (a->kind == 'a') {
        be->convert(a->stage, SJ_F32, a->dev, be->act_dtype, a->n);
        be->to_host(v.buf, a->stage, 4 * (size_t)a->n);
    } else {
        be->to_host(v.buf, a->dev, 4 * (size_t)a->n);
    }
    PyBuffer_Release(&v);
    return arr;
}

/* CUDA events around the timed runs; none on the CPU (no "ms"). */
static void *htimer_begin(const sj_backend *be) {
#ifdef SJ_HAVE_CUDA
    if (be->device) return sj_cuda_timer_begin();
#endif
    (void)be;
    return NULL;
}
static float htimer_end(void *timer) {
#ifdef SJ_HAVE_CUDA
    return sj_cuda_timer_end(timer);
#else
    (void)timer;
    return -1.f;
#endif
}

/* A RoPE table given as its values: inv_freq (hd/2 floats) and mscale. */
static int rope_given(PyObject *inv_o, PyObject *mscale_o, int hd, sj_rope *r) {
    PyObject *inv = PySequence_Fast(inv_o, "cuda_op: inv_freq must be a sequence");
    if (!inv) return -1;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(inv);
    if (n != hd / 2) {
        PyErr_Format(PyExc_ValueError, "cuda_op: %zd frequencies for head dim %d", n, hd);
    } else {
        r->n_pairs = (int)n;
        r->mscale = (float)PyFloat_AsDouble(mscale_o);
        for (Py_ssize_t i = 0; i < n; i++)
            r->inv_freq[i] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(inv, i));
    }
    Py_DECREF(inv);
    return PyErr_Occurred() ? -1 : 0;
}

/* A RoPE op's table from its `floats`: a config dict (sj_rope_init at the
 * op's T), (inv_freq list, mscale), or (theta,): plain RoPE at base theta. */
static int rope_from(PyObject *spec, int hd, int T, sj_rope *r) {
    static const char usage[] = "cuda_op: a RoPE op's floats are a config dict, (inv_freq, "
                                "mscale) or (theta,)";
    if (hd < 2 || hd > 2 * SJ_ROPE_MAX_PAIRS) {
        PyErr_Format(PyExc_ValueError, "cuda_op: RoPE head dim %d is not in 2..%d", hd,
                     2 * SJ_ROPE_MAX_PAIRS);
        return -1;
    }
    sj_config c;
    memset(&c, 0, sizeof c);
    if (PyDict_Check(spec)) {
        if (sj_py_config_from_dict(spec, &c)) return -1;
        if (c.dim / c.n_heads != hd) {
            PyErr_Format(PyExc_ValueError, "cuda_op: the config's head dim is %d, the op's %d",
                         c.dim / c.n_heads, hd);
            return -1;
        }
    } else {
        PyObject *f = PySequence_Fast(spec, usage);
        if (!f) return -1;
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(f);
        int bad = 0;
        if (n == 2) {
            bad = rope_given(PySequence_Fast_GET_ITEM(f, 0), PySequence_Fast_GET_ITEM(f, 1), hd, r);
        } else if (n == 1) {
            c.dim = hd; c.n_heads = 1;
            c.rope_theta = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(f, 0));
            bad = PyErr_Occurred() != NULL;
        } else {
            PyErr_SetString(PyExc_ValueError, usage);
            bad = 1;
        }
        Py_DECREF(f);
        if (bad || n == 2) return bad ? -1 : 0;
    }
    sj_status s = sj_rope_init(r, &c, T);
    if (s) { sj_py_raise(s); return -1; }
    return 0;
}

/* cuda_op(name, dtype, arrays, ints, floats, reps=0) -> {name: float32
 * array} for every argument (outputs as the kernel left them; inputs
 * unchanged); with reps > 0 on CUDA also "ms": device milliseconds per run,
 * timed with CUDA events over reps runs after one warm-up. The optional
 * fused projections also give "fused": whether the backend ran them (else
 * the outputs are untouched). dtype "cpu" runs the CPU backend's kernel
 * (f32), in every build, so that the tests hold both backends to one
 * reference. RoPE ops (rope_forward, rope_backward, matmul_rope) take
 * their table as `floats`, see rope_from. */
static PyObject *py_cuda_op(PyObject *self, PyObject *args) {
    const char *op, *dts;
    PyObject *arrays, *ints_o, *floats_o;
    int reps = 0;
    if (!PyArg_ParseTuple(args, "ssO!OO|i", &op, &dts, &PyDict_Type, &arrays, &ints_o, &floats_o,
                          &reps))
        return NULL;
    if (reps < 0) reps = 0;
    float ms = -1.f;
    const int cuda_dtype = !strcmp(dts, "fp32") || !strcmp(dts, "bf16") || !strcmp(dts, "fp16");
    if (!cuda_dtype && strcmp(dts, "cpu"))
        return PyErr_Format(PyExc_ValueError, "cuda_op: dtype must be 'cpu', 'fp32', 'bf16' or "
                            "'fp16', got '%s'", dts);
    const sj_backend *be = sj_cpu_backend();
    sj_status st = SJ_OK;
    if (cuda_dtype &&
        (st = sj_backend_for(SJ_DEVICE_CUDA, !strcmp(dts, "fp32") ? SJ_F32 :
                             !strcmp(dts, "bf16") ? SJ_BF16 : SJ_F16, &be)))
        return sj_py_raise(st);
    long long I[16] = {0};
    double Fl[8] = {0};
    PyObject *si = PySequence_Fast(ints_o, "ints");
    if (!si) return NULL;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(si) && i < 16; i++)
        I[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(si, i));
    const Py_ssize_t n_ints = PySequence_Fast_GET_SIZE(si);
    Py_DECREF(si);
    if (PyErr_Occurred()) return NULL;
    sj_rope rope;   /* RoPE ops, ints (B, T, n_heads, n_rot, hd, ...) */
    Py_ssize_t n_floats = 0;
    if (!strcmp(op, "rope_forward") || !strcmp(op, "rope_backward") || !strcmp(op, "matmul_rope") ||
        !strncmp(op, "mla_pack_", 9)) {   /* mla_pack: ints[4] is its rotary dim */
        if (rope_from(floats_o, (int)I[4], (int)I[1], &rope)) return NULL;
    } else {
        PyObject *sf = PySequence_Fast(floats_o, "floats");
        if (!sf) return NULL;
        n_floats = PySequence_Fast_GET_SIZE(sf);
        for (Py_ssize_t i = 0; i < n_floats && i < 8; i++)
            Fl[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(sf, i));
        Py_DECREF(sf);
        if (PyErr_Occurred()) return NULL;
    }
    void **ctx = &hctx[be->device != 0];
    if (!*ctx && !(*ctx = be->ctx_create())) return sj_py_raise(SJ_ERR_RUNTIME);
    be->bind(*ctx);

    /* Argument lists, outputs first as in backend.h. 'c' = act or f32 by c_f32. */
    static const struct { const char *op; const char *names[8]; const char *kinds; } specs[] = {
        {"matmul", {"C", "A", "B"}, "caa"},
        {"embedding_forward", {"out", "tok", "emb"}, "ata"},
        {"embedding_backward", {"demb", "dout", "tok"}, "fat"},
        {"rmsnorm_forward", {"out", "rstd", "x", "w"}, "afaa"},
        {"rmsnorm_backward", {"dx", "dw", "dout", "x", "w", "rstd"}, "afaaaf"},
        {"rope_forward", {"out", "in"}, "aa"},
        {"rope_backward", {"din", "dout"}, "aa"},
        {"attention_forward", {"out", "lse", "qkv"}, "afa"},
        {"attention_backward", {"dqkv", "dout", "qkv", "out", "lse"}, "aaaaf"},
        {"swiglu_forward", {"h", "gu"}, "aa"},
        {"swiglu_backward", {"dgu", "dh", "gu"}, "aaa"},
        {"add", {"out", "a", "b"}, "aaa"},
        {"copy", {"dst", "src"}, "aa"},
        {"cross_entropy_forward", {"losses", "lse", "logits", "targets"}, "ffat"},
        {"cross_entropy_backward", {"dlogits", "logits", "lse", "targets", "scale"}, "aafff"},
        {"adamw", {"p", "p_act", "g", "m", "v"}, "fafff"},
        {"matmul_add", {"D", "C", "A", "B"}, "aaaa"},
        {"matmul_swiglu", {"h", "gu", "x", "w"}, "aaaa"},
        {"matmul_rope", {"out", "x", "w"}, "aaa"},
        {"pair_heads_forward", {"out", "in"}, "aa"},
        {"pair_heads_backward", {"din", "dout"}, "aa"},
        {"mix_forward", {"out", "x", "y"}, "aaa"},
        {"mix_backward", {"dx", "dy", "dout"}, "aaa"},
        {"qk_norm_forward", {"out", "rstd", "qkv", "wq", "wk"}, "afaaa"},
        {"qk_norm_backward", {"dqkv", "dwq", "dwk", "dout", "qkv", "wq", "wk", "rstd"}, "affaaaaf"},
        {"gather_rows_forward", {"out", "x", "idx"}, "aat"},
        {"gather_rows_backward", {"dx", "dout", "idx"}, "aat"},
        /* MoE: the record is f32 slots holding int32 bits (uploaded as is) */
        {"moe_route_forward", {"weights", "record", "logits", "bias", "stats"}, "afaaf"},
        {"moe_route_backward", {"dlogits", "bias_master", "dweights", "logits", "weights", "record",
                                "stats"}, "afaaaff"},
        {"moe_permute_forward", {"xp", "x", "record"}, "aaf"},
        {"moe_permute_backward", {"dx", "dxp", "record"}, "aaf"},
        {"moe_unpermute_forward", {"y", "yp", "weights", "record"}, "aaaf"},
        {"moe_unpermute_backward", {"dyp", "dweights", "dy", "yp", "weights", "record"}, "aaaaaf"},
        {"moe_matmul", {"y", "x", "w", "record"}, "aaaf"},
        {"moe_matmul_wgrad", {"dw", "dy", "x", "record"}, "faaf"},
        {"sgd_state", {"p", "g", "buf", "absmax"}, "ffff"},
        {"mla_pack_forward", {"out", "q", "kv", "kpe"}, "aaaa"},
        {"mla_pack_backward", {"dq", "dkv", "dkpe", "dout"}, "aaaa"},
        {"head_slice_forward", {"out", "in"}, "aa"},
        {"head_slice_backward", {"din", "dout"}, "aa"},
        {"scan_forward", {"y", "qk", "v", "a"}, "aaaa"},
        {"scan_backward", {"dqk", "dv", "da", "dy", "qk", "v", "a", "y"}, "aaaaaaaa"},
        {"conv1d_silu_forward", {"out", "x", "w", "bias"}, "aaaa"},
        {"conv1d_silu_backward", {"dx", "dw", "dbias", "dout", "x", "w", "bias"}, "affaaaa"},
        {"ssd_prep_forward", {"v", "a", "x", "dt_raw", "p"}, "aaaaa"},
        {"ssd_prep_backward", {"dx", "ddt_raw", "dp", "dv", "da", "x", "dt_raw", "p"}, "aafaaaaa"},
        {"ssd_skip_forward", {"out", "y", "x", "D"}, "aaaa"},
        {"ssd_skip_backward", {"dy", "dx", "dD", "dout", "x", "D"}, "aafaaa"},
        {"gated_rmsnorm_forward", {"out", "rstd", "y", "z", "w"}, "afaaa"},
        {"gated_rmsnorm_backward", {"dy", "dz", "dw", "dout", "y", "z", "w", "rstd"}, "aafaaaaf"},
        {"linear_prep_forward", {"u", "a", "p"}, "aaa"},
        {"linear_prep_backward", {"dp", "du", "da", "p"}, "aaaa"},
        {"linear_norm_forward", {"out", "y"}, "aa"},
        {"linear_norm_backward", {"dy", "dout", "y"}, "aaa"},
    };
    int k = -1, fused = 0;
    for (int i = 0; i < (int)(sizeof specs / sizeof specs[0]); i++)
        if (!strcmp(specs[i].op, op)) k = i;
    if (k < 0) return PyErr_Format(PyExc_ValueError, "cuda_op: unknown op '%s'", op);
    harg a[8];
    memset(a, 0, sizeof a);
    int na = (int)strlen(specs[k].kinds);
    PyObject *result = NULL;
    for (int i = 0; i < na; i++) {
        a[i].name = specs[k].names[i];
        a[i].kind = specs[k].kinds[i];
        if (a[i].kind == 'c') a[i].kind = I[6] ? 'f' : 'a';
        if (!strcmp(op, "cross_entropy_backward") && i == 3) a[i].kind = 't';
        if (hupload(be, arrays, &a[i]) < 0) goto done;
    }
    #define D(i) (a[i].dev)
    Py_BEGIN_ALLOW_THREADS
    /* reps > 0 (benchmarks): one warm-up run, then reps runs between CUDA
     * events on the same device buffers (outputs are overwritten or, with
     * accum, keep growing; inputs stay unless the op works in place). */
    void *timer = NULL;
    for (int rep = 0; rep <= reps; rep++) {
    if (rep == 1) timer = htimer_begin(be);
    switch (k) {
    case 0: sj_matmul(be, D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], (int)I[6]); break;
    case 1: be->embedding_forward(D(0), D(1), SJ_I32, D(2), (int)I[0], (int)I[1]); break;
    case 2: be->embedding_backward(D(0), D(1), D(2), SJ_I32, (int)I[0], (int)I[1]); break;
    case 3: be->rmsnorm_forward(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (float)Fl[0]); break;
    case 4: /* ints[3] = dw_accum (default 1: added into) */
        be->rmsnorm_backward(D(0), D(1), D(2), D(3), D(4), D(5), (int)I[0], (int)I[1], (int)I[2],
                             n_ints > 3 ? (int)I[3] : 1);
        break;
    case 5: /* ints[6] = in place: out is the input buffer */
        be->rope_forward(I[6] ? D(1) : D(0), D(1), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], &rope);
        break;
    case 6: /* ints[7] = in place: din is the dout buffer */
        be->rope_backward(I[7] ? D(1) : D(0), D(1), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], &rope, (int)I[6]);
        break;
    /* attention: ints (B, T, H, KV, hd, window[, accum]) */
    case 7: be->attention_forward(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5]); break;
    case 8: be->attention_backward(D(0), D(1), D(2), D(3), D(4), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], (int)I[6]); break;
    /* swiglu: the activation (SJ_FFN_*) is the last int, after accum */
    case 9: be->swiglu_forward(D(0), D(1), (int)I[0], (int)I[1], (int)I[2]); break;
    case 10: be->swiglu_backward(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[3], (int)I[2]); break;
    /* add, copy: floats[0] = the factor (default 1) */
    case 11: be->add(D(0), D(1), D(2), I[0], n_floats ? (float)Fl[0] : 1.0f); break;
    case 12: be->copy(D(0), D(1), I[0], n_floats ? (float)Fl[0] : 1.0f, (int)I[1]); break;
    case 13: be->cross_entropy_forward(D(0), D(1), D(2), D(3), SJ_I32, (int)I[0], (int)I[1], (int)I[1], (int)I[2]); break;
    case 14: /* ints[4] = in place: dlogits is the logits buffer */
        be->cross_entropy_backward(I[4] ? D(1) : D(0), D(1), D(2), D(3), SJ_I32, (int)I[0], (int)I[1], (int)I[1], (int)I[2], D(4), (int)I[3]);
        break;
    case 15: {  /* sumsq then adamw, hyper-parameters in device memory; weight decay
                 * on [0, n_decay) (ints[1]) */
        sj_optim_hp hp = { .lr = (float)Fl[0], .beta1 = (float)Fl[1], .beta2 = (float)Fl[2],
                           .eps = (float)Fl[3], .clip = (float)Fl[5], .step = I[2] };
        sj_optim_hp *dhp = be->alloc(sizeof hp, "hp");
        if (!dhp) break;
        be->from_host(dhp, &hp, sizeof hp);
        be->sumsq(&dhp->sumsq, D(2), I[0]);
        const size_t as = sj_dtype_size(be->act_dtype);
        be->adamw(D(0), I[3] ? D(1) : NULL, D(2), 1, sj_state_f32(D(3)), sj_state_f32(D(4)), I[1],
                  1.0f, (float)Fl[4], dhp);
        be->adamw((float *)D(0) + I[1], I[3] ? (char *)D(1) + I[1] * as : NULL,
                  (float *)D(2) + I[1], 1, sj_state_f32((float *)D(3) + I[1]),
                  sj_state_f32((float *)D(4) + I[1]), I[0] - I[1], 1.0f, 0.0f, dhp);
        be->to_host(&hp, dhp, sizeof hp);
        be->free(dhp);
        Fl[7] = hp.sumsq;
        break;
    }
    case 16: /* ints[5] = in place: D is the C buffer */
        be->matmul_add(I[5] ? D(1) : D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4]);
        break;
    case 17: /* ints[3]: gu stored too; ints[4]: the activation */
        fused = be->matmul_swiglu && be->matmul_swiglu(D(0), I[3] ? D(1) : NULL, D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[4]);
        break;
    case 18:
        fused = be->matmul_rope && be->matmul_rope(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], &rope);
        break;
    case 19: be->pair_heads_forward(D(0), D(1), (int)I[0], (int)I[1], (int)I[2]); break;
    case 20: be->pair_heads_backward(D(0), D(1), (int)I[0], (int)I[1], (int)I[2], (int)I[3]); break;
    case 21: /* ints[4] = in place: out is the x buffer */
        be->mix_forward(I[4] ? D(1) : D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (float)Fl[0]);
        break;
    case 22: /* ints[6] = in place: dx is the dout buffer; ints[7] = no dy (NULL) */
        be->mix_backward(I[6] ? D(2) : D(0), I[7] ? NULL : D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (float)Fl[0], (int)I[4], (int)I[5]);
        break;
    case 23: /* ints[4] = weighted (else no gains: NULL), ints[5] = in place: out is qkv */
        be->qk_norm_forward(I[5] ? D(2) : D(0), D(1), D(2), I[4] ? D(3) : NULL, I[4] ? D(4) : NULL,
                            (int)I[0], (int)I[1], (int)I[2], (int)I[3], (float)Fl[0]);
        break;
    case 24: /* ints[4] = weighted, ints[5] = accum, ints[6] = dw_accum, ints[7] = in place:
              * dqkv is dout */
        be->qk_norm_backward(I[7] ? D(3) : D(0), I[4] ? D(1) : NULL, I[4] ? D(2) : NULL, D(3), D(4),
                             I[4] ? D(5) : NULL, I[4] ? D(6) : NULL, D(7), (int)I[0], (int)I[1],
                             (int)I[2], (int)I[3], (int)I[5], (int)I[6]);
        break;
    case 25: be->gather_rows_forward(D(0), D(1), D(2), (int)I[0], (int)I[1]); break;   /* R, C */
    case 26: /* N, R, C, accum */
        be->gather_rows_backward(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3]);
        break;
    /* MoE: ints start (N, E, k); route: then router, norm_topk, accum, with bias (forward) or
     * bias_master (backward); floats: aux_coef, z_coef, bias_rate */
    case 27:
    case 28: {
        const sj_moe_route route = { (int)I[3], (int)I[4], (float)Fl[0], (float)Fl[1], (float)Fl[2],
                                     D(k == 27 ? 4 : 6) };
        if (k == 27)
            be->moe_route_forward(D(0), D(1), D(2), I[6] ? D(3) : NULL, (int)I[0], (int)I[1], (int)I[2], &route);
        else
            be->moe_route_backward(D(0), I[6] ? D(1) : NULL, D(2), D(3), D(4), D(5), (int)I[0], (int)I[1],
                                   (int)I[2], &route, (int)I[5]);
        break;
    }
    case 29: be->moe_permute_forward(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3]); break;
    case 30: be->moe_permute_backward(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4]); break;
    case 31: be->moe_unpermute_forward(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3]); break;
    case 32: /* C, accum_yp, accum_w */
        be->moe_unpermute_backward(D(0), D(1), D(2), D(3), D(4), D(5), (int)I[0], (int)I[1], (int)I[2],
                                   (int)I[3], (int)I[4], (int)I[5]);
        break;
    case 33: /* n, K, transB, accum */
        be->moe_matmul(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], (int)I[6]);
        break;
    case 34: /* n, K, accum */
        be->moe_matmul_wgrad(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5]);
        break;
    case 35: {  /* SGD, no clip or decay, over a state stored as ints (n, state dtype, q8
                 * signed, seed, step); buf and absmax: f32 arrays holding its bytes;
                 * floats (lr, momentum). Step 1 stores g itself: the codec alone. */
        sj_optim_hp hp = { .lr = (float)Fl[0], .momentum = (float)Fl[1],
                           .one_minus_dampening = 1.0f, .state_seed = (uint64_t)I[3],
                           .step = I[4] };
        sj_optim_hp *dhp = be->alloc(sizeof hp, "hp");
        if (!dhp) break;
        be->from_host(dhp, &hp, sizeof hp);
        be->sumsq(&dhp->sumsq, D(1), I[0]);
        const sj_state buf = { D(2), D(3), (int)I[1], (int)I[2], 0 };
        be->sgd(D(0), NULL, D(1), 0, buf, I[0], 1.0f, 0.0f, dhp);
        be->free(dhp);
        break;
    }
    /* mla_pack: ints (B, T, H, dn, dr, dv[, accum_q, accum_kv, accum_kpe, which]); which:
     * bit k set leaves gradient k out (NULL) */
    case 36: be->mla_pack_forward(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], &rope); break;
    case 37:
        be->mla_pack_backward(I[9] & 1 ? NULL : D(0), I[9] & 2 ? NULL : D(1), I[9] & 4 ? NULL : D(2), D(3),
                              (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5], &rope,
                              (int)I[6], (int)I[7], (int)I[8]);
        break;
    case 38: be->head_slice_forward(D(0), D(1), (int)I[0], (int)I[1], (int)I[2], (int)I[3]); break;   /* N, H, hd_in, hd_out */
    case 39: be->head_slice_backward(D(0), D(1), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4]); break;
    case 40: case 41: {   /* ints: sj_scan_dims (12), no decay, accum qk, v, a; floats: scale */
        const sj_scan_dims sd = { (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5],
                                  (int)I[6], (int)I[7], (int)I[8], (int)I[9], (int)I[10], (int)I[11] };
        if (k == 40) be->scan_forward(D(0), D(1), D(2), I[12] ? NULL : D(3), &sd, (float)Fl[0]);
        else be->scan_backward(D(0), D(1), D(2), D(3), D(4), D(5), I[12] ? NULL : D(6), D(7), &sd,
                               (float)Fl[0], (int)I[13], (int)I[14], (int)I[15]);
        break;
    }
    case 42: be->conv1d_silu_forward(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5]); break;
    case 43: /* B, T, ld, off, W, K, accum, dw_accum */
        be->conv1d_silu_backward(D(0), D(1), D(2), D(3), D(4), D(5), D(6), (int)I[0], (int)I[1], (int)I[2],
                                 (int)I[3], (int)I[4], (int)I[5], (int)I[6], (int)I[7]);
        break;
    case 44: be->ssd_prep_forward(D(0), D(1), D(2), D(3), D(4), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4], (int)I[5]); break;
    case 45: /* N, H, P, ldx, ld, off, accum_x, accum_dt, dw_accum */
        be->ssd_prep_backward(D(0), D(1), D(2), D(3), D(4), D(5), D(6), D(7), (int)I[0], (int)I[1], (int)I[2],
                              (int)I[3], (int)I[4], (int)I[5], (int)I[6], (int)I[7], (int)I[8]);
        break;
    case 46: be->ssd_skip_forward(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3]); break;
    case 47: /* N, H, P, ldx, accum_y, accum_x, dw_accum */
        be->ssd_skip_backward(D(0), D(1), D(2), D(3), D(4), D(5), (int)I[0], (int)I[1], (int)I[2], (int)I[3],
                              (int)I[4], (int)I[5], (int)I[6]);
        break;
    case 48: /* N, Din, G, ld, off; eps */
        be->gated_rmsnorm_forward(D(0), D(1), D(2), D(3), D(4), (int)I[0], (int)I[1], (int)I[2], (int)I[3],
                                  (int)I[4], (float)Fl[0]);
        break;
    case 49: /* N, Din, G, ld, off, accum_y, accum_z, dw_accum */
        be->gated_rmsnorm_backward(D(0), D(1), D(2), D(3), D(4), D(5), D(6), D(7), (int)I[0], (int)I[1],
                                   (int)I[2], (int)I[3], (int)I[4], (int)I[5], (int)I[6], (int)I[7]);
        break;
    case 50: /* N, H, hd, feature, normalize; a: the gate (always given) */
        be->linear_prep_forward(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4]);
        break;
    case 51: /* N, H, hd, feature, normalize, accum */
        be->linear_prep_backward(D(0), D(1), D(2), D(3), (int)I[0], (int)I[1], (int)I[2], (int)I[3], (int)I[4],
                                 (int)I[5]);
        break;
    case 52: be->linear_norm_forward(D(0), D(1), (int)I[0], (int)I[1], (int)I[2], (float)Fl[0]); break;
    case 53: /* N, H, hd, accum; eps */
        be->linear_norm_backward(D(0), D(1), D(2), (int)I[0], (int)I[1], (int)I[2], (float)Fl[0], (int)I[3]);
        break;
    }
    }
    if (timer) ms = htimer_end(timer) / reps;
    /* in place: the result is in the input's buffer (the loss's gradient in
     * the logits, rope's output in its input, the sum in the addend) */
    if ((k == 14 && I[4]) || (k == 5 && I[6]) || (k == 6 && I[7]) || (k == 16 && I[5]) ||
        (k == 21 && I[4])) {
        void *t = a[0].dev; a[0].dev = a[1].dev; a[1].dev = t;
    }
    if (k == 22 && I[6]) { void *t = a[0].dev; a[0].dev = a[2].dev; a[2].dev = t; }
    /* qk_norm: its output in qkv, its dqkv in dout */
    if (k == 23 && I[5]) { void *t = a[0].dev; a[0].dev = a[2].dev; a[2].dev = t; }
    if (k == 24 && I[7]) { void *t = a[0].dev; a[0].dev = a[3].dev; a[3].dev = t; }
    Py_END_ALLOW_THREADS
    #undef D
    st = be->sync();
    if (st) { sj_py_raise(st); goto done; }
    result = PyDict_New();
    for (int i = 0; result && i < na; i++) {
        PyObject *arr = hdownload(be, &a[i]);
        if (!arr || PyDict_SetItemString(result, a[i].name, arr) < 0) { Py_XDECREF(arr); Py_CLEAR(result); break; }
        Py_DECREF(arr);
    }
    if (result && reps > 0 && be->device) {
        PyObject *v = PyFloat_FromDouble(ms);
        PyDict_SetItemString(result, "ms", v);
        Py_XDECREF(v);
    }
    if (result && (k == 17 || k == 18) && PyDict_SetItemString(result, "fused", fused ? Py_True : Py_False) < 0)
        Py_CLEAR(result);
    if (result && k == 15) {
        PyObject *v = PyFloat_FromDouble(Fl[7]);
        PyDict_SetItemString(result, "sumsq", v);
        Py_XDECREF(v);
    }
    if (result) {
        st = be->sync();
        if (st) { Py_CLEAR(result); sj_py_raise(st); }
    }
done:
    for (int i = 0; i < na; i++) {
        if (a[i].view.obj) PyBuffer_Release(&a[i].view);
        if (a[i].dev) be->free(a[i].dev);
        if (a[i].stage) be->free(a[i].stage);
    }
    return result;
}

static PyMethodDef functions[] = {
    {"cuda_info", py_cuda_info, METH_NOARGS, "cuda_info() -> {compiled, devices, names}"},
    {"cuda_memory", py_cuda_memory, METH_VARARGS,
     "cuda_memory(reset_peak=False) -> (bytes now, peak) held by the CUDA backend"},
    {"cuda_op", py_cuda_op, METH_VARARGS,
     "cuda_op(op, dtype, arrays, ints, floats, reps=0) -> dict (tests; dtype 'cpu': the CPU "
     "backend; reps>0 on CUDA adds 'ms')"},
#ifdef SJ_HAVE_CUDA
    {"cuda_attention_variant", py_attention_variant, METH_VARARGS, "0 auto, 1 simple, 2 mma.sync only (tests)"},
#endif
    {NULL, NULL, 0, NULL},
};

int sj_py_add_cuda(PyObject *m) {
    if (PyType_Ready(&DeviceTensorType) < 0) return -1;
    Py_INCREF(&DeviceTensorType);
    if (PyModule_AddObject(m, "DeviceTensor", (PyObject *)&DeviceTensorType) < 0) return -1;
    return PyModule_AddFunctions(m, functions);
}
