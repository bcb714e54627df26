//! The `drvault` binary; everything lives in the library (see `drvault::cli`).
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(drvault::cli::main());
}
