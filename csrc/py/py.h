/* py.h — glue shared by the extension's files: status -> exception, the
 * SIGINT guard, and token-buffer checks. The only place Python.h enters. */
#ifndef SJ_PY_H
#define SJ_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "../smedjan.h"

/* Set the Python exception that matches an engine status; returns NULL. */
PyObject *sj_py_raise(sj_status s);

/* Run an engine call with the GIL released and Ctrl-C turned into
 * sj_interrupt(): `SJ_PY_CALL(status, sj_model_forward(...));` */
typedef struct { void (*old)(int); int armed; } sj_py_sigguard;
void sj_py_sig_enter(sj_py_sigguard *g);
void sj_py_sig_leave(sj_py_sigguard *g);
#define SJ_PY_CALL(status, call)                          \
    do {                                                  \
        sj_py_sigguard _g;                                \
        sj_py_sig_enter(&_g);                             \
        Py_BEGIN_ALLOW_THREADS status = (call);           \
        Py_END_ALLOW_THREADS sj_py_sig_leave(&_g);        \
    } while (0)

/* A read-only buffer view of a token array: C-contiguous int32 or uint16.
 * ndim_want 1 or 2 (0 = either). Fills dtype; the caller releases view. */
int sj_py_tokens(PyObject *obj, const char *argname, int ndim_want,
                 Py_buffer *view, sj_dtype *dtype);

/* A writable C-contiguous view of exactly `count` 4-byte items of struct
 * format fmt (e.g. "f"); otherwise ValueError(what). Caller releases view. */
int sj_py_out4(PyObject *obj, Py_buffer *view, const char *fmt, Py_ssize_t count,
               const char *what);

/* A config dict (smedjan.Config.to_dict()'s form) read and validated by the
 * engine; -1 with ValueError/TypeError naming the field. */
int sj_py_config_from_dict(PyObject *d, sj_config *c);
/* ... and back: every field, each per-layer one a value or a list. */
PyObject *sj_py_config_to_dict(const sj_config *c);

/* Each file of the extension adds its functions/types to the module. */
int sj_py_add_model(PyObject *m);
/* The engine model behind a smedjan._C.Model, or NULL with an exception set. */
sj_model *sj_py_model_ptr(PyObject *o);
int sj_py_add_tokenizer(PyObject *m);
int sj_py_add_kernels(PyObject *m);
int sj_py_add_io(PyObject *m);
int sj_py_add_cuda(PyObject *m);
int sj_py_add_infer(PyObject *m);

/* A DeviceTensor over engine device memory (cuda.c): keeps owner alive,
 * counts itself in *exports (may be NULL); notify: a model whose compute
 * copy is refreshed after whole writes (parameters), else NULL. */
PyObject *sj_py_device_tensor(PyObject *owner, void *ptr, int ndim, const int64_t *shape,
                              sj_dtype dtype, Py_ssize_t *exports, sj_model *notify);

#endif
