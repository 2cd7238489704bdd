"""Where the config groups live, how a config is composed, and what makes one valid (SPEC §2)."""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from netprobe.errors import ConfigError, first_line

CONFIG_NAME = "config"
PRECISIONS = ("32", "bf16", "16")
# What torch.nn.init.calculate_gain takes: init.nonlinearity of the kaiming initializers.
NONLINEARITIES = ("relu", "leaky_relu", "selu", "tanh", "sigmoid", "linear", "conv1d", "conv2d",
                  "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")  # fmt: skip
GROUPS = ("model", "data", "init", "optim", "probes", "trainer", "doctor", "experiment")
# Keys (or whole sections) that say how a run reports, saves and finds its files, never what it
# learns: a resumed run may change them, and plots average runs that differ only in them and
# the seed as one experiment.
BOOKKEEPING = (
    "trainer.log_every", "trainer.flush_every", "trainer.log_interval_s",
    "trainer.checkpoint_every", "trainer.tensorboard", "trainer.resume",
    "data.root", "data.download", "data.num_workers", "probes.memory_budget", "doctor",
    "name", "out_root",
)  # fmt: skip


def bookkeeping(key: str) -> bool:
    """Whether a dotted config key is one of BOOKKEEPING or lies in a section that is."""
    return any(key == k or key.startswith(f"{k}.") for k in BOOKKEEPING)


def conf_dir() -> Path:
    """The config folder: inside the installed package (wheel), else the source tree's conf/."""
    package = Path(__file__).resolve().parent
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parent / "conf"


def options(group: str) -> list[str]:
    """The option names of a config group: its YAML files."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate the config as `netprobe train OVERRIDES` would (one run, no sweep)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            try:
                cfg = hydra_compose(CONFIG_NAME, overrides=overrides)
            except Exception as exc:  # noqa: BLE001 - Hydra's errors become one clear line
                raise _explain(exc, overrides, hydra_compose) from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def optimizer_name(optim: DictConfig) -> str:
    """The optimizer an `optim` config builds, as its option is named: its class in lower case
    (`sgd`, `adamw`; `asgd` for optim=sgd optim._target_=torch.optim.ASGD), else `optim.name`."""
    target = optim.get("_target_")
    return str(target).rpartition(".")[2].lower() if target else str(optim.name)


# Hydra's flags that take the next argument as their value.
_FLAGS_WITH_VALUE = {
    "-c", "--cfg", "-p", "--package", "-cn", "--config-name", "-cp", "--config-path",
    "-cd", "--config-dir", "--experimental-rerun",
}  # fmt: skip


def preflight(args: Sequence[str], check_data: bool = True) -> None:
    """Compose and validate every job a `netprobe train ARGS` command line would run, and check
    (or download) the data each needs.

    Hydra's own flags and `hydra.*` overrides are left to Hydra; sweeps (`seed=0,1,2`) are expanded,
    with `-m` also those a preset lists in `hydra.sweeper.params` (the command line wins).
    """
    choices = _job_choices(args)
    # Hydra prints these and trains nothing, so they need no data on disk.
    only_prints = bool({"--cfg", "-c", "--resolve"} & set(args)) or not check_data
    if not only_prints:  # torch and the data sets: `train --cfg job` starts without them
        from netprobe.checks import check_output_dir, check_probes
        from netprobe.data import prepare_data
        from netprobe.setup import check_optimizer

    prepared = set()
    # In Hydra's order: job number i composes the i-th combination.
    combos = itertools.islice(itertools.product(*choices), 1000)
    cfgs = []
    for combo in combos:
        cfg = compose(combo)
        cfgs.append(cfg)
        key = (cfg.data.name, str(cfg.data.get("root")), bool(cfg.data.get("download")))
        if not only_prints and key not in prepared:
            # Missing data fails here, before Hydra makes a run directory.
            prepare_data(cfg.data)
            prepared.add(key)
        if not only_prints:
            check_probes(cfg)
            check_optimizer(cfg.optim)
        if len(cfgs) == 1:
            first_combo = combo
    if not only_prints:
        # After every job's own checks: the run folder, or the sweep's folder and its job folders.
        check_output_dir(args, first_combo, cfgs)


def _job_choices(args: Sequence[str]) -> list[list[str]]:
    """Per override of `args` (Hydra's flags and `hydra.*` left out), the values its jobs take:
    a sweep's values, and under `-m` a preset's `hydra.sweeper.params` the command line lacks."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-") and not re.match(r"^[+~]*hydra[./]", arg):
            overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(first_line(exc)) from None
    # As Hydra's basic sweeper orders them: a preset's own sweep first, then the command line's
    # overrides, a key given again keeping its first place and taking its last value.
    choices: dict[str, list[str]] = {}
    if {"-m", "--multirun"} & set(args):
        swept = [a for a in args if re.match(r"^\+*hydra\.sweeper\.params\.", a)]
        firsts = [
            _values(ov)[0] if ov.is_sweep_override() else t for t, ov in zip(overrides, parsed)
        ]
        for key, value in _sweeper_params(firsts, swept).items():
            choices[key] = _values(OverridesParser.create().parse_override(f"{key}={value}"))
    for text, ov in zip(overrides, parsed):
        choices[ov.get_key_element()] = _values(ov) if ov.is_sweep_override() else [text]
    return list(choices.values())


def _values(override: Any) -> list[str]:
    """`key=value` for each value a (sweep) override takes."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    values = [f"{key}={v}" for v in override.sweep_string_iterator()]
    if not values:  # Hydra would run no job, and say nothing
        raise ConfigError(f"{override.input_line or key} sweeps no value: give it one at least")
    return values


def _sweeper_params(overrides: list[str], extra: list[str]) -> dict[str, str]:
    """`hydra.sweeper.params` of the config that `overrides` compose (a preset's own sweep)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            try:
                cfg = hydra_compose(CONFIG_NAME, [*overrides, *extra], return_hydra_config=True)
            except Exception as exc:  # noqa: BLE001 - the same errors compose() explains
                raise _explain(exc, overrides, hydra_compose) from None
    finally:
        GlobalHydra.instance().clear()
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    return {str(k): str(v) for k, v in params.items()}


def _explain(exc: Exception, overrides: list[str], hydra_compose: Callable) -> ConfigError:
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        if group:
            valid = ", ".join(exc.options or options(group))
            return ConfigError(f"unknown {group} {name!r}; valid {group} options: {valid}")
    match = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", str(exc))
    if match:
        key = match.group(1)
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in overrides if not o.lstrip("+~").startswith(key)]
        try:
            composed = hydra_compose(CONFIG_NAME, overrides=rest)
        except Exception:  # noqa: BLE001
            composed = None
        node = None if composed is None else OmegaConf.select(composed, parent or "")
        probe = key.split(".")[1] if key.startswith("probes.") and "." in key[7:] else None
        probes = set(options("probes")) - {"all", "none"}
        if node is None and probe in probes:
            # A key of a probe this run does not select (probes=[gradients] by default).
            chosen = [k for k in (composed.probes if composed else []) if k in probes]
            return ConfigError(
                f"unknown config key {key!r}: {probe} is not among this run's probes "
                f"({', '.join(map(str, chosen)) or 'none'}); select it too, e.g. "
                f"probes=[{','.join([*map(str, chosen), probe])}]"
            )
        if isinstance(node, DictConfig):
            where = f" under {parent}" if parent else ""
            return ConfigError(
                f"unknown config key {key!r}; valid keys{where}: {', '.join(map(str, node))}"
            )
        return ConfigError(f"unknown config key {key!r}")
    return ConfigError(hydra_message(exc))


def hydra_message(exc: BaseException) -> str:
    """One line for an error of Hydra's: its first line, but for an override of several values
    outside a sweep, whose hints Hydra gives on the lines that follow."""
    match = re.match(r"Ambiguous value for argument '([^']*)'", str(exc))
    if match is None:
        return first_line(exc)
    return (
        f"{match.group(1)} gives several values; valid: a sweep, one job each "
        "(netprobe train -m), a list in brackets (key=[a,b]), or a quoted string (key='a,b')"
    )


# ---------------------------------------------------------------- validation

Check = Callable[[Any], bool]


_INT64 = 2**63 - 1  # steps and counts are stored as int64


def is_int(v: Any) -> bool:
    """An integer that fits in int64 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and -_INT64 - 1 <= v <= _INT64


def _positive_int(v: Any) -> bool:
    return is_int(v) and v > 0


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return is_number(v) and v > 0


def _non_negative_int(v: Any) -> bool:
    return is_int(v) and v >= 0


def _fraction(v: Any) -> bool:
    """In [0, 1): a momentum, a beta, a dropout rate."""
    return is_number(v) and 0 <= v < 1


def _sizes(v: Any) -> bool:
    """A positive integer or a list of them (layer widths)."""
    return _positive_int(v) or (isinstance(v, list) and bool(v) and all(map(_positive_int, v)))


_CHECKS: dict[str, tuple[Check, str]] = {
    # What torch.manual_seed takes: a signed or an unsigned 64-bit integer.
    "seed": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**64,
        "a 64-bit integer",
    ),
    # The run folder's name ends with it: one folder, not a path of them.
    "name": (lambda v: not set("/\\") & set(str(v)), "a folder name, without '/' or '\\'"),
    "trainer.epochs": (_positive_int, "a positive integer"),
    "trainer.max_steps": (_optional(_positive_int), "a positive integer or null"),
    "trainer.precision": (lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "trainer.device": (
        lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
        "auto, cpu, cuda, cuda:N or mps",
    ),
    "trainer.target_val_acc": (
        _optional(lambda v: _positive(v) and v <= 1),
        "a fraction in (0, 1] (0.94, not 94) or null",
    ),
    "trainer.log_every": (_positive_int, "a positive integer"),
    "trainer.flush_every": (_positive_int, "a positive integer"),
    "trainer.log_interval_s": (_positive, "a positive number of seconds"),
    "trainer.checkpoint_every": (_non_negative_int, "an integer ≥ 0"),
    "trainer.on_nonfinite": (lambda v: v in ("stop", "continue"), "stop or continue"),
    "trainer.tensorboard": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.resume": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.compile": (lambda v: isinstance(v, bool), "true or false"),
    "trainer.deterministic": (lambda v: isinstance(v, bool), "true or false"),
    "optim.lr": (_positive, "a positive number"),
    "optim.weight_decay": (lambda v: is_number(v) and v >= 0, "a number ≥ 0"),
    "optim.momentum": (_fraction, "a number in [0, 1)"),
    "optim.nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "optim.betas": (
        lambda v: isinstance(v, list) and len(v) == 2 and all(map(_fraction, v)),
        "two numbers in [0, 1), e.g. [0.9,0.999]",
    ),
    "optim.eps": (_positive, "a positive number"),
    "optim.step_size": (_positive_int, "a positive integer (epochs)"),
    "optim.gamma": (_positive, "a positive number"),
    "data.batch_size": (_positive_int, "a positive integer"),
    "data.probe_size": (_positive_int, "a positive integer"),
    "data.image_size": (_positive_int, "a positive integer"),
    "data.channels": (_positive_int, "a positive integer"),
    "data.num_classes": (_positive_int, "a positive integer"),
    "data.num_samples": (_positive_int, "a positive integer"),
    "data.noise": (lambda v: is_number(v) and v >= 0, "a number ≥ 0"),
    "data.val_fraction": (
        _optional(lambda v: is_number(v) and 0 < v < 1),
        "a fraction in (0, 1), or null for the official test split",
    ),
    "data.num_workers": (_non_negative_int, "an integer ≥ 0"),
    "data.augment": (lambda v: isinstance(v, bool), "true or false"),
    "data.on_device": (_optional(lambda v: isinstance(v, bool)), "true, false or null (auto)"),
    "data.download": (lambda v: isinstance(v, bool), "true or false"),
    "init.gain": (lambda v: is_number(v) and v >= 0, "a number ≥ 0"),
    "init.nonlinearity": (lambda v: v in NONLINEARITIES, f"one of {', '.join(NONLINEARITIES)}"),
    "model.width": (_positive_int, "a positive integer"),
    "model.hidden": (_sizes, "a positive integer or a list of them"),
    "model.dropout": (_fraction, "a number in [0, 1)"),
    "model.middle_blocks": (_non_negative_int, "an integer ≥ 0"),
}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first value of the wrong type or out of range."""
    for key, (check, valid) in _CHECKS.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as exc:  # noqa: BLE001 - missing mandatory values, bad interpolations
            raise ConfigError(f"{key}: {first_line(exc)}") from None
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not check(value):
            shown = value if isinstance(value, list) else repr(value)
            raise ConfigError(f"{key}={shown} is not valid; expected {valid}")
    if cfg.model.get("_target_") in (None, "???"):
        raise ConfigError("model._target_ is not set; give model._target_=my.module.Net")
    optim = cfg.optim
    if optim.get("nesterov") and not optim.get("momentum"):
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    _check_scheduler(optim)
    _check_memory(cfg.data)
    check_device(cfg.trainer.device)
    from netprobe.doctor import thresholds

    thresholds(OmegaConf.to_container(cfg.doctor) if "doctor" in cfg else None)
    if cfg.trainer.get("tensorboard"):
        from netprobe.tensorboard import require

        require()  # before any run directory exists


def _check_scheduler(optim: DictConfig) -> None:
    """`optim.scheduler` is null or names one of `optim.lr_schedulers` (conf/config.yaml)."""
    choices = ["null", *optim.get("lr_schedulers", {})]
    value = optim.get("scheduler")
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is not None and (not isinstance(value, str) or value not in choices[1:]):
        valid = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else "null"
        raise ConfigError(f"optim.scheduler={value!r} is not valid; expected {valid}")


def check_device(name: str) -> None:
    """Refuse a device this machine does not have (`cuda` without a GPU, `cuda:3` with two)."""
    if name in ("auto", "cpu"):
        return  # nothing to ask torch, whose import `train --cfg job` would otherwise wait for
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            have = f"{count} CUDA devices (cuda:0..cuda:{count - 1})" if count else "no CUDA device"
            raise ConfigError(
                f"trainer.device={name} does not exist: this machine has {have}; "
                "valid: auto, cpu" + (", cuda, cuda:N" if count else "")
            )
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps does not exist on this machine; valid: auto, cpu")


def _check_memory(data: DictConfig) -> None:
    """Refuse a synthetic data set larger than this machine's memory (a typo such as
    data.num_samples=10000000000 would otherwise be found by the kernel's OOM killer)."""
    if data.get("num_samples") is None:
        return
    need = data.num_samples * data.channels * data.image_size**2 * 4  # float32 pixels
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        gib = 2**30
        raise ConfigError(
            f"data.num_samples={data.num_samples} images of {data.channels}×{data.image_size}²"
            f" need {need / gib:.0f} GiB, more than this machine's {have / gib:.0f} GiB of memory;"
            " choose fewer samples or a smaller data.image_size"
        )
