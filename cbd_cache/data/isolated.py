"""Reading records in worker processes: the decoder training uses (libpng) can kill the process it runs in
on input PIL accepts, so every untrusted image is decoded in a worker, and the record that kills one is
unreadable, never the caller's crash. `prepare` reads every source record through here, `predict`
every file it is given, and `cache verify` the shard images it recomputes (`Encoded`).
"""
from __future__ import annotations

import itertools
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator

from cbd_cache.data.shards import decode_image
from cbd_cache.data.sources import Record, Source, Unreadable

READ_CHUNK = 16   # records per task handed to a worker process
_worker_source: Source | None = None


class Handed(Source):
    """Records the caller hands over (no splits to list): what `read_in_order` reads for `predict` and `verify`."""

    splits = ()

    def __init__(self, channels: int):
        self.channels, self.class_names, self.description = channels, [], {}

    def records(self, split: str) -> list[Record]:
        return []


class Encoded(Handed):
    """Images already encoded as a shard stores them (a record's ref: (bytes, ext)), to decode in a worker."""

    def read(self, record: Record) -> tuple[bytes, str]:
        return record.ref


def _init_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source
    # not the CLI's handlers: the pool stops its workers with SIGTERM (after one dies, or at shutdown) and
    # Ctrl-C reaches the whole process group; the caller speaks for both, a worker just ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def read_checked(source: Source, record: Record) -> tuple[bytes | None, str]:
    """(bytes, ext) of a readable record that training's decoder decodes, or (None, reason). In a worker only."""
    try:
        data, ext = source.read(record)
    except Unreadable as e:
        return None, str(e)
    try:
        decode_image(data, source.channels)
    except Exception as e:   # PIL raises many types on corrupt input
        return None, f"the training decoder cannot decode it: {e}"
    return data, ext


def _read_chunk(records: list[Record]) -> list[tuple[bytes | None, str]]:
    return [read_checked(_worker_source, r) for r in records]


def _pool(source: Source, workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(source,))


def read_alone(source: Source, record: Record) -> tuple[bytes | None, str]:
    """`read_checked` in a process of its own: the record that kills it is unreadable, and nothing else is."""
    with _pool(source, 1) as pool:
        try:
            return pool.submit(_read_chunk, [record]).result()[0]
        except BrokenProcessPool:
            return None, "the training decoder crashed on it (corrupt data, such as a PNG with a bad checksum)"


def read_in_order(source: Source, records: list[Record], workers: int) -> Iterator[tuple[Record, bytes | None, str]]:
    """(record, bytes or None, ext or reason) in record order; at most 4 chunks per worker in flight (bounded memory).

    Always in worker processes (at least one), since a decoder may crash the process it runs in.
    """
    workers = max(1, workers)
    chunks = (records[i:i + READ_CHUNK] for i in range(0, len(records), READ_CHUNK))
    pool = _pool(source, workers)
    try:
        pending = deque((c, pool.submit(_read_chunk, c)) for c in itertools.islice(chunks, 4 * workers))
        while pending:
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:   # a worker died: find the item, then go on with a new pool
                pool.shutdown(wait=True, cancel_futures=True)
                results = [read_alone(source, r) for r in chunk]
                pool = _pool(source, workers)
                pending = deque((c, pool.submit(_read_chunk, c)) for c, _ in pending)
            following = next(chunks, None)
            if following is not None:
                pending.append((following, pool.submit(_read_chunk, following)))
            for r, (data, ext) in zip(chunk, results):
                yield r, data, ext
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
