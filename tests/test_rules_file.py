"""The rules file: rule settings and local sealing periods, typed errors for anything else."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from alerts.calendar import GMT8
from tools.cli import main
from tools.rules_db import RulesFileError, load_rules_file

GOOD = """
[rules.overspeed]
enabled = false

[[sealing]]
name = "provincial sealing order"
start = 2026-12-31T18:00:00+08:00
end = 2027-01-02T08:00:00
"""


def test_rules_and_sealing_periods_are_read(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(GOOD, encoding="utf-8")
    config, calendar = load_rules_file(path)
    assert not config.enabled("overspeed")
    assert config.enabled("holiday_sealing")
    # 2027-01-01 is a holiday anyway; the evening of a working 2026-12-31 is sealed locally
    assert calendar.is_sealed(datetime(2026, 12, 31, 19, 0, tzinfo=GMT8))
    assert not calendar.is_sealed(datetime(2026, 12, 31, 17, 0, tzinfo=GMT8))


@pytest.mark.parametrize(
    "text",
    [
        "[rules.no_such_rule]\nenabled = true\n",
        "[rules.overspeed]\nno_such_key = 1\n",
        "[elsewhere]\nx = 1\n",
        "[[sealing]]\nstart = 2026-01-02T00:00:00\nend = 2026-01-01T00:00:00\n",
        "[[sealing]]\nstart = 5\nend = 2026-01-01T00:00:00\n",
        "not toml",
    ],
)
def test_bad_rules_files_are_typed_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RulesFileError):
        load_rules_file(path)


def test_serve_refuses_a_bad_rules_file_with_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("[elsewhere]\n", encoding="utf-8")
    assert main(["serve", "--rules", "--rules-file", str(path), "--dsn", "postgresql://x"]) == 2
