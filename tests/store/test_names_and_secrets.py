"""Names and secrets: a harvest name follows the same directory-name rule as run and sweep names (one
definition, store.names), and no error sentence ever shows a storage-options value (they may be credentials)."""

from __future__ import annotations

import json

import pytest
import yaml

from store.config import load_config
from store.errors import UserError, run_cli

SECRET = "SEKRIT-never-shown-7f3a"


@pytest.mark.parametrize("name,ok", [("gpt2-l8", True), ("a.b_c=d+e", True), ("../../../tmp/x", False),
                                     ("..", False), (".hidden", False), ("a/b", False), ("", False),
                                     ("x y", False)])
def test_harvest_run_and_sweep_names_follow_one_rule(name, ok):
    from harvester.config import HarvestConfig
    from store.config import validate
    from trainer.config import SweepConfig, TrainConfig

    base = {"dataset": "d", "runs_root": "r", "tokens": 64, "sae": {"variant": "relu", "m": 8}}
    sweep = {"name": name, "base": base, "grid": {"sae.m": [8]}}
    verdicts = []
    for model, data in ((HarvestConfig, {"name": name}), (TrainConfig, {**base, "name": name}), (SweepConfig, sweep)):
        try:
            validate(model, data)
            verdicts.append(True)
        except UserError as err:
            assert "becomes a directory name" in str(err)
            verdicts.append(False)
    assert verdicts == [ok, ok, ok]


def test_harvest_name_cannot_leave_the_output_root(tmp_path, capsys):
    from harvester.__main__ import main

    cfg = tmp_path / "h.yaml"
    cfg.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "name": "../../../tmp/x"}))
    assert run_cli(main, ["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "name" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ['{"key": "AKIA-x", "secret": "' + SECRET + '", ', '["' + SECRET + '"]'])
def test_malformed_storage_options_are_not_echoed(text, capsys):
    from store.__main__ import main

    assert run_cli(main, ["ls", "s3://bucket/x", "--storage-options", text]) == 2
    err = capsys.readouterr().err
    assert "--storage-options" in err and SECRET not in err and "\n" not in err.strip()


def test_wrongly_typed_storage_options_are_not_echoed(tmp_path):
    from trainer.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"dataset": "d", "runs_root": "r", "name": "n", "tokens": 64,
                                    "sae": {"variant": "relu", "m": 8},
                                    "storage_options": SECRET}))
    with pytest.raises(UserError) as err:
        load_config(TrainConfig, path)
    assert "storage_options" in str(err.value) and SECRET not in str(err.value)


def test_an_error_quoting_an_option_value_is_redacted(capsys):
    """The safety net: whatever failure text reaches the command line, a registered option value in it is
    printed as <redacted> (an endpoint is shown, unless it carries a user:password@ part)."""
    from store.config import parse_storage_options

    parse_storage_options(json.dumps({"endpoint_url": "http://127.0.0.1:9", "key": "AKIA-x", "secret": SECRET}))

    def failing(argv):
        raise UserError(f"the server said: signature of {SECRET} does not match at http://127.0.0.1:9")

    assert run_cli(failing, []) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "<redacted>" in err and "http://127.0.0.1:9" in err


def test_verify_with_a_password_in_the_endpoint_shows_no_secret(capsys):
    from store.__main__ import main

    options = {"endpoint_url": f"http://user:{SECRET}@127.0.0.1:9", "key": "AKIA-x", "secret": SECRET}
    assert run_cli(main, ["verify", "s3://bucket/ds", "--storage-options", json.dumps(options)]) != 0
    captured = capsys.readouterr()
    assert SECRET not in captured.err + captured.out
