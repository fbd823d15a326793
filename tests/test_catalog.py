"""Catalog ground truth: each layout's items, the episode history rule, problems and detection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vggtctl.catalog import Catalog, CatalogProblem, Item, item_frames_for_key, load_catalog
from vggtctl.catalog.episodes import episode_histories
from vggtctl.errors import ConfigError
from vggtctl.keys import ImageKey


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_episode(folder: Path, idxs: list[int], action: str = "MOVE_FORWARD", ext: str = "jpg") -> list[Path]:
    return [touch(folder / f"step_{i}_{action}.{ext}") for i in idxs]


def names(item: Item) -> list[str]:
    return [os.path.basename(p) for p in item.frames]


# --------------------------------------------------------------------------- episodes


def test_episode_history_padding_and_linspace(tmp_path: Path) -> None:
    # idx 0..6 written in an order where string sorting would differ from integer sorting
    ep = tmp_path / "ep1"
    for i in [6, 10, 0, 2, 1, 3, 4]:
        touch(ep / f"step_{i}_TURN_LEFT.jpg")
    cat = load_catalog(tmp_path, max_history=3)
    assert cat.layout == "episodes" and cat.context_kind == "sequence"
    steps = [0, 1, 2, 3, 4, 6, 10]  # step order by integer idx; positions j = 0..6
    # Hand-derived: j <= 3 pads with frame 0 on the left; j > 3 takes floor(linspace(0, j, 4)).
    expected_positions = [
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [0, 0, 1, 2],
        [0, 1, 2, 3],
        [0, 1, 2, 4],  # linspace(0,4,4) = 0, 1.33, 2.67, 4
        [0, 1, 3, 5],  # linspace(0,5,4) = 0, 1.67, 3.33, 5
        [0, 2, 4, 6],  # linspace(0,6,4) = 0, 2, 4, 6
    ]
    assert len(cat.items) == 7
    for item, positions in zip(cat.items, expected_positions, strict=True):
        assert names(item) == [f"step_{steps[p]}_TURN_LEFT.jpg" for p in positions]
        assert len(item.frames) == 4
    assert cat.items[-1].image == str(ep / "step_10_TURN_LEFT.jpg")
    assert cat.items[-1].sample_id == "ep1/step_10_TURN_LEFT.jpg"


def test_episode_paths_are_absolute_and_normalized(tmp_path: Path) -> None:
    make_episode(tmp_path / "data" / "ep", [0, 1])
    cat = load_catalog(str(tmp_path / "data" / ".." / "data"), max_history=2)
    for item in cat.items:
        for frame in item.frames:
            assert os.path.isabs(frame) and frame == os.path.normpath(frame)
            assert ".." not in frame.split(os.sep)


def test_max_history_zero_is_current_frame_only(tmp_path: Path) -> None:
    make_episode(tmp_path / "ep", [0, 1, 2])
    cat = load_catalog(tmp_path, max_history=0)
    assert [names(i) for i in cat.items] == [[f"step_{i}_MOVE_FORWARD.jpg"] for i in range(3)]


def test_episode_extensions_case_insensitive_and_others_ignored(tmp_path: Path) -> None:
    ep = tmp_path / "ep"
    touch(ep / "step_0_STOP.JPG")
    touch(ep / "step_1_STOP.Png")
    touch(ep / "step_2_STOP.jpeg")
    touch(ep / "preview.jpg")  # an image that is not a step
    touch(ep / "step_x_STOP.jpg")  # no integer idx
    touch(ep / "notes.txt")
    touch(ep / "step_0_STOP.JPG.vggt_cache.pt")  # our sidecar: neither a step nor "ignored"
    touch(ep / "step_1_STOP.Png.vggt_cache.pt.tmp-12-ab01cd23")  # our temp file
    cat = load_catalog(tmp_path, layout="episodes", max_history=1)
    assert [os.path.basename(i.image) for i in cat.items] == [
        "step_0_STOP.JPG",
        "step_1_STOP.Png",
        "step_2_STOP.jpeg",
    ]
    assert cat.ignored_files == 3
    assert {os.path.basename(p) for p in cat.ignored_examples} == {
        "preview.jpg",
        "step_x_STOP.jpg",
        "notes.txt",
    }


def test_duplicate_step_idx_skips_that_episode(tmp_path: Path) -> None:
    make_episode(tmp_path / "good", [0, 1])
    bad = tmp_path / "bad"
    make_episode(bad, [0, 1])
    touch(bad / "step_1_TURN_LEFT.jpg")
    cat = load_catalog(tmp_path, max_history=2)
    assert {os.path.dirname(i.image) for i in cat.items} == {str(tmp_path / "good")}
    assert len(cat.problems) == 1
    problem = cat.problems[0]
    assert problem.file == str(bad) and problem.line is None
    assert "step 1" in problem.reason and "step_1_TURN_LEFT.jpg" in problem.reason
    assert cat.episodes == 1
    # verify and status --deep judge one folder at a time: they must skip the same folders
    in_catalog = {os.path.basename(i.image): i.frames for i in cat.items}
    assert episode_histories(str(tmp_path / "good"), os.listdir(tmp_path / "good"), 2) == in_catalog
    assert episode_histories(str(bad), os.listdir(bad), 2) == {}


def test_root_itself_can_be_one_episode(tmp_path: Path) -> None:
    make_episode(tmp_path, [0, 1, 2])
    cat = load_catalog(tmp_path, max_history=1)
    assert cat.layout == "episodes" and cat.episodes == 1
    assert names(cat.items[2]) == ["step_0_MOVE_FORWARD.jpg", "step_2_MOVE_FORWARD.jpg"]
    assert cat.items[0].sample_id == "step_0_MOVE_FORWARD.jpg"


def test_episodes_with_context_none_list_each_image_once(tmp_path: Path) -> None:
    make_episode(tmp_path / "a", [0, 1, 2])
    make_episode(tmp_path / "b", [0])
    cat = load_catalog(tmp_path, context="none", max_history=4)
    assert cat.context_kind == "none"
    assert all(len(i.frames) == 1 for i in cat.items)
    assert sorted(i.image for i in cat.items) == sorted(
        [str(tmp_path / "a" / f"step_{k}_MOVE_FORWARD.jpg") for k in range(3)]
        + [str(tmp_path / "b" / "step_0_MOVE_FORWARD.jpg")]
    )


def test_private_folder_and_linked_folders_are_not_walked(tmp_path: Path) -> None:
    make_episode(tmp_path / "ep", [0, 1])
    make_episode(tmp_path / ".vggtctl" / "ep", [0, 1])
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    make_episode(outside / "ep", [0, 1])
    os.symlink(outside / "ep", tmp_path / "linked")
    cat = load_catalog(tmp_path, max_history=1)
    assert {os.path.dirname(i.image) for i in cat.items} == {str(tmp_path / "ep")}


# --------------------------------------------------------------------------- annotations


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for name in ["h0.jpg", "h1.jpg", "cur.jpg", "solo.png", "c2.jpg"]:
        touch(root / name)
    return root


def test_annotations_json_list_all_three_forms(tmp_path: Path, images: Path) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(
        "[\n"
        '  {"id": "a", "images": ["imgs/h0.jpg", "imgs/h1.jpg", "imgs/cur.jpg"]},\n'
        '  {"id": 7, "image": "imgs/solo.png"},\n'
        "  {\n"
        '    "history_images": ["imgs/h0.jpg"],\n'
        '    "current_image": "imgs/c2.jpg"\n'
        "  }\n"
        "]\n"
    )
    cat = load_catalog(None, annotations=[ann])
    assert cat.layout == "annotations" and cat.context_kind == "sequence"
    assert not cat.problems and not cat.missing_images
    assert [i.frames for i in cat.items] == [
        (str(images / "h0.jpg"), str(images / "h1.jpg"), str(images / "cur.jpg")),
        (str(images / "solo.png"),),
        (str(images / "h0.jpg"), str(images / "c2.jpg")),
    ]
    # explicit ids win; otherwise "<file>:<line>" with the line the sample starts on
    assert [i.sample_id for i in cat.items] == ["a", "7", "ann.json:4"]


def test_annotations_jsonl_malformed_lines_reported_with_line_numbers(tmp_path: Path, images: Path) -> None:
    ann = tmp_path / "ann.jsonl"
    lines = [
        '{"images": ["imgs/h0.jpg", "imgs/cur.jpg"]}',  # 1 ok
        "{not json",  # 2 bad JSON
        "",  # 3 blank: skipped silently
        '{"text": "no images here"}',  # 4 missing keys
        '{"images": "imgs/cur.jpg"}',  # 5 wrong type
        '{"images": ["imgs/h0.jpg", 3]}',  # 6 wrong element type
        '{"history_images": ["imgs/h0.jpg"]}',  # 7 history without current
        '["imgs/cur.jpg"]',  # 8 not an object
        '{"images": []}',  # 9 empty
        '{"image": "imgs/solo.png"}',  # 10 ok
    ]
    ann.write_text("\n".join(lines) + "\n")
    cat = load_catalog(None, annotations=[str(ann)])
    assert [os.path.basename(i.image) for i in cat.items] == ["cur.jpg", "solo.png"]
    assert [(p.file, p.line) for p in cat.problems] == [(str(ann), n) for n in (2, 4, 5, 6, 7, 8, 9)]
    reasons = {p.line: p.reason for p in cat.problems}
    assert "invalid JSON" in reasons[2]
    assert "images" in reasons[4] and "current_image" in reasons[4]
    assert "'images'" in reasons[5] and "string" in reasons[5]
    assert "images[1]" in reasons[6]
    assert "current_image" in reasons[7]
    assert "object" in reasons[8]
    assert "empty" in reasons[9]
    assert str(cat.problems[0]).startswith(f"{ann}:2: ")


def test_annotations_json_list_broken_element_keeps_earlier_samples(tmp_path: Path, images: Path) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text('[\n{"image": "imgs/cur.jpg"},\n{"image": "imgs/h0.jpg"},\n{"image": oops}\n]\n')
    cat = load_catalog(None, annotations=[ann])
    assert [os.path.basename(i.image) for i in cat.items] == ["cur.jpg", "h0.jpg"]
    assert [(p.line, "invalid JSON" in p.reason) for p in cat.problems] == [(4, True)]


def test_annotations_missing_images_drop_their_samples(tmp_path: Path, images: Path) -> None:
    ann = tmp_path / "ann.jsonl"
    ann.write_text(
        '{"images": ["imgs/h0.jpg", "imgs/cur.jpg"]}\n'
        '{"images": ["imgs/gone_history.jpg", "imgs/c2.jpg"]}\n'
        '{"image": "nowhere/gone.jpg"}\n'
        '{"images": ["imgs/gone_history.jpg", "imgs/cur.jpg"]}\n'
    )
    cat = load_catalog(None, annotations=[ann])
    assert [names(i) for i in cat.items] == [["h0.jpg", "cur.jpg"]]
    assert cat.missing_images == sorted(
        [str(images / "gone_history.jpg"), str(tmp_path / "nowhere" / "gone.jpg")]
    )
    assert cat.dropped_items == 3


def test_annotations_resolve_against_data_path_and_keep_absolute(tmp_path: Path, images: Path) -> None:
    ann_dir = tmp_path / "meta"
    ann_dir.mkdir()
    ann = ann_dir / "a.jsonl"
    ann.write_text(
        json.dumps({"images": ["h0.jpg", str(images / "cur.jpg")]})
        + "\n"
        + json.dumps({"image": "solo.png"})
        + "\n"
    )
    with_data_path = load_catalog(None, annotations=[ann], data_path=images)
    assert [i.frames for i in with_data_path.items] == [
        (str(images / "h0.jpg"), str(images / "cur.jpg")),
        (str(images / "solo.png"),),
    ]
    # without data_path, relative names resolve against the annotation file's folder (meta/): missing
    without = load_catalog(None, annotations=[ann])
    assert without.items == [] and str(ann_dir / "h0.jpg") in without.missing_images


def test_annotations_context_none_covers_every_frame_once(tmp_path: Path, images: Path) -> None:
    ann = tmp_path / "a.jsonl"
    ann.write_text(
        '{"images": ["imgs/h0.jpg", "imgs/h1.jpg", "imgs/cur.jpg"]}\n'
        '{"images": ["imgs/h0.jpg", "imgs/cur.jpg"]}\n'
        '{"image": "imgs/cur.jpg"}\n'
    )
    cat = load_catalog(None, annotations=[ann], context="none")
    assert cat.context_kind == "none"
    assert [i.frames for i in cat.items] == [(str(images / n),) for n in ("h0.jpg", "h1.jpg", "cur.jpg")]


def test_annotations_conflicting_histories_are_reported(tmp_path: Path, images: Path) -> None:
    ann = tmp_path / "a.jsonl"
    ann.write_text(
        '{"images": ["imgs/h0.jpg", "imgs/cur.jpg"]}\n'
        '{"images": ["imgs/h0.jpg", "imgs/cur.jpg"]}\n'  # exact duplicate: one item, no problem
        '{"images": ["imgs/h1.jpg", "imgs/cur.jpg"]}\n'
    )
    cat = load_catalog(None, annotations=[ann])
    assert len(cat.items) == 2
    assert [(p.line, "different history" in p.reason) for p in cat.problems] == [(3, True)]


def test_missing_annotation_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="annotation file not found"):
        load_catalog(None, annotations=[tmp_path / "nope.json"])


# --------------------------------------------------------------------------- plain and auto


def test_plain_lists_every_image_with_context_none(tmp_path: Path) -> None:
    expected = [touch(tmp_path / p) for p in ["a.jpg", "sub/b.PNG", "sub/deeper/c.webp"]]
    touch(tmp_path / "a.jpg.vggt_cache.pt")
    touch(tmp_path / "readme.txt")
    cat = load_catalog(tmp_path, layout="plain")
    assert cat.layout == "plain" and cat.context_kind == "none"
    assert [i.frames for i in cat.items] == [(str(p),) for p in sorted(expected, key=str)]
    assert cat.items[1].sample_id == "sub/b.PNG"
    with pytest.raises(ConfigError, match="sequence"):
        load_catalog(tmp_path, layout="plain", context="sequence")


def test_auto_picks_annotations_when_given(tmp_path: Path, images: Path) -> None:
    make_episode(tmp_path / "ep", [0, 1, 2])
    ann = tmp_path / "a.jsonl"
    ann.write_text('{"image": "imgs/cur.jpg"}\n')
    cat = load_catalog(tmp_path, annotations=[ann])
    assert cat.layout == "annotations" and "a.jsonl" in cat.reason


def test_auto_picks_episodes_when_most_images_are_steps(tmp_path: Path) -> None:
    make_episode(tmp_path / "ep1", [0, 1, 2])
    make_episode(tmp_path / "ep2", [0, 1])
    touch(tmp_path / "cover.jpg")
    cat = load_catalog(tmp_path)
    assert cat.layout == "episodes" and cat.context_kind == "sequence"
    assert "5 of 6" in cat.reason
    assert len(cat.items) == 5


def test_auto_picks_plain_otherwise(tmp_path: Path) -> None:
    make_episode(tmp_path / "ep1", [0])
    for k in range(3):
        touch(tmp_path / f"photo{k}.jpg")
    cat = load_catalog(tmp_path)
    assert cat.layout == "plain" and cat.context_kind == "none"
    assert "1 of 4" in cat.reason and len(cat.items) == 4
    assert load_catalog(tmp_path / "ep1").layout == "episodes"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "zip"},
        {"context": "video"},
        {"max_history": -1},
        {"layout": "annotations"},
        {"layout": "episodes", "annotations": ["x.json"]},
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        load_catalog(tmp_path, **kwargs)


def test_missing_root_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        load_catalog(tmp_path / "absent")


# --------------------------------------------------------------------------- keys


def test_item_frames_for_key_names_keys_and_one_stat_each(tmp_path: Path) -> None:
    make_episode(tmp_path / "ep", [0, 1])
    other = touch(tmp_path / "other" / "x.jpg", b"12345")
    cur = tmp_path / "ep" / "step_1_MOVE_FORWARD.jpg"
    item = Item((str(tmp_path / "ep" / "step_0_MOVE_FORWARD.jpg"),) * 3 + (str(other), str(cur)))
    calls: list[str] = []

    def lookup(path: str) -> os.stat_result | None:
        calls.append(path)
        return os.stat(path)

    pairs = item_frames_for_key(item, lookup)
    assert [n for n, _ in pairs] == ["step_0_MOVE_FORWARD.jpg"] * 3 + [
        os.path.join("..", "other", "x.jpg"),
        "step_1_MOVE_FORWARD.jpg",
    ]
    st = os.stat(other)
    assert pairs[3][1] == ImageKey(size=5, mtime_ns=st.st_mtime_ns)
    assert sorted(calls) == sorted(set(item.frames))  # the padded frame is stat'ed once
    os.unlink(other)
    with pytest.raises(FileNotFoundError) as err:
        item_frames_for_key(item)
    assert err.value.filename == str(other)


def test_item_and_problem_basics() -> None:
    with pytest.raises(ValueError):
        Item(())
    assert Item(("/a/b.jpg",)).image == "/a/b.jpg"
    assert Item.from_paths(["/a/./h.jpg", Path("/a/x/../b.jpg")], "s1") == Item(
        ("/a/h.jpg", "/a/b.jpg"), "s1"
    )
    assert str(CatalogProblem("f.json", None, "bad")) == "f.json: bad"
    assert isinstance(Catalog([], "plain", "r", "none").summary(), str)


def test_annotations_written_from_episodes_give_the_same_items(tmp_path: Path) -> None:
    make_episode(tmp_path / "ep1", list(range(12)))
    make_episode(tmp_path / "ep2", [0, 1, 2])
    episodes = load_catalog(tmp_path, max_history=4)
    ann = tmp_path / "from_episodes.jsonl"
    ann.write_text(
        "".join(
            json.dumps({"images": [os.path.relpath(p, tmp_path) for p in i.frames]}) + "\n"
            for i in episodes.items
        )
    )
    again = load_catalog(None, annotations=[ann])
    assert [i.frames for i in again.items] == [i.frames for i in episodes.items]
    assert not again.problems and not again.missing_images


def test_frame_names_are_what_relpath_says_beside_below_and_above_the_image(tmp_path: Path) -> None:
    """The fast path for frames beside the image must name every frame as relpath does."""
    folder = tmp_path / "ep"
    paths = [folder / "a.jpg", folder / "sub" / "b.jpg", tmp_path / "other" / "c.jpg", folder / "cur.jpg"]
    for path in paths:
        touch(path)
    image = str(folder / "cur.jpg")
    for frames in (
        tuple(str(p) for p in paths),
        (str(folder / "." / "a.jpg"), str(folder / "sub" / ".." / "a.jpg"), image),  # not normalized
    ):
        names = [name for name, _ in item_frames_for_key(Item(frames))]
        assert names == [os.path.relpath(p, os.path.dirname(image)) for p in frames]
