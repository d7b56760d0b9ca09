"""The CI script must run exactly the test command the README gives a new user."""

from __future__ import annotations

import re

from conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_readme_test_command() -> None:
    commands = _readme_commands()
    test_cmds = [c for c in commands if "pytest" in c]
    assert len(test_cmds) == 1, commands
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmds[0] in ci


def test_readme_main_job_uses_console_script() -> None:
    commands = _readme_commands()
    assert any(".venv/bin/rllsm " in c for c in commands)
