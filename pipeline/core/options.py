"""What a config option is, written once on its dataclass field, and the checks every value a user gives goes through.

`option(...)` declares a field with everything the rest of lrc needs to know about it: its default, its flag and
help text on the command line, whether a run dir may be reused or resumed with another value of it, the value that
stands for it in runs recorded before it existed, its row in report.md and whether a sweep may vary it (`nested`
declares a field holding another config, whose options then belong to the holder's command too). cli.py,
run_dir.py, report.py and sweep_grid.py derive their option lists from these fields (the functions below), so a new
option is one field and its check (docs/DESIGN.md §4), and none of them can silently miss it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from pipeline.core.errors import LrcError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
CACHE_CHECKS = ("auto", "quick", "full")  # how much of a cache is hashed at open (pipeline/cache/verify.py)

_KEY = "lrc.option"
_NESTED = "lrc.nested"


class _Always:
    """added_at's default: the option is in every recorded run, so a run without it is not one of ours."""

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS = _Always()


@dataclass(frozen=True)
class OptionSpec:
    help: str | None = None  # the command line's help text; None: not a command-line option
    flags: tuple[str, ...] = ()  # typer's names for it; () = --field-name (a bool: --field-name/--no-field-name)
    run_only: bool = False  # how a run is watched or where it runs, not what it computes: a resume may change it
    added_at: Any = ALWAYS  # the value that reproduces runs recorded before the option existed
    report: int | None = None  # its row in report.md's key settings (ascending); None: not listed
    sweepable: bool = True  # False: the same for every point of a sweep (where it reads and writes, how runs start)
    argument: bool = False  # a positional argument of its command, not a --flag
    envvar: str | None = None  # read from this environment variable when not given (the command line shows no default)


def option(default: Any = MISSING, *, default_factory: Any = MISSING, help: str | None = None,
           flags: tuple[str, ...] = (), run_only: bool = False, added_at: Any = ALWAYS, report: int | None = None,
           sweepable: bool = True, argument: bool = False, envvar: str | None = None) -> Any:
    """A dataclass field (no default: a required one) carrying its OptionSpec."""
    spec = OptionSpec(help=help, flags=flags, run_only=run_only, added_at=added_at, report=report, sweepable=sweepable,
                      argument=argument, envvar=envvar)
    return field(default=default, default_factory=default_factory, metadata={_KEY: spec})


@dataclass(frozen=True)
class NestedSpec:
    """A field holding another config whose command-line fields are its command's options too (docs/DESIGN.md §4)."""

    config_class: type
    when: str | None = None  # this nested option unset (None): the field is None (the nested config is not built)
    exclude: tuple[str, ...] = ()  # nested fields this command does not offer (they keep their defaults)
    helps: tuple[tuple[str, str], ...] = ()  # nested field -> the help text this command gives it instead


def nested(config_class: type, default: Any = MISSING, *, when: str | None = None, exclude: tuple[str, ...] = (),
           helps: dict[str, str] | None = None) -> Any:
    """A field holding a `config_class`: its options are declared once there and flattened into every command
    whose config nests it (pipeline/apps/command_line.py), which rebuilds the nested config from them."""
    spec = NestedSpec(config_class, when, exclude, tuple((helps or {}).items()))
    return field(default=default, metadata={_NESTED: spec})


def nested_of(f: Field) -> NestedSpec | None:
    return f.metadata.get(_NESTED)


def spec_of(f: Field) -> OptionSpec:
    """A plain field (no `option`) is compared on reuse, sweepable and not on the command line: the safe side."""
    return f.metadata.get(_KEY, OptionSpec())


def default_of(config_class: type, name: str) -> Any:
    """The default of one config field: the command line's (pipeline/apps/command_line.py) and any other reader's."""
    for f in fields(config_class):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{config_class.__name__}.{name} has no default")
    raise ValueError(f"{config_class.__name__} has no field {name!r}")


# Options several commands share, declared once: every command's --device and --precision say what train-student's
# say, and every command that loads a model dir offers the same two safety switches.
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu or cuda."
PRECISION_HELP = "fp32, or bf16 autocast (faster on recent CPUs and GPUs)."


def device_option(**spec: Any) -> Any:
    return option("auto", help=DEVICE_HELP, **spec)


def precision_option(**spec: Any) -> Any:
    return option("fp32", help=PRECISION_HELP, **spec)


def check_device_precision(config: Any) -> None:
    """The check every config with `device_option` and `precision_option` fields runs on them."""
    require(config.device in DEVICES, f"--device must be one of {DEVICES}, got {config.device!r}")
    require(config.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {config.precision!r}")


def trust_remote_code_option() -> Any:
    """Run Python shipped in a model dir: only for code the user has read."""
    return option(False, flags=("--trust-remote-code",), help=(
        "Run Python code shipped inside the model dir (its config's auto_map). It runs with your permissions: pass "
        "this only for a model whose code you have read."))


def allow_task_mismatch_option() -> Any:
    """Accept a model whose teacher_info.json / training_summary.json records another task."""
    return option(False, flags=("--allow-task-mismatch",), help=(
        "Use a model whose teacher_info.json / training_summary.json records another task (a deliberate transfer)."))


def help_of(config_class: type, name: str) -> str:
    return next(spec_of(f).help for f in fields(config_class) if f.name == name)


def command_line(config_class: type) -> list[tuple[Field, OptionSpec]]:
    """The fields that are command-line options, in field order (the order --help lists them in)."""
    return [(f, spec_of(f)) for f in fields(config_class) if spec_of(f).help is not None]


def run_only(config_class: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(config_class) if spec_of(f).run_only)


def added_at(config_class: type) -> dict[str, Any]:
    return {f.name: spec_of(f).added_at for f in fields(config_class) if spec_of(f).added_at is not ALWAYS}


def report_keys(config_class: type) -> tuple[str, ...]:
    listed = [f for f in fields(config_class) if spec_of(f).report is not None]
    return tuple(f.name for f in sorted(listed, key=lambda f: spec_of(f).report))


def fixed_keys(config_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config_class) if not spec_of(f).sweepable)


def flag_aliases(config_class: type) -> dict[str, str]:
    """Flag name (`lr`) -> field name (`learning_rate`) of the sweepable options whose flag is not their name."""
    aliases = {}
    for f in fields(config_class):
        spec = spec_of(f)
        long = next((flag for flag in spec.flags if flag.startswith("--")), None)
        if spec.sweepable and long is not None and long[2:].replace("-", "_") != f.name:
            aliases[long[2:].replace("-", "_")] = f.name
    return aliases


# One policy for every number a user gives: checked when the config is built, so a bad value is refused before
# any stage starts work (and before any dir is created). NaN fails every comparison and inf is refused
# explicitly, so no non-finite value gets through a range check.


def require(condition: bool, message: str) -> None:
    if not condition:
        raise LrcError(message)


def check_whole(flag: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    """An integer option (a count, a size, a length, a step interval) in [minimum, maximum]."""
    # numbers.Integral: a numpy integer from a script is a whole number too; a bool never is
    require(isinstance(value, numbers.Integral) and not isinstance(value, bool),
            f"{flag} must be a whole number, got {value!r}")
    top = f" and <= {maximum}" if maximum is not None else ""
    require(value >= minimum and (maximum is None or value <= maximum), f"{flag} must be >= {minimum}{top}, got {value}")


def check_real(flag: str, value: Any, low: float = 0.0, high: float = math.inf, low_open: bool = True,
               high_open: bool = True) -> None:
    """A finite number in the interval from low to high (open ends exclude the bound)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        upper = "inf" if high == math.inf else f"{high:g}"
        raise LrcError(f"{flag} must be a finite number in {left}{low:g}, {upper}{right}, got {value!r}")


def check_seed(flag: str, value: Any) -> None:
    check_whole(flag, value, 0, 2**32 - 1)  # numpy's seed range; torch and random accept it too


def check_weights(flag: str, value: Any) -> None:
    """alpha:beta:gamma loss weights: three finite numbers >= 0, not all zero (the step would learn nothing)."""
    require(isinstance(value, (tuple, list)) and len(value) == 3, f"{flag} must be alpha:beta:gamma, got {value!r}")
    for w in value:
        check_real(flag, w, 0.0, low_open=False)
    require(any(w > 0 for w in value), f"{flag} {':'.join(f'{w:g}' for w in value)} are all 0: nothing would be trained")


def check_optimisation(config: Any) -> None:
    """The optimiser settings fine-tuning and student training share (same fields, same flags)."""
    check_real("--epochs", config.epochs)
    check_whole("--batch-size", config.batch_size)
    check_whole("--eval-batch-size", config.eval_batch_size)
    check_real("--lr", config.learning_rate)
    check_real("--weight-decay", config.weight_decay, low_open=False)
    check_real("--max-grad-norm", config.max_grad_norm, low_open=False)  # 0 = no clipping
    check_real("--warmup-ratio", config.warmup_ratio, 0.0, 1.0, low_open=False)
    check_seed("--seed", config.seed)
