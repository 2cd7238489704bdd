"""A run's life outside the happy path: what counts as a run directory, one writer per run
directory, clean stops on Ctrl-C, SIGTERM and SIGHUP, and telling a crashed run (its process is
gone) from one still running."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from netprobe.errors import ConfigError, StorageError

LOCK_FILE = ".netprobe.lock"
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota
RUN_FILE = "run.json"
# What a run leaves in its directory besides run.json: found without run.json, they belong to
# something that is not (or no longer) a run, which netprobe must neither extend nor overwrite.
RUN_FILES = (
    "scalars", "histograms", "matrices", "layers.parquet", "graph.parquet", "checkpoints", ".hydra"
)  # fmt: skip
INTERRUPTED_EXIT = 130


# ---------------------------------------------------------------- is the writer alive?


def process_alive(pid: int, host: str | None = None, started_at: str | None = None) -> bool:
    """Whether process `pid` on `host` may still be the one that started at `started_at`.

    A process on another host cannot be checked and counts as alive. On Linux a pid that was
    reused by a process started after `started_at` counts as gone.
    """
    if host is not None and host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    except OSError:
        return True
    began = _process_start_time(pid)
    if began is not None and started_at:
        try:
            run_start = datetime.fromisoformat(started_at).timestamp()
        except ValueError:
            return True
        # run.json's time is written after the process started, at one-second resolution.
        return began <= run_start + 2
    return True


def _process_start_time(pid: int) -> float | None:
    """When `pid` started (Unix time), from /proc; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def effective_status(info: dict[str, Any]) -> str:
    """run.json's status, except `crashed` for a `running` run whose process is gone."""
    status = str(info.get("status", "?"))
    pid = info.get("pid")
    if status == "running" and isinstance(pid, int):
        if not process_alive(pid, info.get("host"), info.get("started_at")):
            return "crashed"
    return status


# ---------------------------------------------------------------- one writer per run directory


def check_not_a_stray(path: str | os.PathLike) -> None:
    """Refuse a folder holding run files but no run.json: a run is a directory with its run.json
    (SPEC §1), and anything else that looks like one is never written into."""
    path = Path(path)
    if (path / RUN_FILE).exists():
        return
    found = [name for name in RUN_FILES if (path / name).exists()]
    if found:
        raise ConfigError(
            f"{path} holds run files ({', '.join(found)}) but no {RUN_FILE}: it is not a run, "
            f"and netprobe will not write into it; choose another folder (hydra.run.dir=...)"
        )


def check_new_run_dir(path: str | os.PathLike) -> None:
    """Refuse a run directory that already holds a run, so two runs never mix their data.

    Resuming (`trainer.resume`) is the one caller that reuses a run directory: it skips this check.
    """
    path = Path(path)
    holder = _lock_holder(path / LOCK_FILE)
    if holder is not None and holder.get("pid") != os.getpid() and _holder_alive(holder):
        raise ConfigError(_busy_message(path, holder))
    check_not_a_stray(path)
    if not (path / RUN_FILE).exists():
        return
    info: Any = None
    try:
        info = json.loads((path / RUN_FILE).read_text())
        status = effective_status(info) if isinstance(info, dict) else "damaged"
    except (OSError, ValueError):
        status = "damaged"
    if status == "running":
        raise ConfigError(_busy_message(path, info))
    raise ConfigError(
        f"run directory {path} already holds a run (status {status}); choose a new folder "
        f"(hydra.run.dir=...) or continue it with trainer.resume=true"
    )


def claim_run_dir(path: str | os.PathLike, *, resume: bool = False) -> RunLock:
    """Make the run directory `path` and take its lock, for the run's writer to hold
    (netprobe.store.RunWriter releases it). A new run is refused a folder that holds a run or
    run files (`check_new_run_dir`); resuming (`resume`) continues the run there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(path, exc) from None
    try:
        lock = RunLock(path).acquire()
    except OSError as exc:  # a disk without room for the lock's few bytes, a read-only folder
        raise StorageError(path / LOCK_FILE, exc) from None
    try:
        if not resume:
            check_new_run_dir(path)
    except BaseException:
        lock.release()
        raise
    return lock


# Room the lock file keeps on the run's disk (padding on the lines after its JSON: random text,
# which a compressing filesystem cannot shrink to nothing, as it would blanks) for the run's last
# words: when a full disk refuses the closing run.json, the padding is cut and the write tried
# again, so that the run ends with an honest status, not `running`.
RESERVE = 64 * 1024


class RunLock:
    """`.netprobe.lock` in a run directory, created atomically; a second writer is refused.

    The file names the holder's pid and host, so a lock left by a killed process (gone from this
    host) is taken over instead of blocking the directory for ever. It also holds RESERVE bytes
    of the disk while the run writes (where the disk had them): `free_reserve` gives them back.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path) / LOCK_FILE
        self.held = False
        self._text = ""

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        self._text = json.dumps(me)
        for _ in range(3):
            if _create_exclusive(self.path, self._text, pad_to=RESERVE):
                self.held = True
                return self
            holder = _lock_holder(self.path)
            if holder is None or _holder_alive(holder):
                raise ConfigError(_busy_message(self.path.parent, holder))
            self._take_over(holder)
        raise ConfigError(_busy_message(self.path.parent, _lock_holder(self.path)))

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a stale lock, atomically: it is renamed to a private name (one process wins
        that), and put back if what was moved is not the lock found stale but a live one that
        replaced it meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process removed it first
        try:
            moved = _lock_holder(aside)
            if moved != stale and moved is not None and _holder_alive(moved):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            aside.unlink(missing_ok=True)

    def free_reserve(self) -> bool:
        """Cut the lock file back to its JSON, freeing the room it kept; whether it had any."""
        if not self.held:
            return False
        try:
            if self.path.stat().st_size <= len(self._text):
                return False
            os.truncate(self.path, len(self._text))
        except OSError:
            return False
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _create_exclusive(path: Path, text: str, pad_to: int = 0) -> bool:
    """Create `path` holding `text` unless it exists; never leaves it half-written. With `pad_to`,
    random text on the next line pads it to that many bytes, where the disk has room for them.

    The text goes to a private file first and is hard-linked into place, which fails if the name
    exists; filesystems without hard links fall back to O_EXCL.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:  # the private file goes, whatever fails (a full disk may refuse even the text)
        room = max(pad_to - len(text) - 1, 0)
        filler = base64.b64encode(os.urandom(room)).decode()[:room]
        content = f"{text}\n{filler}" if filler else text
        try:
            tmp.write_text(content)
        except OSError as exc:
            if exc.errno not in NO_ROOM:
                raise
            content = text  # a full disk: the lock without its reserve
            tmp.write_text(content)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _lock_holder(path: Path) -> dict[str, Any] | None:
    """Who holds a lock: its first line (its reserve follows it); {} when that does not read."""
    try:
        holder = json.loads(path.read_bytes().split(b"\n", 1)[0])
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: assume someone holds it
    return holder if isinstance(holder, dict) else {}


def _holder_alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    return process_alive(pid, holder.get("host"))


def _busy_message(path: Path, holder: dict[str, Any] | None) -> str:
    who = ""
    if holder and holder.get("pid"):
        who = f" (pid {holder['pid']} on {holder.get('host', '?')})"
    return (
        f"run directory {path} is in use by another netprobe run{who}; choose another folder "
        f"(hydra.run.dir=...), or delete {path / LOCK_FILE} if that process is gone"
    )


# ---------------------------------------------------------------- Ctrl-C, SIGTERM and SIGHUP


def status_for(
    exc_type: type[BaseException] | None, exc: BaseException | None
) -> tuple[str, str | None]:
    """A run's final status and error for how its `with` block ended (SPEC §4): `completed`,
    `interrupted` for KeyboardInterrupt, else `failed` with the exception."""
    if exc_type is None:
        return "completed", None
    if issubclass(exc_type, KeyboardInterrupt):
        return "interrupted", "interrupted"
    return "failed", f"{exc_type.__name__}: {exc}"


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """The stop signals wait until the block ends: what it drains from memory reaches the disk
    before an interrupt can cut in (a flush is short; the signal is acted on right after).

    Blocking them for this thread is not enough: with other threads alive (a data loader's)
    the system hands a signal to one of those, and Python still runs the handler here. So
    meanwhile the handlers only note a signal, and the block's end raises each noted one again
    for the handler it would have met. A handler Python cannot put back (set from C) is left,
    its signal blocked for this thread instead."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs handlers in the main thread only: none can cut in here
        return
    noted: list[int] = []
    handlers, blocked = {}, set()

    def note(signum: int, _frame: Any) -> None:
        # Under a run's StopSignals, as its own handler would: said at once, and a second signal
        # (or one after its first) exits at once.
        stopper = getattr(handlers.get(signum), "__self__", None)
        if isinstance(stopper, StopSignals):
            name = signal.Signals(signum).name
            if noted or stopper.received is not None:
                to_console(f"\nnetprobe: {name} again: exiting now")
                os._exit(INTERRUPTED_EXIT)
            to_console(
                f"\nnetprobe: {name}: stopping once the file being written is whole "
                "(press Ctrl-C again to quit at once)"
            )
        noted.append(signum)

    for sig in StopSignals.SIGNALS:
        if signal.getsignal(sig) is None:
            blocked.add(sig)
        else:
            handlers[sig] = signal.signal(sig, note)
    mask = None
    if blocked and hasattr(signal, "pthread_sigmask"):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # A signal sent twice meanwhile counts once, as a blocked one would.
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


class StopSignals:
    """While active, Ctrl-C, SIGTERM or SIGHUP (the terminal closed, the ssh connection dropped)
    raise KeyboardInterrupt in the training loop, so the run flushes what it recorded and is
    marked `interrupted`; a second signal exits at once (130).

    Only the main thread can receive signals: elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            to_console(f"\nnetprobe: {name} again: exiting now")
            os._exit(INTERRUPTED_EXIT)
        self.received = signum
        to_console(
            f"\nnetprobe: {name}: saving what was recorded (press Ctrl-C again to quit at once)"
        )
        raise KeyboardInterrupt(name)


def to_console(text: str) -> None:
    """`text` on stderr, while someone reads it. Its reader may be gone (`| head`, a `tee` that
    ended: from then on nothing more is printed, and the run trains on, its lines kept in
    train.log), or the terminal itself (after SIGHUP: that line is lost)."""
    if _CONSOLE["gone"]:
        return
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _CONSOLE["gone"] = True
        # Python's own flush of stderr at exit would fail again: it now writes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


_CONSOLE = {"gone": False}


class WorkerStops(StopSignals):
    """In a sweep's own process while a launcher runs its jobs in worker processes (joblib's loky,
    submitit's local jobs, each in a process group of its own: leave_terminal_group): a stop
    signal to this process (Ctrl-C in the terminal included) is passed on to each worker
    of it that holds a run under `sweep`, whose StopSignals close that run `interrupted`, and only
    once they have let go of their runs does KeyboardInterrupt reach the launcher, which kills its
    workers at once (loky with SIGKILL: their runs would be left `running`, then `crashed`).
    A second signal meanwhile: at once. Only the main thread can receive signals."""

    def __init__(self, sweep: str | os.PathLike) -> None:
        super().__init__()
        self.sweep = Path(sweep)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            to_console(f"\nnetprobe: {name} again: stopping the sweep now")
            raise KeyboardInterrupt(name)
        self.received = signum
        workers = self.workers()
        to_console(
            f"\nnetprobe: {name}: stopping the sweep once its {len(workers)} running job(s) have "
            "saved what they recorded (press Ctrl-C again to stop at once)"
        )
        for pid in workers.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)
        while any(self._holds(lock, pid) for lock, pid in workers.items()):
            time.sleep(0.05)
        raise KeyboardInterrupt(name)

    def workers(self) -> dict[Path, int]:
        """The lock of each run under the sweep that a process descended from this one holds."""
        found = {}
        for depth in range(1, 4):
            for lock in self.sweep.glob("/".join(["*"] * depth + [LOCK_FILE])):
                pid = (_lock_holder(lock) or {}).get("pid")
                if isinstance(pid, int) and _descends_from(pid, os.getpid()):
                    found[lock] = pid
        return found

    @staticmethod
    def _holds(lock: Path, pid: int) -> bool:
        holder = _lock_holder(lock)
        return holder is not None and holder.get("pid") == pid and process_alive(pid)


def leave_terminal_group() -> None:
    """In a launcher's worker: a process group of its own, so that Ctrl-C in the terminal (sent
    to the whole foreground group) reaches the sweep's process alone, whose WorkerStops passes it
    on once. Reaching the worker too, it would be a second signal there, which exits at once and
    leaves the run `running`."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` is `ancestor`'s child, grandchild, ... (from /proc; False where
    that cannot be read)."""
    seen = 0
    while pid > 1 and seen < 64:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
        seen += 1
    return False
