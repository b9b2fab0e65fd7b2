/* kernels.c — raw kernels exposed for tests and benchmarks (smedjan._C.gemm
 * ...). Not part of the public Python API. Arrays arrive through the buffer
 * protocol (no NumPy C-API); every shape and dtype is checked here because
 * the kernels trust their arguments. */
#include "py.h"
#include "../cpu/cpu.h"
#include <string.h>

/* A C-contiguous 2-D float32 view of obj; -1 with TypeError/ValueError set. */
static int get_f32_2d(PyObject *obj, const char *fn, const char *arg, int writable,
                      Py_buffer *v) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, v, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s must be a %sC-contiguous float32 array, got %s",
                     fn, arg, writable ? "writable " : "", Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (strcmp(f, "f") != 0 || v->itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be float32, got format '%s'", fn, arg,
                     v->format ? v->format : "B");
        PyBuffer_Release(v);
        return -1;
    }
    if (v->ndim != 2) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be 2-D, got %d-D", fn, arg, v->ndim);
        PyBuffer_Release(v);
        return -1;
    }
    if (v->shape[0] > INT32_MAX || v->shape[1] > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: %s is too large (%zd, %zd)", fn, arg,
                     v->shape[0], v->shape[1]);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

static int overlaps(const Py_buffer *a, const Py_buffer *b) {
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len > 0 && b->len > 0 && a0 < b0 + b->len && b0 < a0 + a->len;
}

typedef void (*gemm_fn)(float *, int, const float *, int, int, const float *, int, int,
                        int, int, int, int);

static PyObject *gemm_common(const char *fn, gemm_fn f, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"C", "A", "B", "transA", "transB", "accum", NULL};
    PyObject *oc, *oa, *ob;
    int ta = 0, tb = 0, accum = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|ppp", kwlist, &oc, &oa, &ob, &ta, &tb,
                                     &accum))
        return NULL;
    Py_buffer c, a, b;
    if (get_f32_2d(oc, fn, "C", 1, &c) < 0) return NULL;
    if (get_f32_2d(oa, fn, "A", 0, &a) < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_f32_2d(ob, fn, "B", 0, &b) < 0) {
        PyBuffer_Release(&c); PyBuffer_Release(&a); return NULL;
    }
    int M = (int)c.shape[0], N = (int)c.shape[1];
    int aM = (int)(ta ? a.shape[1] : a.shape[0]), K = (int)(ta ? a.shape[0] : a.shape[1]);
    int bK = (int)(tb ? b.shape[1] : b.shape[0]), bN = (int)(tb ? b.shape[0] : b.shape[1]);
    PyObject *ret = NULL;
    if (aM != M || bN != N || bK != K) {
        PyErr_Format(PyExc_ValueError,
                     "%s: shapes do not match: C (%d, %d) = op(A) (%d, %d) @ op(B) (%d, %d) "
                     "[A stored (%zd, %zd) transA=%d, B stored (%zd, %zd) transB=%d]",
                     fn, M, N, aM, K, bK, bN, a.shape[0], a.shape[1], ta, b.shape[0],
                     b.shape[1], tb);
    } else if (overlaps(&c, &a) || overlaps(&c, &b)) {
        PyErr_Format(PyExc_ValueError, "%s: C must not share memory with A or B", fn);
    } else {
        int lda = (int)a.shape[1], ldb = (int)b.shape[1];
        sj_status st;  /* the kernels cannot fail; SJ_PY_CALL wants a status */
        SJ_PY_CALL(st, (f(c.buf, N, a.buf, lda, ta, b.buf, ldb, tb, M, N, K, accum), SJ_OK));
        (void)st;
        Py_INCREF(Py_None);
        ret = Py_None;
    }
    PyBuffer_Release(&c); PyBuffer_Release(&a); PyBuffer_Release(&b);
    return ret;
}

static PyObject *py_gemm(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return gemm_common("gemm", SJ_ISA_PICK(sj_cpu_gemm), args, kw);
}
static PyObject *py_gemm_reference(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    return gemm_common("gemm_reference", SJ_ISA_PICK(sj_cpu_gemm_reference), args, kw);
}

static PyMethodDef kernel_methods[] = {
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_VARARGS | METH_KEYWORDS,
     "gemm(C, A, B, transA=False, transB=False, accum=False)\n"
     "C = op(A) @ op(B) (+ C when accum), in place. float32, C-contiguous, 2-D.\n"
     "op(A) is A (M, K), or A.T with A stored (K, M) when transA; likewise B."},
    {"gemm_reference", (PyCFunction)(void (*)(void))py_gemm_reference,
     METH_VARARGS | METH_KEYWORDS,
     "gemm_reference(C, A, B, transA=False, transB=False, accum=False)\n"
     "The serial double-accumulating oracle for gemm; same arguments."},
    {NULL, NULL, 0, NULL},
};

int sj_py_add_kernels(PyObject *m) {
    if (PyModule_AddFunctions(m, kernel_methods) < 0) return -1;
    return PyModule_AddStringConstant(m, "GEMM_ISA", *SJ_ISA_PICK(sj_cpu_gemm_isa));
}
