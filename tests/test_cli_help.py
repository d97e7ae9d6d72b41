"""The front door speaks to users: ``dynsae --help`` lists every command with one line, and every
command's ``--help`` says what it does, reads and writes, with an example, in plain text."""

from __future__ import annotations

import re

import pytest

from dynsae.cli import COMMANDS, main

MARKUP = re.compile(r"``|:(mod|func|class|meth|data|attr):`")


def help_of(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_dynsae_help_lists_every_command_in_one_line_each(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert not MARKUP.search(text)
    listed = dict(re.findall(r"^  (\S+) +(.+)$", text, flags=re.M))
    assert listed == {name: cmd.summary for name, cmd in COMMANDS.items()}
    assert all(len(line) <= 110 for line in text.splitlines())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_says_what_it_reads_and_writes_with_an_example(capsys, name):
    text = help_of(capsys, [name, "--help"])
    assert not MARKUP.search(text), text
    assert text.startswith(f"usage: dynsae {name}")
    assert re.search(r"^reads: +\S", text, flags=re.M) and re.search(r"^writes: +\S", text, flags=re.M)
    assert re.search(rf"^example:\n  dynsae {name} \S", text, flags=re.M), text


def test_an_unknown_command_is_one_sentence(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'trian'") and err.count("\n") == 1
