"""The SQLite task store's files: a damaged store, a deleted -wal and a replaced file
are refused at open, with one line naming the path; a fresh store, a clean close and
a kill with every file kept open as before. A "kill" here is what one leaves on disk:
the store's files copied while it is open (its -wal holding the writes since the last
checkpoint). The app under uvicorn is tested in tests/test_fastapi_store_files.py."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

import sora_async as sa
from sora_async._store import TaskRecord
from sora_async._store_guard import CHECKPOINT_EVERY

SUFFIXES = ("", "-wal", "-shm", "-id")


def record(key: str) -> TaskRecord:
    return TaskRecord(key=key, fingerprint="f", model="sora-2-pro", request="{}")


async def write(store: sa.SQLiteStore, count: int, prefix: str = "k") -> None:
    for n in range(count):
        claimed = await store.claim(record(f"{prefix}-{n}"))
        claimed.state = sa.RecordState.RUNNING
        claimed.task_id = f"task_{prefix}{n}"
        await store.save(claimed)


def killed_copy(store: sa.SQLiteStore, into: Path, *, without: tuple[str, ...] = ()) -> Path:
    """Copy the open store's files (but ``without``) to ``into``: what a kill leaves."""
    into.mkdir()
    for suffix in SUFFIXES:
        source = store.path.with_name(store.path.name + suffix)
        if suffix not in without and source.exists():
            shutil.copyfile(source, into / (store.path.name + suffix))
    return into / store.path.name


async def keys_in(path: Path, **options: bool) -> set[str]:
    store = sa.SQLiteStore(path, **options)
    await store.open()
    try:
        return {row.key for row in await store.unfinished()}
    finally:
        await store.close()


async def test_a_fresh_store_a_clean_close_and_a_kill_open_without_alarm(tmp_path: Path) -> None:
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    await write(store, 3)
    await store.close()
    assert await keys_in(store.path) == {"k-0", "k-1", "k-2"}  # a clean close
    store = sa.SQLiteStore(store.path)
    await store.open()
    await write(store, 3, "more")
    killed = killed_copy(store, tmp_path / "killed")
    await store.close()
    assert (killed.parent / "tasks.db-wal").stat().st_size > 0  # the new keys live there
    assert len(await keys_in(killed)) == 6  # a kill, every file kept
    assert len(await keys_in(killed)) == 6  # and again after a clean close


@pytest.mark.parametrize("writes", [3, CHECKPOINT_EVERY + 10])
async def test_a_store_whose_wal_was_deleted_after_a_kill_is_refused(
    tmp_path: Path, writes: int
) -> None:
    """3 keys written (all in the -wal), or enough for a checkpoint on the way (the
    ones since in the -wal): killed, the -wal deleted, the store is refused with one
    line; accept_loss opens what is left, and the store is whole again after."""
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    await store.close()  # a store that lived before (its own id beside it)
    await store.open()
    await write(store, writes // 2)  # two writes per key
    killed = killed_copy(store, tmp_path / "killed", without=("-wal",))
    await store.close()
    with pytest.raises(sa.StoreLossError) as caught:
        await keys_in(killed)
    message = str(caught.value)
    assert message.startswith(f"store: {killed} lost the writes of its last run")
    assert "-wal file is missing" in message
    assert "accept_loss=True" in message
    assert "\n" not in message
    assert caught.value.field == "store"
    with pytest.raises(sa.StoreLossError):  # refused until the loss is accepted
        await keys_in(killed)
    left = await keys_in(killed, accept_loss=True)
    assert len(left) < writes // 2
    assert await keys_in(killed) == left


@pytest.mark.parametrize("how", ["emptied", "deleted", "another store"])
async def test_a_store_replaced_after_use_is_refused(tmp_path: Path, how: str) -> None:
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    await write(store, 3)
    await store.close()
    for suffix in ("-wal", "-shm"):
        store.path.with_name(store.path.name + suffix).unlink(missing_ok=True)
    if how == "emptied":
        store.path.write_bytes(b"")
    elif how == "deleted":
        store.path.unlink()
    else:
        other = sa.SQLiteStore(tmp_path / "other" / "tasks.db")
        await other.open()
        await other.close()
        shutil.copyfile(other.path, store.path)
    with pytest.raises(sa.StoreLossError) as caught:
        await keys_in(store.path)
    assert str(caught.value).startswith(f"store: {store.path} ")
    assert "tasks.db-id" in str(caught.value)
    assert await keys_in(store.path, accept_loss=True) == set()
    assert await keys_in(store.path) == set()  # accepted once: its own id now


async def test_what_it_cannot_tell_from_a_new_store(tmp_path: Path) -> None:
    """Every file of the store deleted, its -id too: a new store (documented)."""
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    await write(store, 3)
    await store.close()
    for suffix in SUFFIXES:
        store.path.with_name(store.path.name + suffix).unlink(missing_ok=True)
    assert await keys_in(store.path) == set()


async def test_a_kill_inside_the_stores_checkpoint_is_no_loss(tmp_path: Path) -> None:
    """Killed between the checkpoint's first mark and its last (the WAL copied, or
    not yet): with every file kept, the store opens with all its keys."""
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    await write(store, 3)

    def first_step(db: sqlite3.Connection, copy: bool) -> None:
        db.execute("UPDATE store_meta SET main_mark = main_mark + 1")
        if copy:
            db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()

    await store._db().call(lambda db: first_step(db, copy=False))
    before_copy = killed_copy(store, tmp_path / "before")
    await store._db().call(lambda db: first_step(db, copy=True))
    after_copy = killed_copy(store, tmp_path / "after")
    await store.close()
    assert len(await keys_in(before_copy)) == 3
    assert len(await keys_in(after_copy)) == 3


@pytest.mark.parametrize("damage", ["half", "garbage"])
async def test_a_damaged_store_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    await write(store, 200)
    await store.close()
    if damage == "half":
        os.truncate(store.path, store.path.stat().st_size // 2)
    else:
        store.path.write_bytes(b"\x5a" * 8192)
    with pytest.raises(sa.InputError) as caught:
        await keys_in(store.path)
    assert not isinstance(caught.value, sa.StoreLossError)
    message = str(caught.value)
    assert message.startswith(f"store: cannot open {store.path}: it "), message
    assert "restore it from a backup" in message
    assert "\n" not in message


async def test_the_wal_stays_small_whoever_writes(tmp_path: Path) -> None:
    """SQLite's own checkpoints are off: the store's own keep the -wal bounded, after
    writes to its tasks and to any other table of the file alike."""
    store = sa.SQLiteStore(tmp_path / "tasks.db")
    await store.open()
    wal = store.path.with_name("tasks.db-wal")
    await write(store, 1000)
    after_tasks = wal.stat().st_size
    await store._db().run("CREATE TABLE other (n INTEGER)")
    for n in range(2000):
        await store._db().run("INSERT INTO other VALUES (?)", (n,))
    after_other = wal.stat().st_size
    await store.close()
    print(f"-wal {after_tasks} bytes after 2,000 task writes, {after_other} after 2,000 more")
    assert after_tasks < 8 * 2**20  # some 40 MB without the checkpoints
    assert after_other <= after_tasks
