#!/bin/sh
# Makes the seed corpora of every fuzz target under fuzz/corpus/<target>/ (git-ignored):
# - hrl: logs from drvault's own HRL writer;
# - vhd, vhdx: images made by qemu-img / qemu-io (fixed and dynamic, some with data), our
#   writer's fixed VHDs, a hand-made differencing VHD whose parent the targets provide, and
#   VHDX files with a log to replay; converted to the targets' sparse encoding (sparse.py);
#   copies of them with damaged signatures (identifier, one header, cookies, end footer);
# - image: all of those plus two raw files;
# - sealed, sealed_roundtrip: objects sealed by the library with the fuzz key ring;
# - blockmap: block-map roots and segments.
# Library-made seeds come from `#[ignore]` tests named write_fuzz_seeds (format::hrl,
# format::vhd, format::vhdx, chunk::seal). Needs qemu-utils and python3. Then, e.g.:
#   cd fuzz && cargo +nightly fuzz run vhd -- -max_total_time=300 -rss_limit_mb=2048
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
corpus="$root/fuzz/corpus"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in hrl vhd vhdx image sealed sealed_roundtrip blockmap; do mkdir -p "$corpus/$t"; done
mkdir -p "$work/vhd" "$work/vhdx"

# Seeds from drvault's own writers and from hand-made structures qemu cannot make.
HRL_SEED_DIR="$corpus/hrl" VHD_SEED_DIR="$work/vhd" VHDX_SEED_DIR="$work/vhdx" \
SEALED_SEED_DIR="$corpus/sealed" SEALED_ROUNDTRIP_SEED_DIR="$corpus/sealed_roundtrip" \
    cargo test --manifest-path "$root/Cargo.toml" --lib -- --ignored --exact \
    format::hrl::tests::write_fuzz_seeds format::vhd::tests::write_fuzz_seeds \
    format::vhdx::tests::write_fuzz_seeds chunk::seal::tests::write_fuzz_seeds

# qemu-made images. VHD blocks are 2 MiB, so keep the disks small.
q() { qemu-img "$@" >/dev/null; }
w() { qemu-io -f "$1" -c "write -P $2 $3 $4" "$5" >/dev/null; }
q create -f vpc -o subformat=fixed "$work/vhd/qemu-fixed.vhd" 1M
w vpc 0xab 0 64k "$work/vhd/qemu-fixed.vhd"
q create -f vpc -o subformat=dynamic "$work/vhd/qemu-dynamic-empty.vhd" 1M
q create -f vpc -o subformat=dynamic "$work/vhd/qemu-dynamic.vhd" 4M
w vpc 0xab 0 64k "$work/vhd/qemu-dynamic.vhd"
w vpc 0x5c 3145728 4k "$work/vhd/qemu-dynamic.vhd"
head -c 1048576 /dev/zero | tr '\0' '\253' > "$work/raw.img"
q convert -f raw -O vpc -o subformat=dynamic "$work/raw.img" "$work/vhd/qemu-converted.vhd"
q create -f vhdx -o subformat=dynamic,block_size=1M "$work/vhdx/qemu-dynamic.vhdx" 8M
w vhdx 0xab 0 64k "$work/vhdx/qemu-dynamic.vhdx"
w vhdx 0x5c 3145728 4k "$work/vhdx/qemu-dynamic.vhdx"
q create -f vhdx -o subformat=dynamic "$work/vhdx/qemu-dynamic-empty.vhdx" 4M
q create -f vhdx -o subformat=fixed,block_size=1M "$work/vhdx/qemu-fixed.vhdx" 4M
w vhdx 0xab 0 64k "$work/vhdx/qemu-fixed.vhdx"
q convert -f raw -O vhdx -o subformat=dynamic,block_size=1M "$work/raw.img" \
    "$work/vhdx/qemu-converted.vhdx"

# Damaged signatures: a VHDX whose identifier is overwritten and a VHD with both cookies
# damaged (refused: never read as raw), one VHDX header or a dynamic VHD's end footer damaged
# in place (tolerated, as the specifications allow), a head copy or a fixed footer damaged.
dmg() { cp "$1" "$2"; printf '%s' "$3" | dd of="$2" bs=1 seek="$4" conv=notrunc status=none; }
end() { echo $(( $(stat -c %s "$1") - 512 )); }
x="$work/vhdx/qemu-dynamic.vhdx"
dmg "$x" "$work/vhdx/damaged-identifier.vhdx" XXXXXXXX 0
dmg "$x" "$work/vhdx/damaged-header1.vhdx" XXXX 65536
dmg "$x" "$work/vhdx/damaged-header2.vhdx" XXXX 131072
v="$work/vhd/qemu-dynamic.vhd"
dmg "$v" "$work/vhd/damaged-end-footer.vhd" XXXXXXXX "$(end "$v")"
dmg "$v" "$work/vhd/damaged-head-copy.vhd" XXXXXXXX 0
dmg "$work/vhd/damaged-head-copy.vhd" "$work/vhd/damaged-both-cookies.vhd" XXXXXXXX "$(end "$v")"
v="$work/vhd/qemu-fixed.vhd"
dmg "$v" "$work/vhd/damaged-fixed-cookie.vhd" XXXXXXXX "$(end "$v")"

enc() { python3 "$root/fuzz/sparse.py" encode "$1" "$2"; }
for f in "$work"/vhd/* "$work"/vhdx/*; do
    t=$(basename "$(dirname "$f")")
    enc "$f" "$corpus/$t/$(basename "$f")"
    cp "$corpus/$t/$(basename "$f")" "$corpus/image/"
done
# The same disks with bit 31 of the length set: the target recomputes their header checksums
# after mutation (fuzz/src/lib.rs), so mutated header fields reach their own checks.
for f in "$corpus"/vhd/* "$corpus"/vhdx/*; do
    case "$f" in *-fixsum) continue ;; esac
    python3 -c 'import sys; d = bytearray(open(sys.argv[1], "rb").read()); d[3] |= 0x80; open(sys.argv[2], "wb").write(d)' "$f" "$f-fixsum"
done
printf 'not an image' > "$work/raw-small"
enc "$work/raw-small" "$corpus/image/raw-small"
enc "$work/raw.img" "$corpus/image/raw-1m"

# Block maps: u16 root length, root, then u16-prefixed segments (see fuzz_targets/blockmap.rs).
python3 - "$corpus/blockmap" <<'PY'
import struct, sys
out = sys.argv[1]
def root(block, disk, slots):
    count = -(-disk // block)
    return struct.pack("<IIQQII", 1, block, disk, count, len(slots), 0) + b"".join(slots)
def frame(r, segs):
    b = struct.pack("<H", len(r)) + r
    for s in segs:
        b += struct.pack("<H", len(s)) + s
    return b
entry = bytes(range(1, 33)) + bytes(32)
seeds = {
    "empty-disk": frame(root(65536, 0, []), []),
    "all-zero": frame(root(65536, 65536 * 3, [bytes(32)]), []),
    "one-segment": frame(root(65536, 65536 * 3 + 512, [b"\x01" * 32]),
                         [entry + bytes(64) + entry + bytes(64)]),
    # A full segment is 64 KiB, over a u16 length: the first one is all zero (no object).
    "two-segments": frame(root(4096, 4096 * 1025, [bytes(32), b"\x01" * 32]), [b"", entry]),
}
for name, data in seeds.items():
    open(f"{out}/{name}", "wb").write(data)
PY
for t in hrl vhd vhdx image sealed sealed_roundtrip blockmap; do
    echo "$t: $(ls "$corpus/$t" | wc -l) seeds, $(du -sk "$corpus/$t" | cut -f1) KiB"
done
