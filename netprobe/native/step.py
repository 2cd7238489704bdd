"""The per-step statistics of `gradients` and `optim_dynamics` in one pass over each tensor:
bindings of step.c for CPU tensors of float32 or float64 (see its header for the order of sums),
its extension module's functions or, without Python's headers, ctypes', called alike."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from netprobe import native
from netprobe.native import SUFFIXES, Block, library

_I64, _PTR, _INT, _F64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
# Every entry point's arguments, so that ctypes passes 64-bit pointers and sizes.
_SIGNATURES = {
    "np_grad_stats": (_I64, _PTR, _PTR, _PTR, _PTR, _INT),
    "np_norm": (_I64, _PTR, _PTR, _PTR, _INT),
    # ... out, ld; then the sampled entries: k, tensor, offset, sample; then threads
    "np_dyn_grad": (_I64, _PTR, _PTR, _PTR, _INT, _F64, _F64, _PTR, _I64)
    + (_I64, _PTR, _PTR, _PTR, _INT),
    "np_dyn_update": (_I64, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _I64, _INT),
    "np_accuracy": (_I64, _I64, _PTR, _I64, _PTR),
}
_RESTYPES = {"np_accuracy": ctypes.c_float}


@functools.cache
def _bind(lib: ctypes.CDLL | ModuleType) -> ctypes.CDLL | ModuleType:
    if not isinstance(lib, ctypes.CDLL):
        return lib  # the extension module's functions convert their arguments themselves
    for suffix in SUFFIXES.values():
        for name, arguments in _SIGNATURES.items():
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes = list(arguments)
            function.restype = _RESTYPES.get(name, _INT)
    return lib


def kernels(tensors: Sequence[torch.Tensor]) -> StepKernels | None:
    """Kernels for these tensors (a probe's tracked parameters), or None where the PyTorch path
    serves: a device other than the CPU, mixed or other dtypes, or no compiled library."""
    if not tensors:
        return None
    dtype = tensors[0].dtype
    if dtype not in SUFFIXES or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return None
    # A parameter may keep gradients of another dtype (`grad_dtype`): kernels read one dtype.
    if any(getattr(t, "grad_dtype", dtype) not in (None, dtype) for t in tensors):
        return None
    lib = library("step", module=True)
    return None if lib is None else StepKernels(_bind(lib), [t.numel() for t in tensors], dtype)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float | None:
    """(logits.argmax(1) == target).float().mean() to the bit, as a float, in one pass for CPU
    logits [rows, classes] of float32 or float64 and int64 targets; None where PyTorch's ops
    serve (four of them: 40-80 µs of a small model's CPU step, right after its backward)."""
    if not native.ENABLED:
        return None
    try:
        compiled = _accuracy_kernels[None]
    except KeyError:
        checks = native.tensor_checks()
        compiled = _accuracy_kernels[None] = None if checks is None else checks.accuracy
    if compiled is not None:  # it checks them in ~1 µs, and returns None for a GPU's
        return compiled(logits, target)
    # As few reads of the tensors' layouts as will do: each costs µs right after a backward.
    if not logits.is_cpu:
        return None  # a GPU's logits: nothing compiled for them
    try:
        function = _accuracy_kernels[logits.dtype]
    except KeyError:
        function = _accuracy_kernels[logits.dtype] = _accuracy_kernel(logits.dtype)
    if function is None or target.dtype is not torch.int64 or not target.is_cpu:
        return None
    if logits.layout is not torch.strided or target.layout is not torch.strided:
        return None
    if logits.is_neg() or target.is_neg():  # memory that holds the negated values
        return None
    if logits.dim() != 2 or target.dim() != 1 or not target.is_contiguous():
        return None
    (rows, classes), (ld, unit) = logits.shape, logits.stride()
    if unit != 1 or classes == 0 or target.numel() != rows:
        return None
    at, target_at = logits.data_ptr(), target.data_ptr()
    if rows and not (at and target_at):  # no memory of their own (a DTensor, say)
        return None
    return function(rows, classes, at, ld, target_at)


def _accuracy_kernel(dtype: torch.dtype) -> Callable[..., float] | None:
    lib = library("step", module=True) if dtype in SUFFIXES else None
    return None if lib is None else getattr(_bind(lib), f"np_accuracy_{SUFFIXES[dtype]}")


# The accuracy's kernel by logits dtype (None: none for it), and under None tensors.cpp's, which
# checks the tensors too (None: not built); each found once: a cached function's lookup costs
# several µs where this one is counted.
_accuracy_kernels: dict[torch.dtype | None, Callable[..., float | None] | None] = {}


class Unreadable(ValueError):
    """A tensor given to the kernels has no memory of its own to read in place: another layout
    than strided (a sparse gradient, say), or none at its address (a DTensor's wrapper, the
    start of a storage freed in place). Callers that can read it otherwise catch this."""


class MissingGrad(ValueError):
    """A parameter of a `Grads` has no gradient this step."""


class Grads(NamedTuple):
    """The gradients of these parameters, for a StepKernels call to take from the parameters
    themselves: in one compiled call where tensors.cpp is built (reading four parameters'
    `.grad` in Python costs 16-30 µs right after a small model's backward)."""

    params: tuple[torch.Tensor, ...]


# tensors.cpp's statuses where not every tensor was read: a parameter without a gradient; a
# tensor for the Python checks to look at.
_MISSING, _OTHER = 1, 2


class Read(NamedTuple):
    """Tensors that a StepKernels call has just checked and read in place, for kernels over some
    of them (`StepKernels.picks`) to read them again this step without checking each again: the
    tensors (held, so the memory stays theirs) and their addresses, and the kernels that read
    them and which of their calls it was (a Read of an earlier call is refused: a step's
    tensors are read once); its sizes and dtype are theirs."""

    tensors: tuple[torch.Tensor, ...]
    pointers: list[int]
    source: StepKernels
    call: int


class StepKernels:
    """The kernels for one list of tensor sizes and one dtype. Each call takes the tensors
    themselves (a gradient's storage changes from step to step), read in place when contiguous,
    or a `Read` of them."""

    def __init__(self, lib: ctypes.CDLL | ModuleType, sizes: list[int], dtype: torch.dtype) -> None:
        self.dtype, self.n, self.total = dtype, len(sizes), sum(sizes)
        suffix = SUFFIXES[dtype]
        self._grad_stats = getattr(lib, f"np_grad_stats_{suffix}")
        self._norm = getattr(lib, f"np_norm_{suffix}")
        self._dyn_grad = getattr(lib, f"np_dyn_grad_{suffix}")
        self._dyn_update = getattr(lib, f"np_dyn_update_{suffix}")
        self.sizes = tuple(sizes)
        # Arrays the C code reads, passed by address: the sizes, and each call's pointers.
        self._sizes = (_I64 * len(sizes))(*sizes)
        self._pointers = (_PTR * len(sizes))()  # refilled by each call
        self._sizes_at, self._pointers_at = map(ctypes.addressof, (self._sizes, self._pointers))
        # With `keeps_reads`, the last call's tensors, where all were read in place; for its
        # caller to take (holding them keeps them in memory).
        self.keeps_reads = False
        self._read: Read | None = None
        self._calls = 0  # calls that filled the pointer array
        self._picks: tuple[int, ...] | None = None
        self._checked: StepKernels | None = None  # the source of Reads checked against picks
        self._result = ctypes.c_double()
        self._result_at = ctypes.addressof(self._result)
        self._checks = native.tensor_checks()  # None: the checks below, in Python
        self._code = 0 if dtype == torch.float32 else 1

    @property
    def picks(self) -> tuple[int, ...] | None:
        """Where these kernels' tensors are among a Read's (None: they are its tensors)."""
        return self._picks

    @picks.setter
    def picks(self, picks: Sequence[int] | None) -> None:
        self._picks = None if picks is None else tuple(picks)
        self._checked = None

    def take_read(self) -> Read | None:
        """The last call's tensors as a Read, where it read them all in place (and these kernels
        keep reads); once."""
        read, self._read = self._read, None
        return read

    def _data(self, tensors: Sequence[torch.Tensor] | Grads | Read) -> tuple[int, object]:
        """The address of the pointers to each tensor's elements in order, and what the caller
        holds for the call: the gradients read (the kernels run with the GIL released, when
        another thread may set a .grad to None) and the copies made of tensors not readable in
        place. A tensor unlike the one these kernels were made for is refused: the C code
        trusts the sizes. The compiled checks pass what they can read in place; the rest comes
        here, to be named or copied."""
        if isinstance(tensors, Read):
            return self._picked(tensors), None  # the Read holds its tensors
        grads = isinstance(tensors, Grads)
        given = tensors.params if grads else tensors
        if self._checks is not None:
            held = self._checks.pointers(
                given, grads, self.n, self._sizes_at, self._code, self._pointers_at
            )
            if held != _MISSING and held != _OTHER:  # 0, or the gradients, held
                self._calls += 1
                self._read = None  # the compiled checks cost what a Read's would
                return self._pointers_at, held
        if not grads:
            return self._python_checked(tensors)
        tensors = [p.grad for p in given]
        if any(g is None for g in tensors):
            self._calls, self._read = self._calls + 1, None
            raise MissingGrad("a parameter without a gradient given to kernels that read it")
        if any(g.dtype != self.dtype for g in tensors):  # its `grad_dtype`, set since
            self._calls, self._read = self._calls + 1, None
            raise Unreadable(f"a gradient of another dtype than the {self.dtype} kernels read")
        at, copies = self._python_checked(tensors)
        return at, (tensors, copies)

    def _python_checked(self, tensors: Sequence[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """`_data`'s checks in Python, which name what is wrong, and copy what is not readable
        in place (not contiguous, or a view that negates its memory's values)."""
        if len(tensors) != self.n:
            raise ValueError(f"{len(tensors)} tensors given to kernels made for {self.n}")
        pointers: list[int] = []
        copies, dtype = [], self.dtype
        self._calls += 1  # first: a refused call replaces the last one's Read too
        # Right after a backward each read of a tensor's layout costs ~0.2 µs: no more of them
        # than will do.
        for t, size in zip(tensors, self.sizes):
            if t.numel() != size or t.dtype is not dtype or not t.is_cpu:
                raise ValueError(
                    f"a {t.dtype} tensor of {t.numel()} elements on {t.device} given to "
                    f"kernels made for {size} {dtype} elements on the CPU"
                )
            if t.layout is not torch.strided:  # sparse, MKLDNN, nested: no data pointer to read
                raise Unreadable(f"a {t.layout} tensor given to kernels made for strided ones")
            if not t.is_contiguous() or t.is_neg():
                t = t.detach().resolve_neg().contiguous()  # a parameter's copy: no autograd node
                copies.append(t)
            pointers.append(t.data_ptr())
        if 0 in pointers and any(p == 0 and n for p, n in zip(pointers, self.sizes)):
            # A wrapper of other tensors (a DTensor), or a tensor at the start of a storage
            # freed in place. (A view further into a freed or shrunk storage has an address
            # past 0 and is read out of bounds, as PyTorch's own ops read it.)
            raise Unreadable("a tensor without memory of its own given to kernels that read it")
        self._pointers[:] = pointers
        if self.keeps_reads and not copies:
            self._read = Read(tuple(tensors), pointers, self, self._calls)
        else:
            self._read = None
        return self._pointers_at, copies

    def _picked(self, read: Read) -> int:
        """The pointers of a Read's tensors at `picks`, checked against these kernels' sizes and
        dtype once per source of Reads (and again after picks change)."""
        source = read.source
        if read.call != source._calls:
            raise ValueError("a read of tensors its kernels have since replaced")
        picks = self._picks
        if source is not self._checked:
            index = range(source.n) if picks is None else picks
            fits = len(index) == self.n and source.dtype is self.dtype
            if not fits or any(
                not 0 <= j < source.n or source.sizes[j] != size
                for j, size in zip(index, self.sizes)
            ):
                raise ValueError(f"a read of tensors unlike the {self.n} these kernels are for")
            self._checked = source
        self._calls += 1
        self._pointers[:] = read.pointers if picks is None else [read.pointers[j] for j in picks]
        return self._pointers_at

    def _fits(self, out: Block, width: int) -> int:
        """Refuses an output the C code would write past: out [n, ≥ width] (a Block's array is
        float64 with adjacent columns, checked when it was made). Returns its row stride in
        elements."""
        if out.rows != self.n or out.cols < width:
            raise ValueError(f"an output of [{out.rows}, {out.cols}] for [{self.n}, {width}]")
        return out.ld

    def grad_stats(self, grads: Sequence[torch.Tensor] | Grads, out: Block) -> float:
        """Per tensor [l1, l2, mean_abs, max_abs, nonfinite] into `out` ([n, 5]); returns ‖g‖₂
        overall."""
        ld = self._fits(out, 5)
        if ld != 5:
            raise ValueError(f"an output with rows {ld} elements apart for rows of 5")
        data, _held = self._data(grads)
        _check(
            self._grad_stats(self.n, data, self._sizes_at, out.address, self._result_at, _threads())
        )
        return self._result.value

    def norm(self, tensors: Sequence[torch.Tensor] | Grads) -> float:
        """‖·‖₂ over every element of every tensor, as a float: no tensor made per call."""
        data, _held = self._data(tensors)
        _check(self._norm(self.n, data, self._sizes_at, self._result_at, _threads()))
        return self._result.value


class Dynamics:
    """optim_dynamics' two fused loops for the tensors of `kernels`, and the state they carry
    from step to step: one code byte per element (`codes`: sign and z of the last gradient read,
    retained and flip bits of the step under way) and W_{t−1} (`w_prev`). Both live in host
    memory allocated here that can neither move nor be resized (tensors over NumPy arrays), so
    the C code writes at addresses read once. `sample` [2, K]: the sign map's entries, as
    (tensor, offset in it), held in a copy of their own; the C code checks them as it reads."""

    def __init__(self, kernels: StepKernels, sample: torch.Tensor) -> None:
        self.kernels = kernels
        dtype = np.float32 if kernels.dtype == torch.float32 else np.float64
        self._memory = (_aligned(kernels.total, np.uint8), _aligned(kernels.total, dtype))
        self.codes, self.w_prev = (torch.from_numpy(a) for a in self._memory)
        self._codes_at, self._w_prev_at = (a.ctypes.data for a in self._memory)
        self._sample = sample.to("cpu", torch.int64, copy=True).reshape(2, -1).contiguous()
        self._sample_at = (self._sample[0].data_ptr(), self._sample[1].data_ptr())
        self._samples = self._sample.shape[1]
        # The tensors' version counters at the last `changed` call (-1: none yet).
        self._versions = np.full(kernels.n, -1, np.int64)
        self._versions_at = self._versions.ctypes.data

    def grad(
        self,
        grads: Sequence[torch.Tensor] | Grads | Read,
        compare: bool,
        zero: float,
        tiny: float,
        out: Block,
        sample: bool,
    ) -> torch.Tensor | None:
        """The gradient metrics into out[:, :6] (out[:, :2] without `compare`), step t's code
        bytes over step t−1's (read only with `compare`); with `sample`, returns the sampled
        gradients, in the tensors' dtype."""
        k = self.kernels
        ld = k._fits(out, 6 if compare else 2)
        values = torch.empty(self._samples, dtype=k.dtype) if sample else None
        count, at = (0, 0) if values is None else (self._samples, values.data_ptr())
        data, _held = k._data(grads)
        _check(
            k._dyn_grad(
                *(k.n, data, k._sizes_at, self._codes_at, int(compare), zero, tiny),
                *(out.address, ld),
                *(count, *self._sample_at, at, _threads()),
            )
        )
        return values

    def update(
        self, params: Sequence[torch.Tensor], compare: bool, out: Block, column: int
    ) -> None:
        """The update metrics into `out` from its column `column` on, with W_t − w_prev; then
        W_t into w_prev."""
        if column < 0:
            raise ValueError(f"column {column} of an output: columns count from 0")
        k = self.kernels
        ld = k._fits(out, column + (4 if compare else 1))
        data, _held = k._data(params)
        _check(
            k._dyn_update(
                *(k.n, data, k._sizes_at, self._w_prev_at, self._codes_at, int(compare)),
                *(out.address + 8 * column, ld, _threads()),
            )
        )

    def changed(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether any of `params` was changed in place (its version counter moved) since the
        last call; True at the first. One compiled call where tensors.cpp is built: reading a
        counter in Python costs ~1 µs there."""
        checks = self.kernels._checks
        if checks is not None:
            changed = checks.versions(params, len(self._versions), self._versions_at)
            if changed >= 0:
                return bool(changed)
        now, last = [p._version for p in params], self._versions
        if len(now) != len(last):  # other tensors than these kernels': no versions to compare
            last[:] = -1
            return True
        changed = bool((last != now).any())
        last[:] = now
        return changed


def _aligned(n: int, dtype: type[np.generic], to: int = 64) -> np.ndarray:
    """n zeros of `dtype` from an address that is a multiple of `to` bytes (NumPy aligns to 16:
    a vector load would straddle two cache lines)."""
    size = n * np.dtype(dtype).itemsize
    raw = np.zeros(size + to, np.uint8)
    start = -raw.ctypes.data % to
    return raw[start : start + size].view(dtype)


_threads = torch.get_num_threads  # the loops' threads: torch's, read at each call


def _check(status: int) -> None:
    if status == -2:
        raise ValueError("a sampled entry outside the tensors")
    if status != 0:
        raise MemoryError("netprobe: no memory for a probe kernel's partial sums")
