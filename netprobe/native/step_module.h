/* step.c's entry points as the functions of a Python extension module, `_netprobe_step`, built
 * where Python's headers are found (netprobe.native.library): a call costs a fraction of a
 * ctypes call, whose own code is cold right after a small model's backward (~10 µs a call
 * there, ~1.5 warm). Arguments are Python ints and floats: addresses as ints. The loops run
 * with the GIL released, as under ctypes. */

typedef union {
    int64_t i;
    void *p;
    double d;
} arg_t;

/* The call's arguments into v as `kinds` says, one letter each: 'i' an int, 'p' an address
 * (an int), 'd' a float. 0, or -1 with a Python error set. */
static int parse(PyObject *const *args, Py_ssize_t nargs, const char *kinds, arg_t *v) {
    Py_ssize_t k = (Py_ssize_t)strlen(kinds);
    if (nargs != k) {
        PyErr_Format(PyExc_TypeError, "%zd arguments given for %zd", nargs, k);
        return -1;
    }
    for (Py_ssize_t a = 0; a < k; a++) {
        if (kinds[a] == 'd')
            v[a].d = PyFloat_AsDouble(args[a]);
        else if (kinds[a] == 'p')
            v[a].p = PyLong_AsVoidPtr(args[a]);
        else
            v[a].i = PyLong_AsLongLong(args[a]);
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

/* A function returning the entry point's status (0, or < 0 for an error the caller names). */
#define STATUS(name, kinds, call)                                                           \
    static PyObject *py_##name(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {  \
        arg_t v[sizeof(kinds) - 1];                                                         \
        int status;                                                                         \
        (void)module;                                                                       \
        if (parse(args, nargs, kinds, v)) return NULL;                                      \
        Py_BEGIN_ALLOW_THREADS status = call;                                               \
        Py_END_ALLOW_THREADS return PyLong_FromLong(status);                                \
    }

#define TYPED(S)                                                                               \
    STATUS(np_grad_stats_##S, "ippppi",                                                        \
           np_grad_stats_##S(v[0].i, v[1].p, v[2].p, v[3].p, v[4].p, (int)v[5].i))             \
    STATUS(np_norm_##S, "ipppi", np_norm_##S(v[0].i, v[1].p, v[2].p, v[3].p, (int)v[4].i))    \
    STATUS(np_dyn_grad_##S, "ipppiddpiipppi",                                                  \
           np_dyn_grad_##S(v[0].i, v[1].p, v[2].p, v[3].p, (int)v[4].i, v[5].d, v[6].d, v[7].p, \
                           v[8].i, v[9].i, v[10].p, v[11].p, v[12].p, (int)v[13].i))          \
    STATUS(np_dyn_update_##S, "ippppipii",                                                     \
           np_dyn_update_##S(v[0].i, v[1].p, v[2].p, v[3].p, v[4].p, (int)v[5].i, v[6].p,      \
                             v[7].i, (int)v[8].i))                                             \
    /* A batch is small: no GIL released for it. */                                            \
    static PyObject *py_np_accuracy_##S(PyObject *module, PyObject *const *args,               \
                                        Py_ssize_t nargs) {                                    \
        arg_t v[5];                                                                            \
        (void)module;                                                                          \
        if (parse(args, nargs, "iipip", v)) return NULL;                                       \
        return PyFloat_FromDouble(np_accuracy_##S(v[0].i, v[1].i, v[2].p, v[3].i, v[4].p));    \
    }

TYPED(f32)
TYPED(f64)

#define ENTRY(name) {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, NULL}
#define ENTRIES(S)                                                                             \
    ENTRY(np_grad_stats_##S), ENTRY(np_norm_##S), ENTRY(np_dyn_grad_##S),                      \
        ENTRY(np_dyn_update_##S), ENTRY(np_accuracy_##S)
static PyMethodDef functions[] = {ENTRIES(f32), ENTRIES(f64), {NULL, NULL, 0, NULL}};
static struct PyModuleDef definition = {
    .m_base = PyModuleDef_HEAD_INIT, .m_name = "_netprobe_step", .m_size = -1,
    .m_methods = functions};
PyMODINIT_FUNC PyInit__netprobe_step(void) { return PyModule_Create(&definition); }
