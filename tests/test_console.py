"""What a run prints: the start banner, progress lines inside an epoch off a terminal, one line per
epoch, the closing summary, all of it in train.log; and the light commands start without torch."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from netprobe.progress import duration, summary
from tests.helpers import netprobe_cmd

TINY = ["data=synthetic", "data.num_samples=256", "data.image_size=8", "data.batch_size=32",
        "data.probe_size=32", "probes=none"]  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["ls", "{dir}"],
        ["plot", "--help"],
        ["train", "--help"],
        ["train", "model=cnn", "--cfg", "job"],
    ],
)
def test_light_commands_import_no_torch(tmp_path: Path, args: list[str]):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"status": "completed", "seed": 0}))
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    code = (
        "import sys\nfrom netprobe.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
        "print('torch loaded:', 'torch' in sys.modules, 'exit:', code, file=sys.stderr)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert "torch loaded: False exit: 0" in res.stderr, res.stderr[-2000:]


def test_importing_the_cli_leaves_torch_out():
    code = "import sys, netprobe.cli; print([m for m in ('torch', 'pandas') if m in sys.modules])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stderr


def test_progress_lines_inside_an_epoch_off_a_terminal(tiny_run, capsys):
    """With a tiny log_interval_s every step prints a line; each shows that step's loss."""
    capsys.readouterr()
    run = tiny_run(*TINY, "trainer.epochs=2", "trainer.log_interval_s=0.000001")
    err = capsys.readouterr().err.splitlines()
    losses = run.scalars(probe="train", metric="loss").set_index("step")["value"]
    steps_per_epoch = len(losses) // 2
    epoch_1 = err.index(next(line for line in err if line.startswith("epoch 1/2")))
    shown = [line for line in err[:epoch_1] if line.startswith("step ")]
    assert len(shown) >= steps_per_epoch - 1  # the lines come inside the epoch, not after it
    for line in shown:
        step = int(re.match(r"step (\d+)/", line).group(1))
        printed = float(re.search(r"loss (\S+)", line).group(1))
        assert printed == pytest.approx(losses[step - 1], abs=1e-4)  # step counts from 0
    assert all("samples/s" in line and "ETA" in line for line in shown)
    # The epoch line shows the epoch's mean training loss and its validation results.
    val = run.scalars(probe="train", metric="val_acc")["value"].tolist()
    line = err[epoch_1]
    mean = statistics.mean(losses.iloc[:steps_per_epoch])
    assert float(re.search(r" loss (\S+)", line).group(1)) == pytest.approx(mean, abs=1e-4)
    assert f"val_acc {val[0]:.4f}" in line
    assert re.search(r"samples/s  in \d+\.\d+ s$", line), line  # the epoch's time, labelled


def test_default_interval_prints_epoch_lines_only(tiny_run, capsys):
    capsys.readouterr()
    tiny_run(*TINY, "trainer.epochs=2")
    err = capsys.readouterr().err.splitlines()
    assert not [line for line in err if line.startswith("step ")]
    assert [line.split()[1] for line in err if line.startswith("epoch ")] == ["1/2", "2/2"]


def test_train_log_holds_the_console(tmp_path: Path):
    run_dir = tmp_path / "run"
    res = netprobe_cmd(
        "train", *TINY, "model=cnn", "trainer.epochs=2", "trainer.target_val_acc=0.01",
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    printed = res.stderr.strip().splitlines()
    logged = (run_dir / "train.log").read_text().strip().splitlines()
    assert printed and logged == printed
    info = json.loads((run_dir / "run.json").read_text())
    from netprobe.config import compose
    from netprobe.models import build_model

    model = build_model(compose([*TINY, "model=cnn"]).model)
    params = sum(p.numel() for p in model.parameters())
    banner = "\n".join(printed[:5])
    assert f"new run in {run_dir}" in banner and "cnn (" in banner
    assert f"{params / 1000:.1f}k parameters" in banner and "device  cpu" in banner
    # The early stop is the closing summary's reason.
    assert "stopped: validation accuracy" in res.stderr and info["stop_reason"] in res.stderr
    # Its time is the run's time spent training, as `netprobe ls` shows it.
    took = duration(info["duration_s"])
    assert f"run completed in {took}: {run_dir}" in printed, printed
    assert printed[-1] == f"next: netprobe plot {run_dir}"


def test_sweep_summary_comes_once_after_the_sweep(tmp_path: Path):
    sweep = tmp_path / "sweep"
    res = netprobe_cmd(
        "train", "-m", *TINY, "trainer.epochs=1", "seed=0,1,2", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert err.count("next: netprobe plot") == 1
    assert err.strip().splitlines()[-1] == f"next: netprobe plot {sweep}"
    assert err.count(f"sweep {sweep}: 3 jobs, 3 completed") == 1
    # After every job's own summary.
    assert err.rindex("run completed") < err.index(f"sweep {sweep}: 3 jobs")
    finals = [json.loads((sweep / str(j) / "run.json").read_text())["final"] for j in range(3)]
    acc = [f["val_acc"] for f in finals]
    expected = f"val_acc {statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f}"
    assert "mean ± std over 3 runs: best_val_acc" in err and expected in err
    for seed in range(3):
        assert f"seed={seed}" in err


def write_info(path: Path, **info: object) -> Path:
    path.mkdir()
    base = {"status": "completed", "epochs_done": 3, "steps_done": 30, "best_val_acc": 0.9,
            "final": {"loss": 0.25, "val_acc": 0.875}}  # fmt: skip
    (path / "run.json").write_text(json.dumps({**base, **info}))
    return path


def test_summary_names_the_costliest_probe_when_probes_cost_much(tmp_path: Path):
    seconds = {"gradients": 1.0, "activations": 3.0}
    run = write_info(tmp_path / "a", probe_overhead=0.59, probe_seconds=seconds, duration_s=125.0)
    text = summary(run)
    # The time spent training, as run.json (and `netprobe ls`) holds it.
    assert text.splitlines()[0] == f"run completed in 2m05s: {run}"
    assert "best val_acc 0.9000" in text and "val_acc 0.8750" in text and "loss 0.2500" in text
    assert "probes took 59% of the wall time, most of it activations (75% of theirs)" in text
    alone = write_info(tmp_path / "c", probe_overhead=0.2, probe_seconds={"rwc": 2.0})
    assert summary(alone).splitlines()[-2] == "  probes took 20% of the wall time (rwc)"
    (alone / ".hydra").mkdir()
    (alone / ".hydra" / "config.yaml").write_text("probes:\n  rwc:\n    every: epoch\n")
    assert "probes took 20% of the wall time (rwc); probes.rwc.every" in summary(alone)
    cheap = write_info(tmp_path / "b", probe_overhead=0.05, probe_seconds=seconds)
    assert "probes took" not in summary(cheap)
    assert summary(cheap, hint=False).splitlines()[-1].startswith("  final")


def test_summary_says_why_a_run_stopped(tmp_path: Path):
    run = write_info(tmp_path / "a", status="interrupted", error="interrupted", steps_done=24,
                     epochs_done=0)  # fmt: skip
    lines = summary(run).splitlines()
    assert lines[1] == "  stopped: interrupted" and lines[2].startswith("  0 epochs, 24 steps")
    failed = write_info(tmp_path / "b", status="failed", error="ValueError: bad")
    assert "  stopped: ValueError: bad" in summary(failed)
    # Stopped by its non-finite loss (the step after it never ran), or trained on past it.
    error = "non-finite loss at step 28"
    stopped = write_info(tmp_path / "c", status="diverged", error=error, steps_done=29,
                         first_nonfinite_step=28)  # fmt: skip
    assert summary(stopped).splitlines()[1] == f"  stopped: {error}"
    went_on = write_info(tmp_path / "d", status="diverged", error=error, steps_done=69,
                         first_nonfinite_step=28)  # fmt: skip
    assert summary(went_on).splitlines()[1] == (
        f"  ended: {error}, and trained on past it (trainer.on_nonfinite=continue)"
    )
    # Under continue, a non-finite loss at the run's very last step stopped nothing.
    last = write_info(tmp_path / "e", status="diverged", error=error, steps_done=29,
                      first_nonfinite_step=28)  # fmt: skip
    (last / ".hydra").mkdir()
    (last / ".hydra" / "config.yaml").write_text("trainer:\n  on_nonfinite: continue\n")
    assert summary(last).splitlines()[1] == (
        f"  ended: {error}, its last step (trainer.on_nonfinite=continue)"
    )
    (last / ".hydra" / "config.yaml").write_text("trainer:\n  on_nonfinite: stop\n")
    assert summary(last).splitlines()[1] == f"  stopped: {error}"


@pytest.mark.parametrize(("costliest", "key"), [("activations", "at"), ("gradients", "every")])
def test_summary_names_the_schedule_key_the_costliest_probe_takes(tmp_path, costliest, key):
    import json

    seconds = {"activations": 1.0, "gradients": 1.0, costliest: 3.0}
    info = {"status": "completed", "probe_overhead": 0.5, "probe_seconds": seconds}
    (tmp_path / "run.json").write_text(json.dumps(info))
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "probes:\n  activations:\n    at: [start, epoch]\n  gradients:\n    every: 1\n"
    )
    text = summary(tmp_path, hint=False)
    assert f"most of it {costliest} (75% of theirs); probes.{costliest}.{key} sets" in text


def test_banner_counts_in_words(tmp_path: Path):
    from netprobe.config import compose
    from netprobe.progress import banner

    cfg = compose(["trainer.epochs=1"])
    lines = banner(
        cfg, tmp_path, resumed_at=None, device="cpu", parameters=1200, samples=(32, 8),
        steps=(1, 1), probes=[],
    )  # fmt: skip
    assert lines[2].endswith(", 1 step per epoch") and lines[3].endswith("1 epoch, 1 step")


def test_banner_marks_a_probe_with_nothing_to_track(tiny_run, capsys):
    capsys.readouterr()
    tiny_run(*TINY, "model=mlp", "probes=[gradients,channels]")  # channels: no conv in an MLP
    probes = next(line for line in capsys.readouterr().err.splitlines() if "probes  " in line)
    assert probes == "  probes  gradients, channels (nothing to track)"


def test_a_console_whose_reader_left_does_not_end_the_run(tmp_path: Path):
    """`netprobe train ... 2>&1 | head -1`: the run trains on, its lines kept in train.log."""
    run_dir = tmp_path / "run"
    args = ["train", *TINY, "trainer.epochs=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "netprobe", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr.readline().startswith("netprobe train: new run")
    proc.stderr.close()  # the reader leaves
    assert proc.wait(timeout=300) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["epochs_done"] == 2, info.get("error")
    log = (run_dir / "train.log").read_text()
    assert [line.split()[1] for line in log.splitlines() if line.startswith("epoch ")] == [
        "1/2", "2/2",
    ]  # fmt: skip
    assert f"run completed in {duration(info['duration_s'])}: {run_dir}" in log
