"""Typed overrides (config.py): a value must parse to its default's type, before anything runs."""
import dataclasses
import importlib
import os

import pytest

import config
from config import coerce, parse_args
from file_io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["sftqg", "qg_vllm", "sftid", "title_vllm", "genir"]


def test_command_line_values_take_their_defaults_types():
    constants = {"TASKS": ["a"], "EPOCHS": 5, "LR": 5e-5, "RERANK": True, "RUN": "x", "NUM_BEAMS": None}
    parse_args("genir", constants, argv=["--TASKS=PyDoc-Net", "--EPOCHS=3", "--LR=1", "--RERANK=false",
                                         "--RUN=123", "--NUM_BEAMS=20"])
    assert constants == {"TASKS": ["PyDoc-Net"], "EPOCHS": 3, "LR": 1.0, "RERANK": False, "RUN": "123",
                         "NUM_BEAMS": 20}
    assert isinstance(constants["LR"], float)
    parse_args("genir", constants, argv=["--TASKS=A, B", "--RERANK"])
    assert constants["TASKS"] == ["A", "B"] and constants["RERANK"] is True
    parse_args("genir", constants, argv=['--TASKS=["A","B,C"]'])
    assert constants["TASKS"] == ["A", "B,C"]


@pytest.mark.parametrize("argv, message", [
    (["--EPOCHS=five"], "EPOCHS='five' is not a valid int"),
    (["--EPOCHS=2.5"], "EPOCHS=2.5 is not a valid int"),
    (["--LR=fast"], "LR='fast' is not a valid float"),
    (["--RERANK=maybe"], "RERANK='maybe' is not a valid bool"),
])
def test_mismatched_command_line_values_are_refused(argv, message):
    constants = {"EPOCHS": 5, "LR": 5e-5, "RERANK": True}
    with pytest.raises(SystemExit, match=message):
        parse_args("genir", constants, argv=argv)


def test_config_file_values_are_checked_too(tmp_path):
    path = str(tmp_path / "c.json")
    write_json({"genir": {"EPOCHS": "5", "TASKS": "A,B"}}, path)
    with pytest.raises(SystemExit, match=f"{path}: EPOCHS='5' is not a valid int"):
        parse_args("genir", {"EPOCHS": 5, "TASKS": []}, argv=["--config", path])
    assert coerce("TASKS", "A,B", [], path) == ["A", "B"]
    assert coerce("K", 10, 100.0, path) == 10.0 and coerce("X", {"a": 1}, None, path) == {"a": 1}


def test_bad_value_stops_genir_before_any_model_is_loaded(tmp_path):
    import genir
    saved = dict(genir.C)
    try:
        with pytest.raises(SystemExit, match="EPOCHS='five' is not a valid int"):
            genir.main(["--BASE_MODEL=" + str(tmp_path / "no-such-model"), "--TASKS=PyDoc-Net", "--EPOCHS=five",
                        "--OUT_DIR=" + str(tmp_path / "out"), "--MODEL_DIR=" + str(tmp_path / "m")])
    finally:
        genir.C.clear()
        genir.C.update(saved)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("config", ["configs/demo.json", "configs/paper.json", "configs/smol.json"])
def test_shipped_configs_match_every_scripts_types(config):
    for script in SCRIPTS:
        module = importlib.import_module(script)
        parse_args(script, dict(module.C), argv=["--config", os.path.join(ROOT, config)])


def test_help_lists_the_settings_with_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args("genir", {"EPOCHS": 5, "TASKS": ["A"]}, argv=["--help"])
    out = capsys.readouterr().out
    assert "--EPOCHS=5" in out and '--TASKS=["A"]' in out


def test_declared_settings_come_from_the_constants_by_name():
    @dataclasses.dataclass
    class Settings:
        lr: float
        epochs: int
        seed: int

    s = config.declared(Settings, {"LR": 0.5, "EPOCHS": 3, "OTHER": 1}, seed=7)
    assert (s.lr, s.epochs, s.seed) == (0.5, 3, 7)
    with pytest.raises(KeyError, match="Settings.seed: no constant SEED"):
        config.declared(Settings, {"LR": 0.5, "EPOCHS": 3})


def test_a_switch_given_an_unknown_value_names_the_setting():
    config.check_choices({"MODE": "joint"}, {"MODE": ("released", "joint")})
    with pytest.raises(SystemExit, match="MODE='both' is not one of 'released', 'joint'"):
        config.check_choices({"MODE": "both"}, {"MODE": ("released", "joint")})
