"""attach(): runs the probes on their schedules and owns the run's writer (SPEC §4)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from netprobe import native
from netprobe.divergence import ON_NONFINITE, NonfiniteWatch
from netprobe.errors import ConfigError, add_note
from netprobe.lifecycle import claim_run_dir, signals_held, status_for
from netprobe.probes import ProbeRunner, ProbeSpec, build_probes, close_probes, probe_context
from netprobe.probes.base import Probe, StepState, trained_params
from netprobe.probes.memory import AUTO, check_budget
from netprobe.probes.reductions import TotalNorm
from netprobe.store import RunWriter, graph_table, layers_table

Number = float | int | torch.Tensor
# The per-step curve record's metrics, by (accuracy given, gradients present).
CURVE_NAMES = {
    (acc, grads): ["loss", *(["acc"] if acc else []), *(["grad_l2_total"] if grads else [])]
    for acc in (False, True)
    for grads in (False, True)
}


# run.json: every stored row of a step before this one has reached the sink (its events).
EVENTS_BEFORE = "events_before_step"


class Monitor:
    """Drives the probes from the training loop's four calls and writes what they record."""

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | os.PathLike,
        probes: ProbeSpec = ("gradients",),
        probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        *,
        valid_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        info: Mapping[str, Any] | None = None,
        seed: int = 0,
        flush_every: int = 200,
        on_nonfinite: str = "stop",
        resume: Mapping[str, Any] | None = None,
        memory_budget: int | str = AUTO,
        sink: Any = None,
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError(
                f"on_nonfinite={on_nonfinite!r} is not valid; expected {' or '.join(ON_NONFINITE)}"
            )
        self.on_nonfinite, self.nonfinite = on_nonfinite, NonfiniteWatch()
        self._t0 = time.perf_counter()
        self.model, self.optimizer, self.flush_every = model, optimizer, flush_every
        # `write(tables)` each flush, `close(info)` at the end, `restart(step, rows_from)` when
        self.sink = sink  # resumed (TensorBoard)
        self._unsunk: list[dict[str, Any]] = []  # drained tables the sink has yet to get
        # Where training is and the step's facts: one state, updated here, handed to the hooks.
        self.state = StepState()
        self.ctx = ctx = probe_context(model, probe_batch, valid_batch, loss_fn, seed, self.state)
        self.record = ctx.record
        # Probes are built before anything is written, so bad probe settings leave no trace.
        self.probes: list[Probe] = build_probes(ctx, probes)
        self._params = trained_params(model)
        self._total_norm = TotalNorm(self._params)
        self._device = self._params[0].device if self._params else torch.device("cpu")
        # On the CPU the curve is read on the host (no sync to avoid) as CURVE_NAMES's values,
        # unless NETPROBE_NATIVE=0 asks for the path a GPU takes.
        self._on_host = on_host = self._device.type == "cpu" and native.ENABLED
        # There, the norm's read also gives each gradient's statistics at the steps a probe that
        # reads them records.
        self._row_readers = [p.schedule for p in self.probes if p.reads_grad_rows]
        rows_read = on_host and self._total_norm.fused and bool(self._row_readers)
        self._rows_always = any(schedule.every == 1 for schedule in self._row_readers)
        self._grad_rows = native.HostBlocks(len(self._params), 5) if rows_read else None
        # Calls the probes' hooks when their schedules say, and times them.
        self.runner = ProbeRunner(self.probes, self.state, self._device)
        self._flush_time, self._samples, self._flush_t = 0.0, 0, time.perf_counter()
        self._last: dict[str, torch.Tensor | float] = {}
        self.best_val_acc: float | None = None
        self.closed = False
        self._stepping = False  # after_backward called, after_step not yet: the step's order
        try:
            check_budget(self.probes, memory_budget, self._device)
            if resume is not None:
                self.load_state_dict(resume)
            self.writer = self._writer(out_dir, info, seed, resume is not None)
        except BaseException:
            close_probes(self.probes)
            raise
        self.path = self.writer.path
        try:
            self.writer.write_table("layers", layers_table(ctx.layers))
            self.writer.write_table("graph", graph_table(ctx.edges))
            restart = getattr(sink, "restart", None)
            if resume is not None and restart is not None:
                # The steps this process trains again replace what the sink holds of them, and
                # the rows it never got (a process that ran without it) are sent.
                before = self.writer.info.get(EVENTS_BEFORE)
                restart(self.state.step, self.writer.rows_from, before)
                self.writer.remember(**{EVENTS_BEFORE: self.state.step})
            self.runner.start() if resume is None else self.runner.resume()  # started before
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def _writer(
        self, out_dir: str | os.PathLike, info: Mapping[str, Any] | None, seed: int, resume: bool
    ) -> RunWriter:
        initial = {
            "seed": seed,
            "probes": [p.name for p in self.probes],
            "epochs_done": self.state.epoch,
            "steps_done": self.state.step,
            "best_val_acc": self.best_val_acc,
            "final": {},
            "probe_overhead": None,
            "flush_overhead": None,
            "first_nonfinite_step": None,
            **dict(info or {}),
        }
        # One writer per directory; a new run never writes into an old one (resuming does).
        lock = claim_run_dir(out_dir, resume=resume)
        return RunWriter(out_dir, initial, lock=lock, resume=resume)

    # -- resuming: where training is, and what each probe carries between steps
    def state_dict(self) -> dict[str, Any]:
        """Counters, best and latest results, and each probe's state; taken at an epoch end,
        when nothing is buffered."""
        results = {"best_val_acc": self.best_val_acc, "last": self.latest()}
        first = self.nonfinite.settle()
        return {**self.runner.state_dict(), **results, "first_nonfinite_step": first}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.runner.load_state_dict(state)
        self.best_val_acc = state["best_val_acc"]
        self._last = dict(state["last"])
        # A run that went non-finite before the checkpoint (`on_nonfinite=continue`) still did.
        self.nonfinite.restore(state.get("first_nonfinite_step"))

    # -- the training loop's calls
    def after_backward(
        self,
        loss: torch.Tensor,
        acc: Number | None = None,
        batch_size: int | None = None,
        loss_scale: torch.Tensor | float | None = None,
    ) -> None:
        """Record the step's loss (and accuracy); gradient probes read `.grad` now (unscaled).

        With a GradScaler, `loss_scale` is the scale of the loss just backpropagated (its device
        tensor, so nothing is read back): what hooks saw during backward is divided by it.
        """
        if self._stepping or self.closed:
            raise self._misuse("after_backward")
        self._stepping = True
        loss = loss.detach()
        curve = self._host_curve if self._on_host else self._device_curve
        values, total, rows = curve(loss, acc)
        self.record.scalars("train", [""], CURVE_NAMES[acc is not None, total is not None], values)
        if self.optimizer is not None:
            # Its first parameter group's, as a host float (float64 on disk: 1e-3 stays 1e-3).
            lr = float(self.optimizer.param_groups[0]["lr"])
            self.record.scalars("train", [""], ["lr"], lr)
        self._samples += batch_size or 0
        read = self._total_norm.take_read()  # None but on the CPU's fused path
        self.runner.after_backward(loss, total, loss_scale, rows, read)

    def _device_curve(
        self, loss: torch.Tensor, acc: Number | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """The step's curve values as one device tensor [1, k] (nothing read back), ‖g‖₂ (None
        where no parameter has a gradient), and no gradient rows."""
        self.nonfinite.observe(loss, self.state.step)
        # Microseconds count here: no reshape of what is already a scalar.
        values = [loss if loss.dim() == 0 else loss.reshape(())]
        self._last["loss"] = loss
        if acc is not None:
            # Stacked with the loss; a Python float kept to its last bit, as on the CPU's path.
            dtype = torch.float64 if isinstance(acc, float) else None
            acc = torch.as_tensor(acc, dtype=dtype, device=loss.device).detach()
            values.append(acc if acc.dim() == 0 else acc.reshape(()))
            self._last["acc"] = acc
        total = self._total_norm()  # the gradients probe records it too, from the state
        if total is not None:
            values.append(total)
        return torch.stack(values)[None], total, None

    def _host_curve(
        self, loss: torch.Tensor, acc: Number | None
    ) -> tuple[tuple[float, ...], float | None, np.ndarray | None]:
        """The same on the CPU as host floats: no tensor op but the loss's read (and the
        accuracy's, given as a tensor; and the norm's, where the fused kernel does not serve
        these gradients); and `StepState.grad_rows` where a probe reads them."""
        value = self._last["loss"] = loss.item()
        self.nonfinite.observe(value, self.state.step)
        values = [value]
        if acc is not None:
            values.append(float(acc))
            self._last["acc"] = values[-1]
        total = rows = None
        step = self.state.step
        if self._grad_rows is not None and (
            self._rows_always or any(s.records(step) for s in self._row_readers)
        ):
            block = self._grad_rows.next()
            total = self._total_norm.with_rows(block)
            rows = None if total is None else block.array
        if total is None and (norm := self._total_norm()) is not None:
            total = float(norm)
        if total is not None:
            values.append(total)
        return tuple(values), total, rows

    def after_step(self) -> None:
        """Update probes read the new weights now; the step counter advances."""
        if self.closed or not self._stepping:
            raise self._misuse("after_step")
        self._stepping = False
        self.runner.after_step()
        if self.state.step % self.flush_every == 0:
            self.flush()
            # run.json follows the parts: `netprobe ls` sees a long epoch's run move.
            self.writer.update(steps_done=self.state.step)

    def end_epoch(self, val_loss: Number | None = None, val_acc: Number | None = None) -> None:
        """Record validation results, run the epoch captures, and flush."""
        if self.closed:
            raise self._misuse("end_epoch")
        for key, value in (("val_loss", val_loss), ("val_acc", val_acc)):
            if value is not None:
                self._last[key] = float(value)
                self.record.scalars("train", [""], [key], self._last[key])
        if val_acc is not None:
            self.best_val_acc = max(self.best_val_acc or 0.0, self._last["val_acc"])
        # The epoch's throughput is labelled with that epoch, as a resumed run's cut expects.
        self._record_rate()
        self.runner.end_epoch()
        self.flush()
        self.writer.update(
            epochs_done=self.state.epoch, steps_done=self.state.step, best_val_acc=self.best_val_acc
        )

    def _misuse(self, call: str) -> RuntimeError:
        """The error for a call out of the loop's order, or after the run was closed: raised
        before anything is recorded, so the stored steps stay what training did."""
        if self.closed:
            return RuntimeError(
                f"{call}(): the run in {self.path} is closed ({self.status}) and records nothing "
                "more; attach again, to a new folder, for another run"
            )
        if call == "after_step":
            return RuntimeError(
                f"after_step() at step {self.state.step} without after_backward(loss) first: "
                "call loss.backward(), mon.after_backward(loss), opt.step(), mon.after_step()"
            )
        return RuntimeError(
            f"after_backward() twice at step {self.state.step}: call mon.after_step() after "
            "opt.step(), once per after_backward(loss)"
        )

    # -- bookkeeping
    def flush(self) -> None:
        """Move everything buffered to the host and write one part file per table."""
        self._record_rate()
        if self._device.type == "cuda":
            # Waiting for the queued training work is not the flush's cost; the drain waits anyway.
            torch.cuda.synchronize(self._device)
        t = time.perf_counter()
        failure: Exception | None = None
        with signals_held():
            # A table that cannot be written stays with the writer for the next flush.
            tables = self.record.drain()
            if self.sink is not None:
                self._unsunk.append(tables)
            try:
                self.writer.append_all(tables)
            except Exception as exc:
                failure = exc
        # The sink (it may be slow) with the signals let through: each drained table goes to it
        # once, whether or not its Parquet write went through; now, or at the next flush if a
        # signal comes first. A table whose sink write fails midway is not sent again (no
        # doubled events); the store has it. The writer's failure is the one raised.
        try:
            while self._unsunk:
                self.sink.write(self._unsunk.pop(0))  # type: ignore[union-attr]
            if self.sink is not None and failure is None:
                self.writer.remember(**{EVENTS_BEFORE: self.state.step})
        except Exception as exc:
            if failure is None:
                raise
            add_note(failure, f"the sink failed too: {exc}")
        if failure is not None:
            raise failure
        self.nonfinite.settle()  # the drain has just synced: the exact answer costs nothing more
        self.runner.timer.settle()
        self._flush_time += time.perf_counter() - t

    def _record_rate(self) -> None:
        """`samples_per_s` of the samples trained since it was last recorded, if any."""
        now = time.perf_counter()
        if self._samples:
            rate = self._samples / max(now - self._flush_t, 1e-9)
            self.record.scalars("train", [""], ["samples_per_s"], rate)
        self._samples, self._flush_t = 0, now

    @property
    def nonfinite_step(self) -> int | None:
        """The first step with a non-finite loss, once the host knows of it (a step or two late on
        a GPU, exact after each flush); None while every loss has been finite."""
        return self.nonfinite.first_step

    def latest(self) -> dict[str, float]:
        """The last recorded loss, accuracy and validation results as floats (syncs the device)."""
        return {k: float(v) for k, v in self._last.items()}

    def close(self, status: str = "completed", error: str | None = None, **info: Any) -> None:
        """Run the end captures (on success), flush, and record the final status. Idempotent."""
        if self.closed:
            return
        self.closed = True
        # Not completed: the caller's own exception is on its way; a failed flush adds to it.
        ending_badly = status != "completed"
        first = self.nonfinite.settle()
        if status == "completed" and first is not None:
            last_loss = self.latest().get("loss", math.nan)
            if self.on_nonfinite == "stop" or not math.isfinite(last_loss):
                status, error = "diverged", f"non-finite loss at step {first}"
        failure: BaseException | None = None
        try:
            if status == "completed":
                # The end captures get parts of their own, which a resumed run can drop.
                self.flush()
                self.writer.mark_end_captures()
                self.runner.end()
        except BaseException as exc:  # Ctrl-C or an error in the end captures
            failure = exc
            status, error = status_for(type(exc), exc)
        try:
            # Whatever ended the run, what was recorded is written.
            self.flush()
        except BaseException as exc:
            # A run that ended badly already keeps its reason; the writer adds the lost rows.
            failure = failure or exc
            if status == "completed":
                status, error = status_for(type(exc), exc)
        finally:
            close_probes(self.probes)
            wall = time.perf_counter() - self._t0
            self.writer.close(
                status,
                error=error,
                epochs_done=self.state.epoch,
                steps_done=self.state.step,
                best_val_acc=self.best_val_acc,
                final={k: v for k, v in self.latest().items() if math.isfinite(v)},
                # Fractions of wall time: inside probes, and writing what they recorded.
                **self.runner.timer.report(wall),
                flush_overhead=self._flush_time / wall if wall > 0 else None,
                first_nonfinite_step=first,
                **info,
            )
            if self.sink is not None:
                try:
                    self.sink.close(self.writer.info)
                except Exception as exc:
                    # What ended the run, written in run.json, is the failure to report.
                    if failure is None and not ending_badly:
                        raise
                    if failure is not None:
                        add_note(failure, f"the sink failed too: {exc}")
        if failure is not None and not ending_badly:
            raise failure

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: Any):
        self.close(*status_for(exc_type, exc))

    def stop(self, reason: str) -> None:
        """Record why training stopped before its last epoch (run.json's `stop_reason`)."""
        self.writer.update(stop_reason=reason)

    @property
    def status(self) -> str:
        """The run's status: `running` until closed, then how it ended (`completed`, ...)."""
        return self.writer.info["status"]


def attach(
    model: nn.Module,
    out_dir: str | os.PathLike,
    probes: ProbeSpec = ("gradients",),
    probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    **kwargs: Any,
) -> Monitor:
    """Attach probes to `model` and start a run in `out_dir`; use as a context manager.

    The defaults are `netprobe train`'s: the `gradients` probe on every conv and linear weight,
    a part file every 200 steps (`flush_every`), `memory_budget="auto"`; the learning rate is
    recorded each step when `optimizer=` is given (its first parameter group's)."""
    return Monitor(model, out_dir, probes, probe_batch, loss_fn, **kwargs)
