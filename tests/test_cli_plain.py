"""Output off a terminal (a pipe, a log, CI): plain tables and one-line usage errors (DESIGN §7)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from vggtctl.cli.app import app

BOX_DRAWING = set("─│┃━┏┓┗┛┌┐└┘├┤┬┴┼╇╈╋╭╮╰╯═║")


def _tree(root: Path) -> None:
    for n in range(2):
        Image.new("RGB", (40, 30), (40 * n, 90, 160)).save(root / f"img{n}.jpg")
    (root / "gone.jpg.vggt_cache.pt").write_bytes(b"an orphan: its image is gone")


def test_tables_off_a_terminal_have_no_box_drawing(tmp_path):
    _tree(tmp_path)
    commands = [
        ["precompute", str(tmp_path), "--vggt-model", "tiny-random", "--device", "cpu", "--dry-run"],
        ["prune", str(tmp_path), "--orphans", "--dry-run"],
        ["verify", str(tmp_path), "--quick"],
    ]
    cached = tmp_path / "cached"
    cached.mkdir()
    Image.new("RGB", (40, 30), (200, 90, 10)).save(cached / "c.jpg")
    ran = CliRunner().invoke(
        app, ["precompute", str(cached), "--vggt-model", "tiny-random", "--device", "cpu"]
    )
    assert ran.exit_code == 0, ran.output
    commands += [["verify", str(cached), "--quick", "--recompute", "1"]]
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (0, 1), (args, result.output)
        assert result.stdout.strip(), args
        assert not BOX_DRAWING & set(result.stdout), (args, result.stdout)


def test_a_usage_error_is_one_line_naming_the_option(tmp_path):
    for args, named in (
        (["status", str(tmp_path), "--sort", "bogus"], "--sort"),
        (["verify", str(tmp_path), "--quik"], "--quik"),
        (["precompute", str(tmp_path), "--batch-size", "x"], "--batch-size"),
        (["train", "--nodes"], "--nodes"),  # raised without a Click context
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert named in result.stderr and "--help" in result.stderr
        assert not BOX_DRAWING & set(result.stderr)


def test_the_run_summary_says_which_layout_and_why(tmp_path):
    """`--layout auto` says what it picked and why, in a real run's summary too, not only in
    the --dry-run plan."""
    folder = tmp_path / "cam1"
    folder.mkdir()
    Image.new("RGB", (40, 30), (10, 90, 160)).save(folder / "a.jpg")
    args = ["precompute", str(tmp_path), "--vggt-model", "tiny-random", "--device", "cpu", "--workers", "0"]
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        layout = [line for line in result.stdout.splitlines() if line.startswith("layout")]
        assert len(layout) == 1 and "plain (" in layout[0], result.stdout
