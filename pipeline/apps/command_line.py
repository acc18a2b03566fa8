"""The machinery behind cli.py's commands: one-line errors instead of tracebacks, `--config` files, and command
options generated from a config dataclass's fields (each field's `option(...)` in pipeline/core/options.py says
its flags, help and default), so a new option reaches --help, --config and the config with no edit in cli.py."""

from __future__ import annotations

import errno
import functools
import inspect
import os
import re
import types
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

import typer

from pipeline.core import options
from pipeline.core.config import load_config_file
from pipeline.core.errors import LrcError
from pipeline.core.options import default_of

# Fields typed as text on the command line: field -> (its text default, parse(text) -> the field's value).
TextFields = dict[str, tuple[Optional[str], Callable[[Any], Any]]]

# A full disk, a quota, a file-size limit, a read-only file system or folder: the user's to fix, not a bug.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def say(text: str) -> None:
    """A command's result line: once, from rank 0, when torchrun runs several processes."""
    from pipeline.core.distributed import from_env

    if from_env().is_main:
        typer.echo(text)


def disk_errno(err: BaseException) -> int | None:
    """The errno of a disk error: an OSError's, or the one pyarrow and safetensors (Rust) put in their text."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        match = re.search(r"(?:errno|os error) (\d+)", str(err), re.IGNORECASE)
        code = int(match.group(1)) if match else None
    return code if code in DISK_ERRNOS else None


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends in one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.core.distributed import StoppedByPeer
        from pipeline.core.runtime import setup_logging

        setup_logging(bool(kwargs.get("verbose")))
        try:
            return command(*args, **kwargs)
        except LrcError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except StoppedByPeer as err:  # under torchrun: the rank that failed first printed the one error line
            typer.echo(f"stopped: {err}", err=True)
            raise typer.Exit(1) from None
        except Exception as err:  # noqa: BLE001 - only disk errors are handled, the rest re-raised
            code = disk_errno(err)
            if code is None:
                raise
            # The writers clean their temp files up on the way out, so nothing half-written is left to trust.
            where = f" {err.filename}" if getattr(err, "filename", None) else ""
            typer.echo(f"error: cannot write{where}: {os.strerror(code)}: free disk space or choose a writable "
                       "output location, then rerun (finished shards, checkpoints and files are kept)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """`--config FILE`: its values become the defaults, so flags on the command line override them."""
    if value is None:
        return None
    try:
        values = load_config_file(value)
    except LrcError as err:
        raise typer.BadParameter(str(err)) from None
    # A key may be the flag (`cache`, `lr`, `set`) or the parameter behind it (`cache_dir`, `learning_rate`).
    flags = {opt.lstrip("-").replace("-", "_"): param.name for param in ctx.command.params
             for opt in param.opts if opt.startswith("--") and param.name not in ("config", "verbose")}
    known = flags | {name: name for name in flags.values()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = sorted(flags)
        raise typer.BadParameter(f"{value} sets unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    ctx.default_map = {**(ctx.default_map or {}), **{known[k]: v for k, v in values.items()}}
    return value


ConfigOpt = typer.Option(
    None, "--config", is_eager=True, callback=load_config,
    help="TOML or YAML file of option values (names as the flags, - or _); flags given here override it.",
)

VerboseOpt = typer.Option(False, "--verbose", "-v", help="Debug logging.")


# --------------------------------------------------------------------------- options generated from a config


def keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def cli_type(kind: Any) -> Any:
    """The annotation typer reads for a field's type: Optional[X] for the dataclasses' `X | None`."""
    if get_origin(kind) in (Union, types.UnionType):
        return Optional[next(a for a in get_args(kind) if a is not type(None))]
    return kind


def _flat(config_class: type) -> list[tuple[Any, options.OptionSpec, type, bool]]:
    """The command-line fields of config_class and of the configs it nests (`options.nested`), in field order, as
    (field, spec, class declaring it, None allowed though required). A name two nested configs share (extract-teacher's
    --text-column) is one option: the first declaration's."""
    found: dict[str, tuple[Any, options.OptionSpec, type, bool]] = {}
    for f in fields(config_class):
        inner = options.nested_of(f)
        if inner is None:
            if options.spec_of(f).help is not None:
                found.setdefault(f.name, (f, options.spec_of(f), config_class, False))
            continue
        helps = dict(inner.helps)
        for g, spec, owner, _ in _flat(inner.config_class):
            if g.name not in inner.exclude:
                spec = replace(spec, help=helps.get(g.name, spec.help))
                found.setdefault(g.name, (g, spec, owner, g.name == inner.when))
    return list(found.values())


def config_options(config_class: type, text: TextFields,
                    last: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per command-line field of config_class (and of the configs it nests), with the flags,
    help and default its `option` declares (pipeline/core/options.py): a new field reaches --help, --config files and
    the config without an edit here. The order is the fields' (--help lists them so), with `last` moved to the end in
    the order `last` names them (every command ends with its shared options, --device and --precision among them).
    Fields in `text` are typed as text and parsed by `build_config`."""
    params = []
    for f, spec, owner, unset in _flat(config_class):
        kind = get_type_hints(owner)[f.name]
        if f.name in text:
            default = text[f.name][0]
            kind = str if default is not None else Optional[str]
        elif spec.envvar is not None or unset:
            default, kind = None, Optional[cli_type(kind)]  # the environment's value, or None: not given
        elif f.default is MISSING and f.default_factory is MISSING:
            admits_none = type(None) in get_args(kind)
            default = None if admits_none else ...  # a required `X | None` is optional on the command line
        else:
            default = default_of(owner, f.name)
        make = typer.Argument if spec.argument else functools.partial(typer.Option, envvar=spec.envvar)
        params.append(keyword(f.name, cli_type(kind), make(default, *spec.flags, help=spec.help)))
    order = {name: i for i, name in enumerate(last)}
    return sorted(params, key=lambda p: order.get(p.name, -1))  # a stable sort: field order within each part


def _assemble(config_class: type, given: dict[str, Any]) -> Any:
    """config_class from flat values: each nested config rebuilt from its fields' values (None for a field with
    another default: not given, so the nested default holds), or None when its `when` option is unset."""
    top = dict(given)
    for f in fields(config_class):
        inner = options.nested_of(f)
        if inner is None:
            continue
        names = [g.name for g, *_ in _flat(inner.config_class) if g.name not in inner.exclude]
        for name in names:
            top.pop(name, None)
        if inner.when is not None and given.get(inner.when) is None:
            top[f.name] = None
            continue
        defaults = {g.name: g.default for g in fields(inner.config_class)}
        top[f.name] = _assemble(inner.config_class, {
            n: given[n] for n in names if given[n] is not None or defaults.get(n) is None})
    return config_class(**top)


def build_config(config_class: type, values: dict[str, Any], text: TextFields) -> Any:
    """A command's values as its config: the text fields parsed (in their order, so the first bad one is named)."""
    given = {k: v for k, v in values.items() if k not in ("config", "verbose")}
    for name, (_, parse) in text.items():
        given[name] = parse(given[name])
    return _assemble(config_class, given)


def signature(*parameters: inspect.Parameter) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a `**values` command's parameters: typer reads a command's options from inspect.signature."""

    def declare(command: Callable[..., Any]) -> Callable[..., Any]:
        command.__signature__ = inspect.Signature(list(parameters))  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        return command

    return declare


CONFIG_PARAM, VERBOSE_PARAM = keyword("config", Optional[Path], ConfigOpt), keyword("verbose", bool, VerboseOpt)
