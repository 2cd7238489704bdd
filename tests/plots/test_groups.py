"""Group names: only keys that differ and that every run has, short, stable (plots/groups.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netprobe.plots.groups import MAX_NAME, group_runs, mapping


@dataclass
class FakeRun:
    """What grouping reads of a run: its config, run.json, status and path."""

    config: dict[str, Any] | None
    path: Path
    info: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"


def run(name: str, seed: int = 0, **config: Any) -> FakeRun:
    base = {"model": {"name": "cnn", "width": 32}, "data": {"name": "synthetic"}, "seed": seed}
    return FakeRun({**base, **config}, Path("/runs") / name, {"seed": seed})


def probes(*names: str) -> dict[str, Any]:
    return {"probes": {n: {"every": 1, "layers": None, "exclude": []} for n in names}}


def test_seeds_share_a_group_and_absent_probes_do_not_name_it() -> None:
    runs = [
        run("a0", 0, **probes("gradients")),
        run("a1", 1, **probes("gradients")),
        run("b", 0, **probes("gradients", "rwc")),
    ]
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["probes=gradients", "probes=gradients+rwc"]
    assert [len(g.runs) for g in groups] == [2, 1]
    # probes.rwc.* exists in one run only: the section names the difference, not its keys.
    assert all(set(g.varying) == {"probes"} for g in groups)
    rows = mapping(groups, Path("/figures"))  # each run's path from the figures' folder
    paths = sorted(r["path"] for g in rows for r in g["runs"])
    assert paths == ["../runs/a0", "../runs/a1", "../runs/b"]


def test_logging_checkpoints_and_output_do_not_tell_experiments_apart() -> None:
    """Keys that cannot change what is learned: runs differing only in them (and the seed) are
    seeds of one experiment, and they never name a group."""

    def logged(name: str, seed: int, interval: int, every: int, init: str = "default") -> FakeRun:
        trainer = {"epochs": 3, "log_interval_s": interval, "checkpoint_every": every}
        doctor = {"dead_frac": 0.1 * seed}
        return run(name, seed, trainer=trainer, doctor=doctor, init={"name": init})

    one = group_runs([logged("a", 0, 10, 0), logged("b", 1, 30, 1)])
    assert len(one) == 1 and one[0].label == "" and one[0].n == 2
    mixed = [logged("a", 0, 10, 0), logged("b", 1, 30, 1), logged("z", 0, 30, 2, "zeros")]
    groups = group_runs(mixed)
    assert [g.label for g in groups] == ["init=default", "init=zeros"]
    assert [g.n for g in groups] == [2, 1]


def test_long_names_are_cut_with_a_stable_hash() -> None:
    def make() -> list[FakeRun]:
        return [
            run(
                f"r{i}",
                optim={"name": "sgd", "lr": lr, "momentum": m, "weight_decay": wd},
                trainer={"epochs": 3 + i, "schedule_description": f"cosine-with-warmup-{i}" * 3},
            )
            for i, (lr, m, wd) in enumerate([(0.1, 0.9, 1e-4), (0.01, 0.8, 5e-4)])
        ]

    labels = [g.label for g in group_runs(make())]
    assert all(len(label) <= MAX_NAME for label in labels)
    assert len(set(labels)) == 2
    assert labels == [g.label for g in group_runs(make())]  # the same folders every time
    assert all(label.startswith("optim.lr=") for label in labels)


def test_names_that_would_collide_get_told_apart() -> None:
    # Two configs that differ only in a section present in one of them but with equal members.
    a = run("a", **probes("gradients"))
    b = run("b", **probes("gradients"))
    b.config["probes"]["gradients"]["extra"] = 1  # a key only b has
    labels = [g.label for g in group_runs([a, b])]
    assert len(set(labels)) == 2 and all(0 < len(label) <= MAX_NAME for label in labels)


def test_a_run_without_config_is_grouped_by_its_run_json() -> None:
    plain = FakeRun(None, Path("/runs/lib"), {"model": "mlp", "data": "digits", "seed": 0})
    labels = {g.label for g in group_runs([run("cli"), plain])}
    assert labels == {"model=cnn,data=synthetic", "model=mlp,data=digits"}


def test_a_run_without_config_does_not_hide_what_tells_the_others_apart() -> None:
    """A run that crashed before writing its config has only run.json's names: the keys that the
    others differ in still name their groups (not a section it lacks, and a hash)."""
    optim = lambda name, lr: {"optim": {"name": name, "lr": lr, "schedulers": {"cos": {"t": 3}}}}  # noqa: E731
    crashed = FakeRun(None, Path("/runs/crashed"), {"model": "cnn", "data": "synthetic"})
    groups = group_runs([run("adam", **optim("adam", 1e-3)), run("sgd", **optim("sgd", 1e3)),
                         crashed])  # fmt: skip
    assert [g.label for g in groups] == ["optim=adam", "optim=none", "optim=sgd"]


def test_runs_of_one_config_and_seed_are_named_in_a_warning() -> None:
    """A run copied beside itself would count twice in its group's mean: said."""
    with pytest.warns(UserWarning) as caught:
        groups = group_runs([run("a", 1), run("copy-of-a", 1), run("b", 2)])
    assert len(groups) == 1 and groups[0].n == 3
    assert [str(w.message) for w in caught] == [
        "2 runs of one config share seed 1 (/runs/a, /runs/copy-of-a); each counts in their "
        "group's mean and spread"
    ]
