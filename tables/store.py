"""Where a partition's encoded records live on a worker: RocksDB on local disk, or memory.

The store holds what the changelog holds (rows, requests, retired jobs), keyed like it, so that
finished jobs cost disk, not memory. It is a cache of the changelog, never the state of record:
it is created empty when the partition is loaded, filled from the changelog, and deleted when the
partition leaves the worker.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from rocksdict import Cache, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions


class Store(Protocol):
    def get(self, key: bytes) -> bytes | None: ...
    def put(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def write(self, puts: list[tuple[bytes, bytes | None]]) -> None: ...
    def keys(self, prefix: bytes) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    def write(self, puts: list[tuple[bytes, bytes | None]]) -> None:
        for key, value in puts:
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def keys(self, prefix: bytes) -> Iterator[bytes]:
        return (k for k in list(self.data) if k.startswith(prefix))

    def close(self) -> None:
        self.data.clear()


class RocksStore:
    """One RocksDB per partition, sized for a small worker, deleted with the partition."""

    def __init__(self, path: Path, *, block_cache_mb: int = 8, write_buffer_mb: int = 16) -> None:
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_size(write_buffer_mb * 1024 * 1024)
        options.set_max_write_buffer_number(2)
        options.set_max_open_files(64)
        options.set_row_cache(Cache(block_cache_mb * 1024 * 1024))
        # Fresh writes stay uncompressed (a restore writes fast); compaction compresses the rest.
        options.set_compression_type(DBCompressionType.none())
        options.set_bottommost_compression_type(DBCompressionType.lz4())
        self.db = Rdict(str(path), options)
        # No write-ahead log: the store is a cache of the changelog, rebuilt after any crash.
        write = WriteOptions()
        write.disable_wal = True  # type: ignore[method-assign,assignment]  # a property, typed as a method
        self.db.set_write_options(write)

    def get(self, key: bytes) -> bytes | None:
        value = self.db.get(key)
        assert value is None or isinstance(value, bytes)  # raw mode
        return value

    def put(self, key: bytes, value: bytes) -> None:
        self.db[key] = value

    def delete(self, key: bytes) -> None:
        del self.db[key]

    def write(self, puts: list[tuple[bytes, bytes | None]]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in puts:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        self.db.write(batch)

    def keys(self, prefix: bytes) -> Iterator[bytes]:
        for key in self.db.keys(from_key=prefix):
            assert isinstance(key, bytes)  # raw mode
            if not key.startswith(prefix):
                return
            yield key

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.path, ignore_errors=True)


def open_store(url: str, data_dir: Path, number: int) -> Store:
    """The store for one partition: `rocksdb://` (default) or `memory://`."""
    if url.startswith("memory://"):
        return MemoryStore()
    return RocksStore(data_dir / "partitions" / f"p{number}")
