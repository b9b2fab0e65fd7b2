/* model.c — Python face of sj_model and sj_optimizer. */
#include "py.h"

int sj_py_add_model(PyObject *m) { (void)m; return 0; }
