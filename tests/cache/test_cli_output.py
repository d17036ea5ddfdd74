"""`radio-cache` output read from a log (no terminal): whole lines, never wrapped at 80 columns."""

from typer.testing import CliRunner

from radio_distill.cli import cache_app


def test_info_and_verify_lines_are_whole_without_a_terminal(cli_store):
    path, _ = cli_store
    info = CliRunner().invoke(cache_app, ["info", str(path)])
    assert info.exit_code == 0, info.output
    [summary] = [s for s in info.stdout.splitlines() if " samples x " in s]
    assert summary.endswith("MB of shard files") and len(summary) > 80  # over 80 columns, unbroken
    assert any(line.startswith("samples: ok ") for line in info.stdout.splitlines())
    verify = CliRunner().invoke(cache_app, ["verify", str(path)])
    assert verify.exit_code == 0, verify.output
    [line] = [s for s in verify.stdout.splitlines() if s.startswith("ok: ")]
    assert line.endswith("arrays verified")
