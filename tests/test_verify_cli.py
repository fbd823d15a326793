"""`vggtctl verify`: exact counts in --json, exit codes, plain output, the installed executable."""

from __future__ import annotations

import json
import os

import pytest
import treebuilder as tb
from precompute_trees import cached_episode

from vggtctl import manifest
from vggtctl.sidecar import Verdict


def _counts(doc: dict) -> dict[str, int]:
    return {v: d["count"] for v, d in doc["verdicts"].items() if d["count"]}


def _expected_counts(expected: dict[str, Verdict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for verdict in expected.values():
        counts[verdict.value] = counts.get(verdict.value, 0) + 1
    return counts


@pytest.mark.parametrize("check", ["key", "model", "none"])
def test_json_counts_and_problems_exact(make_tree, cli_app, runner, checkpoint, check: str) -> None:
    tree = make_tree(tb.EVERY_KIND)
    args = ["verify", str(tree.root), "--json"]
    if check == "key":
        manifest.record_run(tree.root, {"rate": 2.0}, tb.FEATURE_KEY)
    elif check == "model":
        args += ["--vggt-model", str(checkpoint)]
    result = runner.invoke(cli_app, args)
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    expected = tree.expected_for(check)
    assert _counts(doc) == _expected_counts(expected)
    problems = {p["path"]: p["verdict"] for p in doc["problems"]}
    assert problems == {p: v.value for p, v in expected.items() if v is not Verdict.VALID}
    assert all(p["reason"] for p in doc["problems"])
    for verdict, data in doc["verdicts"].items():
        paths = [p for p, v in expected.items() if v.value == verdict]
        assert data["bytes"] == sum(os.path.getsize(p) for p in paths)
        assert len(data["examples"]) == min(5, len(paths)) and set(data["examples"]) <= set(paths)
    assert doc["ok"] is False and doc["exit_code"] == 1
    assert doc["mode"] == "full"
    assert ("no model check" in doc["expectation"]) == (check == "none")


def test_all_valid_exits_zero(make_tree, cli_app, runner, checkpoint) -> None:
    tree = make_tree({"a/x.jpg": "valid", "b/y.png": "valid", "b/z.jpg": "none"})
    result = runner.invoke(cli_app, ["verify", str(tree.root), "--vggt-model", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert "All 2 sidecars are valid" in result.stdout


def test_ctrl_c_with_json_still_prints_one_document(make_tree, cli_app, runner, monkeypatch) -> None:
    from vggtctl.cli import audit_view

    tree = make_tree({"a/x.jpg": "valid"})

    def interrupted(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(audit_view, "run_audit", interrupted)
    result = runner.invoke(cli_app, ["verify", str(tree.root), "--json"])
    assert result.exit_code == 130
    assert json.loads(result.stdout) == {"interrupted": True, "exit_code": 130}


def test_the_all_valid_line_counts_in_words(make_tree, cli_app, runner) -> None:
    one = make_tree({"a/x.jpg": "valid", "a/y.jpg": "none"})
    assert "The one sidecar is valid." in runner.invoke(cli_app, ["verify", str(one.root)]).stdout
    os.unlink(one.root / "a" / "x.jpg.vggt_cache.pt")
    assert "No sidecars to check." in runner.invoke(cli_app, ["verify", str(one.root)]).stdout


@pytest.mark.parametrize("kind", ["legacy", "temp", "orphan"])
def test_legacy_temp_and_orphans_are_problems(make_tree, cli_app, runner, kind: str) -> None:
    tree = make_tree({"a.jpg": "valid", "b.jpg": kind})
    result = runner.invoke(cli_app, ["verify", str(tree.root), "--json"])
    assert result.exit_code == 1
    assert _counts(json.loads(result.stdout)) == {"valid": 1, kind: 1}


def test_quick_skips_tensor_check(make_tree, cli_app, runner) -> None:
    tree = make_tree({"a.jpg": "valid"})
    feats = tb.features()
    feats[0, 0] = float("nan")
    tb.write_sidecar(tree.root / "a.jpg", feats=feats)
    quick = runner.invoke(cli_app, ["verify", str(tree.root), "--quick", "--json"])
    full = runner.invoke(cli_app, ["verify", str(tree.root), "--json"])
    assert quick.exit_code == 0 and _counts(json.loads(quick.stdout)) == {"valid": 1}
    assert full.exit_code == 1 and _counts(json.loads(full.stdout)) == {"corrupt": 1}
    assert json.loads(quick.stdout)["mode"] == "header"


def test_human_output_is_plain_with_examples(make_tree, cli_app, runner, monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    tree = make_tree(tb.EVERY_KIND)
    result = runner.invoke(cli_app, ["verify", str(tree.root)])
    assert result.exit_code == 1
    assert "\x1b[" not in result.output
    for verdict in ("valid", "stale", "orphan", "corrupt", "legacy", "temp", "context-mismatch"):
        assert verdict in result.stdout
    assert "ep1/step_3_STOP.jpg.vggt_cache.pt" in result.stdout  # the orphan, as an example
    assert "no model check" in result.stdout


def test_data_root_from_environment(make_tree, cli_app, runner, monkeypatch) -> None:
    tree = make_tree({"a.jpg": "valid"})
    monkeypatch.setenv("VGGTCTL_DATA_ROOT", str(tree.root))
    result = runner.invoke(cli_app, ["verify", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["root"] == str(tree.root)


def test_usage_errors_exit_2(tmp_path, cli_app, runner) -> None:
    missing = runner.invoke(cli_app, ["verify", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a folder" in missing.stderr
    bad_model = runner.invoke(cli_app, ["verify", str(tmp_path), "--vggt-model", str(tmp_path / "none.pt")])
    assert bad_model.exit_code == 2 and "none.pt" in bad_model.stderr
    recompute = runner.invoke(cli_app, ["verify", str(tmp_path), "--recompute", "3"])
    assert recompute.exit_code == 2 and "--recompute" in recompute.stderr


def test_installed_executable_json_and_plain(make_tree, vggtctl_exe) -> None:
    tree = make_tree({"ep/a.jpg": "valid", "ep/b.jpg": "stale", "ep/c.jpg": "corrupt"})
    done = vggtctl_exe("verify", str(tree.root), "--json")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert _counts(doc) == {"valid": 1, "stale": 1, "corrupt": 1}
    assert "\x1b[" not in done.stdout + done.stderr


@pytest.mark.parametrize("command", ["status", "verify", "prune"])
def test_workers_from_the_environment_are_read_and_checked(tmp_path, monkeypatch, command) -> None:
    from typer.testing import CliRunner

    from vggtctl.cli.app import app

    tb.write_image(tmp_path / "a.jpg")
    monkeypatch.setenv("VGGTCTL_WORKERS", "abc")
    extra = ["--orphans", "--dry-run"] if command == "prune" else []
    result = CliRunner().invoke(app, [command, str(tmp_path), *extra])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: workers = 'abc' (env VGGTCTL_WORKERS): not a whole number"


# --------------------------------------------------------------------------- --recompute


def test_recompute_with_the_recorded_checkpoint_gone_names_the_manifest(
    tmp_path, cli_app, runner, monkeypatch
):
    """The model path came from the manifest, not from the user: the error says so and how to
    name the new place, before the long full read rather than after it."""
    from vggtctl.cli import audit_view

    tb.write_image(tmp_path / "a.jpg")
    gone = tmp_path / "models" / "v2"
    settings = {"vggt_model": str(gone), "layout": "plain", "preset": "janusvln"}
    manifest.record_run(tmp_path, {"kind": "precompute", "settings": settings}, tb.FEATURE_KEY)

    def no_audit(*_a, **_k):
        raise AssertionError("the model is resolved before the audit")

    monkeypatch.setattr(audit_view, "run_audit", no_audit)
    result = runner.invoke(cli_app, ["verify", str(tmp_path), "--recompute", "1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(gone) in lines[0] and "manifest" in lines[0] and "--vggt-model" in lines[0]


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
    """One episode of 3 steps cached by precompute with tiny-random (CPU, seconds)."""
    return cached_episode(tmp_path_factory.mktemp("remedy"))


def test_recompute_mismatch_names_the_sidecars_and_a_command_that_re_encodes_them(precomputed, cli_app):
    """A sidecar whose features differ passes the header check: prune keeps it and precompute
    skips it. The output names it and a precompute command; deleting it and running that
    command (as printed) re-encodes it, after which the recompute passes."""
    import shlex

    import torch
    from typer.testing import CliRunner

    from vggtctl import sidecar
    from vggtctl.cli.app import app

    victim = sorted(precomputed.glob("episode_*/*.vggt_cache.pt"))[1]
    stored = torch.load(victim, map_location="cpu", weights_only=True)
    altered = stored["features"].clone()
    altered[0] += 0.5
    sidecar.write(victim, altered, stored["meta"])

    result = CliRunner().invoke(cli_app, ["verify", str(precomputed), "--quick", "--recompute", "3"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    removes = [line for line in lines if line.strip().startswith("rm -- ")]
    assert len(removes) == 1 and shlex.split(removes[0])[2:] == [str(victim)]
    commands = [line.strip() for line in lines if line.strip().startswith("vggtctl precompute ")]
    assert len(commands) == 1
    assert any("--force" in line for line in lines)
    assert any("vggtctl prune" in line and "skips" in line for line in lines)
    as_json = CliRunner().invoke(
        cli_app, ["verify", str(precomputed), "--quick", "--recompute", "3", "--json"]
    )
    section = json.loads(as_json.stdout)["recompute"]
    assert [c["path"] for c in section["checks"] if not c["ok"]] == [str(victim)]
    assert section["reencode_after_deleting"] == commands[0]  # scripts get the same command

    # the remedy, as printed
    os.remove(victim)
    rerun = CliRunner().invoke(
        app, [*shlex.split(commands[0])[1:], "--device", "cpu", "--workers", "0", "--json"]
    )
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["encoded"] == 1
    checked = CliRunner().invoke(cli_app, ["verify", str(precomputed), "--recompute", "3", "--json"])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["recompute"]["mismatches"] == 0
