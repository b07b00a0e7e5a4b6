"""The `kdengine` command's surface: bare call prints help, every flag explains itself."""
from __future__ import annotations

import argparse
import subprocess
import sys

from kdengine.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and not (a.help and a.help.strip())]


def test_bare_command_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kdengine")
    for cmd in ("doctor", "build", "bench", "repro", "infer", "demo"):
        assert cmd in out


def test_bare_command_as_a_program():
    r = subprocess.run([sys.executable, "-m", "kdengine"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: kdengine" in r.stdout


def test_every_subcommand_and_flag_has_help_text():
    top = build_parser()
    subs = _subparsers(top)
    assert set(subs) >= {"doctor", "build", "bench", "repro", "infer", "demo"}
    sub_action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub_action._choices_actions}
    assert all(helps.get(name) for name in subs), helps
    missing = {name: _undocumented(p) for name, p in subs.items() if _undocumented(p)}
    assert not missing, f"flags without help text: {missing}"


def test_pass_through_subcommands_document_their_flags():
    """`repro` and `infer` parse their own arguments: their parsers explain every flag too."""
    from kdengine.infer import infer_parser
    from kdengine.repro import _parser as repro_parser

    for name, parser in (("infer", infer_parser()), ("repro", repro_parser())):
        assert not _undocumented(parser), f"kdengine {name}: flags without help text: {_undocumented(parser)}"
        assert parser.format_help().startswith(f"usage: kdengine {name}")


def test_pass_through_help_reaches_the_subcommand(capsys):
    import pytest

    for name in ("repro", "infer"):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: kdengine {name}")


def test_doctor_prints_one_table(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("op ")]
    assert len(header) == 1 and "backend" in header[0] and "why" in header[0]
    assert "C++ kernels:" in out
    # one row per (op, backend): the op names appear once each, in the first column
    assert out.count("kd_loss ") == 1


def _row_backend(out: str, op: str) -> str:
    """The backend column of ``op``'s cpu row in the doctor table."""
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(op + " "))
    for line in lines[i:]:
        if line.startswith(op + " ") or line.startswith(" "):
            cells = line[len(op):].split() if line.startswith(op + " ") else line.split()
            if cells and cells[0] == "cpu":
                return " ".join(cells[:2])
        else:
            break
    raise AssertionError(f"no cpu row for {op}")


def test_doctor_names_the_cpu_path_of_each_op(capsys):
    """The CPU's features, and for each op's cpu backend the instruction-set path it runs now,
    which follows the test knobs (so it is read from the library, not from /proc/cpuinfo)."""
    import pytest

    from kdengine import _dispatch, testing

    if not _dispatch.backend_availability("cpu", "cpu").available:
        pytest.skip("the C++ kernels are not built here")
    main(["doctor"])
    out = capsys.readouterr().out
    binary = testing.isa_in_use("binary")[1]
    floats = testing.isa_in_use("float")[1]
    assert f"binary ops {binary}" in out and f"float ops {floats}" in out
    assert _row_backend(out, "xnor_matmul") == f"cpu ({binary})"
    assert _row_backend(out, "kd_loss") == f"cpu ({floats})"
    with testing.float_isa(testing.ISA_PORTABLE), testing.binary_isa(testing.ISA_PORTABLE):
        main(["doctor"])
    out = capsys.readouterr().out
    assert _row_backend(out, "kd_loss") == "cpu (portable)"
    assert _row_backend(out, "if_multistep") == "cpu (portable)"
    assert _row_backend(out, "xnor_matmul") == "cpu (portable)"
    cpu_line = next(line for line in out.splitlines() if line.startswith("cpu: "))
    assert ("avx2" in cpu_line) == (testing.ISA_AVX2 in testing.float_isas())  # the CPU's features
