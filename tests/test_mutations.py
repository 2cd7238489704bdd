"""scripts/mutations.py keeps working: every mutation still applies to the code, one cheap
mutation is killed by its test, and a mutation no test catches is reported as surviving."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from netprobe.probes import PROBES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "mutations.py"


@pytest.fixture(scope="module")
def mutations():
    spec = importlib.util.spec_from_file_location("mutations_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_mutation_changes_one_line_of_the_current_code(mutations) -> None:
    ids = [mu.id for mu in mutations.MUTATIONS]
    assert len(ids) == len(set(ids))
    modules = set()
    for mu in mutations.MUTATIONS:
        path = mutations.locate(ROOT, mu)  # the line is there exactly once
        modules.add(path.stem)
        source = path.read_text()
        mutant = mutations.mutate(source, mu)
        changed = [a for a, b in zip(source.splitlines(), mutant.splitlines()) if a != b]
        assert len(changed) == 1 and len(mutant.splitlines()) == len(source.splitlines()), mu.id
        assert all((ROOT / test).exists() for test in mu.tests), mu.id
    # Every probe's module has mutations of its own (a new probe needs some).
    assert {cls.__module__.rsplit(".", 1)[-1] for cls in PROBES.values()} <= modules
    with pytest.raises(ValueError, match="0 lines"):
        mutations.mutate("x = 1\n", mutations.MUTATIONS[0])


def test_a_mutation_is_killed_in_a_copy_and_the_tree_is_left_alone() -> None:
    rwc = ROOT / "netprobe" / "probes" / "rwc.py"
    before = rwc.read_text()
    test = "tests/probes/test_rwc.py::test_rwc_matches_numpy_from_saved_weights"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "rwc.norm", "--no-baseline", "--tests", test],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "killed    rwc.norm" in done.stdout
    assert "1 of 1 mutations killed" in done.stdout
    assert rwc.read_text() == before


def test_a_surviving_mutation_fails_the_check(mutations, monkeypatch, capsys) -> None:
    monkeypatch.setattr(mutations, "pytest", lambda tree, tests, timeout: (True, "1 passed"))
    assert mutations.main(["--only", "rwc.norm", "--no-baseline"]) == 1
    assert "SURVIVED  rwc.norm" in capsys.readouterr().out
