"""prune's data-safety rules from review 5: special files and dangling image links are never
planned, the plan says what it judged against, the picker takes ASCII numbers only, and a
root that vanishes before the delete is a one-line error."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest
import treebuilder as tb

from vggtctl import prune
from vggtctl.cli import render
from vggtctl.sidecar import Verdict


def test_picker_asks_again_on_unicode_digits(make_tree, cli_app, runner, monkeypatch) -> None:
    monkeypatch.setattr(render, "is_interactive", lambda: True)
    tree = make_tree({"a.jpg": "orphan", "b.jpg": "valid"})
    orphan = tree.root / "a.jpg.vggt_cache.pt"
    # '²' and '١' are str.isdigit() but not a number we offer: asked again, then cancelled
    result = runner.invoke(cli_app, ["prune", str(tree.root)], input="\u00b2\n\u0661\n\n")
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.count("Not understood") == 2
    assert result.stderr.index("Checked against:") < result.stderr.index("Not understood")  # shown first
    assert "Nothing chosen; nothing deleted." in result.stderr
    assert orphan.exists()


def _cli(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from vggtctl.cli.app import app

    return CliRunner().invoke(app, list(args))


def _linked_tree(base: Path, count: int = 3) -> tuple[Path, Path, list[Path]]:
    """ROOT/ep/fN.jpg are symbolic links into base/raw (another mount, say); each has a valid
    sidecar, 40 days old."""
    raw, root = base / "raw", base / "train"
    sidecars = []
    for i in range(count):
        tb.write_image(raw / f"f{i}.jpg", i)
        (root / "ep").mkdir(parents=True, exist_ok=True)
        os.symlink(raw / f"f{i}.jpg", root / "ep" / f"f{i}.jpg")
        sidecar = tb.write_sidecar(root / "ep" / f"f{i}.jpg")
        tb.age(sidecar, 40 * 86400)
        sidecars.append(sidecar)
    return raw, root, sidecars


def test_sidecars_of_dangling_image_links_survive_every_prune(tmp_path: Path) -> None:
    raw, root, sidecars = _linked_tree(tmp_path)
    (tmp_path / "raw").rename(tmp_path / "unmounted")  # the source goes away: every link dangles
    result = _cli("prune", str(root), "--all-invalid", "--older-than", "30d", "--yes", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["plan"]["file_count"] == 0
    kept = doc["plan"]["image_unreachable_left"]
    assert sorted(k["path"] for k in kept) == sorted(str(p) for p in sidecars)
    assert {k["reason"] for k in kept} == {"image is a dangling symbolic link (its source unmounted?)"}
    assert all(p.is_file() for p in sidecars)

    shown = _cli("prune", str(root), "--orphans", "--dry-run")
    assert "Kept 3 sidecars whose image or a history frame cannot be reached" in shown.stdout
    assert "dangling symbolic link (its source unmounted?)" in shown.stdout

    status = _cli("status", str(root), "--json")
    totals = json.loads(status.stdout)["totals"]
    assert (totals["orphans"], totals["dangling"]) == (0, 3)
    plain = _cli("status", str(root))
    assert (
        "Dangling: 3 sidecars whose image is a dangling symbolic link (its source unmounted?)" in plain.stdout
    )
    assert "Orphans:" not in plain.stdout

    verify = _cli("verify", str(root), "--quick")
    assert verify.exit_code == 1  # not servable now: a finding, but not one prune acts on
    assert (
        "Kept by `vggtctl prune`: 3 sidecars whose image or a history frame is a dangling symbolic link"
        in verify.stdout
    )

    (tmp_path / "unmounted").rename(raw)  # remounted: valid again, nothing was lost
    again = json.loads(_cli("verify", str(root), "--quick", "--json").stdout)
    assert again["verdicts"]["valid"]["count"] == 3


def test_a_dangling_link_of_another_image_kind_keeps_its_sidecar_too(tmp_path: Path) -> None:
    """x.tif is not counted as an image by the scan; its sidecar's image is asked for directly."""
    from vggtctl import audit, prune

    raw = tb.write_image(tmp_path / "raw" / "x.jpg")
    root = tmp_path / "train"
    root.mkdir()
    os.symlink(tmp_path / "raw" / "gone.tif", root / "x.tif")
    sidecar = tb.write_sidecar(raw)
    os.replace(sidecar, root / "x.tif.vggt_cache.pt")
    report = audit.audit(root, None)
    plan = prune.plan_prune(report, list(prune.CATEGORIES), older_than=0)
    assert plan.files == ()
    assert [p for p, _ in plan.unreachable_left] == [str(root / "x.tif.vggt_cache.pt")]


def test_an_orphan_whose_image_comes_back_as_a_dangling_link_is_skipped(tmp_path: Path) -> None:
    from vggtctl import audit, prune

    image = tb.write_image(tmp_path / "ep" / "a.jpg")
    sidecar = tb.write_sidecar(image)
    image.unlink()  # a real orphan at scan time
    report = audit.audit(tmp_path, None)
    plan = prune.plan_prune(report, ["orphans"], older_than=0)
    assert [t.path for t in plan.files] == [str(sidecar)]
    os.symlink(tmp_path / "elsewhere" / "a.jpg", image)  # put back as a link whose source is down
    result = prune.execute(plan, record=False)
    assert result.deleted == 0 and [p for p, _ in result.skipped] == [str(sidecar)]
    assert sidecar.is_file()


def _special_files(folder: Path) -> list[Path]:
    """A FIFO (and a socket where the platform binds one) named like sidecars."""
    made = []
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = folder / "a.jpg.vggt_cache.pt"
    os.mkfifo(fifo)
    made.append(fifo)
    path = folder / "b.jpg.vggt_cache.pt"
    if hasattr(socket, "AF_UNIX") and len(os.fsencode(path)) < 100:
        server = socket.socket(socket.AF_UNIX)
        try:
            server.bind(str(path))
            made.append(path)
        except OSError:
            pass
        finally:
            server.close()  # the socket file stays
    return made


def test_special_files_named_like_sidecars_are_left_out_and_listed(tmp_path: Path, monkeypatch) -> None:
    from vggtctl import audit, sidecar

    short = Path(os.path.realpath(tmp_path))
    specials = _special_files(short)
    for p in specials:  # their images are there, so they are not orphans
        tb.write_image(short / p.name.removesuffix(".vggt_cache.pt"))

    # never open them (a FIFO would block the reader): what a reader would say does not matter here
    def refuse(path, *a, **k):  # type: ignore[no-untyped-def]
        return sidecar.Classification(os.fspath(path), sidecar.Verdict.CORRUPT, "not a regular file")

    monkeypatch.setattr(audit, "classify", refuse)
    for _ in range(2):  # every run, not only the first
        result = _cli("prune", str(short), "--all-invalid", "--yes", "--json")
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)["plan"]
        assert plan["file_count"] == 0
        assert plan["specials_left"] == sorted(str(p) for p in specials)
    shown = _cli("prune", str(short), "--corrupt", "--dry-run")
    assert (
        f"Left {len(specials)} special file{'' if len(specials) == 1 else 's'} (socket, FIFO or device) "
        "named like sidecars" in shown.stdout
    )
    assert all(p.exists() for p in specials)


def test_the_plan_says_what_valid_was_judged_against(make_tree) -> None:
    from vggtctl import manifest

    tree = make_tree({"a.jpg": "model-mismatch", "b.jpg": "valid"})
    manifest.record_run(tree.root, {"rate": 1.0}, tb.FEATURE_KEY)
    shown = _cli("prune", str(tree.root), "--model-changed", "--dry-run")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    checked = [i for i, line in enumerate(lines) if line.startswith("Checked against: ")]
    plan_at = next(i for i, line in enumerate(lines) if "Prune plan for" in line)
    assert checked and checked[0] < plan_at  # above the table
    assert tb.CURRENT_FINGERPRINT[:12] in lines[checked[0]]
    assert "test-model" in lines[checked[0]]

    doc = json.loads(_cli("prune", str(tree.root), "--model-changed", "--dry-run", "--json").stdout)
    assert tb.CURRENT_FINGERPRINT[:12] in doc["plan"]["expectation"]
    assert doc["plan"]["unreadable"] == []


def test_the_json_plan_lists_what_the_scan_could_not_read(tmp_path: Path) -> None:
    tb.write_sidecar(tb.write_image(tmp_path / "ep" / "a.jpg"))
    os.symlink("loop.jpg", tmp_path / "ep" / "loop.jpg")
    doc = json.loads(_cli("prune", str(tmp_path), "--orphans", "--dry-run", "--json").stdout)
    assert doc["plan"]["unreadable"] == [f"{tmp_path / 'ep' / 'loop.jpg'}: {os.strerror(errno.ELOOP)}"]


def test_a_root_gone_before_the_delete_is_one_line_not_a_traceback(make_tree, monkeypatch) -> None:
    from vggtctl import prune

    tree = make_tree({"a.jpg": "orphan"})
    real_plan = prune.plan_prune

    def plan_then_unmount(*args, **kwargs):  # type: ignore[no-untyped-def]
        plan = real_plan(*args, **kwargs)
        tree.root.rename(tree.root.with_name("moved"))
        return plan

    monkeypatch.setattr(prune, "plan_prune", plan_then_unmount)
    result = _cli("prune", str(tree.root), "--orphans", "--yes")
    assert result.exit_code == 3
    assert not isinstance(result.exception, OSError)
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert message == [
        f"error: {tree.root}: cannot open the data root to delete (No such file or directory); nothing deleted"
    ]


def test_a_folder_link_inside_the_root_is_never_entered(tmp_path: Path) -> None:
    """ROOT/link -> ROOT/real stays inside the root, so the realpath check lets it through; only
    opening each folder without following links (O_NOFOLLOW) refuses it, also when a folder is
    swapped for a link between the scan and the delete."""
    root = tmp_path / "data"
    victim = tb.write_sidecar(tb.write_image(root / "real" / "a.jpg"))
    (root / "real" / "a.jpg").unlink()  # an orphan: prune --orphans would delete it
    os.symlink("real", root / "link")
    st = victim.stat()
    target = prune.PruneTarget(
        str(root / "link" / victim.name),
        Verdict.ORPHAN,
        "orphans",
        st.st_size,
        "image is gone",
        (st.st_ino, st.st_size, st.st_mtime_ns),  # the real file's stamp: the re-check passes
    )
    plan = prune.PrunePlan(str(root), (prune.CategoryTotal("orphans", 1, st.st_size),), (target,))
    result = prune.execute(plan, record=False)
    assert victim.is_file() and result.deleted == 0
    assert [path for path, _ in result.failed] == [target.path]
    assert "'link' is not a real folder" in result.failed[0][1]
