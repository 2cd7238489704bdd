"""The monitor's own accounting (probe and flush overhead), what it stores, and what it leaves."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netprobe
import netprobe.monitor as monitor_module
import netprobe.probes.timer as timer_module
from netprobe import native
from netprobe.probes.gradients import Gradients
from netprobe.store import RunWriter
from tests.helpers import train_steps


class FakeClock:
    """A perf_counter that moves only when told: overhead shares without wall-clock time."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def test_probe_and_flush_overhead_are_the_shares_of_time_spent_in_them(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(monitor_module, "time", clock)
    monkeypatch.setattr(timer_module, "time", clock)
    original_probe, original_append = Gradients.after_backward, RunWriter.append

    def probe(self, state):
        clock.tick(0.02)
        original_probe(self, state)

    appends = []

    def append(self, *args, **kwargs):
        clock.tick(0.005)
        appends.append(args[0])
        original_append(self, *args, **kwargs)

    monkeypatch.setattr(Gradients, "after_backward", probe)
    monkeypatch.setattr(RunWriter, "append", append)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with netprobe.attach(model, tmp_path, probes=["gradients"], flush_every=5) as mon:
        # 30 ms after each step: the rest of the step, outside the monitor.
        train_steps(mon, model, opt, [(x, y)] * 10, after=lambda: clock.tick(0.03))
    info = netprobe.load(tmp_path).info
    # 10 probe calls of 20 ms; the flushes at steps 5 and 10 write a scalars part each, 5 ms.
    assert appends == ["scalars", "scalars"]
    wall = 10 * (0.02 + 0.03) + 2 * 0.005
    assert info["probe_overhead"] == pytest.approx(10 * 0.02 / wall, rel=1e-9)
    assert info["flush_overhead"] == pytest.approx(2 * 0.005 / wall, rel=1e-9)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("failure", ["bad probe setting", "folder already holds a run"])
def test_a_failed_attach_leaves_no_hooks_on_the_model(tmp_path, failure):
    from netprobe.errors import ConfigError

    model = small_net()
    batch = (torch.randn(4, 4), torch.randint(0, 2, (4,)))
    probes = {"gradient_flow": {}, "weights": {"every": 0}}
    if failure == "folder already holds a run":
        with netprobe.attach(small_net(), tmp_path / "run", probes=[], probe_batch=batch):
            pass
        probes = {"gradient_flow": {}}
    with pytest.raises(ConfigError):
        netprobe.attach(model, tmp_path / "run", probes=probes, probe_batch=batch)
    assert hook_count(model) == 0


def test_python_numbers_are_stored_in_float64(tmp_path):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with netprobe.attach(model, tmp_path / "run", probes=[], optimizer=opt) as mon:
        loss = F.cross_entropy(model(torch.randn(4, 4)), torch.tensor([0, 1, 0, 1]))
        loss.backward()
        mon.after_backward(loss)
        opt.step()
        mon.after_step()
        mon.end_epoch(val_loss=0.5, val_acc=0.94)
    train = netprobe.load(tmp_path / "run").scalars(probe="train")
    value = dict(zip(train["metric"], train["value"]))
    assert value["lr"] == 1e-3 and value["val_acc"] == 0.94


def test_attach_and_train_share_their_defaults():
    """What `attach` does unless told is what `netprobe train` does with its default config."""
    import inspect

    from netprobe.config import compose
    from netprobe.probes.memory import split_budget

    cfg = compose([])
    params = inspect.signature(netprobe.Monitor).parameters
    assert params["flush_every"].default == cfg.trainer.flush_every
    assert params["on_nonfinite"].default == cfg.trainer.on_nonfinite
    assert params["memory_budget"].default == cfg.probes.memory_budget
    assert list(params["probes"].default) == list(split_budget(cfg.probes)[0])


def test_the_learning_rate_follows_the_optimizer_each_step(tmp_path):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with netprobe.attach(model, tmp_path / "run", probes=[], optimizer=opt) as mon:
        batches = [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1])) for _ in range(5)]
        train_steps(mon, model, opt, batches, after=schedule.step)
    lr = netprobe.load(tmp_path / "run").scalars(probe="train", metric="lr")
    assert lr["step"].tolist() == [0, 1, 2, 3, 4]
    assert lr["value"].tolist() == [0.1, 0.1, 0.05, 0.05, 0.025]


@pytest.mark.parametrize("acc", ["tensor", "float", "int", None])
@pytest.mark.parametrize("backward", [True, False])
def test_the_cpu_curve_stores_what_the_gpu_path_stores(tmp_path, monkeypatch, acc, backward):
    """On the CPU each step's loss, accuracy and ‖g‖₂ are read into rows of host arrays (a new
    array every SIZE rows, here 2); NETPROBE_NATIVE=0 takes the device path a GPU run takes.
    Both store the same curve: loss and accuracy (a tensor, a float, an int) to the bit, the
    norm as a float64 reference written here (the kernel sums 16 float32 squares at a time:
    within 1e-7; the device path sums float32 norms: within 1e-6)."""
    monkeypatch.setattr(native.HostBlocks, "SIZE", 2)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,))) for _ in range(5)]
    curves = {}
    for path in ("host", "device"):
        monkeypatch.setattr(native, "ENABLED", path == "host")
        torch.manual_seed(0)
        model = small_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        want = {"loss": [], "acc": [], "grad_l2_total": []}
        with netprobe.attach(model, tmp_path / path, probes=[], flush_every=3) as mon:
            assert mon._on_host == (path == "host")
            for x, y in batches:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                if backward:
                    loss.backward()
                    squares = sum((p.grad.double() ** 2).sum() for p in model.parameters())
                    want["grad_l2_total"].append(float(squares.sqrt()))
                share = (logits.argmax(1) == y).float().mean()
                share = {"tensor": share, "float": share.item() / 3, "int": 1, None: None}[acc]
                want["loss"].append(loss.item())
                want["acc"] += [] if share is None else [float(share)]  # a float: to the bit
                mon.after_backward(loss, acc=share)
                opt.step()
                mon.after_step()
        train = netprobe.load(tmp_path / path).scalars(probe="train")
        curves[path] = {m: train[train["metric"] == m]["value"].tolist() for m in want}
        assert curves[path]["loss"] == want["loss"] and curves[path]["acc"] == want["acc"]
        rel = 1e-7 if path == "host" else 1e-6
        assert curves[path]["grad_l2_total"] == pytest.approx(want["grad_l2_total"], rel=rel)
    # The same rows in the same order.
    host, device = (netprobe.load(tmp_path / p).scalars(probe="train") for p in curves)
    assert host[["step", "metric"]].equals(device[["step", "metric"]])


def test_the_fused_steps_check_no_tensor_in_python_where_tensors_cpp_is_built(
    tmp_path, monkeypatch
):
    """Right after a small model's backward each tensor field read in Python costs µs: where
    tensors.cpp is built, the monitor's norm, `gradients`, `optim_dynamics` and the accuracy
    check every tensor there, and the Python checks are never called."""
    from netprobe.native import step as native_step
    from netprobe.train import batch_accuracy

    if native.compiler() is None or native.tensor_checks() is None:
        pytest.skip("tensors.cpp is not built here")
    checked = []
    original = native_step.StepKernels._python_checked
    monkeypatch.setattr(
        native_step.StepKernels,
        "_python_checked",
        lambda self, t: checked.append(1) or original(self, t),
    )
    monkeypatch.setattr(native_step, "_accuracy_kernel", lambda dtype: checked.append(1))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    probes = ["gradients", "optim_dynamics"]
    with netprobe.attach(model, tmp_path, probes=probes, optimizer=opt) as mon:
        for _ in range(3):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            acc = batch_accuracy(logits, y)
            assert isinstance(acc, float)  # from the compiled accuracy, not PyTorch's ops
            mon.after_backward(loss, acc=acc, batch_size=8)
            opt.step()
            mon.after_step()
    assert checked == []
    df = netprobe.load(tmp_path).scalars()
    assert set(df["probe"]) >= {"train", "gradients", "optim_dynamics"}


def test_a_parameter_with_gradients_of_another_dtype_is_read(tmp_path, kernel_path):
    """`grad_dtype` (a float32 weight keeping float64 gradients) leaves the fused kernels, which
    read one dtype, to PyTorch's path; the norms are those of the gradients as they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].weight.grad_dtype = torch.float64
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    want = []
    probes = ["gradients", "optim_dynamics"]
    with netprobe.attach(model, tmp_path, probes=probes, optimizer=opt) as mon:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            squares = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())
            want.append(squares**0.5)
            mon.after_backward(loss, batch_size=8)
            opt.step()
            mon.after_step()
    df = netprobe.load(tmp_path).scalars(probe="train")
    got = df[df["metric"] == "grad_l2_total"].sort_values("step")["value"].tolist()
    assert got == pytest.approx(want, rel=1e-6)
    assert set(netprobe.load(tmp_path).scalars()["probe"]) >= {"gradients", "optim_dynamics"}


def test_the_monitors_read_of_the_gradients_is_lent_to_the_hooks_only(
    tmp_path, monkeypatch, kernel_path
):
    """On the CPU, where the fused read's checks ran in Python, that read of every gradient is
    handed to the probes' hooks (a Read: optim_dynamics reads its gradients from it), and
    dropped when they return: it holds them. Where a trained parameter has no gradient there is
    none to lend; nor where tensors.cpp checks them (each kernel's own check costs as little)."""
    from netprobe import native
    from netprobe.probes.optim_dynamics import OptimDynamics

    seen, original = [], OptimDynamics.after_backward

    def hook(self, state):
        seen.append(state.grad_read is not None)
        original(self, state)

    monkeypatch.setattr(OptimDynamics, "after_backward", hook)

    class Net(nn.Module):
        def __init__(self, unused: bool) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            self.unused = nn.Linear(2, 2) if unused else None  # trained, without a gradient

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    lent = []
    for unused in (False, True):
        model = Net(unused)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with netprobe.attach(model, tmp_path / str(unused), probes=["optim_dynamics"]) as mon:
            train_steps(mon, model, opt, [(x, y)] * 2)
            assert mon.state.grad_read is None
            python_checks = mon._total_norm.fused and native.tensor_checks() is None
            lent += [python_checks and not unused] * 2
    assert seen == lent


class SparseBag(nn.Module):
    """Token ids [batch, 3] → an embedding with sparse gradients, averaged → a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


@pytest.mark.parametrize("host", [True, False])
def test_sparse_gradients_count_in_the_norms_by_their_values(tmp_path, monkeypatch, host):
    """An nn.Embedding(sparse=True) makes a sparse gradient, an index given twice in the batch
    twice in it: the curve's ‖g‖₂ and gradient_flow's ‖∂L/∂W‖₂ count its dense values, on the
    fused CPU path and on the device path alike; the probes that track weights leave it out."""
    monkeypatch.setattr(native, "ENABLED", host)
    torch.manual_seed(0)
    model = SparseBag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1, 1, 2], [3, 1, 4], [5, 9, 2], [6, 5, 3]])
    y = torch.tensor([0, 1, 1, 0])
    probes = ["gradients", "optim_dynamics", "gradient_flow"]
    want_total, want_emb = [], []
    with netprobe.attach(model, tmp_path / "run", probes=probes, probe_batch=(x, y)) as mon:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            assert model.emb.weight.grad.is_sparse
            dense = [p.grad.to_dense().double() for p in model.parameters()]
            want_total.append(float(sum((g**2).sum() for g in dense).sqrt()))
            want_emb.append(float(dense[0].norm()))
            mon.after_backward(loss)
            opt.step()
            mon.after_step()
    run = netprobe.load(tmp_path / "run")
    assert run.info["status"] == "completed"
    total = run.scalars(probe="train", metric="grad_l2_total")["value"].tolist()
    assert total == pytest.approx(want_total, rel=1e-6)
    emb = run.scalars(probe="gradient_flow", layer="emb", metric="w_grad_l2")
    assert len(emb) and emb["value"].tolist() == pytest.approx(
        [want_emb[step] for step in emb["step"]], rel=1e-6
    )
    assert set(run.scalars(probe="gradients")["layer"]) == {"", "fc.weight"}


def test_a_probe_asked_to_read_sparse_gradients_refuses_before_writing(tmp_path):
    from netprobe.errors import ConfigError

    x, y = torch.tensor([[1, 2, 3]]), torch.tensor([0])
    for name in ("gradients", "optim_dynamics"):
        with pytest.raises(ConfigError, match=rf"probes.{name} tracks emb.weight.*sparse"):
            netprobe.attach(
                SparseBag(),
                tmp_path / name,
                probes={name: {"layers": ["emb.weight"]}},
                probe_batch=(x, y),
            )
        assert not (tmp_path / name).exists()


class SparseLookup(nn.Module):
    """A module of the user's own that makes a sparse gradient: attach cannot tell it from a
    dense one."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, sparse=True)


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("name", ["gradients", "optim_dynamics"])
def test_a_sparse_gradient_met_while_training_is_named(tmp_path, monkeypatch, host, name):
    """A probe that reads dense gradients and meets a sparse one at its first step fails with
    one line naming the parameter, on the fused CPU path and on the device path; the run is
    left `failed`, readable, with that line."""
    from netprobe.probes.base import SparseGradients

    monkeypatch.setattr(native, "ENABLED", host)
    model = SparseBag()
    model.emb = SparseLookup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.tensor([[1, 1, 2], [3, 1, 4]]), torch.tensor([0, 1])
    message = rf"probes.{name} tracks emb.weight, whose gradients are sparse \(torch.sparse_coo\)"
    with pytest.raises(SparseGradients, match=message):
        with netprobe.attach(
            model, tmp_path / "run", probes={name: {"layers": ["emb.weight"]}}
        ) as mon:
            train_steps(mon, model, opt, [(x, y)])
    info = netprobe.load(tmp_path / "run").info
    assert info["status"] == "failed" and "emb.weight" in info["error"]


def test_run_json_counts_the_steps_written_at_each_flush(tmp_path):
    """Between epoch ends, each flush brings run.json's steps_done up to the steps whose rows are
    on disk: `netprobe ls` shows a run with long epochs moving."""
    import json

    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 4), torch.randint(0, 2, (4,))) for _ in range(5)]
    with netprobe.attach(model, tmp_path / "run", probes=["gradients"], flush_every=2) as mon:
        for i, (x, y) in enumerate(batches):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.after_backward(loss)
            opt.step()
            mon.after_step()
            info = json.loads((tmp_path / "run" / "run.json").read_text())
            assert info["steps_done"] == (i + 1) // 2 * 2 and info["status"] == "running"
        assert len(netprobe.load(tmp_path / "run").scalars(probe="train", metric="loss")) == 4


def one_step(mon, model: nn.Module, order: tuple[str, ...]) -> None:
    """One training step on `model`, with the monitor's calls in `order`."""
    loss = F.cross_entropy(model(torch.randn(4, 4)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    for call in order:
        getattr(mon, call)(loss) if call == "after_backward" else getattr(mon, call)()


@pytest.mark.parametrize(
    "order, words",
    [
        (
            ("after_step", "after_backward"),
            ["after_step() at step 0", "after_backward(loss) first"],
        ),
        (("after_backward", "after_backward"), ["after_backward() twice at step 0"]),
    ],
)
def test_calls_out_of_order_are_refused_before_anything_is_recorded(tmp_path, order, words):
    """A loop that steps before after_backward would file the step's loss and gradients under
    the next step; one that calls after_backward twice, two records under one step."""
    model = small_net()
    with pytest.raises(RuntimeError) as caught:
        with netprobe.attach(model, tmp_path / "run", probes=["gradients"]) as mon:
            one_step(mon, model, order)
    assert all(w in str(caught.value) for w in words), caught.value
    run = netprobe.load(tmp_path / "run")
    assert run.info["status"] == "failed" and run.info["steps_done"] == 0
    assert len(run.scalars(probe="train", metric="loss")) == (order[0] == "after_backward")


@pytest.mark.parametrize("call", ["after_backward", "after_step", "end_epoch", "stop"])
def test_a_closed_run_takes_no_more_calls_and_stays_as_it_was(tmp_path, call):
    """Its lock is released when it closes, so another process may own the folder by then."""
    model = small_net()
    with netprobe.attach(model, tmp_path / "run", probes=["gradients"]) as mon:
        one_step(mon, model, ("after_backward", "after_step"))
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    args = {"after_backward": (torch.tensor(1.0),), "stop": ("done",)}.get(call, ())
    with pytest.raises(RuntimeError, match="is closed"):
        getattr(mon, call)(*args)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == files


def test_a_run_closed_within_a_step_takes_no_after_step(tmp_path):
    """Closed between after_backward and after_step (an error, a signal): the step's end is
    refused as closed, its probes and counters left as they were; stop() changes nothing."""
    model = small_net()
    with netprobe.attach(model, tmp_path / "run", probes=["gradients"]) as mon:
        one_step(mon, model, ("after_backward",))
    step, info = mon.state.step, dict(mon.writer.info)
    with pytest.raises(RuntimeError, match="is closed"):
        mon.after_step()
    with pytest.raises(RuntimeError, match="is closed"):
        mon.stop("done")
    assert mon.state.step == step and mon.writer.info == info
