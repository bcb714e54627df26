//! Criterion benchmarks of the block pipeline on 4 MiB blocks, and the baselines that explain it.
//!
//! * `baseline/*`: BLAKE3 alone, the zero check alone, sealing alone (AES-256-GCM without and
//!   with zstd level 1) and opening alone: the costs the pipeline is made of.
//! * `pipeline/memory`, `pipeline/file`: `ChunkStore::put_block` (zero check, hash, name, head,
//!   compress, seal, create-only put) into a `memory://` store and into a local `file://` store
//!   with fsync on, one block at a time, plus one case with 4 blocks in flight.
//!
//! Data: `random` (incompressible), `realistic` (bytes of installed files from /usr/share and
//! /usr/lib concatenated: ELF code, text, compressed archives, i.e. what disks hold) and `zeros`.
//! Every put gets a block that was never stored before (an 8-byte counter stamped into a copy,
//! outside the timed section), or the store would answer from deduplication after the first
//! iteration; stores are emptied every 32 puts, also untimed, to keep memory and disk bounded.
//!
//! Each group measures for 3 s after a 1 s warm-up, so `cargo bench --bench pipeline` stays
//! around two minutes.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};

use drvault::bench::images::{walk_files, WyRand};
use drvault::chunk::digest::is_zero;
use drvault::chunk::seal;
use drvault::chunk::{ChunkStore, CpuPool, KeyRing, PlainHash};
use drvault::file_formats::ObjectKind;
use drvault::store::Store;

const BLOCK: usize = 4 << 20;
/// Distinct realistic blocks (64 MiB of installed files).
const REAL_BLOCKS: usize = 16;
/// Bytes taken from one file for the realistic sample.
const PER_FILE_MAX: usize = 512 << 10;
/// Puts between two (untimed) store resets.
const RESET_EVERY: u64 = 32;

fn random_block() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    WyRand::new(42).fill(&mut b);
    b
}

/// 64 MiB of installed files (the first 512 KiB of each), alternately from /usr/share and
/// /usr/lib in sorted order.
fn realistic_blocks() -> Vec<Vec<u8>> {
    let lists = [
        walk_files(Path::new("/usr/share")),
        walk_files(Path::new("/usr/lib")),
    ];
    let want = BLOCK * REAL_BLOCKS;
    let mut data = Vec::with_capacity(want);
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    'fill: for i in 0..longest {
        for l in &lists {
            if let Some((p, _)) = l.get(i) {
                // At most 512 KiB per file, so that a few large binaries (gcc's cc1 is 30 MB)
                // do not make up the whole sample.
                if let Ok(bytes) = std::fs::read(p) {
                    data.extend_from_slice(bytes.get(..PER_FILE_MAX).unwrap_or(&bytes));
                }
                if data.len() >= want {
                    break 'fill;
                }
            }
        }
    }
    assert!(data.len() >= want, "need 64 MiB of files under /usr");
    data.truncate(want);
    data.chunks(BLOCK).map(<[u8]>::to_vec).collect()
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .throughput(Throughput::Bytes(BLOCK as u64));
}

fn baselines(c: &mut Criterion) {
    let random = random_block();
    let real = realistic_blocks();
    let zeros = vec![0u8; BLOCK];
    let keys = KeyRing::random();

    let mut g = c.benchmark_group("baseline/blake3");
    configure(&mut g);
    g.bench_function("random", |b| b.iter(|| PlainHash::of(black_box(&random))));
    g.bench_function("realistic", |b| {
        b.iter(|| PlainHash::of(black_box(&real[0])))
    });
    g.finish();

    let mut g = c.benchmark_group("baseline/zero_check");
    configure(&mut g);
    g.bench_function("zeros", |b| b.iter(|| is_zero(black_box(&zeros))));
    g.finish();

    let mut g = c.benchmark_group("baseline/seal");
    configure(&mut g);
    let name = "chunks/abc/bench";
    g.bench_function("aes_only/random", |b| {
        b.iter(|| {
            seal::seal(&keys, ObjectKind::Chunk, name, black_box(&random), None).expect("seal")
        })
    });
    g.bench_function("zstd1_aes/random", |b| {
        b.iter(|| {
            seal::seal(&keys, ObjectKind::Chunk, name, black_box(&random), Some(1)).expect("seal")
        })
    });
    let mut i = 0usize;
    g.bench_function("zstd1_aes/realistic", |b| {
        b.iter(|| {
            i = (i + 1) % REAL_BLOCKS;
            seal::seal(&keys, ObjectKind::Chunk, name, black_box(&real[i]), Some(1)).expect("seal")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("baseline/open");
    configure(&mut g);
    for (label, data) in [("random", &random), ("realistic", &real[0])] {
        let sealed = seal::seal(&keys, ObjectKind::Chunk, name, data, Some(1))
            .expect("seal")
            .bytes;
        // open() consumes its input: the copy is made outside the timed section.
        g.bench_function(label, |b| {
            b.iter_batched(
                || sealed.clone(),
                |s| seal::open(&keys, ObjectKind::Chunk, name, s).expect("opens"),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Where `put_block` stores: rebuilt (untimed) every RESET_EVERY puts.
enum Target {
    Memory,
    File(tempfile::TempDir),
}

impl Target {
    fn fresh(&self, keys: &Arc<KeyRing>) -> ChunkStore {
        let store = match self {
            Target::Memory => Store::open("memory://", &[]),
            Target::File(dir) => {
                let root = dir.path().join("vault");
                let _ = std::fs::remove_dir_all(&root);
                Store::open(&format!("file://{}", root.display()), &[])
            }
        }
        .expect("store opens");
        ChunkStore::new(store, keys.clone(), CpuPool::new(2), 1)
    }
}

/// Never-stored copy of `base`: the stamp makes every put a real store, not a dedup hit.
static STAMP: AtomicU64 = AtomicU64::new(1);

fn unique(base: &[u8]) -> Bytes {
    let mut v = base.to_vec();
    if !is_zero(base) {
        let s = STAMP.fetch_add(1, Ordering::Relaxed).to_le_bytes();
        v[..8].copy_from_slice(&s);
    }
    Bytes::from(v)
}

fn put_group(c: &mut Criterion, group: &str, target: Target) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let keys = Arc::new(KeyRing::random());
    let inputs: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("random", vec![random_block()]),
        ("realistic", realistic_blocks()),
        ("zeros", vec![vec![0u8; BLOCK]]),
    ];
    let mut g = c.benchmark_group(group);
    configure(&mut g);
    g.sampling_mode(SamplingMode::Flat);
    for (label, blocks) in &inputs {
        g.bench_function(*label, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut cs = target.fresh(&keys);
                for i in 0..iters {
                    if i > 0 && i % RESET_EVERY == 0 {
                        cs = target.fresh(&keys);
                    }
                    let block = unique(&blocks[i as usize % blocks.len()]);
                    let t = Instant::now();
                    let r = rt.block_on(cs.put_block(block, None)).expect("put");
                    timed += t.elapsed();
                    black_box(r);
                }
                timed
            })
        });
    }
    // Four blocks in flight: what two cores give when fsync and CPU overlap.
    let real = &inputs[1].1;
    g.throughput(Throughput::Bytes(4 * BLOCK as u64));
    g.bench_function("realistic_4_in_flight", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut cs = target.fresh(&keys);
            for i in 0..iters {
                if i > 0 && i % (RESET_EVERY / 4) == 0 {
                    cs = target.fresh(&keys);
                }
                let blocks: Vec<Bytes> = (0..4)
                    .map(|k| unique(&real[(i as usize * 4 + k) % real.len()]))
                    .collect();
                let t = Instant::now();
                rt.block_on(async {
                    let puts = blocks.into_iter().map(|b| cs.put_block(b, None));
                    for r in futures_util::future::join_all(puts).await {
                        black_box(r.expect("put"));
                    }
                });
                timed += t.elapsed();
            }
            timed
        })
    });
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    put_group(c, "pipeline/memory", Target::Memory);
    let dir = tempfile::tempdir().expect("temp dir");
    put_group(c, "pipeline/file", Target::File(dir));
}

criterion_group!(benches, baselines, pipeline);
criterion_main!(benches);
