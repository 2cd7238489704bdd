"""The fused CPU kernels (netprobe.native) against float64 NumPy references written here, on
sizes that cross their blocks, lanes and threading threshold, and their loader's fallbacks."""

from __future__ import annotations

import ctypes
import math
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from netprobe import native
from netprobe.native import Block
from netprobe.native import step as native_step
from tests.helpers import (
    OTHER_BUILDS,
    fused_grad_stats,
    other_build,
    python_checks,
    torch_threads,
)

pytestmark = pytest.mark.skipif(
    native.compiler() is None or not native.ENABLED,
    reason="no C compiler, or NETPROBE_NATIVE=0: the fused kernels are not built",
)
# A tail of each kind: under one lane group, one block exactly, one element past it, and past
# the size from which the kernels split work between threads.
SIZES = [1, 7, 8, 9, 16383, 16384, 16385, 300_001]
ZERO, TINY = 1e-5, 1e-7
NO_SAMPLE = torch.zeros((2, 0), dtype=torch.long)


@pytest.fixture(params=["compiled", "python"])
def checks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the kernels' tensors checked by tensors.cpp (skipped where it is not
    built) and in Python, as where it is not."""
    if request.param == "python":
        python_checks(monkeypatch)
    elif native.tensor_checks() is None:
        pytest.skip("tensors.cpp is not built here (no C++ compiler, or no PyTorch headers)")
    return request.param


def grads_of(sizes: list[int], dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Magnitudes spread around both thresholds and far above, random signs, exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        scale = 10.0 ** torch.randint(-9, 0, (n,), generator=gen).to(torch.float64)
        g = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        g[torch.rand(n, generator=gen) < 0.05] = 0.0
        out.append(g.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_stats_match_float64_and_ignore_the_thread_count(dtype) -> None:
    grads = grads_of(SIZES, dtype)
    grads[-1][200_000] = float("nan")  # in a later block of a threaded tensor
    grads[5][3] = float("inf")
    kernels = native_step.kernels(grads)
    with torch_threads(1):
        per_tensor, total = fused_grad_stats(kernels, grads)
    for threads in (2, 3):  # the same bits
        with torch_threads(threads):
            again = fused_grad_stats(kernels, grads)
        np.testing.assert_array_equal(again[0], per_tensor)
        assert again[1] == total or (np.isnan(again[1]) and np.isnan(total))
    # The monitor's norm sums the same squares in the same order.
    assert np.isnan(kernels.norm(grads)) and np.isnan(total)
    # Without the NaN and the inf, to the bit.
    finite = [g for g in grads if torch.isfinite(g).all()]
    assert native_step.kernels(finite).norm(finite) == float(
        fused_grad_stats(native_step.kernels(finite), finite)[1]
    )
    want = np.sqrt(sum((g.double().numpy() ** 2).sum() for g in finite))
    assert float(native_step.kernels(finite).norm(finite)) == pytest.approx(want, rel=1e-7)
    for row, g in zip(per_tensor, grads):
        a = np.abs(g.double().numpy())
        finite = np.isfinite(a)
        want = [a.sum(), np.sqrt((a * a).sum()), a.sum() / a.size, a.max(), (~finite).sum()]
        if np.isnan(a).any():
            assert np.isnan(row[:4]).all() and row[4] == want[4]
            continue
        np.testing.assert_allclose(row, want, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    assert np.isnan(total)


def test_finite_gradients_whose_squares_overflow_float32_keep_finite_norms() -> None:
    """A diverging run's last finite gradients: |g| above 1.8e19 squares past float32's range,
    which torch's float32 norm reports as inf; the kernels sum such a block again in double."""
    grads = grads_of([7, 16385, 300_001])
    grads[1][[5, 16384]] = torch.tensor([3e25, -2e20])  # the first block and the last one
    grads[2][123_456] = 4e37  # Σ|g| past float32's range too (a lane sums 16 of them in T)
    grads[2][123_457] = 3e38
    kernels = native_step.kernels(grads)
    for threads in (1, 2):
        with torch_threads(threads):
            per_tensor, total = fused_grad_stats(kernels, grads)
            norm = kernels.norm(grads)
        for row, g in zip(per_tensor, grads):
            a = np.abs(g.double().numpy())
            want = [a.sum(), np.sqrt((a * a).sum()), a.sum() / a.size, a.max(), 0]
            np.testing.assert_allclose(row, want, rtol=1e-6)
        want = np.sqrt(sum((g.double().numpy() ** 2).sum() for g in grads))
        assert float(total) == pytest.approx(want, rel=1e-6) and math.isfinite(want)
        assert float(norm) == float(total)
    assert torch.linalg.vector_norm(grads[1]) == math.inf  # what the double pass is for


def dynamics_reference(g_prev, g, w_before, w_after, compare: bool) -> list[float]:
    """optim_dynamics' ten metrics (or three without `compare`) of one tensor, in float64."""
    g_prev, g = g_prev.double().numpy(), g.double().numpy()
    dw = w_after.double().numpy() - w_before.double().numpy()
    n = g.size
    z_prev, z = np.abs(g_prev) <= ZERO, np.abs(g) <= ZERO
    head = [(np.abs(g) <= TINY).sum() / n, z.sum() / n]
    if not compare:
        return [*head, np.sqrt((dw * dw).sum())]
    retained, flip = z_prev & z, np.sign(g_prev) * np.sign(g) < 0
    moved = np.abs(dw)[retained].sum() / max(retained.sum(), 1)
    curvature = np.sign(dw) * np.sign(g) * (flip & retained)
    return [
        *head,
        (z_prev & ~z).sum() / max(z_prev.sum(), 1),
        retained.sum() / max(z_prev.sum(), 1),
        (flip & retained).sum() / max(retained.sum(), 1),
        flip.sum() / n,
        np.sqrt((dw * dw).sum()),
        moved,
        (curvature > 0).sum(),
        (curvature < 0).sum(),
    ]


@pytest.mark.parametrize("threads", [1, 2])
def test_dynamics_over_three_steps_match_float64(threads: int) -> None:
    """Codes carried from step to step, W_{t−1} kept by each update: every metric of every
    tensor as the reference computes it from the full gradients and weights."""
    sizes = SIZES[3:]
    steps = [grads_of(sizes, seed=s) for s in range(3)]
    # Gradients of step 1 mostly retained in the last tensor, with flips among them.
    steps[1][-1] = steps[0][-1] * -0.5
    weights = [grads_of(sizes, seed=10 + s) for s in range(4)]
    params = [w.clone() for w in weights[0]]
    dynamics = native_step.Dynamics(native_step.kernels(params), NO_SAMPLE)
    dynamics.w_prev.copy_(torch.cat(params))
    for t, grads in enumerate(steps):
        compare = t > 0
        metrics = Block.of(np.empty((len(sizes), 10 if compare else 3)))
        with torch_threads(threads):
            dynamics.grad(grads, compare, ZERO, TINY, metrics, sample=False)
        for p, w in zip(params, weights[t + 1]):
            p.copy_(w)
        with torch_threads(threads):
            dynamics.update(params, compare, metrics, 6 if compare else 2)
        metrics = metrics.array
        for i in range(len(sizes)):
            want = dynamics_reference(
                steps[t - 1][i] if compare else grads[i],
                grads[i],
                weights[t][i],
                weights[t + 1][i],
                compare,
            )
            np.testing.assert_allclose(metrics[i], want, rtol=1e-6, err_msg=f"{t} {i}")
        # W_t: the next step's starting point
        assert torch.equal(dynamics.w_prev, torch.cat(params))
    assert (metrics[-1, 4] > 0) and (metrics[-1, 3] > 0.5)  # retained flips did occur


def test_the_sampled_entries_are_read_and_checked_once() -> None:
    grads = grads_of([5, 40_000])
    kernels = native_step.kernels(grads)
    which, offsets = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 4, 17, 39_999])
    dynamics = native_step.Dynamics(kernels, torch.stack([which, offsets]))
    out = Block.of(np.empty((2, 2)))
    got = dynamics.grad(grads, False, ZERO, TINY, out, sample=True)
    want = torch.stack([grads[w][o] for w, o in zip(which.tolist(), offsets.tolist())])
    assert torch.equal(got, want)
    assert dynamics.grad(grads, False, ZERO, TINY, out, sample=False) is None
    for tensor, offset in ((2, 0), (-1, 0), (0, 5), (1, 40_000), (1, -1)):
        outside = native_step.Dynamics(kernels, torch.tensor([[0, tensor], [0, offset]]))
        with pytest.raises(ValueError, match="sampled entry"):
            outside.grad(grads, False, ZERO, TINY, out, sample=True)
        assert not outside.codes.any()  # nothing written


def test_only_cpu_tensors_of_one_float_dtype_take_the_fused_path() -> None:
    assert native_step.kernels([torch.zeros(3), torch.zeros(2, dtype=torch.float64)]) is None
    assert native_step.kernels([torch.zeros(3, dtype=torch.bfloat16)]) is None
    assert native_step.kernels([torch.zeros(3, device="meta")]) is None
    assert native_step.kernels([]) is None
    assert native_step.kernels([torch.zeros(3)]) is not None


def test_a_strided_gradient_is_read_in_its_logical_order(checks) -> None:
    g = torch.randn(6, 5).t()  # not contiguous
    per_tensor, _ = fused_grad_stats(native_step.kernels([g]), [g])
    assert per_tensor[0, 3] == g.abs().max().item()


def test_switched_off_or_unbuildable_means_the_pytorch_path(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(native, "ENABLED", False)
    assert native.library("step") is None and native_step.kernels([torch.zeros(3)]) is None
    assert native_step.accuracy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)) is None
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    native._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiling step.c failed"):
            assert native.library("step") is None
        assert not list(tmp_path.rglob("*.so"))  # no half-built library left behind
    finally:
        native._load.cache_clear()


@pytest.mark.skipif(not native._module_flags(), reason="Python's headers are not installed")
def test_the_step_kernels_are_a_module_here_and_ctypes_without_pythons_headers(
    monkeypatch, tmp_path
) -> None:
    """Where Python's headers are found the per-step kernels are an extension module (whose
    functions refuse calls unlike theirs); without them, or where the module will not build,
    a ctypes library: the same results."""
    grads = grads_of([300, 17])
    module = native.library("step", module=True)
    assert not isinstance(module, ctypes.CDLL)
    with pytest.raises(TypeError, match="arguments given"):
        module.np_norm_f32(1, 2)
    with pytest.raises(TypeError):
        module.np_norm_f32(1, "an address", 0, 0, 1)
    ours = native_step.kernels(grads)
    want = fused_grad_stats(ours, grads)
    logits, target = torch.randn(9, 4), torch.randint(0, 4, (9,))
    accuracy = (logits.argmax(1) == target).float().mean().item()
    assert native_step.accuracy(logits, target) == accuracy
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    unbuildable = ["-DNETPROBE_MODULE", "-include", "no-such-header.h"]
    for flags in ([], unbuildable):  # no Python.h; a module that does not compile
        monkeypatch.setattr(native, "_module_flags", lambda flags=flags: flags)
        native._load.cache_clear()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plain = native.library("step", module=True)
            assert isinstance(plain, ctypes.CDLL)
            messages = [str(w.message) for w in caught]
            if flags:
                assert len(messages) == 1 and "called through ctypes" in messages[0]
            else:
                assert messages == []
            theirs = native_step.StepKernels(
                native_step._bind(plain), [g.numel() for g in grads], torch.float32
            )
            for a, b in zip(want, fused_grad_stats(theirs, grads)):
                np.testing.assert_array_equal(a, b)
            function = native_step._accuracy_kernel(torch.float32)
            assert function(9, 4, logits.data_ptr(), 4, target.data_ptr()) == accuracy
        finally:
            native._load.cache_clear()


@pytest.mark.parametrize("build", sorted(OTHER_BUILDS))
def test_the_same_bits_on_any_vector_width(build, tmp_path) -> None:
    """Built for another instruction set (SSE2 only; AVX2 without AVX-512), or to share even a
    small job between 3 threads, the kernels give the very bits of the build tuned for this CPU:
    no sum depends on the vector width or the threads."""
    lib, threads = other_build("step.c", build, tmp_path)
    with torch_threads(threads):
        grads = grads_of(SIZES)
        tuned = native_step.kernels(grads)
        other = native_step.StepKernels(
            native_step._bind(lib), [g.numel() for g in grads], torch.float32
        )
        ours, theirs = fused_grad_stats(tuned, grads), fused_grad_stats(other, grads)
        np.testing.assert_array_equal(ours[0], theirs[0])
        assert ours[1] == theirs[1]
        assert other.norm(grads) == tuned.norm(grads)
        weights = [grads_of(SIZES, seed=5 + t) for t in range(3)]
        for w in weights[1:]:
            w[-1][::7] = weights[0][-1][::7]  # unmoved weights
        weights[1][-1][:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])
        steps = [grads_of(SIZES, seed=t) for t in range(2)]
        steps[1][-1] = steps[0][-1] * -0.5  # retained, and flipped
        steps[1][-1][-5:] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-6])
        results = []
        for kernels in (tuned, other):
            dynamics = native_step.Dynamics(kernels, NO_SAMPLE)
            dynamics.w_prev.copy_(torch.cat(weights[0]))
            out = []
            for t, grads in enumerate(steps):
                metrics = Block.of(np.empty((len(SIZES), 10)))
                dynamics.grad(grads, t > 0, ZERO, TINY, metrics, sample=False)
                dynamics.update(weights[t + 1], t > 0, metrics, 6 if t else 2)
                out.append(metrics.array[:, : 10 if t else 3])
            results.append((out, dynamics.codes))
        for ours, theirs in zip(*(out for out, _ in results)):
            np.testing.assert_array_equal(ours, theirs)
        assert torch.equal(results[0][1], results[1][1])


def test_a_tensor_unlike_the_kernels_is_refused(checks) -> None:
    """The C code reads as many elements as its sizes say: anything else is an error. A
    parameter without a gradient is one of its own kind (readers count it as zeros)."""
    params = [nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(3))]
    kernels = native_step.kernels(params)
    params[0].grad = torch.ones(10)
    with pytest.raises(native_step.MissingGrad):
        kernels.norm(native_step.Grads(tuple(params)))
    params[1].grad = torch.ones(3)
    assert kernels.norm(native_step.Grads(tuple(params))) == pytest.approx(math.sqrt(13))
    params[1].grad = torch.ones(3).to_sparse()
    with pytest.raises(native_step.Unreadable, match="strided"):
        kernels.norm(native_step.Grads(tuple(params)))
    params[1].grad = None
    params[1].grad_dtype = torch.float64  # set after the kernels were made: read otherwise
    params[1].grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(native_step.Unreadable, match="another dtype"):
        kernels.norm(native_step.Grads(tuple(params)))
    assert native_step.kernels(params) is None  # made now: PyTorch's path from the start
    for wrong in (
        [torch.zeros(10)],
        [torch.zeros(10), torch.zeros(4)],
        [torch.zeros(10), torch.zeros(3, dtype=torch.float64)],
        [torch.zeros(10).to_sparse(), torch.zeros(3)],  # no data pointer: another layout
        [torch.zeros(10), torch.zeros(3).to_mkldnn()],
        [
            torch.nested.nested_tensor([torch.zeros(4), torch.zeros(6)], layout=torch.jagged),
            torch.zeros(3),
        ],  # its data_ptr() is 0
    ):
        with pytest.raises(ValueError, match="kernels made for"):
            kernels.norm(wrong)
    freed = torch.zeros(10)
    freed.untyped_storage().resize_(0)  # freed in place: its address is 0
    with pytest.raises(native_step.Unreadable, match="without memory"):  # read otherwise
        kernels.norm([freed, torch.zeros(3)])


def test_the_compiled_checks_pass_only_what_is_read_in_place() -> None:
    """tensors.cpp writes the addresses PyTorch gives of the tensors, or of the parameters'
    gradients, where each is a contiguous strided CPU tensor of the dtype and size asked for
    with memory at its address, and hands back a capsule that holds the gradients it read; a
    missing gradient is told apart; anything else is left to the Python checks, which name it."""
    module = native.tensor_checks()
    if module is None:
        pytest.skip("tensors.cpp is not built here (no C++ compiler, or no PyTorch headers)")
    sizes, out = (ctypes.c_int64 * 2)(10, 3), (ctypes.c_void_p * 2)()
    read, missing, other = 0, 1, 2

    def status(tensors, grads: bool = False, dtype: int = 0) -> int:
        at = map(ctypes.addressof, (sizes, out))
        return module.pointers(tensors, grads, 2, *[next(at)], dtype, *[next(at)])

    good = [torch.randn(10), torch.randn(3)]
    assert status(good) == read and list(out) == [t.data_ptr() for t in good]
    wide = [t.double() for t in good]
    assert status(tuple(wide), dtype=1) == read and list(out) == [t.data_ptr() for t in wide]
    params = [nn.Parameter(t.clone()) for t in good]
    assert status(params, grads=True) == missing
    params[0].grad, params[1].grad = good
    held = status(params, grads=True)  # the gradients, held by a capsule
    assert type(held).__name__ == "PyCapsule" and list(out) == [t.data_ptr() for t in good]
    freed = torch.zeros(10)
    freed.untyped_storage().resize_(0)
    for wrong, dtype in (
        ([good[0]], 0),
        ([*good, good[1]], 0),
        (good, 1),  # float32 tensors, float64 asked for
        (wide, 0),
        (good, 2),  # no such dtype code
        ([good[0], torch.randn(4)], 0),
        ([torch.randn(5, 2).t(), good[1]], 0),  # not contiguous
        ([good[0].to_sparse(), good[1]], 0),
        ([good[0], good[1].to_mkldnn()], 0),
        ([torch.zeros(10, device="meta"), good[1]], 0),
        ([freed, good[1]], 0),
        ([good[0], 3], 0),
        ([torch._neg_view(good[0]), good[1]], 0),  # memory that holds the negated values
    ):
        assert status(wrong, dtype=dtype) == other
    with pytest.raises(TypeError):
        module.pointers(good, False)
    with pytest.raises(TypeError):
        status(None)


def test_tensors_cpp_that_will_not_build_is_tried_once_and_checked_in_python(
    monkeypatch, tmp_path, capfd
) -> None:
    """A C++ compiler that fails: the first run says it compiles, warns that it failed, and the
    Python checks serve; later runs do not pay for the build again, and say why."""
    calls = tmp_path / "calls"
    compiler = tmp_path / "c++"
    compiler.write_text(f"#!/bin/sh\necho called >> {calls}\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    native._tensor_checks.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiling tensors.cpp failed"):
            assert native.tensor_checks() is None
        assert "compiling tensors.cpp for this PyTorch" in capfd.readouterr().err
        native._tensor_checks.cache_clear()
        with pytest.warns(UserWarning, match="did not build here today"):
            assert native.tensor_checks() is None
        assert calls.read_text() == "called\n"  # once
        (failed,) = (tmp_path / "cache").rglob("tensors-*.failed")
        os.utime(failed, (0, 0))  # a day later, the build is tried again (it may have passed)
        native._tensor_checks.cache_clear()
        with pytest.warns(UserWarning, match="compiling tensors.cpp failed"):
            assert native.tensor_checks() is None
        assert calls.read_text() == "called\ncalled\n"
        assert native_step.kernels([torch.ones(4)]).norm([torch.ones(4)]) == 2.0
        assert not list((tmp_path / "cache").rglob("tensors-*.so"))
    finally:
        native._tensor_checks.cache_clear()


def test_an_unwritable_cache_means_the_pytorch_path(monkeypatch, tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder would be: mkdir fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    native._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="fused kernels of step.c are unavailable"):
            assert native.library("step") is None
    finally:
        native._load.cache_clear()


def test_an_output_the_kernels_would_overrun_is_refused() -> None:
    params = [torch.zeros(10), torch.zeros(3)]
    kernels = native_step.kernels(params)
    dynamics = native_step.Dynamics(kernels, NO_SAMPLE)
    good = np.zeros((2, 10))
    overlapping = np.lib.stride_tricks.as_strided(good, (2, 10), (40, 8))
    read_only = good.copy()
    read_only.flags.writeable = False
    for out in (
        np.zeros((2, 10), np.float32),
        np.zeros((2, 10), ">f8"),  # float64 the other way round
        np.zeros(10),
        good[:, ::2],  # columns apart
        good[::-1],
        overlapping,
        read_only,
    ):
        with pytest.raises(ValueError, match="output"):
            Block.of(out)
    for out in (np.zeros((1, 10)), good[:, :3]):  # a row short; too narrow to compare
        with pytest.raises(ValueError, match="output"):
            dynamics.grad(params, True, ZERO, TINY, Block.of(out), sample=False)
    for out, column in ((good[:, :9], 6), (good, -1)):  # a column short; before the first
        with pytest.raises(ValueError, match="output|column"):
            dynamics.update(params, True, Block.of(out), column)
    for out in (good[:, :5], np.zeros((2, 4)), np.zeros((3, 5))):
        with pytest.raises(ValueError, match="output"):
            kernels.grad_stats(params, Block.of(out))
    # float64 in another dtype object than numpy's own (an unpickled array) is float64 still
    unpickled = pickle.loads(pickle.dumps(np.zeros((2, 5))))
    assert unpickled.dtype is not np.dtype(np.float64)
    kernels.grad_stats(params, Block.of(unpickled))


def test_the_dynamics_state_cannot_move_or_be_resized() -> None:
    """The C code writes the code bytes and W_{t−1} at addresses read once: an attempt to give
    either tensor more elements fails (and leaves the memory where it was)."""
    for name in ("codes", "w_prev"):
        dynamics = native_step.Dynamics(native_step.kernels([torch.zeros(10)]), NO_SAMPLE)
        buffer = getattr(dynamics, name)
        address = buffer.data_ptr()
        with pytest.raises(RuntimeError, match="not resizable"), pytest.warns(UserWarning):
            torch.cat([torch.zeros(11, dtype=buffer.dtype)], out=buffer)
        assert buffer.untyped_storage().data_ptr() == address


def test_a_parameter_given_new_memory_is_read_there(checks) -> None:
    """The parameters' addresses are kept from one update to the next, but a parameter whose
    memory moved (`.data =`) is read at its new address, and checked again."""
    p, q = nn.Parameter(torch.zeros(1000)), nn.Parameter(torch.zeros(10))
    dynamics = native_step.Dynamics(native_step.kernels([p, q]), NO_SAMPLE)
    dynamics.w_prev.zero_()
    out = Block.of(np.empty((2, 3)))
    dynamics.update([p, q], False, out, 2)
    assert out.array[0, 2] == 0.0
    p.data = torch.full((1000,), 2.0)
    dynamics.update([p, q], False, out, 2)
    assert out.array[0, 2] == pytest.approx(math.sqrt(1000 * 4.0))  # ‖W_t − W_{t−1}‖₂
    p.data = torch.zeros(999)
    with pytest.raises(ValueError, match="kernels made for"):
        dynamics.update([p, q], False, out, 2)


def test_the_gradients_read_are_held_for_the_kernels_call(checks) -> None:
    """The kernels read with the GIL released: a .grad set to None by another thread meanwhile
    must not free what they read. What `_data` hands back holds the gradients until dropped."""
    from torch.multiprocessing.reductions import StorageWeakRef

    p = nn.Parameter(torch.zeros(1000))
    p.grad = torch.ones(1000)
    kernels = native_step.kernels([p])
    weak = StorageWeakRef(p.grad.untyped_storage())
    _, held = kernels._data(native_step.Grads((p,)))
    p.grad = None
    assert not weak.expired()
    del held
    assert weak.expired()


def test_a_negated_view_is_read_as_its_values(checks) -> None:
    """A view that negates its memory's values (torch._neg_view, as PyTorch's conjugate and
    negative views make) is read through a copy of its values, never as the memory holds it."""
    g = torch.arange(1.0, 5.0)
    kernels = native_step.kernels([g])
    _, held = kernels._data([torch._neg_view(g)])
    assert ctypes.c_float.from_address(kernels._pointers[0]).value == -1.0
    if checks == "compiled":
        sizes, out = (ctypes.c_int64 * 1)(4), (ctypes.c_void_p * 1)()
        module = native.tensor_checks()
        at = (ctypes.addressof(sizes), ctypes.addressof(out))
        assert module.pointers([torch._neg_view(g)], False, 1, at[0], 0, at[1]) == 2


def test_the_weights_versions_tell_an_in_place_change(checks) -> None:
    """`Dynamics.changed`: whether a weight was changed in place since the last call (its
    version counter), so that W_{t−1} is read afresh."""
    p, q = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3))
    dynamics = native_step.Dynamics(native_step.kernels([p, q]), NO_SAMPLE)
    assert dynamics.changed([p, q])  # nothing seen yet
    assert not dynamics.changed((p, q))
    with torch.no_grad():
        q.add_(1.0)
    assert dynamics.changed([p, q]) and not dynamics.changed([p, q])
    p.detach().mul_(2.0)  # a view's change is its base's
    assert dynamics.changed([p, q]) and not dynamics.changed([p, q])
    assert dynamics.changed([p]) and dynamics.changed([p, q])  # other tensors between


def test_tensors_read_once_are_read_again_from_their_read(monkeypatch) -> None:
    """A Read of tensors checked in Python by one kernels' call serves kernels over some of them,
    picked by index; one unlike those kernels' tensors is refused."""
    python_checks(monkeypatch)
    grads = grads_of([5, 7, 9, 11])
    whole = native_step.kernels(grads)
    whole.keeps_reads = True
    whole.norm(grads)
    read = whole.take_read()
    assert read is not None and whole.take_read() is None  # taken once
    part = native_step.kernels([grads[3], grads[1]])
    part.picks = [3, 1]
    assert part.norm(read) == part.norm([grads[3], grads[1]])
    for picks in ([1, 3], [3], [3, 4], [3, -1], None):
        part.picks = picks
        with pytest.raises(ValueError, match="a read of tensors unlike"):
            part.norm(read)
    wide = native_step.kernels([g.double() for g in (grads[3], grads[1])])
    wide.picks = [3, 1]
    with pytest.raises(ValueError, match="a read of tensors unlike"):  # twice the bytes there
        wide.norm(read)
    part.picks = [3, 1]
    whole.norm(grads_of([5, 7, 9, 11], seed=1))  # its pointers are another call's now
    with pytest.raises(ValueError, match="since replaced"):
        part.norm(read)
    whole.norm(grads)
    read = whole.take_read()
    with pytest.raises(ValueError, match="kernels made for"):  # refused midway
        whole.norm([*grads[:2], torch.zeros(3), grads[3]])
    with pytest.raises(ValueError, match="since replaced"):
        part.norm(read)
    strided = [grads[0], torch.randn(7, 2).t()]  # a copy is read: no Read of it
    pair = native_step.kernels(strided)
    pair.keeps_reads = True
    pair.norm(strided)
    assert pair.take_read() is None


def test_accuracy_is_torchs_to_the_bit(checks) -> None:
    """The first largest logit of a row is its prediction, a NaN counting as largest (as
    torch.argmax): ties, NaN rows, -inf rows, float64, rows apart in memory, no rows."""
    nan, inf = float("nan"), float("inf")
    rows = [
        [1, 3, 3, 0],
        [1, nan, 5, nan],
        [-inf] * 4,
        [2, 2, nan, 9],
        [nan, 1, 2, 3],
        [0, 0, 0, 7],
    ]
    gen = torch.Generator().manual_seed(0)
    cases = [
        (torch.tensor(rows), torch.tensor([1, 1, 0, 3, 0, 3])),
        (torch.tensor(rows, dtype=torch.float64), torch.tensor([2, 1, 1, 2, 0, 3])),
        (torch.randn(29, 10, generator=gen), torch.randint(0, 10, (29,), generator=gen)),
        (torch.randn(7, 16, generator=gen)[:, :10], torch.randint(0, 10, (7,), generator=gen)),
        (torch.randint(0, 3, (300, 5), generator=gen).float(), torch.zeros(300, dtype=torch.long)),
        (torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)),
    ]
    for logits, target in cases:
        want = (logits.argmax(1) == target).float().mean()
        got = native_step.accuracy(logits, target)
        assert isinstance(got, float)
        assert got == float(want) or (np.isnan(got) and want.isnan())


def test_accuracy_leaves_what_it_cannot_read_to_pytorch(checks) -> None:
    logits, target = torch.randn(8, 4), torch.randint(0, 4, (8,))
    freed, freed_target = torch.randn(8, 4), target.clone()
    for t in (freed, freed_target):  # no memory at its address: PyTorch's ops crash on it too
        t.untyped_storage().resize_(0)
    for args in (
        (logits.bfloat16(), target),
        (logits.t().contiguous().t(), target),  # columns apart in memory
        (logits, target.int()),
        (logits, target[:4]),
        (logits.reshape(8, 2, 2), target),
        (torch.zeros(8, 0), target),
        (logits, torch.randint(0, 4, (16,))[::2]),
        (logits.to_sparse(), target),
        (logits, target[:, None]),  # [8, 1]: torch's == broadcasts it to [8, 8]
        (logits, target.to("meta")),
        (freed, target),
        (logits, freed_target),
        (torch._neg_view(logits), target),  # memory that holds the negated values
        (logits, torch._neg_view(target)),
    ):
        assert native_step.accuracy(*args) is None


def test_the_switch_is_read_from_the_environment_at_import() -> None:
    for value, want in (("0", "False"), ("1", "True")):
        done = subprocess.run(
            [sys.executable, "-c", "import netprobe.native as n; print(n.ENABLED)"],
            env={**os.environ, "NETPROBE_NATIVE": value},
            capture_output=True,
            text=True,
        )
        assert done.stdout.strip() == want, done.stderr


def test_host_blocks_are_fresh_and_their_addresses_theirs(monkeypatch) -> None:
    """Every block handed out is a new [shape] float64 array, its address its own first
    element's, across pools; a pool holds SIZE blocks, fewer where they would pass BYTES."""
    monkeypatch.setattr(native.HostBlocks, "SIZE", 3)
    blocks = native.HostBlocks(2, 5)
    handed = [blocks.next() for _ in range(8)]  # three pools
    for block in handed:
        assert block.array.shape == (2, 5) and block.array.dtype == np.float64
        assert block.address == block.array.ctypes.data
    starts = sorted(b.address for b in handed)
    assert len(set(starts)) == 8 and len({id(b.array.base) for b in handed}) == 3
    monkeypatch.setattr(native.HostBlocks, "BYTES", 200)
    assert len(native.HostBlocks(2, 5).next().array.base) == 2  # 200 bytes: two blocks of 80
