"""Mutation check: every probe formula, changed by one line, must fail one of the probe's tests.

Each mutation below replaces one line of netprobe/probes/ or of the fused kernels in
netprobe/native/ (a wrong norm, a dropped term, an off-by-one, a swapped pair), found by its text
wherever it lives, in a temporary copy of the tree; the probe's tests then run on that copy,
stopping at the first failure. The loader compiles a C mutant as it would any change (without a
C compiler those mutations are left out). A mutation is *killed* when a test fails, and
*survives* when every test passes: then no test checks that line against an independent
reference. The working tree is never modified.

    python scripts/mutations.py                 # every mutation (minutes: one test run each)
    python scripts/mutations.py --list          # the mutations, by id
    python scripts/mutations.py --only rwc.norm correlation.diagonal

Exit status 0 when every mutation run is killed; 1 when one survives, its line is no longer in
the code (the code changed: update the mutation), or the tests fail before any mutation.
Not part of the default test run: tests/test_mutations.py runs one cheap mutation of it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from netprobe.native import TUNED, compiler

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("netprobe", "tests", "conf", "pyproject.toml")
# Where a mutation's line is looked for: the probes and the fused kernels under them.
SEARCHED = (("netprobe/probes", "*.py"), ("netprobe/native", "*.[ch]"))


@dataclass(frozen=True)
class Mutation:
    id: str  # PROBE.WHAT: the tests of PROBE must catch it unless `tests` says otherwise
    line: str  # a line of SEARCHED, without its indentation, that occurs exactly once
    mutant: str  # what replaces it, at the same indentation
    tests: tuple[str, ...]  # test files that must catch it


def m(id: str, line: str, mutant: str, *tests: str) -> Mutation:
    names = tests or (id.split(".")[0],)
    return Mutation(id, line, mutant, tuple(f"tests/probes/test_{n}.py" for n in names))


def c(id: str, line: str, mutant: str, *probes: str) -> Mutation:
    """A mutation of the fused kernels: their tests and the probes' tests catch it."""
    kernels = "tests/test_native_hist.py" if id.startswith("hist") else "tests/test_native.py"
    tests = (kernels, *(f"tests/probes/test_{n}.py" for n in probes))
    return Mutation(f"native.{id}", line, mutant, tests)


MUTATIONS = [
    # gradients: l1, l2, mean_abs, max_abs, nonfinite
    m("gradients.l2_norm",
      "l1, l2, max_abs = segments.sum(scratch), segments.norm(scratch), segments.amax(scratch)",
      "l1, l2, max_abs = segments.sum(scratch), segments.sum(scratch), segments.amax(scratch)"),
    m("gradients.mean_count",
      "return torch.stack([l1, l2, l1 / sizes, max_abs, nonfinite], dim=1), "
      "torch.linalg.vector_norm(",
      "return torch.stack([l1, l2, l1 / (sizes - 1), max_abs, nonfinite], dim=1), "
      "torch.linalg.vector_norm("),
    m("gradients.nonfinite",
      "nonfinite = sizes - segments.count(scratch).to(dtype)",
      "nonfinite = segments.count(scratch).to(dtype)"),
    # gradients' rows picked from the monitor's read of every gradient
    m("gradients.picked_rows", "return np.array(rows)", "return np.array(rows[::-1])"),
    m("gradients.picked_slice",
      "return slice(rows[0], rows[-1] + 1, step)  # type: ignore[operator]",
      "return slice(rows[0], rows[-1], step)  # type: ignore[operator]"),
    # segments: the per-tensor reductions under gradients and optim_dynamics
    m("segments.norm",
      "return self._reduce(flat, lambda v: torch.linalg.vector_norm(v, dim=1))",
      "return self._reduce(flat, lambda v: torch.linalg.vector_norm(v, ord=1, dim=1))",
      "segments", "gradients"),
    # gradient_flow: w_grad_l2 over a node's parameters, out_grad_l2 summed over calls
    m("gradient_flow.weight_norm",
      "return list(torch._foreach_norm(tensors, 2, dtype=dtype))",
      "return list(torch._foreach_norm(tensors, 1, dtype=dtype))"),
    # a sparse gradient's norm: an index given twice is one entry
    Mutation("reductions.sparse_coalesced",
             "values = t.coalesce().values() if t.layout is torch.sparse_coo else t.values()",
             "values = t._values() if t.layout is torch.sparse_coo else t.values()",
             ("tests/test_monitor.py",)),
    m("gradient_flow.weight_sqrt",
      "return total.index_add_(0, node_of_grad, squares).sqrt()",
      "return total.index_add_(0, node_of_grad, squares.sqrt())"),
    m("gradient_flow.output_sqrt",
      "values = torch.stack([stash[n][1] for n in names]).sqrt()",
      "values = torch.stack([stash[n][1] for n in names])"),
    m("gradient_flow.repeated_calls",
      "square = previous[1] + square",
      "square = square"),
    # weights (and the shared distributions): moments, histogram, dist_init
    m("weights.dist_init",
      "return torch.where(initial_norm > 0, distance / initial_norm, torch.nan)",
      "return torch.where(initial_norm > 0, distance, torch.nan)"),
    m("weights.initial_norm",
      "self.initial_norm = torch.stack(torch._foreach_norm(self.initial, 2, dtype=torch.float64))",
      "self.initial_norm = torch.stack(torch._foreach_norm(self.initial, 1, dtype=torch.float64))"),
    m("distributions.skew",
      "skew = torch.where(m2 > 0, m3 / (m2 * std), torch.zeros_like(m3))",
      "skew = torch.where(m2 > 0, m3 / m2, torch.zeros_like(m3))",
      "weights", "activations"),
    m("distributions.variance",
      "m2, m3 = m2 / t.numel(), m3 / t.numel()",
      "m2, m3 = m2 / (t.numel() - 1), m3 / t.numel()",
      "weights", "activations"),
    m("distributions.mean",
      "mean = total / t.numel()",
      "mean = total / (t.numel() - 1)",
      "weights", "activations"),
    m("distributions.peak",
      "peak = factor * torch.stack("
      'torch._foreach_norm(tensors, float("inf"), dtype=torch.float64))',
      "peak = factor * torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))",
      "weights", "activations"),
    m("distributions.quantile",
      "where = torch.stack([tail * last, (1 - tail) * last]).clamp(min=0)",
      "where = torch.stack([tail * last, (1 - tail) * (last + 1)]).clamp(min=0)",
      "weights", "activations"),
    # rwc: ‖W_e − W_{e−1}‖₁ / ‖W_{e−1}‖₁, the elementwise mean, the previous weights moving on
    m("rwc.norm",
      "change = torch.stack(torch._foreach_norm(diffs, 1, dtype=torch.float64))",
      "change = torch.stack(torch._foreach_norm(diffs, 2, dtype=torch.float64))"),
    m("rwc.denominator",
      "return change / torch.stack(torch._foreach_norm(previous, 1, dtype=torch.float64))",
      "return change / torch.stack(torch._foreach_norm(current, 1, dtype=torch.float64))"),
    m("rwc.elementwise_count",
      "counts.append(nonzero.sum())",
      "counts.append(nonzero.sum() + 1)"),
    m("rwc.previous",
      "torch._foreach_copy_(previous, self.tensors)",
      "pass"),
    # optim_dynamics: zero, released, retained and flip fractions, update sizes, sign codes
    m("optim_dynamics.retained",
      "n_retained = segments.count(torch.mul(z_prev, z, out=retained))",
      "n_retained = segments.count(torch.maximum(z_prev, z, out=retained))"),
    m("optim_dynamics.flip_retained",
      "n_flip_retained = segments.count(flipped.mul_(retained))",
      "n_flip_retained = segments.count(flipped)"),
    m("optim_dynamics.local_min_max",
      "local_min, local_max = (moving + net) / 2, (moving - net) / 2",
      "local_min, local_max = (moving - net) / 2, (moving + net) / 2"),
    m("optim_dynamics.wdiff_retained",
      "mean_moved = moved / torch.clamp(n_retained, min=1)",
      "mean_moved = moved"),
    m("optim_dynamics.sign_threshold",
      "codes = torch.where(g.abs() > zero_threshold, SIGN_LARGE, g.sign())",
      "codes = torch.where(g.abs() >= zero_threshold, SIGN_LARGE, g.sign())"),
    # the fused CPU kernels of gradients, optim_dynamics and the monitor's norm
    c("max_nan",
      "p[2] = p[0] != p[0] ? p[0] : (double)most; /* a NaN among the |g| makes Σ|g| NaN */",
      "p[2] = (double)most;", "gradients"),
    c("l1_lanes", "s += a;", "s += a * a;", "gradients"),
    c("norm_square", "q += v * v;", "q += v;"),
    c("zero_prev_bit",
      "MT z_prev = -((old >> 2) & 1), ret = z_prev & z;",
      "MT z_prev = -((old >> 3) & 1), ret = z_prev & z;", "optim_dynamics"),
    c("flip_both_ways",
      "MT flip = (-(old & 1) & neg) | (-((old >> 1) & 1) & pos), rflip = flip & ret;",
      "MT flip = (-(old & 1) & neg), rflip = flip & ret;", "optim_dynamics"),
    c("local_min",
      "n_min -= rflip & ((d_pos & g_pos) | (d_neg & g_neg));",
      "n_min -= rflip & ((d_pos & g_neg) | (d_neg & g_neg));", "optim_dynamics"),
    c("moved_retained", "mv += (VT)((MT)ABS(d) & ret);", "mv += ABS(d);", "optim_dynamics"),
    c("hist_dead", "for (int64_t k = 0; k < len; k++) active[k] |= !(row[k] <= 0);",
      "for (int64_t k = 0; k < len; k++) active[k] |= !(row[k] < 0);", "activations"),
    c("hist_upper_edge",
      "while (s < bins + 1 && v >= c[s + 1]) s++;",
      "while (s < bins + 1 && v > c[s + 1]) s++;", "activations"),
    c("hist_skew", "p[0] = fold(m2), p[1] = fold(m3);", "p[0] = fold(m2), p[1] = fold(m2);",
      "activations"),
    c("accuracy_first_max",
      "if (x[c] > x[top] || x[c] != x[c]) top = c;",
      "if (x[c] >= x[top] || x[c] != x[c]) top = c;"),
    c("accuracy_nan_largest",
      "for (int64_t c = 1; c < classes && x[top] == x[top]; c++)",
      "for (int64_t c = 1; c < classes; c++)"),
    c("keep_w_t", "STORE(wp + k, &now, sizeof(T), n - k);", "(void)now;", "optim_dynamics"),
    # optim_dynamics' float32 loops for AVX-512 (left out where the tuned build has none)
    c("avx512_tiny_tail",
      "t |= (uint64_t)_mm512_mask_cmp_ps_mask(in, a, tiny, _CMP_LE_OQ) << (16 * q);",
      "t |= (uint64_t)_mm512_cmp_ps_mask(a, tiny, _CMP_LE_OQ) << (16 * q);", "optim_dynamics"),
    c("avx512_flip_bit",
      "code = _mm512_mask_add_epi8(code, rflip, code, _mm512_set1_epi8(16));",
      "code = _mm512_mask_add_epi8(code, flip, code, _mm512_set1_epi8(16));", "optim_dynamics"),
    c("avx512_local_max",
      "n_max += count(rflip & ((d_pos & g_neg) | (d_neg & g_pos)));",
      "n_max += count(rflip & (d_pos & g_neg));", "optim_dynamics"),
    c("avx512_moved_retained",
      "mv = _mm512_mask_add_ps(mv, (__mmask16)(ret >> (16 * s)), mv, abs16(d));",
      "mv = _mm512_add_ps(mv, abs16(d));", "optim_dynamics"),
    c("avx512_keep_w_t",
      "_mm512_mask_storeu_ps(wp + k + 16 * s, in, now);", "(void)now;", "optim_dynamics"),
    # activations: zero_frac and dead_frac
    m("activations.zero_boundary",
      "inactive = flat <= 0",
      "inactive = flat < 0"),
    m("activations.units",
      "flat = y.detach().reshape(y.shape[0], -1)",
      "flat = y.detach().reshape(-1, y.shape[-1])"),
    # correlation: Pearson, corr_mean without the within-layer diagonal, CKA
    m("correlation.std",
      "std = centered.square().mean(dim=0).sqrt()",
      "std = centered.abs().mean(dim=0)"),
    m("correlation.pearson_count",
      "return standardize(a).T @ standardize(b) / a.shape[0]",
      "return standardize(a).T @ standardize(b) / (a.shape[0] - 1)"),
    m("correlation.diagonal",
      "total -= positive.diagonal().sum()",
      "pass"),
    m("correlation.pairs",
      "count = d_a * (d_a - 1) if same_layer else d_a * d_b",
      "count = d_a * d_a if same_layer else d_a * d_b"),
    m("correlation.gram_centring",
      "xc = xc - xc.mean(dim=0)",
      "xc = xc"),
    m("correlation.hsic1_term",
      "hsic = flat @ flat.T + totals[:, None] * totals[None, :] / ((n - 1) * (n - 2))",
      "hsic = flat @ flat.T + totals[:, None] * totals[None, :] / ((n - 1) * (n - 3))"),
    m("correlation.feature_subset",
      "return torch.randperm(d, generator=generator)[:k].sort().values",
      "return torch.randperm(d, generator=generator)[: k - 1].sort().values"),
    # augmentation: the affine map and invariance
    m("augmentation.aspect",
      "torch.stack([-sin / aspect, cos], dim=-1),",
      "torch.stack([-sin * aspect, cos], dim=-1),"),
    m("augmentation.shift",
      "t = 2 * shift  # a fraction f of the width is 2f in normalized units",
      "t = shift"),
    m("augmentation.variance",
      "var_aug = to_float64(augmented).var(dim=0, correction=0).mean()",
      "var_aug = to_float64(augmented).var(dim=0, correction=1).mean()"),
    # channels: ‖LG^{c1→c2}‖_F, emission and absorption, the transpose's padding
    m("channels.em_ab",
      "return norms.sum(dim=1), norms.sum(dim=0)",
      "return norms.sum(dim=0), norms.sum(dim=1)"),
    m("channels.map_norm",
      "squares.append(torch.linalg.vector_norm(lg, dim=-1, dtype=torch.float64).square())",
      "squares.append(torch.linalg.vector_norm(lg, 1, dim=-1, dtype=torch.float64).square())"),
    m("channels.gram_quadratic",
      "squares.append(((pair_w @ gram) * pair_w).sum(dim=-1))  # wᵀ A w per (c1, c2)",
      "squares.append((pair_w @ gram).sum(dim=-1))"),
    m("channels.same_padding",
      "return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))",
      "return tuple(-(-d * (k - 1) // 2) for d, k in zip(conv.dilation, conv.kernel_size))"),
    m("channels.tap_reach",
      "last = min(size_out - 1, (size_in - 1 + padding - tap * dilation) // stride)",
      "last = min(size_out - 1, (size_in + padding - tap * dilation) // stride)"),
]  # fmt: skip


def targets_avx512_bw(compiler: str) -> bool:
    """Whether the kernels' tuned build for this CPU compiles step_avx512.h's loops."""
    done = subprocess.run(
        [compiler, *TUNED, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True
    )
    return "__AVX512BW__" in done.stdout


def locate(tree: Path, mutation: Mutation) -> Path:
    """The one file of SEARCHED in `tree` holding the mutation's line (the line is found
    wherever the code has moved it); ValueError unless it occurs exactly once."""
    hits = [
        path
        for folder, pattern in SEARCHED
        for path in sorted((tree / folder).rglob(pattern))
        for line in path.read_text().splitlines()
        if line.strip() == mutation.line
    ]
    if len(hits) != 1:
        raise ValueError(
            f"{len(hits)} lines of {', '.join(f for f, _ in SEARCHED)} read {mutation.line!r}"
        )
    return hits[0]


def mutate(source: str, mutation: Mutation) -> str:
    """`source` with the mutation's line replaced; ValueError unless the line occurs once."""
    lines = source.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == mutation.line]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} lines read {mutation.line!r}")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = f"{indent}{mutation.mutant}\n"
    return "".join(lines)


def pytest(tree: Path, tests: list[str], timeout: float) -> tuple[bool, str]:
    """Run `tests` in `tree`, stopping at the first failure: (all passed, the first failure or
    pytest's last line)."""
    # No bytecode cache: a mutant of the same size written within the same second as the
    # original could otherwise run from the other's cached bytecode.
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    env["MPLBACKEND"] = "Agg"
    env["XDG_CACHE_HOME"] = str(tree / ".cache")  # compiled mutants stay in the copy
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", *tests]
    try:
        done = subprocess.run(
            cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"a test run past {timeout:.0f} s"
    out = done.stdout.splitlines()
    failed = [line.split(" - ")[0] for line in out if line.startswith(("FAILED", "ERROR"))]
    last = out[-1] if out else done.stderr.strip()[-300:]
    return done.returncode == 0, failed[0] if failed else last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--tests", nargs="+", metavar="TEST", help="run these tests instead")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    args = parser.parse_args(argv)
    known = {mu.id: mu for mu in MUTATIONS}
    if args.list:
        for mu in MUTATIONS:
            print(f"{mu.id:32} {mu.line}\n{'':32} -> {mu.mutant}")
        return 0
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        print(f"unknown mutation {', '.join(unknown)}; valid: {', '.join(known)}", file=sys.stderr)
        return 2
    chosen = [known[i] for i in args.only] if args.only else MUTATIONS
    cc = compiler()
    if cc is None:
        print("no C compiler: the fused kernels' mutations are left out")
        chosen = [mu for mu in chosen if not mu.id.startswith("native.")]
    elif not targets_avx512_bw(cc):
        print("no AVX-512 BW in the tuned build: its loops' mutations are left out")
        chosen = [mu for mu in chosen if not mu.id.startswith("native.avx512")]

    bad = 0
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        tree = Path(tmp)
        for name in COPIED:
            src, dst = ROOT / name, tree / name
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, dst)
        if not args.no_baseline:
            tests = args.tests or sorted(
                {t for mu in chosen for t in mu.tests if (tree / t).exists()}
            )
            ok, first = pytest(tree, tests, args.timeout)
            if not ok:
                print(f"the tests fail without any mutation: {first}")
                return 1
        for mu in chosen:
            try:
                path = locate(tree, mu)
                missing = [t for t in mu.tests if not (tree / t).exists()]
                if missing:
                    raise ValueError(f"no test file {', '.join(missing)}")
            except ValueError as exc:
                print(f"STALE     {mu.id}: {exc}")
                bad += 1
                continue
            original = path.read_text()
            path.write_text(mutate(original, mu))
            start = time.perf_counter()
            try:
                passed, first = pytest(tree, list(args.tests or mu.tests), args.timeout)
            finally:
                path.write_text(original)
            took = time.perf_counter() - start
            if passed:
                bad += 1
                print(f"SURVIVED  {mu.id} ({took:.0f} s): {path.name}: {mu.mutant}")
            else:
                print(f"killed    {mu.id} ({took:.0f} s) by {first}")
            sys.stdout.flush()
    print(f"{len(chosen) - bad} of {len(chosen)} mutations killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
