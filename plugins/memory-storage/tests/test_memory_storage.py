"""The in-memory storage plugin driven through a real pluggy PluginManager: the SDK's
conformance checks, and what is particular to it (not durable; a clean close keeps the
data set in a snapshot file)."""

import pytest

from lugh_sdk.api.types import StorageError
from lugh_sdk.storage_conformance import CHECKS, commit, opener, state
from lugh_memory_storage.plugin import SNAPSHOT_NAME, MemoryStorage

open_store = opener(MemoryStorage)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_conformance(check, tmp_path):
    check(open_store, tmp_path)


def test_it_says_it_is_not_durable_and_a_crash_loses_everything(tmp_path):
    hook = open_store(tmp_path)
    commit(hook, {"a": b"1"})
    assert hook.storage_stats()["durable"] is False
    # no close (a crash): nothing was written
    assert not (tmp_path / SNAPSHOT_NAME).exists()
    assert state(open_store(tmp_path)) == {}


def test_a_clean_close_keeps_the_data_set(tmp_path):
    hook = open_store(tmp_path)
    commit(hook, {"a": b"1"})
    hook.storage_close()
    assert state(open_store(tmp_path)) == {"a": b"1"}


def test_use_before_open_is_a_clear_error():
    with pytest.raises(StorageError, match="not open"):
        MemoryStorage().storage_scan("", "", 1)
