// The per-step kernels' checks of their tensors, as an extension module, `_netprobe_tensors`,
// built against the installed PyTorch's headers (netprobe.native.tensor_checks). Right after a small
// model's backward, Python's own code is cold: reading four parameters' `.grad` there took
// 16-30 µs and checking their layouts 35-45 µs; here a tensor's fields are read in a few
// nanoseconds, and the whole call costs ~3 µs. Nothing here decides a result: a tensor these
// checks do not pass is left to the Python checks, which name what is wrong or copy it.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace {

#define FN(name) name##f32
#define T float
#include "accuracy.h"
#undef T
#undef FN
#define FN(name) name##f64
#define T double
#include "accuracy.h"
#undef T
#undef FN

// versions(tensors, n, at) -> 1, 0 or -1
//   Writes each of n tensors' count of in-place changes (its version counter) to the n int64s
//   at `at` and returns 1 where any differs from what was there, else 0; -1 for anything but a
//   list or tuple of n tensors with version counters (what was written then means nothing).
PyObject *versions(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "versions takes 3 arguments, %zd given", nargs);
        return nullptr;
    }
    const Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    auto *at = static_cast<int64_t *>(PyLong_AsVoidPtr(args[2]));
    if (PyErr_Occurred()) return nullptr;
    if (!PyList_CheckExact(args[0]) && !PyTuple_CheckExact(args[0])) return PyLong_FromLong(-1);
    if (PySequence_Fast_GET_SIZE(args[0]) != n) return PyLong_FromLong(-1);
    PyObject **items = PySequence_Fast_ITEMS(args[0]);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!THPVariable_Check(items[i])) return PyLong_FromLong(-1);
    long changed = 0;
    try {
        for (Py_ssize_t i = 0; i < n; i++) {
            const int64_t version = THPVariable_Unpack(items[i])._version();
            changed |= version != at[i];
            at[i] = version;
        }
    } catch (...) {  // a tensor without a version counter (an inference tensor): read it in Python
        return PyLong_FromLong(-1);
    }
    return PyLong_FromLong(changed);
}

// Whether `t` is a strided CPU tensor whose fields can be read here, whose memory holds its
// values as they are (no negation or conjugation left to apply) and is at its address (none
// where it has no elements).
bool plain(const at::Tensor &t) {
    return t.defined() && t.layout() == c10::kStrided && t.is_cpu() && !t.is_neg() &&
           !t.is_conj() && !t.unsafeGetTensorImpl()->is_python_dispatch() && t.has_storage() &&
           (t.numel() == 0 || t.data_ptr() != nullptr);
}

// What `pointers` returns where not READ (netprobe.native.step names them).
enum Status : long { MISSING = 1, OTHER = 2 };

// The gradients a READ of them found, held for as long as the capsule lives: the kernels read
// them with the GIL released, when another thread may set a parameter's .grad to None.
struct Held {
    std::vector<at::Tensor> tensors;
};

void release(PyObject *capsule) {
    delete static_cast<Held *>(PyCapsule_GetPointer(capsule, "netprobe.held"));
}

// pointers(tensors, grads, n, sizes, dtype, out) -> 0, a capsule, 1 or 2
//   tensors: a list or tuple of n tensors (parameters, with `grads`); grads: read each one's
//   gradient instead; sizes: the address of n int64 element counts; dtype: 0 float32, 1
//   float64; out: the address of n pointers, filled in (what it holds means nothing unless
//   all were read).
// All read: each one (its gradient) is a contiguous strided CPU tensor of that dtype and size
// with memory of its own, and `out` holds their addresses; the result is 0 for tensors (the
// caller's sequence holds them) and, for gradients, a capsule holding them, to keep for the
// kernels' call. 1 (MISSING): some parameter has no gradient. 2 (OTHER): some tensor is unlike
// that (the Python checks say how, or copy it).
PyObject *pointers(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "pointers takes 6 arguments, %zd given", nargs);
        return nullptr;
    }
    const int grads = PyObject_IsTrue(args[1]);
    if (grads < 0) return nullptr;
    const Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    auto *sizes = static_cast<const int64_t *>(PyLong_AsVoidPtr(args[3]));
    const long code = PyLong_AsLong(args[4]);
    auto *out = static_cast<void **>(PyLong_AsVoidPtr(args[5]));
    if (PyErr_Occurred()) return nullptr;
    PyObject *seq = PySequence_Fast(args[0], "pointers takes a list or tuple of tensors");
    if (seq == nullptr) return nullptr;
    const c10::ScalarType dtype = code == 0 ? c10::ScalarType::Float : c10::ScalarType::Double;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    long status = PySequence_Fast_GET_SIZE(seq) == n && (code == 0 || code == 1) ? 0 : OTHER;
    auto held = std::make_unique<Held>();
    try {
        if (grads) held->tensors.reserve(static_cast<size_t>(n));
        for (Py_ssize_t i = 0; status == 0 && i < n; i++) {
            if (!THPVariable_Check(items[i])) {
                status = OTHER;
                break;
            }
            const at::Tensor &owner = THPVariable_Unpack(items[i]);
            const at::Tensor &t = grads ? owner.grad() : owner;
            if (!t.defined()) {
                status = grads ? MISSING : OTHER;
            } else if (!plain(t) || t.scalar_type() != dtype || t.numel() != sizes[i] ||
                       !t.is_contiguous()) {
                status = OTHER;  // a wrapper of other tensors, a storage freed in place, ...
            } else {
                out[i] = t.data_ptr();
                if (grads) held->tensors.push_back(t);
            }
        }
    } catch (...) {  // a tensor whose fields cannot be read this way: the Python checks say why
        status = OTHER;
    }
    Py_DECREF(seq);
    if (status != 0 || !grads) return PyLong_FromLong(status);
    PyObject *capsule = PyCapsule_New(held.get(), "netprobe.held", release);
    if (capsule != nullptr) held.release();  // the capsule's now
    return capsule;
}

// accuracy(logits, target) -> float or None
//   (logits.argmax(1) == target).float().mean() to the bit, for logits [rows, classes] of
//   float32 or float64 with adjacent columns and int64 targets [rows], contiguous, both CPU
//   tensors with memory at their addresses; None for anything else (PyTorch's ops serve).
PyObject *accuracy(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "accuracy takes 2 arguments, %zd given", nargs);
        return nullptr;
    }
    if (!THPVariable_Check(args[0]) || !THPVariable_Check(args[1])) Py_RETURN_NONE;
    try {
        const at::Tensor &x = THPVariable_Unpack(args[0]);
        const at::Tensor &y = THPVariable_Unpack(args[1]);
        if (!plain(x) || !plain(y) || x.dim() != 2 || y.dim() != 1 || !y.is_contiguous() ||
            y.scalar_type() != c10::ScalarType::Long)
            Py_RETURN_NONE;
        const int64_t rows = x.size(0), classes = x.size(1);
        if (x.stride(1) != 1 || classes == 0 || y.numel() != rows) Py_RETURN_NONE;
        const auto *target = static_cast<const int64_t *>(y.data_ptr());
        if (x.scalar_type() == c10::ScalarType::Float)
            return PyFloat_FromDouble(np_accuracy_f32(
                rows, classes, static_cast<const float *>(x.data_ptr()), x.stride(0), target));
        if (x.scalar_type() == c10::ScalarType::Double)
            return PyFloat_FromDouble(np_accuracy_f64(
                rows, classes, static_cast<const double *>(x.data_ptr()), x.stride(0), target));
    } catch (...) {  // fields that cannot be read this way: PyTorch's ops serve
    }
    Py_RETURN_NONE;
}

PyMethodDef functions[] = {
    {"pointers", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(pointers)),
     METH_FASTCALL, nullptr},
    {"versions", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(versions)),
     METH_FASTCALL, nullptr},
    {"accuracy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(accuracy)),
     METH_FASTCALL, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_netprobe_tensors", nullptr, -1, functions};

}  // namespace

PyMODINIT_FUNC PyInit__netprobe_tensors() { return PyModule_Create(&definition); }
