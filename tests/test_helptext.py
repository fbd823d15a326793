"""Command help: prose paragraphs reach the terminal as single lines (it wraps them), examples as
written, and the command list gets each help's first sentence."""

from __future__ import annotations

from vggtctl.cli.helptext import first_sentence, reflow


def test_prose_is_joined_and_examples_are_kept() -> None:
    text = """First line of
    the summary. Second sentence.

    A paragraph
    over two lines.

    Examples:

      vggtctl status /data
      vggtctl verify /data
    """
    assert reflow(text).split("\n\n") == [
        "First line of the summary. Second sentence.",
        "A paragraph over two lines.",
        "Examples:",
        "  vggtctl status /data\n  vggtctl verify /data",
    ]
    assert first_sentence(text) == "First line of the summary."
    assert first_sentence("One row per folder (e.g. each episode) and more") == (
        "One row per folder (e.g. each episode) and more"
    )


def test_every_command_help_has_no_hard_break_inside_a_paragraph() -> None:
    from vggtctl.cli.app import app

    assert app.registered_commands
    for info in app.registered_commands:
        for paragraph in (info.help or "").split("\n\n"):
            if not paragraph.startswith(" "):
                assert "\n" not in paragraph, (info.name, paragraph)
        assert info.short_help and "\n" not in info.short_help


def test_counts_take_the_right_number() -> None:
    from vggtctl.wording import count

    assert [count(n, "folder") for n in (0, 1, 2, 1000)] == [
        "0 folders",
        "1 folder",
        "2 folders",
        "1,000 folders",
    ]
    assert (
        count(3, "process", "processes") == "3 processes" and count(1, "process", "processes") == "1 process"
    )
