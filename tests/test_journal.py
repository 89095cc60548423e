"""The journal: durable, append-only, CRC-checked; torn and corrupt records are reported."""

from __future__ import annotations

from kernel.journal import Journal, unfinished, write_atomically


def test_append_survives_reopen_in_order(tmp_path):
    j = Journal(tmp_path / "journal.log")
    j.append("swap.begin", id="a", service="scheduler")
    j.append("swap.commit", id="a", service="scheduler")
    j.close()
    again = Journal(tmp_path / "journal.log")
    assert [r["op"] for r in again.records()] == ["swap.begin", "swap.commit"]
    assert [r["seq"] for r in again.records()] == [1, 2]
    assert again.append("install.stage", id="b")["seq"] == 3
    assert again.problems == []


def test_torn_last_record_is_ignored_and_reported(tmp_path):
    path = tmp_path / "journal.log"
    j = Journal(path)
    j.append("swap.begin", id="a")
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"seq":2,"op":"swap.com')  # power cut mid-write
    again = Journal(path)
    assert [r["op"] for r in again.records()] == ["swap.begin"]
    assert any("torn" in p for p in again.problems)


def test_corrupt_middle_record_is_reported(tmp_path):
    path = tmp_path / "journal.log"
    j = Journal(path)
    for i in range(3):
        j.append("swap.begin", id=str(i))
    j.close()
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"1"', b'"X"')
    path.write_bytes(b"\n".join(lines))
    again = Journal(path)
    assert len(again.records()) == 2
    assert any("corrupt" in p for p in again.problems)


def test_unfinished_operations():
    records = [
        {"seq": 1, "op": "swap.begin", "data": {"id": "a"}},
        {"seq": 2, "op": "swap.commit", "data": {"id": "a"}},
        {"seq": 3, "op": "swap.begin", "data": {"id": "b"}},
        {"seq": 4, "op": "swap.quiesce", "data": {"id": "b"}},
        {"seq": 5, "op": "swap.begin", "data": {"id": "c"}},
        {"seq": 6, "op": "swap.rollback", "data": {"id": "c"}},
    ]
    assert [r["data"]["id"] for r in unfinished(records, "swap")] == ["b"]


def test_write_atomically_replaces_whole(tmp_path):
    target = tmp_path / "services.json"
    write_atomically(target, b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert not (tmp_path / "services.json.tmp").exists()
