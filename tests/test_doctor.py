"""netprobe doctor: the planted-pathology gallery, healthy runs, each rule against a hand-made
store, and the places findings show (CLI, ls, train's summary and run.json, the report page)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import netprobe
from netprobe import doctor
from netprobe.cli import main
from netprobe.config import compose
from netprobe.doctor import Thresholds, diagnose, problems, thresholds
from netprobe.errors import ConfigError
from netprobe.lifecycle import claim_run_dir
from netprobe.store import RunWriter, rows_table, scalar_table
from netprobe.train import train
from tests.gallery import BASE, CASES
from tests.helpers import netprobe_cmd


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every planted case trained once for the whole module (about 10 s on 2 cores)."""
    root = tmp_path_factory.mktemp("gallery")
    out = {}
    for case in CASES:
        out[case.code] = root / case.code
        train(compose([*BASE, *case.overrides]), out[case.code])
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.code for c in CASES])
def test_gallery_case_is_found_on_its_layers(case, gallery: dict[str, Path]) -> None:
    found = [f for f in problems(diagnose(gallery[case.code])) if f.code == case.code]
    assert found, f"{case.code} not reported: {[f.code for f in diagnose(gallery[case.code])]}"
    named = {layer for f in found for layer in f.layers}
    assert set(case.layers) <= named, (case.layers, named)
    for f in found:
        assert "threshold" in f.evidence and f.advice


def test_every_code_has_a_planted_case() -> None:
    assert sorted(c.code for c in CASES) == sorted(doctor.CODES)


def test_dead_units_evidence_is_the_stored_dead_frac(gallery: dict[str, Path]) -> None:
    run = netprobe.load(gallery["dead_units"])
    stored = run.scalars(probe="activations", metric="train/dead_frac", layer="hidden")
    last = stored.sort_values("step")["value"].iloc[-1]
    (f,) = [f for f in diagnose(run) if f.code == "dead_units"]
    assert f.evidence["dead_frac"]["hidden"] == pytest.approx(last, rel=1e-3)
    # The output layer feeds no ReLU: never counted, whatever its share of negative logits.
    assert "out" not in f.layers


def test_diverged_names_first_step_and_layers(gallery: dict[str, Path]) -> None:
    run = netprobe.load(gallery["diverged"])
    loss = run.scalars(probe="train", metric="loss")
    first = int(loss[~np.isfinite(loss["value"])]["step"].min())
    (f,) = [f for f in diagnose(run) if f.code == "diverged"]
    assert f.evidence["first_nonfinite_step"] == first and f.steps == (first, first)
    grads = run.scalars(probe="gradients", metric="nonfinite")
    bad = grads[grads["value"] > 0]
    at = bad[bad["step"] == bad["step"].min()]
    assert set(f.layers) == set(at["layer"]) and f.layers
    assert len(f.evidence["loss_before"]) == min(5, first)


DOCTOR_PROBES = "probes=[gradients,weights,rwc,optim_dynamics,activations]"


def test_healthy_short_run_has_no_warning(tmp_path: Path) -> None:
    run = tmp_path / "mlp"
    train(compose([*BASE, DOCTOR_PROBES, "trainer.epochs=3"]), run)
    assert problems(diagnose(run)) == []
    assert doctor.health(run) == "ok"


@pytest.mark.slow
def test_healthy_models_and_presets_have_no_warning(tmp_path: Path) -> None:
    """Every built-in model and preset, short (scripts/doctor_false_positives.py, one seed)."""
    from scripts.doctor_false_positives import configs

    flagged = {}
    for name, overrides in configs(epochs=3).items():
        run = tmp_path / name.replace(" ", "_").replace("=", "-")
        train(compose(overrides), run)
        found = problems(diagnose(run))
        if found:
            flagged[name] = [(f.code, f.layers) for f in found]
    assert flagged == {}


# ---------------------------------------------------------------- rules on hand-made stores


def _store(path: Path, scalars: list[tuple], layers: list[tuple[str, str, str, int]] = ()) -> Path:
    """A run directory holding exactly the given scalars (step, epoch, probe, layer, metric,
    value) and layers (module, param, type, numel), in that forward order."""
    writer = RunWriter(path, {"model": "hand", "data": "hand"}, lock=claim_run_dir(path))
    blocks = [(s, e, p, [layer], [m], np.array([[v]])) for s, e, p, layer, m, v in scalars]
    writer.append("scalars", scalar_table(blocks))
    rows = [
        {"order": i, "module": m, "param": p, "type": t, "shape": [n], "numel": n}
        for i, (m, p, t, n) in enumerate(layers)
    ]
    writer.write_table("layers", rows_table("layers", rows))
    writer.close("completed")
    return path


def _loss(values: list[float], per_epoch: int = 10) -> list[tuple]:
    return [(i, i // per_epoch, "train", "", "loss", v) for i, v in enumerate(values)]


def test_unstable_loss_counts_spikes_as_defined(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = list(1.0 + 0.01 * rng.standard_normal(200))
    spikes = [50, 90, 130, 170, 190]
    for i in spikes:
        values[i] = 5.0
    run = _store(tmp_path / "r", _loss(values))
    (f,) = [f for f in diagnose(run) if f.code == "unstable_loss"]
    # Reference: a spike is ≥ 3× the median of the 20 steps before it and ≥ 0.1 × start above it.
    ref = [np.median(values[i - 20 : i]) for i in range(20, 200)]
    expect = [i for i, r in zip(range(20, 200), ref) if values[i] >= 3 * r and values[i] - r >= 0.1]
    assert expect == spikes and f.evidence["spikes"] == len(spikes)
    assert f.steps == (50, 190)
    calm = _store(tmp_path / "calm", _loss([1.0 + 0.01 * np.sin(i) for i in range(200)]))
    assert not [f for f in diagnose(calm) if f.code == "unstable_loss"]


def test_loss_plateau_and_threshold_override(tmp_path: Path) -> None:
    values = [2.3 - 0.0005 * i for i in range(100)]  # 2.30 → 2.25: far above half its start
    run = _store(tmp_path / "r", _loss(values))
    (f,) = [f for f in diagnose(run) if f.code == "loss_plateau"]
    before, last = np.median(values[50:75]), np.median(values[75:])
    assert f.evidence["improvement"] == pytest.approx(1 - last / before, rel=1e-3)
    lenient = thresholds({"plateau_improvement": 0.001})
    assert not [f for f in diagnose(run, lenient) if f.code == "loss_plateau"]
    # The same loss with the validation loss still falling 2.6 % in the last epoch is learning
    # (AlexNet's first epochs); with it falling 0.5 %, not.
    for last_val, reported in ((2.2375, False), (2.285, True)):
        val = [(29 + 10 * e, e, "train", "", "val_loss", v) for e, v in enumerate([2.30, 2.2966])]
        val.append((99, 9, "train", "", "val_loss", last_val))
        run = _store(tmp_path / f"val{last_val}", _loss(values) + val)
        found = [f for f in diagnose(run) if f.code == "loss_plateau"]
        assert bool(found) == reported, last_val
    # A loss that rose far above its start and stays there has not levelled off: no plateau
    # (it read "stopped improving at 2291329394756347648% of where it started").
    risen = [2.3] * 20 + [1e17] * 80
    assert not [
        f for f in diagnose(_store(tmp_path / "risen", _loss(risen))) if f.code == "loss_plateau"
    ]


def test_overfitting_needs_k_rising_epochs(tmp_path: Path) -> None:
    train_loss = [1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1]
    val_loss = [1.0, 0.9, 0.85, 0.9, 1.0, 1.1, 1.2]  # rises for 4 epochs, gap grows with it
    rows = [
        (e * 10 + i, e, "train", "", "loss", v) for e, v in enumerate(train_loss) for i in range(10)
    ]
    rows += [(e * 10 + 9, e, "train", "", "val_loss", v) for e, v in enumerate(val_loss)]
    run = _store(tmp_path / "r", rows)
    (f,) = [f for f in diagnose(run) if f.code == "overfitting"]
    assert f.epochs == (2, 6) and f.evidence["epochs_rising"] == 4
    assert not [
        f for f in diagnose(run, thresholds({"overfit_epochs": 5})) if f.code == "overfitting"
    ]


def test_layer_rules_against_reference(tmp_path: Path) -> None:
    layers = [(f"l{i}", "weight", "Linear", 100) for i in range(4)]
    rows = []
    for step in range(30):
        for i, scale in enumerate([1e-5, 1.0, 2.0, 3.0]):  # l0's gradient: 1e-5 × the others'
            rows.append((step, 0, "gradients", f"l{i}.weight", "l2", scale * 10.0))
    rows += [(30, 0, "rwc", f"l{i}.weight", "rwc", v) for i, v in enumerate([0.1, 0.0, 0.2, 0.1])]
    run = _store(tmp_path / "r", _loss([2.0 - 0.05 * i for i in range(30)]) + rows, layers)
    found = {f.code: f for f in diagnose(run)}
    vanishing = found["vanishing_gradients"]
    assert vanishing.layers == ["l0.weight"]
    rms = np.array([1e-5, 1, 2, 3]) * 10 / np.sqrt(100)
    ratio = rms[0] / np.median(rms)
    assert vanishing.evidence["ratio_to_median"]["l0.weight"] == pytest.approx(ratio, rel=1e-3)
    assert "exploding_gradients" not in found
    assert found["stalled_layer"].layers == ["l1.weight"]
    # Not recorded: the rule says which probe to turn on, and says nothing else.
    dead = found["dead_units"]
    assert (
        dead.severity == "info"
        and dead.advice == "turn on probes=[activations] to check dead_units"
    )
    # On, but it recorded nothing the rule reads: turning it on would not help.
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "probes": ["gradients", "activations"]}))
    dead = next(f for f in diagnose(run) if f.code == "dead_units")
    assert dead.advice == (
        "probes.activations was on but recorded none of it: its layers/exclude select no layer, "
        "or the run ended before its first capture"
    )


def test_symmetric_init_and_no_learning_thresholds(tmp_path: Path) -> None:
    layers = [("a", "weight", "Linear", 10), ("b", "weight", "Linear", 10)]
    rows = [
        (0, 0, "weights", "a.weight", "std", 0.0),
        (0, 0, "weights", "a.weight", "mean", 1.0),
        (0, 0, "weights", "b.weight", "std", 0.1),
        (0, 0, "weights", "b.weight", "mean", 0.0),
    ]
    run = _store(tmp_path / "r", rows, layers)
    (f,) = [f for f in diagnose(run) if f.code == "symmetric_init"]
    assert f.layers == ["a.weight"] and f.severity == "error"


def test_thresholds_refuse_bad_values() -> None:
    assert thresholds({"dead_frac": 0.6}).dead_frac == 0.6
    assert thresholds({}) == Thresholds()
    with pytest.raises(ConfigError, match="dead_frac"):
        thresholds({"dead_frac": -1})
    assert thresholds({"dead_frac": 1}).dead_frac == 1
    for key in ("dead_frac", "zero_grad_frac", "spike_frac", "plateau_loss_frac"):
        with pytest.raises(ConfigError, match=rf"^doctor.{key}=1.5 .*fraction in \(0, 1\]$"):
            thresholds({key: 1.5})
    with pytest.raises(ConfigError, match="valid keys"):
        thresholds({"nope": 1})
    with pytest.raises(ConfigError, match="overfit_epochs"):
        thresholds({"overfit_epochs": 1.5})


def test_doctor_config_group_is_validated() -> None:
    assert compose(["doctor.dead_frac=0.7"]).doctor.dead_frac == 0.7
    with pytest.raises(ConfigError, match="doctor.dead_frac"):
        compose(["doctor.dead_frac=-2"])
    with pytest.raises(ConfigError, match="doctor.dead_frac=2"):
        compose(["doctor.dead_frac=2"])


# ---------------------------------------------------------------- where findings show


def _main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`netprobe ARGS` in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_strict_and_refusals(gallery: dict[str, Path], capsys) -> None:
    sick = str(gallery["no_learning"])
    code, out, err = _main(capsys, "doctor", sick, "--format", "json")
    assert code == 0, err
    (entry,) = json.loads(out)
    assert any(f["code"] == "no_learning" for f in entry["findings"])
    assert entry["health"] == "1 error"
    assert _main(capsys, "doctor", sick, "--strict")[0] == 1
    # Its only finding needs 3 rising epochs; asked for 100, --strict has nothing to refuse.
    overfit = str(gallery["overfitting"])
    assert _main(capsys, "doctor", overfit, "--strict")[0] == 1
    assert _main(capsys, "doctor", overfit, "--strict", "--overfit-epochs", "100")[0] == 0
    code, out, err = _main(capsys, "doctor", sick, "--dead-frac", "-1")
    assert code == 2 and "dead_frac" in err and not out
    code, out, err = _main(capsys, "doctor", sick, "--dead-frac", "5")
    assert code == 2 and "doctor.dead_frac=5.0" in err and "(0, 1]" in err and not out
    code, out, err = _main(capsys, "doctor", sick + "/nope")
    assert code == 2 and "no such file" in err
    code, out, _ = _main(capsys, "doctor", str(gallery["dead_units"]))
    assert "dead_units" in out and "hidden" in out


def test_ls_health_column(gallery: dict[str, Path], capsys) -> None:
    assert doctor.health(gallery["stalled_layer"]) == "1 warning"
    code, out, _ = _main(capsys, "ls", str(gallery["no_learning"]))
    assert code == 0 and "health" in out and "1 error" in out


def test_train_keeps_findings_in_run_json_and_prints_them(tmp_path: Path) -> None:
    run = tmp_path / "ones"
    args = ["train", *BASE, "init=ones", "trainer.epochs=1", "probes=[weights]"]
    done = netprobe_cmd(*args, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr
    kept = json.loads((run / "run.json").read_text())["findings"]
    assert "symmetric_init" in {f["code"] for f in kept}
    assert all(f["severity"] in ("warning", "error") for f in kept)
    assert "symmetric_init" in done.stderr and "doctor:" in done.stderr


def test_report_page_opens_with_linked_findings(gallery: dict[str, Path], tmp_path: Path) -> None:
    from netprobe.plots import plot

    plot([gallery["dead_units"]], out=tmp_path / "fig", only=["activation_stats"])
    page = (tmp_path / "fig" / "index.html").read_text()
    start = page.index("id='findings'")
    assert start < page.index("<figure")
    href = page[start:].split(">dead_units</a>")[0].rsplit("<a href='", 1)[1].split("'")[0]
    assert Path(href).stem == "activation_stats" and (tmp_path / "fig" / href).exists()


def test_the_table_says_which_missing_probes_were_on(tmp_path: Path, capsys) -> None:
    """The "not checked" row names the probes to turn on apart from those already on."""
    layers = [("l0", "weight", "Linear", 100)]
    rows = [(s, 0, "gradients", "l0.weight", "l2", 1.0) for s in range(30)]
    run = _store(tmp_path / "r", _loss([2.0 - 0.05 * i for i in range(30)]) + rows, layers)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "probes": ["gradients", "activations"]}))
    code, out, err = _main(capsys, "doctor", str(run), "--format", "table")
    assert code == 0, err
    # The last column, "what helps", its folded lines joined.
    cells = [line.split("│")[-2].strip() for line in out.splitlines() if line.count("│") == 7]
    text = " ".join(c for c in cells if c)
    assert text.startswith("turn on probes=[rwc,weights]; "), text
    assert "probes.activations was on but recorded none of it" in text, text
