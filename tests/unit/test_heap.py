"""Freed heap memory handed back to the system (sbc/ops/heap.py): what a burst freed in the
middle of glibc's heap leaves RSS once trimmed, and the service's periodic trimmer."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sbc.ops import heap


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_pages_freed_in_the_middle_of_the_heap_go_back_to_the_system() -> None:
    trim = heap.malloc_trim()
    assert trim is not None, "glibc's malloc_trim not found"
    trim()
    # 32 MiB in 4 KiB blocks (glibc's heap, not pymalloc's arenas, not mmap), one in 64 kept:
    # what is freed lies between blocks that stay, in the middle of the heap, not at its top.
    burst = [bytearray(4096) for _ in range(8192)]
    kept = burst[::64]
    before_free = rss_kib()
    del burst
    freed = rss_kib()
    assert trim() is True
    trimmed = rss_kib()
    assert freed - trimmed > 16 * 1024, (before_free, freed, trimmed)
    assert before_free - trimmed > 16 * 1024
    assert len(kept) == 128


async def test_the_trimmer_trims_in_a_worker_thread_until_cancelled() -> None:
    threads: list[threading.Thread] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def trim() -> bool:
        threads.append(threading.current_thread())
        if len(threads) == 3:
            loop.call_soon_threadsafe(done.set)
        return False

    task = asyncio.ensure_future(heap.trim_heap_every(0.001, trim))
    async with asyncio.timeout(5):
        await done.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert len(threads) >= 3
    assert threading.main_thread() not in threads  # the loop is never held up by a trim


async def test_without_malloc_trim_the_trimmer_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heap, "malloc_trim", lambda: None)
    async with asyncio.timeout(5):
        await heap.trim_heap_every(0.001)  # returns at once instead of looping
