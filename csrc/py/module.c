/* module.c — smedjan._C: status -> exception mapping, the Ctrl-C guard,
 * token checks, and module init. Each engine area adds itself in its own
 * file (model.c, tokenizer.c). */
#include "py.h"
#include <signal.h>
#include <string.h>

static PyObject *OutOfMemoryError;

/* OutOfMemoryError(message), with the figures of the memory check that
 * refused (None where the failure was not one, or a figure is unknown). */
static void raise_oom(const char *msg) {
    PyObject *e = PyObject_CallFunction(OutOfMemoryError, "s", msg);
    if (!e) return;
    const sj_oom_info *o = sj_last_oom();
    const struct { const char *name; int64_t v; } f[] = {
        { "requested", o ? o->requested : -1 }, { "available", o ? o->available : -1 },
        { "held", o ? o->held : -1 }, { "limit", o && o->limit > 0 ? o->limit : -1 },
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        PyObject *v = f[i].v >= 0 ? PyLong_FromLongLong(f[i].v) : (Py_INCREF(Py_None), Py_None);
        if (!v || PyObject_SetAttrString(e, f[i].name, v) < 0) { Py_XDECREF(v); Py_DECREF(e); return; }
        Py_DECREF(v);
    }
    PyObject *dev = o ? PyUnicode_FromString(o->device == SJ_DEVICE_CUDA ? "cuda" : "cpu")
                      : (Py_INCREF(Py_None), Py_None);
    if (!dev || PyObject_SetAttrString(e, "device", dev) < 0) { Py_XDECREF(dev); Py_DECREF(e); return; }
    Py_DECREF(dev);
    PyErr_SetObject(OutOfMemoryError, e);
    Py_DECREF(e);
}

PyObject *sj_py_raise(sj_status s) {
    const char *msg = sj_last_error();
    if (!msg || !*msg) msg = "smedjan engine error";
    switch (s) {
    case SJ_ERR_ARG: case SJ_ERR_FORMAT: PyErr_SetString(PyExc_ValueError, msg); break;
    case SJ_ERR_IO: PyErr_SetString(PyExc_OSError, msg); break;
    case SJ_ERR_NOMEM: raise_oom(msg); break;
    case SJ_ERR_INTERRUPTED: PyErr_SetNone(PyExc_KeyboardInterrupt); break;
    default: PyErr_SetString(PyExc_RuntimeError, msg); break;
    }
    return NULL;
}

static void on_sigint(int sig) { (void)sig; sj_interrupt(); }

/* Only the main thread owns SIGINT; calls from other threads run unguarded
 * (Python would not deliver Ctrl-C to them either). */
void sj_py_sig_enter(sj_py_sigguard *g) {
    g->armed = PyGILState_Check() && _PyOS_IsMainThread();
    sj_interrupt_clear();
    if (g->armed) g->old = signal(SIGINT, on_sigint);
}

void sj_py_sig_leave(sj_py_sigguard *g) {
    if (g->armed) signal(SIGINT, g->old);
}

int sj_py_out4(PyObject *o, Py_buffer *v, const char *fmt, Py_ssize_t count, const char *what) {
    if (PyObject_GetBuffer(o, v, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) return -1;
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (strcmp(f, fmt) || v->len != count * 4) {
        PyBuffer_Release(v);
        PyErr_Format(PyExc_ValueError, "%s", what);
        return -1;
    }
    return 0;
}

int sj_py_tokens(PyObject *obj, const char *argname, int ndim_want,
                 Py_buffer *view, sj_dtype *dtype) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a C-contiguous int32 or uint16 array, got %s",
                     argname, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if ((strcmp(f, "i") == 0 || strcmp(f, "l") == 0) && view->itemsize == 4) *dtype = SJ_I32;
    else if (strcmp(f, "H") == 0 && view->itemsize == 2) *dtype = SJ_U16;
    else {
        PyErr_Format(PyExc_TypeError, "%s: token dtype must be int32 or uint16 (format '%s')",
                     argname, view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    if (ndim_want && view->ndim != ndim_want) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-D array, got %d-D", argname,
                     ndim_want, view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_threads(PyObject *self, PyObject *args) {
    int n = 0;
    if (!PyArg_ParseTuple(args, "|i", &n)) return NULL;
    if (n > 0) {
        sj_status s = sj_threads_set(n);
        if (s) return sj_py_raise(s);
    }
    return PyLong_FromLong(sj_threads_get());
}

/* mem_available(device) -> (available, total, source): bytes new
 * allocations may take on 'cpu' or 'cuda' (-1: unknown). */
static PyObject *py_mem_available(PyObject *self, PyObject *args) {
    const char *dev;
    if (!PyArg_ParseTuple(args, "s", &dev)) return NULL;
    sj_device d;
    if (!strcmp(dev, "cuda")) d = SJ_DEVICE_CUDA;
    else if (!strcmp(dev, "cpu") || !strcmp(dev, "cpu-staged")) d = SJ_DEVICE_CPU;
    else return PyErr_Format(PyExc_ValueError, "device must be 'cpu' or 'cuda', got '%s'", dev);
    int64_t total = -1;
    const char *src = "";
    int64_t avail;
    Py_BEGIN_ALLOW_THREADS avail = sj_mem_available(d, &total, &src);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(LLs)", (long long)avail, (long long)total, src);
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    (void)self; (void)args;
    return Py_BuildValue("{sssssssO}", "isa", sj_cpu_isa(), "isa_best", sj_cpu_isa_best(),
                         "isa_build", sj_cpu_isa_build(), "native",
#ifdef SJ_ISA_NATIVE
                         Py_True
#else
                         Py_False
#endif
    );
}

static PyMethodDef methods[] = {
    {"threads", py_threads, METH_VARARGS, "threads([n]) -> worker thread count (sets it when n > 0)"},
    {"isa", py_isa, METH_NOARGS,
     "isa() -> {isa, isa_best, isa_build, native}: the CPU kernels' instruction-set level\n"
     "(SMEDJAN_ISA caps it), the best this CPU runs, the compiled copy running it, and\n"
     "whether this is a SMEDJAN_NATIVE=1 build"},
    {"mem_available", py_mem_available, METH_VARARGS,
     "mem_available(device) -> (available, total, source) in bytes (-1: unknown)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = { PyModuleDef_HEAD_INIT, "smedjan._C",
                                     "smedjan's C engine", -1, methods };

PyMODINIT_FUNC PyInit__C(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    OutOfMemoryError = PyErr_NewExceptionWithDoc(
        "smedjan.OutOfMemoryError",
        "MemoryError from smedjan: an allocation that would not fit was refused before it was\n"
        "made (or failed), so the process goes on. Attributes (bytes, None where not known):\n"
        "requested, available, held (by the model at the time), limit (memory_limit), and\n"
        "device ('cpu' or 'cuda').", PyExc_MemoryError, NULL);
    Py_XINCREF(OutOfMemoryError);   /* one reference for the module, one kept here */
    if (!OutOfMemoryError || PyModule_AddObject(m, "OutOfMemoryError", OutOfMemoryError) < 0) {
        Py_XDECREF(OutOfMemoryError);
        Py_DECREF(m);
        return NULL;
    }
    /* the compiler flags of this build (setup.py), so a portable wheel can be checked */
    PyModule_AddStringConstant(m, "BUILD_FLAGS", SJ_BUILD_FLAGS);
#ifdef SJ_HAVE_CUDA
    PyModule_AddIntConstant(m, "HAVE_CUDA", 1);
#else
    PyModule_AddIntConstant(m, "HAVE_CUDA", 0);
#endif
    if (sj_py_add_model(m) < 0 || sj_py_add_tokenizer(m) < 0 || sj_py_add_kernels(m) < 0 ||
        sj_py_add_io(m) < 0 || sj_py_add_cuda(m) < 0 ||
        sj_py_add_infer(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
