"""What a person watching `netprobe train` sees: on a terminal a live bar, off one a plain line
every `trainer.log_interval_s` seconds; the same facts both ways, and every kept line also in the
run's train.log."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from netprobe.config import optimizer_name
from netprobe.lifecycle import to_console

LOG_FILE = "train.log"
# The probes' share of wall time above which the closing summary names it, and the costliest.
PROBE_SHARE_SHOWN = 0.10
# Seconds between loss read-backs for the live bar: each is one host sync.
BAR_REFRESH_S = 0.5


def duration(seconds: float) -> str:
    """0.42 s, 4.2 s, 3m05s, 2h07m."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def count(n: int) -> str:
    """1234 → 1.2k, 11_200_000 → 11.2M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def plural(n: int, word: str) -> str:
    """1 epoch, 3 epochs."""
    return f"{n} {word}{'s' * (n != 1)}"


def echo(text: str, run_dir: str | Path | None = None, show: bool = True) -> None:
    """Print `text` to stderr (unless not `show`: printed elsewhere) and append it to the run's
    train.log."""
    if show:
        to_console(text)
    if run_dir is not None and (Path(run_dir) / "run.json").exists():
        with open(Path(run_dir) / LOG_FILE, "a") as log:
            log.write(text + "\n")


class TrainProgress:
    """Counts steps and samples; reads the loss back only when it shows it (a sync each time).

    `loss` per step is a device tensor, summed on the device; the line shows the mean since the
    last line (the live bar: the last half second), the epoch line the epoch's mean.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        total: int,
        epochs: int,
        first_step: int = 0,
        interval_s: float = 30.0,
        quiet: bool = False,
    ) -> None:
        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.total, self.epochs, self.step = total, epochs, first_step
        self.interval_s = interval_s
        self._log: IO[str] | None = None
        if run_dir is not None and not quiet:
            self._log_path: Path | None = Path(run_dir) / LOG_FILE
        else:
            self._log_path = None
        self._bar: Progress | None = None
        self._t0 = self._shown_t = self._step_t = time.monotonic()
        self._epoch_t = self._t0
        self._shown_samples = 0  # at the last line: the rate shown is the rate since then
        self._steps = 0  # this session's, for the rate and ETA
        self._samples = self._epoch_samples = 0
        self._loss_sum: Any = None  # device tensor
        self._loss_n = 0
        self._epoch_loss, self._epoch_n = 0.0, 0
        self._last_loss: float | None = None
        self.epoch = 0

    # -- output
    def print(self, text: str) -> None:
        """One kept line: above the live bar, or on stderr; and in train.log."""
        if self.quiet:
            return
        if self.live:
            self.console.print(text, markup=False, soft_wrap=True)
        else:
            to_console(text)
        if self._log_path is not None:
            if self._log is None:
                self._log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self._log_path, "a")  # noqa: SIM115 - open for the whole run
            self._log.write(text + "\n")
            self._log.flush()

    def __enter__(self) -> TrainProgress:
        if self.live:
            self._bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=self.console,
                transient=True,  # the kept epoch lines stay; the bar goes when training ends
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "train", total=self.total, completed=self.step, epoch="", stats="", eta="?"
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- the training loop's calls
    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch_t = time.monotonic()
        self._epoch_samples = 0
        self._epoch_loss, self._epoch_n = 0.0, 0

    def advance(self, loss: Any = None, samples: int = 0) -> None:
        """One optimizer step of `samples` samples, with its loss (a tensor; not read here)."""
        self.step += 1
        self._steps += 1
        self._samples += samples
        self._epoch_samples += samples
        if loss is not None:
            detached = loss.detach().float()
            if self._loss_sum is None:
                self._loss_sum = detached.clone()
            else:
                self._loss_sum.add_(detached)
            self._loss_n += 1
        if self.quiet:
            return
        now = self._step_t = time.monotonic()
        if self._bar is not None:
            if now - self._shown_t >= BAR_REFRESH_S:
                self._bar.update(
                    self._task,
                    completed=self.step,
                    epoch=f"{self.epoch + 1}/{self.epochs}",
                    stats=self._stats(now),
                    eta=self._eta(now),
                )
        elif now - self._shown_t >= self.interval_s:
            percent = 100 * self.step / self.total if self.total else 100.0
            self.print(
                f"step {self.step}/{self.total} ({percent:.0f}%)  epoch {self.epoch + 1}/"
                f"{self.epochs}  {self._stats(now)}  elapsed {duration(now - self._t0)}  "
                f"ETA {self._eta(now)}"
            )

    def epoch_done(self, epoch: int, val: dict[str, float]) -> None:
        """The epoch's kept line: mean training loss, validation results, throughput, and the
        time the epoch took (its evaluation included)."""
        self._read_loss()
        now = time.monotonic()
        training = self._step_t - self._epoch_t  # the rate leaves the evaluation out
        parts = [f"epoch {epoch + 1}/{self.epochs}", f"step {self.step}"]
        if self._epoch_n:
            parts.append(f"loss {self._epoch_loss / self._epoch_n:.4f}")
        parts += [f"{k} {val[k]:.4f}" for k in ("val_loss", "val_acc") if k in val]
        if self._epoch_samples and training > 0:
            parts.append(f"{self._epoch_samples / training:,.0f} samples/s")
        parts.append(f"in {duration(now - self._epoch_t)}")
        self.print("  ".join(parts))
        if self._bar is not None:
            self._bar.update(self._task, completed=self.step)
        self._shown_t, self._shown_samples = now, self._samples

    # -- what the lines say
    def _read_loss(self) -> None:
        """The mean loss since the last read (one host sync), into the epoch's sum too."""
        if not self._loss_n:
            return
        total = float(self._loss_sum)
        self._last_loss = total / self._loss_n
        self._epoch_loss += total
        self._epoch_n += self._loss_n
        self._loss_sum.zero_()
        self._loss_n = 0

    def _stats(self, now: float) -> str:
        """Mean loss and samples/s since the last line shown; starts the next window."""
        self._read_loss()
        parts = []
        if self._last_loss is not None:
            parts.append(f"loss {self._last_loss:.4f}")
        window = now - self._shown_t
        if self._samples > self._shown_samples and window > 0:
            parts.append(f"{(self._samples - self._shown_samples) / window:,.0f} samples/s")
        self._shown_t, self._shown_samples = now, self._samples
        return "  ".join(parts)

    def _eta(self, now: float) -> str:
        if not self._steps:
            return "?"
        per_step = (now - self._t0) / self._steps
        return duration(max(self.total - self.step, 0) * per_step)


def banner(
    cfg: Any,
    run_dir: str | Path,
    *,
    resumed_at: tuple[int, int] | None,
    device: str,
    parameters: int,
    samples: tuple[int, int],
    steps: tuple[int, int],
    probes: list[str],
) -> list[str]:
    """The start lines: where the run is written and what trains on what. `samples`: train and
    validation; `steps`: per epoch and in all."""
    start = (
        "new run"
        if resumed_at is None
        else f"resuming at epoch {resumed_at[0] + 1}, step {resumed_at[1]}"
    )
    model, data, t = cfg.model, cfg.data, cfg.trainer
    return [
        f"netprobe train: {start} in {run_dir}",
        f"  model   {model.name} ({count(parameters)} parameters), init {cfg.init.name}, "
        f"{optimizer_name(cfg.optim)} lr {cfg.optim.lr:g}",
        f"  data    {data.name}: {samples[0]} train / {samples[1]} val samples, batch "
        f"{data.batch_size}, {plural(steps[0], 'step')} per epoch",
        f"  device  {device}, precision {t.precision}; {plural(t.epochs, 'epoch')}, "
        f"{plural(steps[1], 'step')}",
        f"  probes  {', '.join(probes) if probes else 'none'}",
    ]


def _setting(run_dir: str | Path, *keys: str) -> Any:
    """The run's config value at `keys` (None without a config, or without that value)."""
    import yaml

    from netprobe.store import CONFIG_FILE

    try:
        with open(Path(run_dir) / CONFIG_FILE) as f:
            value = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _schedule_key(run_dir: str | Path, probe: str) -> str:
    """`every` or `at`, whichever the run's config gives the probe ("" without a config)."""
    settings = _setting(run_dir, "probes", probe)
    settings = settings if isinstance(settings, dict) else {}
    return next((key for key in ("every", "at") if key in settings), "")


def summary(run_dir: str | Path, hint: bool = True) -> str:
    """The closing lines: status and why it stopped, best and final metrics, the time spent
    training (run.json's, as `netprobe ls` shows it), the probes' share of it when large, and the
    command that plots the run."""
    from netprobe.store import FINAL_METRICS, run_seconds

    with open(Path(run_dir) / "run.json") as f:
        info = json.load(f)
    status = info.get("status", "?")
    trained_s = run_seconds(info)
    took = f" in {duration(trained_s)}" if trained_s is not None else ""
    lines = [f"run {status}{took}: {run_dir}"]
    reason = info.get("stop_reason") or (info.get("error") if status != "completed" else None)
    epochs, steps = info.get("epochs_done", 0), info.get("steps_done", 0)
    first = info.get("first_nonfinite_step")
    diverged = reason and status == "diverged" and isinstance(first, int)
    if diverged and steps > first + 1:
        # trainer.on_nonfinite=continue: the run did not stop at its non-finite loss.
        lines.append(f"  ended: {reason}, and trained on past it (trainer.on_nonfinite=continue)")
    elif diverged and _setting(run_dir, "trainer", "on_nonfinite") == "continue":
        # Its last step's loss, under continue: nothing was stopped, nothing came after it.
        lines.append(f"  ended: {reason}, its last step (trainer.on_nonfinite=continue)")
    elif reason:
        lines.append(f"  stopped: {reason}")
    done = f"  {plural(epochs, 'epoch')}, {plural(steps, 'step')}"
    if isinstance(info.get("best_val_acc"), (int, float)):
        done += f"; best val_acc {info['best_val_acc']:.4f}"
    lines.append(done)
    final = info.get("final") or {}
    shown = [f"{k} {final[k]:.4f}" for k in FINAL_METRICS if k in final]
    if shown:
        lines.append("  final   " + ", ".join(shown))
    share = info.get("probe_overhead")
    seconds = info.get("probe_seconds") or {}
    if isinstance(share, (int, float)) and share > PROBE_SHARE_SHOWN:
        line = f"  probes took {share:.0%} of the wall time"
        if seconds and sum(seconds.values()) > 0:
            name = max(seconds, key=seconds.get)
            if len(seconds) == 1:
                line += f" ({name})"
            else:
                line += (
                    f", most of it {name} ({seconds[name] / sum(seconds.values()):.0%} of theirs)"
                )
            key = _schedule_key(run_dir, name)
            if key:
                line += f"; probes.{name}.{key} sets how often it runs"
        lines.append(line)
    if hint:
        lines.append(f"next: netprobe plot {run_dir}")
    return "\n".join(lines)
