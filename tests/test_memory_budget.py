"""One memory budget: the same flag, unit (MiB), parser and help on every command that has one; bad values are one line."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import pytest
from pydantic import ValidationError

from engines.errors import RllsmValueError
from engines.support import MEMORY_BUDGET_HELP, mib_to_bytes, parse_memory_budget
from streamer.cli import build_parser, main
from streamer.cli.options import memory_budget_arg


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _memory_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if any("memory" in s or "mem-" in s for s in a.option_strings)]


BUDGETED = sorted(name for name, p in _subcommands().items() if _memory_actions(p))
BAD = ["0", "-1", "-0.5", "12GB", "8 GiB", "nan", "inf", "1e30", ""]


def test_every_command_that_should_have_a_budget_has_it():
    assert {"serve", "reconstruct", "fuse", "replay", "bench"} <= set(BUDGETED)


@pytest.mark.parametrize("command", BUDGETED)
def test_one_flag_one_unit_one_parser(command):
    actions = _memory_actions(_subcommands()[command])
    visible = [a for a in actions if a.help != argparse.SUPPRESS]
    assert len(visible) == 1, [a.option_strings for a in visible]
    flag = visible[0]
    assert flag.option_strings == ["--memory-budget"]
    assert flag.type is memory_budget_arg and flag.help == MEMORY_BUDGET_HELP and "MiB" in flag.help
    assert flag.dest == "memory_budget" and flag.default is None  # None = auto
    for hidden in actions:  # a deprecated alias may exist, hidden, landing in the same place
        assert hidden.dest == "memory_budget"


@pytest.mark.parametrize("command", BUDGETED)
@pytest.mark.parametrize("bad", BAD)
def test_bad_budget_is_one_line_naming_flag_and_unit(command, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, f"--memory-budget={bad}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--memory-budget" in err and "MiB" in err, err


@pytest.mark.parametrize("command", BUDGETED)
def test_auto_and_numbers_parse_to_mib(command):
    p = _subcommands()[command]
    flag = _memory_actions(p)[0]
    assert flag.type("auto") is None and flag.type("AUTO") is None
    assert flag.type("8192") == 8192.0 and flag.type("0.5") == 0.5


@pytest.mark.parametrize("value", [0.25, 1, 4096.0, 2**24, 0, -3, math.nan, math.inf, 2**24 + 1])
def test_parser_and_configs_accept_the_same_budgets(value):
    """The CLI parser and every config field are one type: they accept and refuse the same values."""
    from engines.reconstruct import ReconstructParams
    from streamer.service import ServiceConfig

    try:
        parsed = parse_memory_budget(str(value))
    except RllsmValueError:
        parsed = None
    accepted = []
    for build in (lambda v: ReconstructParams(memory_budget_mib=v),
                  lambda v: ServiceConfig(recording="rec", memory_budget_mib=v)):
        try:
            build(value)
            accepted.append(True)
        except ValidationError:
            accepted.append(False)
    assert accepted == [parsed is not None] * 2
    if parsed is not None:
        assert parsed == float(value) and mib_to_bytes(parsed) == int(value * 2**20)


def test_service_budget_is_mib_end_to_end():
    """The service's stack refusal uses the configured MiB, and says the limit in MiB with the flag."""
    from streamer.decoding import make_work_check
    from streamer.service import memory_budget_bytes

    budget = memory_budget_bytes(64.0)
    assert budget == 64 * 2**20
    check = make_work_check("deskew", budget)
    assert check((8, 32, 32), None) is None
    msg = check((64, 512, 512), None)
    assert msg is not None and "64 MiB" in msg and "--memory-budget" in msg


def test_old_gb_spellings_convert_and_warn():
    from streamer.service import ServiceConfig

    with pytest.warns(FutureWarning, match="memory_budget_mib"):
        cfg = ServiceConfig(recording="rec", memory_budget_gb=2.0)
    assert cfg.memory_budget_mib == pytest.approx(2e9 / 2**20)
    sub = _subcommands()["serve"]
    with pytest.warns(FutureWarning, match="--memory-budget"):
        args = sub.parse_args(["--recording", "rec", "--memory-budget-gb", "2"])
    assert args.memory_budget == pytest.approx(2e9 / 2**20)


def test_command_line_error_is_one_line_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "streamer", "reconstruct", "in.tif", "out.tif", "--memory-budget",
                           "12GB"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--memory-budget" in lines[0] and "MiB" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("given", [64.0, None])
def test_build_stages_hands_the_budget_in_mib_to_the_chain(given, monkeypatch):
    """serve, replay --offline and the distributed replay build their chains here: the budget arrives in MiB."""
    from engines import reconstruct
    from engines.config import OpticsConfig
    from streamer.pipeline import build_stages, default_budget_mib

    seen = {}

    def chain(mode, optics, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(reconstruct, "stage_chain", chain)
    build_stages("classical", OpticsConfig(), device="cpu", memory_budget_mib=given)
    want = given if given is not None else default_budget_mib("cpu")
    assert seen["memory_budget_mib"] == pytest.approx(want, rel=0.2)  # the default follows the free RAM
    assert reconstruct.ReconstructParams(memory_budget_mib=seen["memory_budget_mib"]).memory_budget_mib == \
        seen["memory_budget_mib"]
