#!/usr/bin/env python3
"""Converts disk image files to and from the fuzz targets' sparse encoding (fuzz/src/lib.rs).

  sparse.py encode IN OUT   file -> sparse input (zero sectors dropped, byte runs as fills)
  sparse.py decode IN OUT   sparse input -> flat file (to inspect or to write a regression test)
"""
import struct
import sys

MAX_FILE_LEN = (1 << 30) - 1
MAX_PIECE = 0x7FFF
MIN_FILL = 32


def encode(data: bytes) -> bytes:
    if len(data) > MAX_FILE_LEN:
        raise SystemExit(f"file of {len(data)} bytes is over the {MAX_FILE_LEN}-byte limit")
    out = bytearray(struct.pack("<I", len(data)))
    zero = bytes(512)
    pos = 0
    while pos < len(data):
        # Runs of non-zero 512-byte sectors become records; all-zero sectors are dropped.
        if data[pos:pos + 512] == zero[: min(512, len(data) - pos)]:
            pos += 512
            continue
        end = pos
        while end < len(data) and data[end:end + 512] != zero[: min(512, len(data) - end)]:
            end += 512
        end = min(end, len(data))
        out += encode_run(pos, data[pos:end])
        pos = end
    return bytes(out)


def encode_run(base: int, run: bytes) -> bytes:
    out = bytearray()
    i = 0
    lit_start = 0

    def literal(a: int, b: int) -> None:
        while a < b:
            n = min(MAX_PIECE, b - a)
            out.extend(struct.pack("<IH", base + a, n))
            out.extend(run[a:a + n])
            a += n

    while i < len(run):
        j = i
        while j < len(run) and run[j] == run[i] and j - i < MAX_PIECE:
            j += 1
        if j - i >= MIN_FILL:
            literal(lit_start, i)
            if run[i] != 0:
                out.extend(struct.pack("<IHB", base + i, 0x8000 | (j - i), run[i]))
            lit_start = j
        i = j
    literal(lit_start, len(run))
    return bytes(out)


def decode(data: bytes) -> bytes:
    (length,) = struct.unpack_from("<I", data, 0)
    if length & 0x80000000:
        print("note: checksum-fixing bit set; the target recomputes header checksums that "
              "this flat file keeps as they are", file=sys.stderr)
    length &= MAX_FILE_LEN
    out = bytearray(length)
    rest = 4
    while len(data) - rest >= 6:
        at, n = struct.unpack_from("<IH", data, rest)
        rest += 6
        if n & 0x8000:
            if rest >= len(data):
                break
            piece = bytes([data[rest]]) * (n & 0x7FFF)
            rest += 1
        else:
            piece = data[rest:rest + n]
            rest += len(piece)
        if at < length:
            piece = piece[: length - at]
            out[at:at + len(piece)] = piece
    return bytes(out)


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[1] not in ("encode", "decode"):
        raise SystemExit(__doc__)
    with open(sys.argv[2], "rb") as f:
        data = f.read()
    result = encode(data) if sys.argv[1] == "encode" else decode(data)
    with open(sys.argv[3], "wb") as f:
        f.write(result)


if __name__ == "__main__":
    main()
