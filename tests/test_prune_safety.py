"""prune's data-safety rules from review 5: special files and dangling image links are never
planned, the plan says what it judged against, the picker takes ASCII numbers only, and a
root that vanishes before the delete is a one-line error."""

from __future__ import annotations

from vggtctl.cli import render


def test_picker_asks_again_on_unicode_digits(make_tree, cli_app, runner, monkeypatch) -> None:
    monkeypatch.setattr(render, "is_interactive", lambda: True)
    tree = make_tree({"a.jpg": "orphan", "b.jpg": "valid"})
    orphan = tree.root / "a.jpg.vggt_cache.pt"
    # '²' and '١' are str.isdigit() but not a number we offer: asked again, then cancelled
    result = runner.invoke(cli_app, ["prune", str(tree.root)], input="\u00b2\n\u0661\n\n")
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.count("Not understood") == 2
    assert "Nothing chosen; nothing deleted." in result.stderr
    assert orphan.exists()
