"""Command-line handling shared by the pipeline scripts (nanoGPT-style overrides).

Each script keeps its constants in a dict at the top. They are overridden, in order, by
  1. `--config path.json`: a JSON file; the section named after the script (e.g. "sftqg") is used,
     or the whole file when it has no such section;
  2. `--KEY=value` / `--key value` for any constant (case-insensitive);
  3. the original single-dash flags (`-pid -total_num -docs_path -data_name -model_sufix
     -model_name -num_q`), which each script declares itself.
Every value must have its default's type (nanoGPT's rule): an int where a float is expected is
fine, a list may be given as JSON / a Python literal or as a comma list (`--TASKS=A,B`), a
default of None takes any value. A mismatch stops the script before anything is read or written.
"""
import argparse
import ast
import dataclasses
import json
import logging
import os

from file_io import read_json

log = logging.getLogger(__name__)

SCRIPTS = {"sftqg", "qg_vllm", "sftid", "title_vllm", "genir"}


TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _literal(text):
    try:
        return json.loads(text)
    except ValueError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def coerce(key, value, default, source, text=False):
    """`value` as the type of `default`, or SystemExit naming the key, the value and the expected
    type. `text`: a command-line string, parsed (a config file's values are typed already, but a
    list may still be a comma list)."""
    text = text and isinstance(value, str)
    if default is None:
        return _literal(value) if text else value
    kind = type(default)
    if kind is bool:
        if text and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
        ok = isinstance(value, bool)
    elif kind in (int, float):
        if text:
            value = _literal(value.strip())
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        value = kind(value) if ok else value
    elif kind in (list, tuple):
        if isinstance(value, str):
            parsed = _literal(value) if value.strip()[:1] in "[(" else None
            value = list(parsed) if isinstance(parsed, (list, tuple)) else \
                [part.strip() for part in value.split(",") if part.strip()]
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    elif kind is dict:
        value = _literal(value) if text else value
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise SystemExit(f"{source}: {key}={value!r} is not a valid {kind.__name__} (default {default!r})")
    return value


def parse_args(script, constants, flags=(), argv=None, description=None):
    """Apply overrides to `constants` (a dict, updated in place); return the parsed single-dash flags.

    `flags` are (name, type, default) tuples for the script's original single-dash flags.
    """
    settings = "\n".join(f"  --{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in constants.items())
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"settings (defaults shown; --KEY=value, or a --config file):\n{settings}")
    parser.add_argument("--config", default=None, help="JSON file of constant overrides")
    for name, typ, default in flags:
        parser.add_argument(f"-{name}", type=typ, default=default)
    args, rest = parser.parse_known_args(argv)
    defaults = dict(constants)
    args.passthrough = (["--config", args.config] if args.config else []) + list(rest)
    if args.config:
        data = read_json(args.config)
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a JSON object (optionally with a '{script}' section)")
        if script in data:
            section = data[script]
        elif SCRIPTS & set(data):
            section = {}
        else:
            section = data
        _apply(constants, section, args.config, defaults)
    _apply(constants, _key_values(rest), "command line", defaults, text=True)
    return args


def _key_values(rest):
    out, i = {}, 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--"):
            raise SystemExit(f"unrecognised argument: {item}")
        if "=" in item:
            key, value = item[2:].split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = item[2:], rest[i + 1]
            i += 1
        else:
            key, value = item[2:], "true"
        out[key] = value
        i += 1
    return out


def _apply(constants, overrides, source, defaults, text=False):
    by_lower = {k.lower(): k for k in constants}
    for key, value in overrides.items():
        name = by_lower.get(key.lower())
        if name is None:
            raise SystemExit(f"{source}: unknown setting '{key}'; known: {', '.join(sorted(constants))}")
        constants[name] = coerce(name, value, defaults[name], source, text)
        log.debug("%s: %s = %r", source, name, value)


def check_choices(constants, choices, source="settings"):
    """SystemExit naming the key, the value and the allowed values when a constant of `choices`
    ({key: allowed values}) has another value; call it right after parse_args."""
    for key, allowed in choices.items():
        if constants[key] not in allowed:
            raise SystemExit(f"{source}: {key}={constants[key]!r} is not one of {', '.join(map(repr, allowed))}")


def check_positive_int_or_none(constants, key, source="settings"):
    """SystemExit unless constants[key] is None or a positive int (a default of None takes any value)."""
    value = constants[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SystemExit(f"{source}: {key}={value!r} is not None or a positive int")


def check_number_lists(constants, key, allowed, source="settings"):
    """SystemExit unless constants[key] maps names from `allowed` to non-empty lists of numbers."""
    for name, values in constants[key].items():
        if name not in allowed:
            raise SystemExit(f"{source}: {key} names {name!r}, not one of {', '.join(map(repr, allowed))}")
        if not isinstance(values, (list, tuple)) or not values or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise SystemExit(f"{source}: {key}[{name!r}]={values!r} is not a non-empty list of numbers")


def declared(cls, constants, **values):
    """A settings dataclass `cls` from a script's constants: each field from the constant of the same
    name in upper case, unless given in `values`. A field with no such constant is a programming
    error, named."""
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            fields[f.name] = values[f.name]
        elif f.name.upper() in constants:
            fields[f.name] = constants[f.name.upper()]
        else:
            raise KeyError(f"{cls.__name__}.{f.name}: no constant {f.name.upper()} and no value given")
    return cls(**fields)


def setup_logging(rank=0):
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [%(name)s{'' if rank == 0 else f' r{rank}'}] %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def env_rank():
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
