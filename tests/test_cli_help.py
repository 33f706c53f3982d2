"""The command line's help as a person meets it: examples and defaults everywhere, the log level
before or after the sub-command, consistent flag names."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from tools.cli import build_parser, main


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _commands(child, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_every_command_is_walked() -> None:
    names = {path for path, _ in COMMANDS}
    assert {("serve",), ("db", "migrate"), ("vehicles", "import"), ("alerts", "tail")} <= names


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_help_has_an_example(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    assert parser.prog == "jt808 " + " ".join(path)
    assert "examples:" in text
    examples = text.split("examples:", 1)[1]
    assert re.search(r"^\s+(\S+=\S+ )?(export \S+=\$\()?jt808 ", examples, re.MULTILINE), examples
    assert "--log-level" in text  # also after the sub-command


def test_help_is_printed_per_sub_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: jt808 db migrate")
    assert "--backend" in text
    assert "--json" not in text  # that is db status's


def test_serve_help_shows_defaults_and_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--host", "default 0.0.0.0"),
        ("--ack", "default durable"),
        ("--registration", "default open"),
        ("--workers", "default 1"),
        ("--port", "default 6808"),
    ]:
        assert re.search(re.escape(flag) + r" .*?" + re.escape(default), text), flag
    assert "$JT808_DSN" in text
    assert "JT808_* environment variables" in text


def test_defaults_are_shown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--terminals N terminals (default 10)" in text
    assert main(["alerts", "tail", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default http://127.0.0.1:9808" in text
    assert "Follow a node's live alert stream" in text  # a description, not only a usage line
    assert main(["alerts", "list", "--help"]) == 0
    assert "Alert history from the database" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("path", "columns"),
    [
        (["vehicles", "import"], ["plate", "phone", "unit", "category", "exempt", "max_speed_kmh"]),
        (["filings", "import"], ["plate", "start, end", "destination", "purpose", "filed_at"]),
        (["fences", "import"], ["geometry", "name", "kind", "unit", "start_time, end_time"]),
    ],
)
def test_imports_list_their_columns(
    path: list[str], columns: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*path, "--help"]) == 0
    text = capsys.readouterr().out
    for column in columns:
        assert re.search(rf"^\s+{re.escape(column)}\b", text, re.MULTILINE), column


def test_log_level_after_the_sub_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["decode", "--log-level", "WARNING", "7e7e"])
    assert args.log_level == "WARNING"
    args = parser.parse_args(["--log-level", "ERROR", "decode", "7e7e"])
    assert args.log_level == "ERROR"  # not reset by the sub-command's default
    args = parser.parse_args(["vehicles", "import", "f.csv", "--log-level", "DEBUG"])
    assert args.log_level == "DEBUG"
    assert parser.parse_args(["decode"]).log_level == "INFO"


def test_export_takes_csv_and_still_the_former_output_flag() -> None:
    parser = build_parser()
    common = ["export", "--from", "2026-10-01", "--to", "2026-10-02"]
    assert parser.parse_args([*common, "--csv", "a.csv"]).csv == "a.csv"
    assert parser.parse_args([*common, "--output", "b.csv"]).csv == "b.csv"
    assert parser.parse_args([*common, "-o", "c.csv"]).csv == "c.csv"
    assert parser.parse_args(common).csv is None
    (export,) = [p for path, p in COMMANDS if path == ("export",)]
    assert "--output" not in export.format_help()  # the former spelling is hidden


def test_alerts_list_takes_from_and_to_as_export_does() -> None:
    parser = build_parser()
    args = parser.parse_args(["alerts", "list", "--from", "2026-10-01", "--to", "2026-10-02"])
    assert (args.since.day, args.until.day) == (1, 2)
