"""Claims under a race: two processes judge the same dead claim at once. The one that moves it
aside second must notice it moved the winner's fresh claim, put it back and give the chunk up,
or both would encode it."""

from __future__ import annotations

import json
import os
import time

from vggtctl import claims


def test_a_claim_taken_over_between_judging_and_moving_is_put_back(tmp_path, monkeypatch):
    book, live = claims.ClaimBook(tmp_path), claims.ClaimBook(tmp_path)
    path = claims.claims_dir(tmp_path) / "c.claim"
    path.write_text(json.dumps({"host": "elsewhere", "pidns": None, "pid": 1, "start": 5}))
    old = time.time() - 2 * claims.DEFAULT_TTL_S
    os.utime(path, (old, old))  # past the TTL: dead to every book
    real_rename = os.rename
    raced = []

    def rename_after_the_other_took_over(src, dst):  # type: ignore[no-untyped-def]
        if not raced:  # `book` has judged the claim dead; `live` takes it over first
            raced.append(src)
            assert live.try_claim("c")
        real_rename(src, dst)

    monkeypatch.setattr(claims.os, "rename", rename_after_the_other_took_over)
    try:
        assert book.try_claim("c") is False
        assert raced == [path]
        assert json.loads(path.read_text())["book"] == live.owner["book"]
        assert (book.taken_over, live.taken_over) == (0, 1)
        assert "c" in live.held and "c" not in book.held
        assert [p.name for p in path.parent.iterdir()] == ["c.claim"]  # nothing left aside
    finally:
        monkeypatch.undo()
        book.release_all()
        live.release_all()
    assert not path.exists()
