"""Command-line handling shared by the pipeline scripts (nanoGPT-style overrides).

Each script keeps its constants in a dict at the top. They are overridden, in order, by
  1. `--config path.json`: a JSON file; the section named after the script (e.g. "sftqg") is used,
     or the whole file when it has no such section;
  2. `--KEY=value` / `--key value` for any constant (case-insensitive; values parsed as Python
     literals, else kept as strings);
  3. the original single-dash flags (`-pid -total_num -docs_path -data_name -model_sufix
     -model_name -num_q`), which each script declares itself.
"""
import argparse
import ast
import logging
import os

from file_io import read_json

log = logging.getLogger(__name__)

SCRIPTS = {"sftqg", "qg_vllm", "sftid", "title_vllm", "genir"}


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(script, constants, flags=(), argv=None, description=None):
    """Apply overrides to `constants` (a dict, updated in place); return the parsed single-dash flags.

    `flags` are (name, type, default) tuples for the script's original single-dash flags.
    """
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="JSON file of constant overrides")
    for name, typ, default in flags:
        parser.add_argument(f"-{name}", type=typ, default=default)
    args, rest = parser.parse_known_args(argv)
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
        _apply(constants, section, args.config)
    _apply(constants, _key_values(rest), "command line")
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
            key, value = item[2:], "True"
        out[key] = _parse_value(value)
        i += 1
    return out


def _apply(constants, overrides, source):
    by_lower = {k.lower(): k for k in constants}
    for key, value in overrides.items():
        name = by_lower.get(key.lower())
        if name is None:
            raise SystemExit(f"{source}: unknown setting '{key}'; known: {', '.join(sorted(constants))}")
        constants[name] = value
        log.debug("%s: %s = %r", source, name, value)


def setup_logging(rank=0):
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [%(name)s{'' if rank == 0 else f' r{rank}'}] %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def env_rank():
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
