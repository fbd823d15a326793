"""`prune`: the plan, exact deletions per category, refusals, and the safety rules."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
import treebuilder as tb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vggtctl import audit, manifest, prune
from vggtctl.cli import render
from vggtctl.errors import ConfigError
from vggtctl.sidecar import Expectation, Verdict


def _files(root: Path) -> set[str]:
    """Every file and link under root (links not followed), the manifest's own files excepted."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".vggtctl"]
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            if not name.startswith("vggt_cache_manifest.json"):
                found.add(os.path.join(folder, name))
    return found


# --------------------------------------------------------------------------- library


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("1w2d", 9 * 86400), ("90s", 90), ("0s", 0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert prune.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "d", "3x", "", "-1d", "1d 2q"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        prune.parse_duration(text)


def test_plan_per_category_and_freed_bytes(make_tree) -> None:
    tree = make_tree(tb.EVERY_KIND)
    report = audit.audit(tree.root, tb.expectation())
    plan = prune.plan_prune(report, ["orphans", "corrupt", "temp"])
    wanted = tree.paths(Verdict.ORPHAN, Verdict.CORRUPT, Verdict.TEMP)
    assert {t.path for t in plan.files} == wanted
    assert plan.freed_bytes == sum(os.path.getsize(p) for p in wanted)
    assert [(c.name, c.files) for c in plan.categories] == [("orphans", 1), ("corrupt", 1), ("temp", 1)]
    assert _files(tree.root) >= wanted  # planning deletes nothing
    with pytest.raises(dataclasses.FrozenInstanceError):  # the plan is frozen
        plan.files = ()  # type: ignore[misc]


def test_model_changed_covers_every_settings_mismatch(make_tree) -> None:
    tree = make_tree(tb.EVERY_KIND)
    plan = prune.plan_prune(audit.audit(tree.root, tb.expectation()), ["model-changed"])
    assert {t.path for t in plan.files} == tree.paths(
        Verdict.MODEL_MISMATCH, Verdict.PREPROCESS_MISMATCH, Verdict.CONTEXT_MISMATCH
    )


def test_recent_temp_files_are_kept_unless_older_than_given(make_tree) -> None:
    tree = make_tree({"a.jpg": "temp", "b.jpg": "valid"})
    fresh = tb.temp_name(tree.root / "b.jpg", pid=7, token="ab01cd23")
    fresh.write_bytes(b"being written")
    report = audit.audit(tree.root, None)
    plan = prune.plan_prune(report, ["temp"])
    assert {t.path for t in plan.files} == tree.paths(Verdict.TEMP) and plan.kept_recent_temps == 1
    everything = prune.plan_prune(report, ["temp"], older_than=0)
    assert {t.path for t in everything.files} == tree.paths(Verdict.TEMP) | {str(fresh)}


def test_older_than_filters_by_mtime(make_tree) -> None:
    tree = make_tree({"old.jpg": "orphan", "new.jpg": "orphan"})
    old = str(tree.root / "old.jpg.vggt_cache.pt")
    tb.age(Path(old), 40 * 86400)
    plan = prune.plan_prune(audit.audit(tree.root, None), ["orphans"], older_than=prune.parse_duration("30d"))
    assert [t.path for t in plan.files] == [old]


def test_execute_skips_files_changed_since_the_scan(make_tree) -> None:
    tree = make_tree({"a.jpg": "stale", "b.jpg": "orphan", "c.jpg": "corrupt"})
    plan = prune.plan_prune(audit.audit(tree.root, None), ["stale", "orphans", "corrupt"])
    tb.write_sidecar(tree.root / "a.jpg")  # recomputed meanwhile: now valid, must survive
    tb.write_image(tree.root / "b.jpg")  # the orphan's image came back
    result = prune.execute(plan)
    assert result.deleted == 1 and not result.failed
    assert {p for p, _ in result.skipped} == tree.paths(Verdict.STALE, Verdict.ORPHAN)
    assert os.path.exists(tree.root / "a.jpg.vggt_cache.pt")
    assert os.path.exists(tree.root / "b.jpg.vggt_cache.pt")
    entry = manifest.load(tree.root).prunes[-1]
    assert entry["files"] == 1 and entry["categories"] == ["stale", "orphans", "corrupt"]


def test_execute_refuses_paths_outside_root_and_foreign_names(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside.jpg.vggt_cache.pt"
    foreign = root / "notes.txt"
    root.mkdir()
    outside.write_bytes(b"x")
    foreign.write_bytes(b"x")
    inner = root / "real.jpg.vggt_cache.pt"
    inner.write_bytes(b"x")
    swapped = root / "swapped.jpg.vggt_cache.pt"  # a link put in a sidecar's place after the scan
    swapped.symlink_to(inner.name)
    targets = (
        prune.PruneTarget(str(outside), Verdict.CORRUPT, "corrupt", 1),
        prune.PruneTarget(str(root / ".." / "outside.jpg.vggt_cache.pt"), Verdict.CORRUPT, "corrupt", 1),
        prune.PruneTarget(str(foreign), Verdict.CORRUPT, "corrupt", 1),
        prune.PruneTarget(str(swapped), Verdict.CORRUPT, "corrupt", 1),
    )
    plan = prune.PrunePlan(str(root), (prune.CategoryTotal("corrupt", 4, 4),), targets)
    result = prune.execute(plan, record=False)
    assert result.deleted == 0 and len(result.failed) == 4
    assert all(reason.startswith("refused") for _, reason in result.failed)
    assert outside.exists() and foreign.exists() and swapped.is_symlink() and inner.exists()


# --------------------------------------------------------------------------- CLI


def test_cli_deletes_exactly_the_chosen_categories(make_tree, cli_app, runner, checkpoint) -> None:
    tree = make_tree(tb.EVERY_KIND)
    before = _files(tree.root)
    result = runner.invoke(
        cli_app,
        [
            "prune",
            str(tree.root),
            "--model-changed",
            "--stale",
            "--vggt-model",
            str(checkpoint),
            "-y",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    expected = tree.expected_for("model")
    gone = {
        p
        for p, v in expected.items()
        if v in (Verdict.MODEL_MISMATCH, Verdict.CONTEXT_MISMATCH, Verdict.STALE)
    }
    assert {f["path"] for f in doc["plan"]["files"]} == gone
    assert doc["result"]["deleted"] == len(gone)
    assert doc["result"]["freed_bytes"] == doc["plan"]["freed_bytes"]
    assert _files(tree.root) == before - gone
    assert manifest.load(tree.root).prunes[-1]["files"] == len(gone)


@pytest.mark.parametrize("flag", ["--orphans", "--stale", "--corrupt", "--legacy", "--temp"])
def test_cli_single_category(make_tree, cli_app, runner, flag: str) -> None:
    tree = make_tree(tb.EVERY_KIND)
    verdict = {
        "--orphans": Verdict.ORPHAN,
        "--stale": Verdict.STALE,
        "--corrupt": Verdict.CORRUPT,
        "--legacy": Verdict.LEGACY,
        "--temp": Verdict.TEMP,
    }[flag]
    before = _files(tree.root)
    result = runner.invoke(cli_app, ["prune", str(tree.root), flag, "--yes"])
    assert result.exit_code == 0, result.output
    assert _files(tree.root) == before - tree.paths(verdict)
    assert "Deleted 1 file," in result.stdout


def test_cli_all_invalid_leaves_only_valid_sidecars(make_tree, cli_app, runner) -> None:
    tree = make_tree(tb.EVERY_KIND)
    manifest.record_run(tree.root, {"rate": 1.0}, tb.FEATURE_KEY)
    before = _files(tree.root)
    result = runner.invoke(cli_app, ["prune", str(tree.root), "--all-invalid", "--yes"])
    assert result.exit_code == 0, result.output
    assert _files(tree.root) == before - set(tree.problems())


def test_cli_dry_run_deletes_nothing(make_tree, cli_app, runner) -> None:
    tree = make_tree(tb.EVERY_KIND)
    before = _files(tree.root)
    result = runner.invoke(cli_app, ["prune", str(tree.root), "--all-invalid", "--dry-run", "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is True and doc["result"] is None
    no_model_problems = {p for p, v in tree.expected_for("none").items() if v is not Verdict.VALID}
    assert {f["path"] for f in doc["plan"]["files"]} == no_model_problems
    assert _files(tree.root) == before


def test_cli_refusals_without_a_terminal(make_tree, cli_app, runner) -> None:
    tree = make_tree(tb.EVERY_KIND)
    before = _files(tree.root)
    no_yes = runner.invoke(cli_app, ["prune", str(tree.root), "--orphans"])
    assert no_yes.exit_code == 2 and "--yes" in no_yes.stderr and "--dry-run" in no_yes.stderr
    no_category = runner.invoke(cli_app, ["prune", str(tree.root), "--yes"])
    assert no_category.exit_code == 2
    for flag in (
        "--model-changed",
        "--orphans",
        "--stale",
        "--corrupt",
        "--legacy",
        "--temp",
        "--all-invalid",
    ):
        assert flag in no_category.stderr
    no_model = runner.invoke(cli_app, ["prune", str(tree.root), "--model-changed", "--yes"])
    assert no_model.exit_code == 2 and "--vggt-model" in no_model.stderr
    bad_age = runner.invoke(cli_app, ["prune", str(tree.root), "--orphans", "--older-than", "30", "-y"])
    assert bad_age.exit_code == 2 and "--older-than" in bad_age.stderr
    assert _files(tree.root) == before
    assert no_yes.stdout == no_category.stdout == ""


def test_cli_data_root_from_toml_in_working_folder(make_tree, cli_app, runner, tmp_path, monkeypatch) -> None:
    tree = make_tree({"a.jpg": "orphan"})
    work = tmp_path / "work"
    work.mkdir()
    (work / "vggtctl.toml").write_text(f"data_root = {json.dumps(str(tree.root))}\n")
    monkeypatch.chdir(work)
    result = runner.invoke(cli_app, ["prune", "--orphans", "-y"])
    assert result.exit_code == 0, result.output
    assert not tree.paths(Verdict.ORPHAN) & _files(tree.root)


def test_cli_interactive_confirm_and_decline(make_tree, cli_app, runner, monkeypatch) -> None:
    monkeypatch.setattr(render, "is_interactive", lambda: True)
    tree = make_tree(tb.EVERY_KIND)
    before = _files(tree.root)
    declined = runner.invoke(cli_app, ["prune", str(tree.root), "--corrupt"], input="\n")
    assert declined.exit_code == 0 and _files(tree.root) == before
    assert "nothing deleted" in declined.stderr
    accepted = runner.invoke(cli_app, ["prune", str(tree.root), "--corrupt"], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert _files(tree.root) == before - tree.paths(Verdict.CORRUPT)


def test_cli_interactive_category_choice(make_tree, cli_app, runner, monkeypatch) -> None:
    monkeypatch.setattr(render, "is_interactive", lambda: True)
    tree = make_tree({"a.jpg": "orphan", "b.jpg": "legacy", "c.jpg": "valid"})
    before = _files(tree.root)
    # Offered in order: orphans (1), legacy (2). A wrong answer is asked again.
    result = runner.invoke(cli_app, ["prune", str(tree.root)], input="9\nlegacy\ny\n")
    assert result.exit_code == 0, result.output
    assert "--orphans" in result.stderr and "--legacy" in result.stderr
    assert _files(tree.root) == before - tree.paths(Verdict.LEGACY)


def test_cli_deletion_errors_are_per_file_and_exit_3(make_tree, cli_app, runner, monkeypatch) -> None:
    tree = make_tree({"a.jpg": "corrupt", "b.jpg": "corrupt", "c.jpg": "corrupt"})
    stuck = str(tree.root / "b.jpg.vggt_cache.pt")
    real_unlink = os.unlink

    def flaky_unlink(path, *, dir_fd=None):
        if os.fspath(path) in (stuck, os.path.basename(stuck)):
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(prune.os, "unlink", flaky_unlink)
    result = runner.invoke(cli_app, ["prune", str(tree.root), "--corrupt", "-y"])
    assert result.exit_code == 3
    assert "b.jpg.vggt_cache.pt" in result.stderr and "Permission denied" in result.stderr
    assert _files(tree.root) & tree.paths(Verdict.CORRUPT) == {stuck}


def test_installed_executable_prune(make_tree, vggtctl_exe) -> None:
    tree = make_tree({"a.jpg": "orphan", "b.jpg": "temp", "c.jpg": "valid"})
    before = _files(tree.root)
    refused = vggtctl_exe("prune", str(tree.root), "--orphans")
    assert refused.returncode == 2 and _files(tree.root) == before
    done = vggtctl_exe("prune", str(tree.root), "--orphans", "--temp", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["result"]["deleted"] == 2
    assert _files(tree.root) == before - tree.paths(Verdict.ORPHAN, Verdict.TEMP)


# --------------------------------------------------------------------------- safety


def _hostile_tree(base: Path) -> tuple[Path, set[str], set[str]]:
    """A root with symlinks out of it and look-alike names. Returns (root, to_delete, outside)."""
    root, outside = base / "root", base / "outside"
    tree = tb.make_tree(
        root, {"ep/a.jpg": "corrupt", "ep/b.jpg": "orphan", "ep/c.jpg": "valid", "d.jpg": "temp"}
    )
    out_tree = tb.make_tree(outside, {"o1.jpg": "corrupt", "o2.jpg": "orphan", "o3.jpg": "temp"})
    os.symlink(outside, root / "linked")  # folder symlink inside root pointing outside
    os.symlink(outside, root / "ep" / "z.vggt_cache.pt")  # a folder link named like a sidecar
    os.symlink(outside / "o1.jpg.vggt_cache.pt", root / "ep" / "y.jpg.vggt_cache.pt")  # file link
    for name in (
        "x.vggt_cache.pt.bak",
        "x.vggt_cache.pt2",
        "vggt_cache.pt",
        ".vggt_cache.pt",
        "x.jpg.vggt_cache.pt.tmp-1",
    ):
        (root / "ep" / name).write_bytes(b"look-alike")
    (root / "ep" / "f.vggt_cache.pt").mkdir()
    (root / "ep" / "f.vggt_cache.pt" / "inner.jpg.vggt_cache.pt.bak").write_bytes(b"x")
    outside_files = _files(outside)
    assert out_tree.expected
    return root, set(tree.problems()), outside_files


def test_prune_never_leaves_root_or_touches_look_alikes(tmp_path: Path, cli_app, runner) -> None:
    root, to_delete, outside_files = _hostile_tree(tmp_path)
    before = _files(root)
    result = runner.invoke(cli_app, ["prune", str(root), "--all-invalid", "-y", "--json"])
    doc = json.loads(result.stdout)
    # Links named like sidecars are judged (corrupt: never followed) and left out of the plan,
    # listed as left to the user: not a failure of every prune of this root (execute would
    # refuse them too, should one be swapped in after the scan). They and their targets stay.
    links = {str(root / "ep" / "y.jpg.vggt_cache.pt"), str(root / "ep" / "z.vggt_cache.pt")}
    assert result.exit_code == 0, result.output
    assert set(doc["plan"]["links_left"]) == links and doc["result"]["failed"] == []
    assert _files(root) == before - to_delete
    assert _files(tmp_path / "outside") == outside_files


kinds = st.sampled_from(["valid", "stale", "orphan", "model-mismatch", "legacy", "corrupt", "temp", "none"])
look_alikes = st.sampled_from(
    ["x.vggt_cache.pt.bak", "x.vggt_cache.pt2", "vggt_cache.pt", "y.vggt_cache.pt/"]
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=st.lists(st.tuples(st.sampled_from(["", "a", "a/b", "c"]), kinds), min_size=1, max_size=7),
    extras=st.lists(st.tuples(st.sampled_from(["", "a", "c"]), look_alikes), max_size=3),
    link_in=st.sampled_from([None, "", "a"]),
    chosen=st.sets(st.sampled_from(list(prune.CATEGORIES)), min_size=1),
)
def test_property_prune_deletes_exactly_the_selected_files(entries, extras, link_in, chosen) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "root"
        spec = {os.path.join(folder, f"img{i}.jpg"): kind for i, (folder, kind) in enumerate(entries)}
        tree = tb.make_tree(root, spec)
        for folder, name in extras:
            target = root / folder / name.rstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith("/"):
                target.mkdir(exist_ok=True)
            else:
                target.write_bytes(b"look-alike")
        outside = tb.make_tree(base / "outside", {"o.jpg": "corrupt", "p.jpg": "orphan", "q.jpg": "temp"})
        outside_before = _files(outside.root)
        if link_in is not None:
            (root / link_in).mkdir(parents=True, exist_ok=True)
            os.symlink(outside.root, root / link_in / "escape")
        before = _files(root)

        expect = Expectation(model_fingerprint=tb.CURRENT_FINGERPRINT)
        plan = prune.plan_prune(audit.audit(root, expect, workers=2), sorted(chosen))
        result = prune.execute(plan, record=False)

        selected = set().union(*(prune.CATEGORIES[c] for c in chosen))
        truth = tree.expected_for("model")
        expected_gone = {p for p, v in truth.items() if v in selected}
        assert {t.path for t in plan.files} == expected_gone
        assert result.deleted == len(expected_gone) and not result.failed and not result.skipped
        assert _files(root) == before - expected_gone
        assert _files(outside.root) == outside_before


def test_status_counts_the_orphans_prune_orphans_removes(tmp_path: Path) -> None:
    """A damaged sidecar whose image is gone is an orphan for both; a sidecar next to a file the
    scan does not count as an image (readme.txt) is an orphan for neither."""
    from typer.testing import CliRunner

    from vggtctl.cli.app import app

    gone = tb.write_sidecar(tb.write_image(tmp_path / "ep" / "a.jpg"))
    tb.truncate(gone)
    (tmp_path / "ep" / "a.jpg").unlink()
    tb.write_sidecar(tb.write_image(tmp_path / "ep" / "b.jpg"))
    (tmp_path / "ep" / "readme.txt").write_text("notes")
    (tmp_path / "ep" / "readme.txt.vggt_cache.pt").write_bytes(
        (tmp_path / "ep" / "b.jpg.vggt_cache.pt").read_bytes()
    )
    status = json.loads(CliRunner().invoke(app, ["status", str(tmp_path), "--json"]).stdout)
    assert status["totals"]["orphans"] == 1
    result = CliRunner().invoke(app, ["prune", str(tmp_path), "--orphans", "--dry-run", "--json"])
    plan = json.loads(result.stdout)["plan"]
    assert [f["path"] for f in plan["files"]] == [str(gone)]


def test_a_link_named_like_a_sidecar_is_left_and_said_so_not_a_failure(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vggtctl.cli.app import app

    real = tb.write_sidecar(tb.write_image(tmp_path / "ep" / "a.jpg"))
    link = tmp_path / "ep" / "gone.jpg.vggt_cache.pt"  # its image does not exist: an orphan
    link.symlink_to(real.name)
    status = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert "1 of them are symbolic links, which vggtctl never deletes" in status.stdout
    result = CliRunner().invoke(app, ["prune", str(tmp_path), "--orphans", "--yes"])
    assert result.exit_code == 0, result.output
    assert "Left 1 symbolic link named like sidecars (e.g. ep/gone.jpg.vggt_cache.pt)" in result.stdout
    assert link.is_symlink() and real.is_file()
    doc = json.loads(
        CliRunner().invoke(app, ["prune", str(tmp_path), "--orphans", "--dry-run", "--json"]).stdout
    )
    assert doc["plan"]["links_left"] == [str(link)] and doc["plan"]["file_count"] == 0
