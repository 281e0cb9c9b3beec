"""What holds sbc's memory after a burst of calls: a ``--python`` wrapper for bench/load.py.

Runs ``python -m sbc ...`` as given and, in that process (CPython 3.11, pymalloc), writes to
``$MEMDIAG_DIR`` (default /tmp/memdiag):

* ``pid``: the sbc process, for ``kill -USR1``;
* ``samples.csv`` every ``$MEMDIAG_EVERY`` seconds (default 2; 0: none): RssAnon and RssFile
  (KiB), pymalloc's arenas (1 MiB each), its bytes in allocated blocks, its wholly unused pools
  (16 KiB each), and gc's three counts;
* ``report.N.txt`` on each SIGUSR1: the same figures, the tracked objects by type; from the
  second one on also what a full collection frees (unreachable objects, pause, arenas after)
  and, with ``MEMDIAG_PINS=1``, the objects found in the arenas made after the first report
  (pool headers read with ctypes, the 3.11 layout; a diagnosis, never in the service) with
  who holds each; with ``MEMDIAG_BLOCKS=1``, every allocated block of those arenas, found
  by walking their pools (what no collector-tracked object names: free lists of C
  extensions, dict tables, list items).

Not a benchmark: it perturbs what it measures a little (its own reports allocate: the
blocks list shows the report's own strings, ints and tuples too), so read the samples, and
use the pins to name what survives a burst. Commands in docs/performance.md ("Round 4: idle",
"Round 8: idle"). Other arguments (``-c ...``) are passed to the interpreter unchanged.
"""

from __future__ import annotations

import array
import collections
import ctypes
import gc
import os
import runpy
import signal
import struct
import sys
import threading
import time
from typing import Any

OUT = os.environ.get("MEMDIAG_DIR", "/tmp/memdiag")
POOL = 16 * 1024  # pymalloc pool size in 3.11; pools are aligned to it
_first_arenas: list[int] = []


def rss() -> dict[str, int]:
    found: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("RssAnon", "RssFile")):
                key, value = line.split(":")
                found[key] = int(value.split()[0])
    return found


def pymalloc() -> dict[str, int]:
    """Arenas, allocated bytes and unused pools from sys._debugmallocstats (written to fd 2)."""
    path = os.path.join(OUT, f".mallocstats.{threading.get_ident()}")  # the sampler's, a report's
    saved = os.dup(2)
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.dup2(fd, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    found = {"arenas": 0, "allocated": 0, "unused_pools": 0}
    with open(path) as stats:
        for line in stats:
            number = line.rsplit("=", 1)[-1].strip().replace(",", "")
            if line.startswith("# arenas allocated current"):
                found["arenas"] = int(number)
            elif line.startswith("# bytes in allocated blocks"):
                found["allocated"] = int(number)
            elif "unused pools *" in line:
                found["unused_pools"] = int(line.split()[0])
    return found


def figures() -> str:
    r, p = rss(), pymalloc()
    return (
        f"RssAnon {r['RssAnon']} KiB, RssFile {r['RssFile']} KiB; pymalloc {p['arenas']} arenas, "
        f"{p['allocated'] / 2**20:.2f} MiB allocated, {p['unused_pools']} unused pools; "
        f"gc counts {gc.get_count()}"
    )


def sample(every: float) -> None:
    with open(os.path.join(OUT, "samples.csv"), "w") as out:
        out.write("t,rss_anon_kib,rss_file_kib,arenas,allocated_bytes,unused_pools\n")
        start = time.monotonic()
        while True:
            r, p = rss(), pymalloc()
            out.write(
                f"{time.monotonic() - start:.1f},{r['RssAnon']},{r['RssFile']},{p['arenas']},"
                f"{p['allocated']},{p['unused_pools']}\n"
            )
            out.flush()
            time.sleep(every)


_idle_arenas: dict[int, int] = {}  # arena index -> its lowest pool's address, at report 1


def _regions() -> list[tuple[int, int]]:
    """Anonymous read-write mappings of 1 MiB or more: where pymalloc's arenas are."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            anonymous = len(fields) == 5 or (len(fields) == 6 and fields[5].startswith("[anon"))
            if anonymous and fields[1].startswith("rw"):  # never a reserved (PROT_NONE) one
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if end - start >= 1 << 20:
                    regions.append((start, end))
    return regions


def _pool_header(copy: bytes) -> tuple[int, int, int, int, int] | None:
    """count, freeblock, arena index, block size, nextoffset of a plausible used pool."""
    count, _, freeblock = struct.unpack_from("=IIQ", copy, 0)
    arena, szidx, nextoffset, maxnext = struct.unpack_from("=IIII", copy, 32)
    size = (szidx + 1) * 16
    if (
        arena < 1 << 16
        and 0 < count <= POOL // 16
        and szidx < 32
        and 48 <= nextoffset <= POOL
        and maxnext == POOL - size
    ):
        return count, freeblock, arena, size, nextoffset
    return None


def arena_bases() -> dict[int, int]:
    """Each arena in use (by index) and the address of its lowest used pool. Indexes are
    reused once an arena is given back: an arena is told by its index and its address."""
    bases: dict[int, int] = {}
    header_bytes = ctypes.c_char * 48
    for start, end in _regions():
        pool = (start + POOL - 1) & ~(POOL - 1)
        while pool + POOL <= end:
            header = _pool_header(header_bytes.from_address(pool).raw)
            if header is not None:
                bases.setdefault(header[2], pool)
            pool += POOL
    return bases


def _new_arena(arena: int, pool: int) -> bool:
    """Whether the pool at ``pool`` is in an arena made after report 1 (an index then unused,
    or used then by an arena elsewhere)."""
    base = _idle_arenas.get(arena)
    return base is None or not base - (1 << 20) < pool < base + (1 << 20)


def pins(min_arena: int) -> list[str]:
    """Objects (gc's and those they refer to) whose pymalloc pool lies in an arena made after
    report 1 (see :func:`arena_bases`), by arena index, each with who holds it. ``min_arena``
    (the arenas at report 1) is only shown."""
    gc.unfreeze()  # the frozen start-up objects too: their containers may hold new objects
    try:
        found: dict[int, Any] = {}
        for o in gc.get_objects():
            found[id(o)] = o
            for child in gc.get_referents(o):
                found.setdefault(id(child), child)
    finally:
        gc.freeze()
    by_arena: dict[int, list[Any]] = collections.defaultdict(list)
    for address, o in found.items():
        size = sys.getsizeof(o)
        if not 0 < size <= 512:  # bigger blocks come from malloc
            continue
        start = address - 16 if type(o).__flags__ & (1 << 14) else address  # gc header
        pool = start & ~(POOL - 1)
        # struct pool_header: count (8 bytes), 3 pointers, then arenaindex and szidx (uint)
        if ctypes.c_uint.from_address(pool + 36).value != (size + 15) // 16 - 1:
            continue  # not a pymalloc pool of this size class (a static object, say)
        arena = ctypes.c_uint.from_address(pool + 32).value
        if arena < 1 << 16 and _new_arena(arena, pool):
            by_arena[arena].append(o)
    lines = [f"arenas made after report 1 ({min_arena} then) holding objects: {len(by_arena)}"]
    ours = {id(found), id(by_arena), *map(id, by_arena.values())}
    gc.unfreeze()  # gc.get_referrers() does not look into the frozen objects
    try:
        for arena in sorted(by_arena):
            objects = by_arena[arena]
            kinds = collections.Counter(type(o).__qualname__ for o in objects).most_common(8)
            lines.append(f" arena {arena}: {len(objects)} objects {kinds}")
            for i in range(min(12, len(objects))):
                lines.append(f"    {type(objects[i]).__qualname__}: {repr(objects[i])[:150]}")
                lines += [f"      held by {where}" for where in holders(objects[i], ours)]
    finally:
        gc.freeze()
    return lines


def blocks(min_arena: int) -> list[str]:
    """Every allocated block in the pools of arenas made after report 1, found by
    walking the pools themselves (anonymous mappings, each 16 KiB pool's header, its free
    list): what pins an arena when :func:`pins` finds no object there (a dict's table, a
    list's items, an object no collector-tracked one refers to, an object kept in a C
    extension's free list). A block is named by its type when it starts with an object of a
    type alive in the process (at its address, or after a collector header; a reference count
    of 0: in a free list), else shown as raw bytes.

    Each pool is copied whole (a bytes object of 16 KiB: malloc's, not pymalloc's) and read
    from the copy, addresses kept in an array, the types looked up after the walk: the walk's
    own small objects are freed at once and hardly ever counted as blocks; ctypes' foreign
    calls (which let other threads run) are not used while walking. A block is named after the
    walk, from live memory: one freed since may show as another object."""
    regions = _regions()
    found = array.array("Q")  # (arena, address, size) triples
    found.extend([0] * 3 * 200_000)  # room made before the walk (malloc'd, never moved)
    n = 0
    pool_bytes = ctypes.c_char * POOL
    for start, end in regions:
        pool = (start + POOL - 1) & ~(POOL - 1)
        while pool + POOL <= end:
            copy = pool_bytes.from_address(pool).raw
            header = _pool_header(copy)
            if header is not None and _new_arena(header[2], pool):
                _, freeblock, arena, size, nextoffset = header
                free = set()
                block = freeblock
                while block and pool <= block < pool + POOL and block not in free:
                    free.add(block)
                    block = struct.unpack_from("=Q", copy, block - pool)[0]
                for address in range(pool + 48, pool + nextoffset, size):
                    if address not in free and n < len(found):
                        found[n : n + 3] = array.array("Q", (arena, address, size))
                        n += 3
            pool += POOL
    types_by_address: dict[int, type] = {}
    for o in gc.get_objects():
        t = o if isinstance(o, type) else type(o)
        types_by_address[id(t)] = t
    for t in (int, float, str, bytes, tuple, list, dict, set, type(None), bool, complex):
        types_by_address[id(t)] = t
    for module in list(sys.modules.values()):  # C extensions' static types (uvloop's, say)
        for value in list(getattr(module, "__dict__", {}).values()):
            if isinstance(value, type):
                types_by_address.setdefault(id(value), value)
    by_arena: dict[int, list[str]] = collections.defaultdict(list)
    for i in range(0, n, 3):
        arena, address, size = found[i : i + 3]
        by_arena[arena].append(_block_text(address, size, types_by_address))
    lines = [f"arenas made after report 1 ({min_arena} then) with blocks: {len(by_arena)}"]
    for arena in sorted(by_arena):
        kinds = collections.Counter(text.split(":")[0] for text in by_arena[arena]).most_common(8)
        lines.append(f" arena {arena}: {len(by_arena[arena])} blocks {kinds}")
        lines += [f"    {text}" for text in by_arena[arena][:25]]
    return lines


def _block_text(address: int, size: int, types_by_address: dict[int, type]) -> str:
    raw = (ctypes.c_char * size).from_address(address).raw
    for offset in (0, 16):  # an object, or one after its collector header
        if offset + 16 > size:
            continue
        refcount, type_address = struct.unpack_from("=QQ", raw, offset)
        t = types_by_address.get(type_address)
        if t is None or refcount >= 1 << 32:
            continue
        if refcount == 0:  # not alive: kept in a free list (a C extension's, say)
            return f"{t.__qualname__} in a free list ({size} B)"
        try:
            pointer = ctypes.c_size_t(address + offset)
            text = repr(ctypes.py_object.from_buffer(pointer).value)[:120]
        except Exception as exc:  # a half-made object: its type is enough
            text = f"<repr failed: {type(exc).__name__}>"
        return f"{t.__qualname__} ({size} B): {text}"
    return f"raw ({size} B): {raw[:48].hex()}"


def holders(o: Any, ours: set[int], limit: int = 3) -> list[str]:
    """Who refers to ``o`` (the collector's view): an object's attribute or slot, a dict's key
    (and whose ``__dict__`` that dict is), a container's type; to name the owner of a pin.
    ``ours``: ids of this script's own containers, left out."""
    found = []
    for ref in gc.get_referrers(o):
        if id(ref) in ours or type(ref).__name__ in ("frame", "cell"):
            continue  # this script's own lists, frames and closures
        name = type(ref).__qualname__
        if isinstance(ref, dict):
            keys = [k for k, v in ref.items() if v is o][:2]
            owners = [
                type(x).__qualname__
                for x in gc.get_referrers(ref)
                if getattr(x, "__dict__", None) is ref
            ][:1]
            name = f"dict{' of ' + owners[0] if owners else ''} key {keys!r}"[:200]
        else:
            slots = [
                s
                for c in type(ref).__mro__
                for s in getattr(c, "__slots__", ())
                if isinstance(s, str) and getattr(ref, s, None) is o
            ]
            if slots:
                name += f".{slots[0]}"
            elif isinstance(ref, (list, tuple)):
                name += f" of {len(ref)}: {repr(ref)[:100]}"
        found.append(name)
        if len(found) >= limit:
            break
    return found


def report(signum: int, frame: Any) -> None:
    n = len(_first_arenas) + 1
    lines = [f"report {n} at {time.time():.1f}: {figures()}"]
    kinds = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    lines.append(f"tracked objects by type: {kinds.most_common(30)}")
    if n == 1:
        _first_arenas.append(pymalloc()["arenas"])
        if os.environ.get("MEMDIAG_PINS") == "1" or os.environ.get("MEMDIAG_BLOCKS") == "1":
            _idle_arenas.update(arena_bases())
    else:
        _first_arenas.append(_first_arenas[0])
        started = time.perf_counter()
        unreachable = gc.collect()
        pause = 1000 * (time.perf_counter() - started)
        lines.append(f"full collection: {unreachable} unreachable, {pause:.1f} ms; {figures()}")
        if os.environ.get("MEMDIAG_PINS") == "1":
            lines += pins(_first_arenas[0])
        if os.environ.get("MEMDIAG_BLOCKS") == "1":
            lines += blocks(_first_arenas[0])
    with open(os.path.join(OUT, f"report.{n}.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")


def main() -> None:
    args = sys.argv[1:]
    if args[:2] != ["-m", "sbc"]:
        os.execv(sys.executable, [sys.executable, *args])
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "pid"), "w") as out:
        out.write(str(os.getpid()))
    signal.signal(signal.SIGUSR1, report)
    every = float(os.environ.get("MEMDIAG_EVERY", "2"))
    if every > 0:
        threading.Thread(target=sample, args=(every,), daemon=True).start()
    sys.argv = ["sbc", *args[2:]]
    runpy.run_module("sbc", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
