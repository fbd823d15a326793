"""`vggtctl status` end to end: the JSON document and the table against trees with known
counts, through Typer's runner and through the installed executable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import scantree
import treebuilder as tb
import typer
from typer.testing import CliRunner

from vggtctl import manifest
from vggtctl.cli import status as status_cli


@pytest.fixture
def app() -> typer.Typer:
    """`status` alone on an app, so these tests do not depend on the other commands."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """Test root."""

    status_cli.register(app)
    return app


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return scantree.build(tmp_path / "data")


def status_json(app: typer.Typer, *args: str) -> dict:
    result = CliRunner().invoke(app, ["status", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rows_by_name(doc: dict) -> dict[str, dict]:
    return {row["name"]: row for row in doc["rows"]}


def test_rows_totals_and_footer_match_the_layout(app, tree: Path) -> None:
    doc = status_json(app, str(tree))
    rows = rows_by_name(doc)
    assert set(rows) == set(scantree.ROWS_DEPTH1)
    for name, expected in scantree.ROWS_DEPTH1.items():
        for key, value in expected.items():
            assert rows[name][key] == value, (name, key)
    assert rows["ep1"]["missing"] == 3 and rows["ep2"]["coverage"] == 0
    for key, value in scantree.TOTAL.items():
        assert doc["totals"][key] == value, key
    foot = doc["footer"]
    # 6 sidecars of 100 bytes: mean 100; 10 images at full coverage; 5 missing.
    assert foot["mean_sidecar_bytes"] == 100
    assert foot["projected_cache_bytes"] == 1000
    assert foot["remaining_cache_bytes"] == 500
    assert foot["todo_items"] == 5
    assert foot["free_bytes"] > 0 and foot["fs_total_bytes"] >= foot["free_bytes"]
    assert foot["rate_items_per_s"] is None and foot["eta_seconds"] is None
    assert doc["symlinked_dirs"] == [str(tree / "link_ep")]
    assert doc["unreadable"] == []
    assert "deep" not in doc


def test_root_row_only_when_files_lie_in_root(app, tree: Path) -> None:
    for name in ("top.jpg", "top.jpg" + scantree.SIDECAR):
        (tree / name).unlink()
    assert "." not in rows_by_name(status_json(app, str(tree)))
    assert list(rows_by_name(status_json(app, str(tree), "--depth", "0"))) == ["."]


def test_depths(app, tree: Path) -> None:
    flat = status_json(app, str(tree), "--depth", "0")
    assert [row["name"] for row in flat["rows"]] == ["."]
    assert flat["rows"][0]["images"] == 10 and flat["rows"][0]["cached"] == 5

    rows = rows_by_name(status_json(app, str(tree), "--depth", "2"))
    # ep3 is above depth 2 and holds no files: no row; ep1 and ep2 hold files directly.
    assert set(rows) == {".", "ep1", "ep1/sub", "ep2"}
    assert (rows["ep1"]["images"], rows["ep1"]["cached"], rows["ep1"]["orphans"]) == (5, 3, 1)
    assert (rows["ep1/sub"]["images"], rows["ep1/sub"]["cached"]) == (2, 1)


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        ("name", [".", "ep1", "ep2", "ep3"]),
        ("coverage", ["ep2", "ep1", ".", "ep3"]),  # 0%, 57%, then 100% and empty, by name
        ("missing", ["ep1", "ep2", ".", "ep3"]),  # 3, 2, 0, 0
        ("size", ["ep1", ".", "ep2", "ep3"]),  # 606, 110, 61, 0 bytes
    ],
)
def test_sort_and_top(app, tree: Path, sort: str, order: list[str]) -> None:
    doc = status_json(app, str(tree), "--sort", sort)
    assert [row["name"] for row in doc["rows"]] == order
    top = status_json(app, str(tree), "--sort", sort, "--top", "2")
    assert [row["name"] for row in top["rows"]] == order[:2]
    assert (top["rows_shown"], top["rows_total"]) == (2, 4)
    assert top["totals"]["images"] == scantree.TOTAL["images"]  # totals cover every row


def test_time_to_finish_uses_the_manifest_rate(app, tree: Path) -> None:
    manifest.record_run(tree, {"items": 50, "seconds": 10.0})  # 5 items/s
    foot = status_json(app, str(tree))["footer"]
    assert foot["rate_items_per_s"] == pytest.approx(5.0)
    assert foot["eta_seconds"] == pytest.approx(5 / 5.0)  # 5 missing images


def test_unreadable_folder_is_warned_about_and_makes_the_report_partial(app, tree: Path, monkeypatch) -> None:
    scantree.deny(monkeypatch, tree / "ep2")
    result = CliRunner().invoke(app, ["status", str(tree), "--json"])
    assert result.exit_code == 3  # the report is printed, but its counts miss a folder
    doc = json.loads(result.stdout)
    assert doc["unreadable"] == [f"{tree / 'ep2'}: Permission denied"]
    assert rows_by_name(doc)["ep1"]["images"] == 7
    assert f"warning: cannot read {tree / 'ep2'}: Permission denied" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sort", "bogus"], "bogus"),
        (["--vggt-model", "x"], "--vggt-model only applies with --deep"),
        (["--top", "0"], "--top"),
    ],
)
def test_bad_options_exit_2(app, tree: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["status", str(tree), *args])
    assert result.exit_code == 2
    assert message in result.output + result.stderr


def test_missing_root_exits_2(app, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "not a folder" in result.stderr


def test_deep_splits_cached_into_verdicts(app, make_tree, checkpoint: Path) -> None:
    tree = make_tree(tb.EVERY_KIND)
    doc = status_json(app, str(tree.root), "--deep", "--vggt-model", str(checkpoint))
    truth = tree.expected_for("model")  # --vggt-model checks the model fingerprint only
    assert doc["deep"]["verdicts"].keys() == {v.value for v in truth.values()}
    for verdict, count in Counter(truth.values()).items():
        assert doc["deep"]["verdicts"][verdict.value]["count"] == count, verdict
    per_row: dict[str, Counter] = {}
    for path, verdict in truth.items():
        rel = os.path.relpath(path, tree.root)
        row = rel.split(os.sep)[0] if os.sep in rel else "."
        per_row.setdefault(row, Counter())[verdict.value] += 1
    rows = rows_by_name(doc)
    assert {name: Counter(row["verdicts"]) for name, row in rows.items()} == per_row
    ep2 = rows["ep2"]
    assert ep2["valid_coverage"] == pytest.approx(per_row["ep2"]["valid"] / ep2["images"], abs=1e-6)
    valid = sum(1 for v in truth.values() if v.value == "valid")
    images = len(tree.images) + 1  # + the history frame of the context-mismatch item
    assert doc["totals"]["images"] == images
    assert doc["footer"]["todo_items"] == images - valid
    totals = doc["totals"]  # the same fields as a row, verdicts summed over every row
    summed: Counter = Counter()
    for row in rows.values():
        summed.update(row["verdicts"])
    assert totals["verdicts"] == dict(summed) and 0 <= totals["valid_coverage"] <= 1


def test_plain_table_for_pipes(app, tree: Path) -> None:
    result = CliRunner().invoke(app, ["status", str(tree)], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["folder", "images", "cached", "coverage"]
    ep1 = next(line for line in lines if line.startswith("ep1 "))
    assert ep1.split()[:5] == ["ep1", "7", "4", "57.1%", "3"]
    assert next(line for line in lines if line.startswith("total")).split()[:3] == ["total", "10", "5"]
    assert "\x1b[" not in result.stdout and "█" not in result.stdout
    assert any(line.startswith("Free space:") for line in lines)
    assert any("Temp debris: 1 file," in line for line in lines)


def test_plain_deep_header_names_one_column_per_word(app, tree: Path) -> None:
    result = CliRunner().invoke(app, ["status", str(tree), "--deep"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split()[:4] == ["folder", "images", "cached", "coverage(valid)"]


def test_a_folder_name_that_is_not_utf8_is_shown_with_its_bytes(app, tmp_path: Path) -> None:
    folder = tmp_path / os.fsdecode(b"ep_\xff")
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (folder / "a.jpg").write_bytes(b"x")
    result = CliRunner().invoke(app, ["status", str(tmp_path)], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "ep_\\xff" in result.stdout and "\ufffd" not in result.stdout


def test_installed_executable(tree: Path, vggtctl_exe) -> None:
    proc = vggtctl_exe("status", str(tree), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout holds the document and nothing else
    rows = rows_by_name(doc)
    for name, expected in scantree.ROWS_DEPTH1.items():
        for key, value in expected.items():
            assert rows[name][key] == value, (name, key)
    assert doc["totals"]["images"] == scantree.TOTAL["images"]

    table = vggtctl_exe("status", str(tree), "--sort", "missing", "--top", "1")
    assert table.returncode == 0, table.stderr
    first = table.stdout.splitlines()[1].split()
    assert first[:3] == ["ep1", "7", "4"]
    assert "Showing 1 of 4 rows" in table.stdout


def test_plain_status_never_imports_torch(tree: Path) -> None:
    """A listing of 10^7 files must not pay torch's import time: the status library, its CLI
    module and everything a non-deep report touches stay torch-free."""
    code = (
        "import sys\n"
        "from vggtctl.cli import render, status\n"
        "from vggtctl.status import build_status\n"
        f"report = build_status({str(tree)!r})\n"
        "status.footer_lines(report)\n"
        "assert report.total.images == 10\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("width", [200, 70])
def test_terminal_table_drops_columns_rather_than_cutting_numbers(
    tree: Path, monkeypatch, width: int
) -> None:
    import io

    from rich.console import Console

    from vggtctl.cli import render
    from vggtctl.status import build_status

    buffer = io.StringIO()
    monkeypatch.delenv("NO_COLOR", raising=False)
    terminal = Console(file=buffer, force_terminal=True, width=width, no_color=True, highlight=False)
    monkeypatch.setattr(render, "out", terminal)
    status_cli.show(build_status(tree))
    lines = re.sub(r"\x1b\[[0-9;]*m", "", buffer.getvalue()).splitlines()
    assert (
        max(len(line) for line in lines if not line.startswith(("(", "Cache", "Time", "Temp", "Orph")))
        <= width
    )
    ep1 = next(line for line in lines if line.lstrip().startswith("ep1 ")).split()
    assert ep1[:2] == ["ep1", "7"] and "57.1%" in ep1 and "3" in ep1  # images, coverage, missing intact
    assert not any("…" in line for line in lines)
    narrow_note = any(line.startswith("(narrow terminal:") for line in lines)
    assert narrow_note == (width < 100)


def test_piped_output_keeps_long_names_on_one_line(tmp_path) -> None:
    """Off a terminal (a pipe, a log file) nothing is wrapped or cut at 80 columns: a problem's
    path in verify's table stays whole, so it can be grepped and pasted."""
    import subprocess
    import sys

    import treebuilder as tb

    name = "episode_" + "x" * 150
    broken = tb.write_sidecar(tb.write_image(tmp_path / name / "a.jpg"))
    tb.truncate(broken)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    for command in (["status"], ["verify"]):
        done = subprocess.run(
            [sys.executable, "-m", "vggtctl", *command, str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode in (0, 1, 3), done.stderr
        assert any(name in line for line in done.stdout.splitlines()), done.stdout
        assert "…" not in done.stdout
    assert f"{name}/a.jpg.vggt_cache.pt" in done.stdout
