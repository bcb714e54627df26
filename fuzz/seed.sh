#!/bin/sh
# Writes seed logs made by drvault's own HRL writer into fuzz/corpus/hrl/ (git-ignored).
# Then, with cargo-fuzz and a nightly toolchain:
#   cd fuzz && cargo +nightly fuzz run hrl corpus/hrl -- -max_total_time=300
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/fuzz/corpus/hrl"
HRL_SEED_DIR="$root/fuzz/corpus/hrl" cargo test --manifest-path "$root/Cargo.toml" --lib \
    format::hrl::tests::write_fuzz_seeds -- --ignored --exact
ls -l "$root/fuzz/corpus/hrl"
