"""What holds pymalloc's arenas in a running sbc, read from outside: a gdb script.

    gdb -p PID -batch -x bench/arena_census.py        # CENSUS_OUT=FILE (default: stdout)

Attaches to the process (CPython 3.11 with its debug symbols, as pyenv builds it), reads
pymalloc's own table of arenas (``arenas``, ``maxarenas``) and, for each arena with at least
``CENSUS_SPARSE`` free pools (default 40: the burst's last arenas, nearly empty), walks its used
pools and names every allocated block: its type when it starts with an object (at the block or
after a collector header; a reference count of 0: kept in a free list), with the value of an
int, float, str, bytes, the name of a coroutine, a task's coroutine, a builtin method and its
object; else its first bytes. For the blocks of arenas with at most 8 used pools it then looks
for their referrers in every writable mapping (8-byte aligned pointers to the block or to the
object after its collector header), and for those referrers' own referrers.

Unlike bench/memdiag.py (which runs in sbc's process and whose walk and reports allocate in the
very pools they look at), nothing is made in the process: it is stopped while gdb reads it (a
few seconds), then goes on. Pointers found may be stale (a dead block's bytes, a dead frame's
value stack): read the referrers as leads. Commands in docs/performance.md, Round 9: idle.
"""

from __future__ import annotations

import os
import struct

import gdb  # type: ignore[import-not-found]  # gdb's own module: run with gdb -x

POOL = 16 * 1024  # pymalloc pool size in 3.11
INFERIOR = gdb.selected_inferior()


def read(address: int, size: int) -> bytes:
    return bytes(INFERIOR.read_memory(address, size).tobytes())


def word(address: int) -> int:
    return int(struct.unpack("Q", read(address, 8))[0])


def symbol(name: str) -> int:
    return int(gdb.parse_and_eval(f"(unsigned long)&{name}"))


TYPE_TYPE = symbol("PyType_Type")
VALUE_TYPES = {
    symbol("PyLong_Type"): "int",
    symbol("PyFloat_Type"): "float",
    symbol("PyUnicode_Type"): "str",
    symbol("PyTuple_Type"): "tuple",
    symbol("PyBytes_Type"): "bytes",
    symbol("PyDict_Type"): "dict",
}
_names: dict[int, str | None] = {}


def type_name(address: int) -> str | None:
    """The tp_name of the type at ``address``, or None when it is not one."""
    if address in _names:
        return _names[address]
    name = None
    try:
        if address and address % 8 == 0:
            meta = word(address + 8)
            if meta == TYPE_TYPE or (meta and meta % 8 == 0 and word(meta + 8) == TYPE_TYPE):
                text = read(word(address + 24), 80).split(b"\0")[0]
                if text and all(32 < c < 127 for c in text):
                    name = text.decode()
    except gdb.MemoryError:
        pass
    _names[address] = name
    return name


def text_of(address: int) -> str:
    """A compact str's first characters (the 3.11 layout: ASCII data after 48 bytes)."""
    try:
        return repr(read(address + 48, min(word(address + 16), 60)))
    except gdb.MemoryError:
        return "?"


def value_of(kind: str, name: str, raw: bytes, at: int, address: int) -> str:
    """What a named block holds, for the kinds that tell its owner."""
    if kind == "int":
        size = struct.unpack_from("q", raw, at + 16)[0]
        digits = [
            struct.unpack_from("I", raw, at + 24 + 4 * i)[0] for i in range(min(abs(size), 2))
        ]
        value = sum(d << (30 * i) for i, d in enumerate(digits))
        return str(-value if size < 0 else value)
    if kind == "float":
        return repr(struct.unpack_from("d", raw, at + 16)[0])
    if kind == "str":
        return text_of(address + at)
    if kind == "bytes":
        return repr(read(address + at + 32, min(struct.unpack_from("q", raw, at + 16)[0], 40)))
    if kind == "tuple":
        size = struct.unpack_from("q", raw, at + 16)[0]
        items = [struct.unpack_from("Q", raw, at + 24 + 8 * i)[0] for i in range(min(size, 4))]
        return f"len {size}: " + ",".join(str(type_name(word(i + 8)) if i else None) for i in items)
    if kind == "dict":
        used, _, keys = struct.unpack_from("qQQ", raw, at + 16)
        return f"used {used} keys {keys:#x}"
    if name in ("coroutine", "generator"):
        return "qualname " + text_of(struct.unpack_from("Q", raw, at + 40)[0])
    if name == "_asyncio.Task":
        coro = int(gdb.parse_and_eval(f"(unsigned long)((TaskObj*){address + at:#x})->task_coro"))
        return "coro " + text_of(word(coro + 40))
    if name == "builtin_function_or_method":
        method, owner = struct.unpack_from("QQ", raw, at + 16)
        called = read(word(method), 40).split(b"\0")[0].decode(errors="replace")
        return f"{called} of {type_name(word(owner + 8)) if owner else None} at {owner:#x}"
    return ""


def describe(address: int, size: int) -> str:
    raw = read(address, size)
    for at in (0, 16):  # an object, or one after its collector header
        if at + 16 > size:
            continue
        refcount, kind_address = struct.unpack_from("QQ", raw, at)
        name = type_name(kind_address)
        if name is None or refcount >= 1 << 32:
            continue
        try:
            value = value_of(VALUE_TYPES.get(kind_address, ""), name, raw, at, address)
        except (gdb.MemoryError, gdb.error):
            value = "?"
        free = " (in a free list)" if refcount == 0 else ""
        return f"{name}{free} refcount {refcount} {value}".rstrip()
    return "raw " + raw[:48].hex()


ARENAS = gdb.parse_and_eval("arenas")
MAX_ARENAS = int(gdb.parse_and_eval("maxarenas"))


def block_of(address: int) -> tuple[int, int] | None:
    """The pymalloc block holding ``address`` (its start and size), if any."""
    pool = address & ~(POOL - 1)
    try:
        header = struct.unpack("IIQQQIIII", read(pool, 48))
    except gdb.MemoryError:
        return None
    count, arena, index, _, maxnext = header[0], header[5], header[6], header[7], header[8]
    size = (index + 1) * 16
    if not (0 < count <= 1024 and index < 32 and maxnext == POOL - size and arena < MAX_ARENAS):
        return None
    if not int(ARENAS[arena]["address"]) or address < pool + 48:
        return None
    return pool + 48 + (address - pool - 48) // size * size, size


def mappings() -> list[tuple[int, int, str]]:
    found = []
    with open(f"/proc/{INFERIOR.pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            if not fields[1].startswith("rw") or name.startswith(("/dev", "anon_inode", "[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end, name))
    return found


def referrers(targets: list[int]) -> dict[int, list[tuple[int, str]]]:
    """Aligned words equal to each target (or to its object after a collector header)."""
    patterns = {t: (struct.pack("Q", t), struct.pack("Q", t + 16)) for t in targets}
    found: dict[int, list[tuple[int, str]]] = {t: [] for t in targets}
    for start, end, name in mappings():
        for chunk in range(start, end, 1 << 20):
            try:
                data = read(chunk, min(1 << 20, end - chunk))
            except gdb.MemoryError:
                continue
            for target, pair in patterns.items():
                for pattern in pair:
                    i = data.find(pattern)
                    while i >= 0:
                        if i % 8 == 0:
                            found[target].append((chunk + i, name))
                        i = data.find(pattern, i + 1)
    return found


def referrer_lines(targets: list[int], limit: int) -> tuple[list[str], list[int]]:
    lines: list[str] = []
    blocks: list[int] = []
    for target, where in referrers(targets).items():
        lines.append(f"  {target:#x}:")
        for address, name in where[:limit]:
            block = block_of(address)
            if block is None:
                lines.append(f"    from {address:#x} (not pymalloc: {name or 'anonymous'})")
                continue
            text = describe(*block)
            if address - block[0] < 16 and not text.startswith("raw"):
                continue  # a collector link or the header of an object, not a reference
            lines.append(f"    from {address:#x} (+{address - block[0]} in {block[0]:#x}: {text})")
            blocks.append(block[0])
    return lines, list(dict.fromkeys(blocks))


def main() -> None:
    sparse = int(os.environ.get("CENSUS_SPARSE", "40"))
    lines: list[str] = []
    pins: list[int] = []
    in_use = 0
    for i in range(MAX_ARENAS):
        arena = ARENAS[i]
        base = int(arena["address"])
        if not base:
            continue
        in_use += 1
        free, total = int(arena["nfreepools"]), int(arena["ntotalpools"])
        used = []
        pool = (base + POOL - 1) & ~(POOL - 1)
        while pool < int(arena["pool_address"]):
            count, _, first_free, _, _, index, size_index, next_offset, _ = struct.unpack(
                "IIQQQIIII", read(pool, 48)
            )
            if count > 0 and index == i:
                used.append((pool, count, first_free, size_index, next_offset))
            pool += POOL
        blocks = sum(u[1] for u in used)
        lines.append(
            f"arena {i} at {base:#x}: {free}/{total} pools free, {len(used)} used, {blocks} blocks"
        )
        if free < sparse:
            continue
        for pool, count, first_free, size_index, next_offset in used:
            size = (size_index + 1) * 16
            free_blocks: set[int] = set()
            block = first_free
            while block and pool <= block < pool + POOL and block not in free_blocks:
                free_blocks.add(block)
                block = word(block)
            lines.append(f"  pool {pool:#x}, blocks of {size} B: {count}")
            for address in range(pool + 48, pool + next_offset, size):
                if address not in free_blocks:
                    lines.append(f"    {address:#x} {describe(address, size)}")
                    if len(used) <= 8:
                        pins.append(address)
    if 0 < len(pins) <= 60:
        lines.append("referrers:")
        found, holders = referrer_lines(pins, 8)
        lines += found
        lines.append("their referrers:")
        lines += referrer_lines(holders[:60], 6)[0]
    out = os.environ.get("CENSUS_OUT")
    text = f"arenas in use {in_use}\n" + "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        print(text, end="")


main()
