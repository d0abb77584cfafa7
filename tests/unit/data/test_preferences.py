import json

import pytest

from pbkd_cli.data.preferences import PreferencePair, PreferenceWriter, load_preferences
from pbkd_cli.io import PbkdError


def pair(i: int) -> PreferencePair:
    return PreferencePair(id=f"p{i}", prompt=f"Q{i}", chosen=f"good {i}", rejected=f"bad {i}", question=f"q{i}")


def test_pairs_round_trip_in_the_prompt_chosen_rejected_convention(tmp_path):
    writer = PreferenceWriter(tmp_path / "prefs.jsonl")
    writer.append_chunk([pair(0), pair(1)], prompts=2)
    path = writer.finalize()
    row = json.loads(path.read_text().splitlines()[0])
    assert {"prompt", "chosen", "rejected"} <= set(row)
    assert [p.id for p in load_preferences(path)] == ["p0", "p1"]
    assert not list(tmp_path.glob("*.partial.jsonl")) and not list(tmp_path.glob("*.commit.json"))


def test_a_chunk_cut_short_by_a_crash_is_dropped_and_redone(tmp_path):
    target = tmp_path / "prefs.jsonl"
    writer = PreferenceWriter(target)
    writer.append_chunk([pair(0), pair(1)], prompts=2, stats={"n": 2})
    with writer.path.open("a") as handle:  # the next chunk was half written when the process died
        handle.write(json.dumps({"id": "p2", "prompt": "Q2", "chosen": "x", "rejected": "y"}) + "\n{\"id\": \"p3")
    resumed = PreferenceWriter(target)
    assert resumed.prompts_done == 2 and resumed.pairs == 2 and resumed.stats == {"n": 2}
    resumed.append_chunk([pair(2), pair(3)], prompts=2, stats={"n": 2})
    pairs = load_preferences(resumed.finalize())
    assert [p.id for p in pairs] == ["p0", "p1", "p2", "p3"]


def test_bad_preference_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(PbkdError, match=r"bad.jsonl line 2: missing 'rejected', or neither a string nor a list of messages"):
        load_preferences(bad)
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    with pytest.raises(PbkdError, match=r"bad.jsonl line 3: missing 'chosen', or neither a string nor a list of messages"):   # the file's line
        load_preferences(bad)
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    with pytest.raises(PbkdError, match=r"bad.jsonl line 2: invalid JSON"):
        load_preferences(bad)
    bad.write_text("")
    with pytest.raises(PbkdError, match="no preference pairs"):
        load_preferences(bad)
    with pytest.raises(PbkdError, match="no such file"):
        load_preferences(tmp_path / "missing.jsonl")


def test_a_run_killed_between_publishing_and_dropping_its_commit_keeps_its_pairs(tmp_path):
    target = tmp_path / "prefs.jsonl"
    writer = PreferenceWriter(target)
    writer.append_chunk([pair(0), pair(1)], prompts=2)
    good = writer.path.read_bytes()
    writer.path.replace(target)  # finalize's first half; the commit record is still there
    resumed = PreferenceWriter(target)
    assert resumed.prompts_done == 2 and resumed.pairs == 2
    assert resumed.finalize().read_bytes() == good and not writer.commit_path.exists()


def test_a_partial_file_shorter_than_its_commit_is_refused_not_padded(tmp_path):
    target = tmp_path / "prefs.jsonl"
    writer = PreferenceWriter(target)
    writer.append_chunk([pair(0), pair(1)], prompts=2)
    writer.path.write_bytes(writer.path.read_bytes()[:10])
    with pytest.raises(PbkdError, match="prefs.partial.jsonl: 10 bytes where prefs.commit.json committed"):
        PreferenceWriter(target)
    assert len(writer.path.read_bytes()) == 10


def test_the_heldout_split_is_seeded_disjoint_and_complete():
    from pbkd_cli.data.preferences import split_heldout

    items = list(range(50))
    heldout, train = split_heldout(items, 0.2, seed=3)
    assert len(heldout) == 10 and sorted(heldout + train) == items
    assert split_heldout(items, 0.2, seed=3) == (heldout, train) != split_heldout(items, 0.2, seed=4)
    assert split_heldout(items, 0.0, seed=3)[0] == [] and len(split_heldout(items, 0.0, seed=3)[1]) == 50
