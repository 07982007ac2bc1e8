"""Run configs: a YAML file of flags (`--config run.yaml`), the shipped presets (`--model NAME`, the files in
configs/), and the resolved config every training run writes, which `--config` repeats.

A config file maps flag names (without the dashes) to values. A flag's value comes from the command line if
it is given there, else from --config, else from the --model preset, else from its default; every value is
checked as the flag checks it, and a key that is no flag of the script is one line naming the nearest flags.

PyYAML reads the files; without it (a bare GPU machine), the flat `key: value` form this module writes is
still read: one flag per line, each value a JSON scalar or list, `#` comments.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os

from common import UserError
from files import atomic_path, os_reason

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
NOT_SAVED = ("config", "help")  # flags that name the config itself or print and exit


# ----------------------------------------------------------------------------- files


def read_config(path: str, flag: str = "--config") -> dict:
    """A config file's flags, or one line saying why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path} ({os_reason(e)})") from None
    try:
        values = _parse(text)
    except ValueError as e:
        raise UserError(f"{flag} {path}: not a YAML mapping of flags ({e})") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise UserError(f"{flag} {path}: not a mapping of flag names to values")
    return values


def _parse(text: str):
    try:
        import yaml
    except ImportError:
        return _parse_flat(text)
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(" ".join(str(e).split())) from None
    return {} if values is None else values


def _parse_flat(text: str) -> dict:
    """The `key: JSON value` lines write_config writes (and hand-written ones like them), without PyYAML."""
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, colon, value = line.partition(":")
        if not colon or not key.strip():
            raise ValueError(f"line {number} is not 'flag: value' (install pyyaml to read full YAML)")
        value = value.strip()
        try:
            values[key.strip()] = json.loads(value) if value else None
        except json.JSONDecodeError:
            values[key.strip()] = value  # a plain string, as YAML reads it
    return values


def write_config(settings: dict, path: str, header: str) -> None:
    """Write a run's flags as a config file (atomically): one `flag: value` line each, the values in JSON,
    which is YAML too, so --config reads it back exactly with or without PyYAML."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key}: {json.dumps(value)}" for key, value in settings.items() if key not in NOT_SAVED]
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def config_path_beside(checkpoint_path: str) -> str:
    """Where a run's resolved config goes beside its checkpoint: the checkpoint's name with .yaml."""
    return os.path.splitext(checkpoint_path)[0] + ".yaml"


# ----------------------------------------------------------------------------- presets


def _presets() -> dict[str, dict]:
    return {os.path.basename(path)[: -len(".yaml")]: read_config(path, "--model")
            for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))}


# --model names a config in configs/ so nobody types its flags: the model card's six shapes (docs/sizing.md
# "Suggested model shapes"), each with the tokenizer it was sized for, and the README's quick start.
MODEL_PRESETS: dict[str, dict] = _presets()


def add_config_args(p: argparse.ArgumentParser, presets: bool = False, default_model: str = "small") -> None:
    """--config, and with presets=True --model (taking effect through parse_with_config)."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML file of flags (keys are the flags' names); flags on the command line override it")
    if presets:
        p.add_argument("--model", choices=tuple(MODEL_PRESETS), default=default_model,
                       help="a named shape (with its tokenizer; configs/NAME.yaml), or quickstart, the README's "
                       "whole offline run; flags from --config or the command line override it")


# ----------------------------------------------------------------------------- parsing


def parse_with_config(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse a command line that may name --config and a --model preset: each flag takes the command
    line's value if it gives one (even one equal to the default), else the config's, else the preset's
    (only flags the script has), else its default."""
    args = p.parse_args(argv)
    unset = object()  # a second parse into a namespace of sentinels tells which flags were given
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    on_command_line = {k for k, v in vars(given).items() if v is not unset}
    actions = {a.dest: a for a in p._actions if a.option_strings}
    config = read_config(args.config) if args.config else {}
    for key, value in config.items():
        if key in NOT_SAVED or key not in actions:
            near = difflib.get_close_matches(key, [k for k in actions if k not in NOT_SAVED], n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"--config {args.config}: {key!r} is not a flag of this script{hint}")
        if key not in on_command_line:
            setattr(args, key, _checked(actions[key], value, f"--config {args.config}: {key}"))
    preset = MODEL_PRESETS.get(getattr(args, "model", None), {})
    for key, value in preset.items():
        if key in actions and key not in on_command_line and key not in config:
            setattr(args, key, _checked(actions[key], value, f"configs/{args.model}.yaml: {key}"))
    return args


def _checked(action: argparse.Action, value, where: str):
    """A config value as the flag would take it from the command line: its type's conversion, its choices."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None:
        return None
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if many:
        items = value if isinstance(value, list) else [value]
        return [_one(action, item, where) for item in items]
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: expected one value, got {value!r}")
    return _one(action, value, where)


def _one(action: argparse.Action, value, where: str):
    if isinstance(value, bool) and action.choices is not None and {"on", "off"} <= set(action.choices):
        value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise UserError(f"{where}: expected a value for {action.option_strings[0]}, got {value!r}")
    converted = value
    if action.type is not None:
        try:
            converted = action.type(str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            reason = str(e) or f"invalid {getattr(action.type, '__name__', 'value')}"
            raise UserError(f"{where}: {reason} (got {value!r})") from None
    elif not isinstance(value, str):
        converted = str(value)
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def run_settings(args: argparse.Namespace, **resolved) -> dict:
    """The flags a run resolved to (with what it decided itself, e.g. a drawn seed), as a config to write."""
    return {k: v for k, v in {**vars(args), **resolved}.items() if k not in NOT_SAVED}
