//! Store conformance: one suite of behaviours the vault relies on, run against every backend
//! (local directory, memory, Azurite, moto S3, and the fault wrapper with no rules), plus the
//! fault wrapper's own behaviour.
//!
//! Each backend test starts from an empty namespace (fresh directory, container or bucket), so
//! the cases may use fixed keys. The suite reports "N/N cases passed" per backend on stderr,
//! past the harness's capture, so a run shows what was covered.

use crate::emulators;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use bytes::Bytes;
use drvault::store::faulty::{FaultKind, FaultOp, FaultRule, FaultStats, FaultyStore};
use drvault::store::{Key, PutOutcome, Store, StoreError};

fn key(s: &str) -> Key {
    let parts: Vec<&str> = s.split('/').collect();
    Key::new(&parts).unwrap_or_else(|| panic!("test key {s:?} refused"))
}

/// Deterministic, incompressible-looking content so a misplaced byte range shows.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let take = (len - v.len()).min(8);
        v.extend_from_slice(&x.to_le_bytes()[..take]);
    }
    Bytes::from(v)
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

// ---------------------------------------------------------------------------------------------
// The suite.

async fn round_trip(s: &Store) {
    for (name, data) in [
        ("empty", Bytes::new()),
        ("one", Bytes::from_static(b"\x7f")),
        ("big", pattern(8 << 20, 1)),
    ] {
        let k = key(&format!("rt/{name}"));
        s.put(&k, data.clone()).await.unwrap();
        let back = s.get(&k).await.unwrap();
        assert!(
            back == data,
            "{name}: got {} bytes back, wrote {}",
            back.len(),
            data.len()
        );
        assert_eq!(
            s.head(&k).await.unwrap(),
            Some(data.len() as u64),
            "{name}: head size"
        );
    }
}

async fn get_range(s: &Store) {
    let k = key("range/obj");
    let data = pattern(1000, 2);
    s.put(&k, data.clone()).await.unwrap();
    assert_eq!(
        s.get_range(&k, 10..20).await.unwrap(),
        data.slice(10..20),
        "inside"
    );
    assert_eq!(
        s.get_range(&k, 990..1000).await.unwrap(),
        data.slice(990..1000),
        "to the end"
    );
    assert_eq!(s.get_range(&k, 0..1000).await.unwrap(), data, "whole");
    assert_eq!(
        s.get_range(&k, 999..1000).await.unwrap(),
        data.slice(999..1000),
        "last byte"
    );
}

/// Ranges that are empty or not entirely inside the object are refused, never short.
#[allow(clippy::reversed_empty_ranges)] // an inverted range is one of the inputs under test
async fn get_range_refuses_bad_ranges(s: &Store) {
    let k = key("range/bad");
    s.put(&k, pattern(100, 5)).await.unwrap();
    for (r, size) in [
        (50..150, Some(100)),
        (100..101, Some(100)),
        (150..160, Some(100)),
        (10..10, None),
        (20..10, None),
    ] {
        match s.get_range(&k, r.clone()).await {
            Err(StoreError::BadRange {
                key,
                range,
                size: got,
            }) => {
                assert_eq!(
                    (key.as_str(), range.clone(), got),
                    ("range/bad", r.clone(), size),
                    "{r:?}"
                );
            }
            other => panic!("range {r:?} of a 100-byte object: {other:?}"),
        }
    }
    let empty = key("range/empty");
    s.put(&empty, Bytes::new()).await.unwrap();
    match s.get_range(&empty, 0..1).await {
        Err(StoreError::BadRange { size: Some(0), .. }) => {}
        other => panic!("range 0..1 of an empty object: {other:?}"),
    }
}

async fn missing_objects(s: &Store) {
    let k = key("missing/nothing-here");
    assert_eq!(s.head(&k).await.unwrap(), None);
    match s.get(&k).await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, "missing/nothing-here"),
        other => panic!("get of missing key: {other:?}"),
    }
    match s.get_range(&k, 0..1).await {
        Err(StoreError::NotFound { .. }) => {}
        other => panic!("get_range of missing key: {other:?}"),
    }
}

async fn delete_is_idempotent(s: &Store) {
    let k = key("del/x");
    s.delete(&k).await.unwrap();
    s.put(&k, Bytes::from_static(b"x")).await.unwrap();
    s.delete(&k).await.unwrap();
    assert_eq!(s.head(&k).await.unwrap(), None);
    assert!(matches!(s.get(&k).await, Err(StoreError::NotFound { .. })));
    s.delete(&k).await.unwrap();
}

/// Overwrites replace the whole object: a concurrent reader sees the old or the new content,
/// never a mix or a truncated object.
async fn put_overwrites_atomically(s: &Store) {
    let k = key("ow/obj");
    let a = pattern(1 << 20, 3);
    let b = pattern(700 << 10, 4);
    s.put(&k, a.clone()).await.unwrap();

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (s, k, a, b, done) = (s.clone(), k.clone(), a.clone(), b.clone(), done.clone());
        tokio::spawn(async move {
            let mut reads = 0u32;
            // At least a few reads even if the writer finishes first.
            while reads < 4 || !done.load(std::sync::atomic::Ordering::Acquire) {
                let got = s.get(&k).await.unwrap();
                assert!(
                    got == a || got == b,
                    "read {} bytes matching neither version",
                    got.len()
                );
                reads += 1;
            }
        })
    };
    for i in 0..10 {
        let next = if i % 2 == 0 { &b } else { &a };
        s.put(&k, next.clone()).await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    reader.await.unwrap();
    // The last write (i = 9) was `a`.
    assert!(s.get(&k).await.unwrap() == a);
    assert_eq!(s.head(&k).await.unwrap(), Some(a.len() as u64));
}

async fn put_if_absent_keeps_first(s: &Store) {
    let k = key("pia/x");
    assert_eq!(
        s.put_if_absent(&k, Bytes::from_static(b"first"))
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        s.put_if_absent(&k, Bytes::from_static(b"second"))
            .await
            .unwrap(),
        PutOutcome::Existed
    );
    assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"first"));
    // An overwrite is still allowed afterwards, and create-only still refuses.
    s.put(&k, Bytes::from_static(b"third")).await.unwrap();
    assert_eq!(
        s.put_if_absent(&k, Bytes::from_static(b"fourth"))
            .await
            .unwrap(),
        PutOutcome::Existed
    );
    assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"third"));
}

async fn concurrent_put_if_absent_has_one_winner(s: &Store) {
    let k = key("race/x");
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move {
                let content = pattern(4096 + i as usize, 100 + i);
                let outcome = s.put_if_absent(&k, content.clone()).await.unwrap();
                (outcome, content)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (outcome, content) = t.await.unwrap();
        if outcome == PutOutcome::Created {
            winners.push(content);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "{} writers were told Created",
        winners.len()
    );
    assert!(
        s.get(&k).await.unwrap() == winners[0],
        "stored content is not the winner's"
    );
}

async fn list_exact_prefix(s: &Store) {
    let inside = [
        ("lst/a/b/1", 1),
        ("lst/a/b/deep/2", 2),
        ("lst/a/b/deep/er/3", 3),
    ];
    let outside = [
        ("lst/a/bc/4", 4),
        ("lst/a/b.sib", 5),
        ("lst/ab", 6),
        ("lst/a/bb", 7),
    ];
    for (k, n) in inside.iter().chain(outside.iter()) {
        s.put(&key(k), pattern(*n, *n as u64)).await.unwrap();
    }
    let listed = |v: Vec<drvault::store::Listed>| -> BTreeMap<String, u64> {
        v.into_iter().map(|l| (l.key.to_string(), l.size)).collect()
    };
    let got = listed(s.list(&key("lst/a/b")).await.unwrap());
    let want: BTreeMap<String, u64> = inside
        .iter()
        .map(|(k, n)| (k.to_string(), *n as u64))
        .collect();
    assert_eq!(got, want, "list lst/a/b");
    let got = listed(s.list(&key("lst/a")).await.unwrap());
    assert_eq!(got.len(), 6, "list lst/a: {got:?}");
    assert!(!got.contains_key("lst/ab"));
    assert!(s.list(&key("lst/none")).await.unwrap().is_empty());
    // A listed key's last segment is its name.
    assert!(s
        .list(&key("lst/a/b/deep/er"))
        .await
        .unwrap()
        .iter()
        .all(|l| l.key.name() == "3"));
}

/// A prefix of stored keys is not itself an object.
async fn prefix_is_not_an_object(s: &Store) {
    s.put(&key("pfx/dir/obj"), Bytes::from_static(b"o"))
        .await
        .unwrap();
    let dir = key("pfx/dir");
    assert_eq!(s.head(&dir).await.unwrap(), None);
    assert!(matches!(
        s.get(&dir).await,
        Err(StoreError::NotFound { .. })
    ));
    s.delete(&dir).await.unwrap();
    assert_eq!(s.head(&key("pfx/dir/obj")).await.unwrap(), Some(1));
}

async fn every_allowed_character_class(s: &Store) {
    let long = "Z".repeat(128);
    let segments = [
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "abcdefghijklmnopqrstuvwxyz",
        "0123456789",
        "a.b_c-d",
        "-",
        "_",
        "...",
        ".hidden",
        "trailing.",
        "-lead-",
        long.as_str(),
    ];
    for (i, seg) in segments.iter().enumerate() {
        let k = Key::new(&["chars", seg, seg]).unwrap_or_else(|| panic!("{seg:?} refused"));
        s.put(&k, Bytes::copy_from_slice(seg.as_bytes()))
            .await
            .unwrap();
        assert_eq!(
            s.get(&k).await.unwrap(),
            seg.as_bytes(),
            "segment {i} {seg:?}"
        );
        assert_eq!(
            s.head(&k).await.unwrap(),
            Some(seg.len() as u64),
            "segment {seg:?}"
        );
    }
    let listed: Vec<String> = s
        .list(&key("chars"))
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key.to_string())
        .collect();
    let mut want: Vec<String> = segments
        .iter()
        .map(|seg| format!("chars/{seg}/{seg}"))
        .collect();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    want.sort();
    assert_eq!(listed_sorted, want);
}

/// Names a backend would treat specially (the local backend's `#<digits>` staging files, path
/// traversal, separators inside a segment) cannot even be expressed as a `Key`.
async fn special_keys_are_unrepresentable(_s: &Store) {
    for seg in [
        ".", "..", "", "x#1", "obj#12", "a/b", "a\\b", "%2E%2E", "a b", "a\nb", "é", "a:b", "*",
    ] {
        assert!(Key::new(&["v", seg]).is_none(), "{seg:?} accepted");
    }
    assert!(Key::new(&["a".repeat(129)]).is_none());
    assert!(Key::new::<&str>(&[]).is_none());
}

/// Runs every case; returns how many passed (a failing case panics with its name).
async fn conformance(s: &Store, backend: &str) -> usize {
    macro_rules! cases {
        ($($case:ident),* $(,)?) => {{
            let mut passed = 0usize;
            let total = [$(stringify!($case)),*].len();
            $(
                $case(s).await;
                passed += 1;
                report(&format!("conformance[{backend}] ok: {}", stringify!($case)));
            )*
            report(&format!("conformance[{backend}]: {passed}/{total} cases passed"));
            passed
        }};
    }
    cases!(
        round_trip,
        get_range,
        get_range_refuses_bad_ranges,
        missing_objects,
        delete_is_idempotent,
        put_overwrites_atomically,
        put_if_absent_keeps_first,
        concurrent_put_if_absent_has_one_winner,
        list_exact_prefix,
        prefix_is_not_an_object,
        every_allowed_character_class,
        special_keys_are_unrepresentable,
    )
}

const CASES: usize = 12;

// ---------------------------------------------------------------------------------------------
// Backends.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_local() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(
        &format!("file://{}", dir.path().join("vault").display()),
        &[],
    )
    .unwrap();
    assert_eq!(conformance(&s, "local").await, CASES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_memory() {
    let s = Store::open("memory://", &[]).unwrap();
    assert_eq!(conformance(&s, "memory").await, CASES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_azurite() {
    let Some(azurite) = emulators::Azurite::start() else {
        return;
    };
    assert!(azurite.create_container("conformance").await);
    let s = Store::open("az://conformance", &azurite.store_options("conformance")).unwrap();
    assert_eq!(conformance(&s, "azurite").await, CASES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_moto_s3() {
    let Some(moto) = emulators::Moto::start() else {
        return;
    };
    moto.create_bucket("conformance").await;
    let s = Store::open("s3://conformance", &moto.store_options("conformance")).unwrap();
    assert_eq!(conformance(&s, "moto-s3").await, CASES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_faulty_wrapper_without_rules() {
    let dir = tempfile::tempdir().unwrap();
    let inner = Store::open(&format!("file://{}", dir.path().display()), &[]).unwrap();
    let (s, handle) = FaultyStore::wrap(&inner, 42);
    assert_eq!(conformance(&s, "faulty(local)").await, CASES);
    assert_eq!(handle.stats(), FaultStats::default());
}

/// Documents the one known divergence (see the layout rule in `store`'s module docs): the local
/// backend cannot hold `a/b` as an object while `a/b/...` exists. If object_store ever changes
/// this, the test tells us the rule can be relaxed.
#[tokio::test]
async fn local_backend_cannot_hold_object_and_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&format!("file://{}", dir.path().display()), &[]).unwrap();
    s.put(&key("lay/a/b"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert!(s
        .put(&key("lay/a"), Bytes::from_static(b"y"))
        .await
        .is_err());
    assert_eq!(
        s.put_if_absent(&key("lay/a"), Bytes::from_static(b"y"))
            .await
            .unwrap(),
        PutOutcome::Existed
    );
    assert_eq!(s.head(&key("lay/a")).await.unwrap(), None);
    s.put(&key("lay/c"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert!(s
        .put(&key("lay/c/d"), Bytes::from_static(b"y"))
        .await
        .is_err());
}

// ---------------------------------------------------------------------------------------------
// Azure container creation against the emulator.

#[tokio::test]
async fn azure_ensure_container_reports_created_then_existing() {
    use drvault::store::azure::ensure_container;
    let Some(azurite) = emulators::Azurite::start() else {
        return;
    };
    let (url, acct, secret) = (
        azurite.url(),
        emulators::AZURITE_ACCOUNT,
        emulators::AZURITE_KEY,
    );
    assert!(ensure_container(&url, acct, secret, "made-here")
        .await
        .unwrap());
    assert!(!ensure_container(&url, acct, secret, "made-here")
        .await
        .unwrap());
    // The container is usable by the store right away.
    let s = Store::open("az://made-here", &azurite.store_options("made-here")).unwrap();
    s.put(&key("x"), Bytes::from_static(b"x")).await.unwrap();

    // A wrong (but well-formed) key is a definite configuration error, not a retryable one.
    let wrong =
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==";
    match ensure_container(&url, acct, wrong, "other").await {
        Err(StoreError::Config(msg)) => assert!(msg.contains("403"), "{msg}"),
        other => panic!("wrong key: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The fault wrapper.

fn faulty_memory(seed: u64) -> (Store, drvault::store::faulty::FaultHandle) {
    FaultyStore::wrap(&Store::open("memory://", &[]).unwrap(), seed)
}

#[tokio::test]
async fn fault_error_on_get_is_unavailable() {
    let (s, h) = faulty_memory(1);
    let k = key("f/get");
    s.put(&k, Bytes::from_static(b"v")).await.unwrap();
    h.set_rules(vec![FaultRule::new(FaultOp::Get, FaultKind::Error(1.0))])
        .unwrap();
    for _ in 0..3 {
        match s.get(&k).await {
            Err(StoreError::Unavailable {
                op: "get",
                key,
                source,
            }) => {
                assert_eq!(key, "f/get");
                assert!(source.to_string().contains("injected"), "{source}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert_eq!(h.stats().errors, 3);
    h.clear();
    assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"v"));
}

#[tokio::test]
async fn fault_rule_with_remaining_fires_that_many_times() {
    let (s, h) = faulty_memory(2);
    let k = key("f/rem");
    s.put(&k, Bytes::from_static(b"v")).await.unwrap();
    h.set_rules(vec![
        FaultRule::new(FaultOp::Get, FaultKind::Error(1.0)).times(3)
    ])
    .unwrap();
    let outcomes: Vec<bool> = get_outcomes(&s, &k, 6).await;
    assert_eq!(outcomes, [false, false, false, true, true, true]);
    assert_eq!(
        h.stats(),
        FaultStats {
            errors: 3,
            ..Default::default()
        }
    );
    assert_eq!(h.rules()[0].remaining, Some(0));
}

/// `n` sequential gets; true where the get succeeded.
async fn get_outcomes(s: &Store, k: &Key, n: usize) -> Vec<bool> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(s.get(k).await.is_ok());
    }
    v
}

#[tokio::test]
async fn fault_torn_put_leaves_nothing_visible() {
    let (s, h) = faulty_memory(3);
    h.set_rules(vec![
        FaultRule::new(FaultOp::Any, FaultKind::Torn).under("f/torn")
    ])
    .unwrap();
    let k = key("f/torn/new");
    assert!(matches!(
        s.put(&k, Bytes::from_static(b"n")).await,
        Err(StoreError::Unavailable { op: "put", .. })
    ));
    assert!(matches!(
        s.put_if_absent(&k, Bytes::from_static(b"n")).await,
        Err(StoreError::Unavailable {
            op: "put_if_absent",
            ..
        })
    ));
    assert_eq!(s.head(&k).await.unwrap(), None);
    assert!(s.list(&key("f/torn")).await.unwrap().is_empty());

    // A torn overwrite leaves the previous version in place.
    let old = key("f/torn-old");
    h.clear();
    s.put(&old, Bytes::from_static(b"old")).await.unwrap();
    h.set_rules(vec![
        FaultRule::new(FaultOp::Put, FaultKind::Torn).under("f/torn")
    ])
    .unwrap();
    assert!(s.put(&old, Bytes::from_static(b"new")).await.is_err());
    assert_eq!(s.get(&old).await.unwrap(), Bytes::from_static(b"old"));
    assert_eq!(h.stats().torn, 3);
}

#[tokio::test]
async fn fault_lost_after_ack_reports_success_but_writes_nothing() {
    let (s, h) = faulty_memory(4);
    h.set_rules(vec![
        FaultRule::new(FaultOp::Put, FaultKind::LostAfterAck).times(1),
        FaultRule::new(FaultOp::PutIfAbsent, FaultKind::LostAfterAck).times(1),
    ])
    .unwrap();
    let (a, b) = (key("f/lost/a"), key("f/lost/b"));
    s.put(&a, Bytes::from_static(b"a")).await.unwrap();
    assert_eq!(
        s.put_if_absent(&b, Bytes::from_static(b"b")).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(s.head(&a).await.unwrap(), None);
    assert!(matches!(s.get(&b).await, Err(StoreError::NotFound { .. })));
    assert_eq!(
        h.stats(),
        FaultStats {
            lost_after_ack: 2,
            ..Default::default()
        }
    );
    // Both rules are used up: the retry lands.
    assert_eq!(
        s.put_if_absent(&b, Bytes::from_static(b"b")).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(s.get(&b).await.unwrap(), Bytes::from_static(b"b"));
}

/// The sequence of injected faults for a given seed, over a fixed sequence of calls.
async fn fault_sequence(seed: u64) -> (Vec<bool>, FaultStats) {
    let (s, h) = faulty_memory(seed);
    let k = key("f/seq");
    s.put(&k, Bytes::from_static(b"v")).await.unwrap();
    h.set_rules(vec![
        FaultRule::new(FaultOp::Get, FaultKind::Error(0.5)),
        FaultRule::new(FaultOp::Head, FaultKind::Error(0.3)),
    ])
    .unwrap();
    let mut seq = Vec::new();
    for i in 0..64 {
        seq.push(s.get(&k).await.is_ok());
        if i % 3 == 0 {
            seq.push(s.head(&k).await.is_ok());
        }
    }
    (seq, h.stats())
}

#[tokio::test]
async fn fault_same_seed_gives_same_sequence() {
    let (a, stats_a) = fault_sequence(0xD5_7A_u64).await;
    let (b, stats_b) = fault_sequence(0xD5_7A_u64).await;
    let (c, _) = fault_sequence(7).await;
    assert_eq!(a, b);
    assert_eq!(stats_a, stats_b);
    assert_ne!(a, c, "different seeds gave the same 86 decisions");
    // Probability 0.5 over 64 gets: both outcomes occur.
    assert!(a.contains(&true) && a.contains(&false));
}

#[tokio::test]
async fn fault_latency_delays_without_failing() {
    let (s, h) = faulty_memory(5);
    let k = key("f/slow");
    h.set_rules(vec![FaultRule::new(
        FaultOp::Any,
        FaultKind::Latency(Duration::from_millis(2)),
    )])
    .unwrap();
    s.put(&k, Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"v"));
    assert_eq!(s.list(&key("f")).await.unwrap().len(), 1);
    s.delete(&k).await.unwrap();
    assert_eq!(
        h.stats(),
        FaultStats {
            latencies: 4,
            ..Default::default()
        }
    );
}
