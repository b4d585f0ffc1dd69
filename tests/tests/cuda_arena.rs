//! The CUDA VMM arena under load (run on the GPU with `--ignored`): many
//! threads growing and shrinking one reservation, every mapped byte checked
//! readable and writable, faults part way through a commit, and clean-up.
//!
//! Sizes: `PAGODA_STRESS_OPS` operations per thread (default 500; the
//! sanitizer run uses fewer).

use std::sync::atomic::{AtomicU8, Ordering};

use pagoda_backend::{Backend, BufRef, FaultInjector, KvArenaOps, RawSegment};
use pagoda_tests::cuda_backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn ops_per_thread() -> usize {
    std::env::var("PAGODA_STRESS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// A view of `[offset, offset + bytes)` of an arena range.
fn view(range: RawSegment, offset: u64, bytes: u64) -> BufRef {
    BufRef {
        segment: Some(range.id),
        offset,
        addr: range.addr + offset,
        bytes,
    }
}

/// The arena is growable on the H200 unless the run forces the fixed path.
fn expect_growable() -> bool {
    std::env::var(pagoda_cuda::VMM_ENV).map_or(true, |v| v.trim() != "0")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn eight_threads_grow_and_shrink_one_arena() {
    let be = cuda_backend();
    assert_eq!(
        be.arena().is_growable(),
        expect_growable(),
        "{}",
        be.info().device
    );
    assert_eq!(be.info().can_grow_kv, expect_growable());
    let g = be.info().kv_commit_granularity;
    assert_eq!(g, 2 << 20, "2 MiB chunks on the H200");
    const CHUNKS: u64 = 192;
    let phys0 = be.arena().physical_bytes();
    let range = be.reserve(CHUNKS * g).unwrap();
    let after_reserve = be.arena().physical_bytes();
    if expect_growable() {
        assert_eq!(after_reserve, phys0, "a reservation maps nothing");
    }
    // 0 = free, 1 = claimed by a thread (claims keep threads off each other's
    // chunks; the arena itself must still survive concurrent map/unmap).
    let claims: Vec<AtomicU8> = (0..CHUNKS).map(|_| AtomicU8::new(0)).collect();
    let threads = 12;
    let n_ops = ops_per_thread();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (be, claims) = (&be, &claims);
            s.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(1000 + t as u64);
                let mut held: Vec<(u64, u64)> = Vec::new();
                let mut done = 0;
                while done < n_ops {
                    if !held.is_empty() && (held.len() > 3 || rng.random_bool(0.45)) {
                        // Shrink: check the bytes once more, then give the chunks back.
                        let (c0, n) = held.swap_remove(rng.random_range(0..held.len()));
                        let bad = be
                            .check_committed(range, c0 * g, n * g, rng.random())
                            .unwrap();
                        assert_eq!(bad, 0, "thread {t}: chunks {c0}+{n} lost bytes");
                        be.decommit(range, c0 * g, n * g).unwrap();
                        for c in c0..c0 + n {
                            claims[c as usize].store(0, Ordering::Release);
                        }
                        done += 1;
                        continue;
                    }
                    // Grow: claim a run of 1-4 free chunks, commit, check.
                    let n = rng.random_range(1..=4u64);
                    let c0 = rng.random_range(0..=CHUNKS - n);
                    let mut got = 0;
                    while got < n
                        && claims[(c0 + got) as usize]
                            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    {
                        got += 1;
                    }
                    if got < n {
                        for c in c0..c0 + got {
                            claims[c as usize].store(0, Ordering::Release);
                        }
                        continue;
                    }
                    be.commit(range, c0 * g, n * g).unwrap();
                    // Committed memory reads as zeros...
                    let mut head = vec![0xAAu8; 4096];
                    be.download(view(range, c0 * g, 4096), &mut head).unwrap();
                    assert!(
                        head.iter().all(|&b| b == 0),
                        "thread {t}: fresh chunk not zeroed"
                    );
                    // ... and every byte can be written and read back.
                    let bad = be
                        .check_committed(range, c0 * g, n * g, rng.random())
                        .unwrap();
                    assert_eq!(bad, 0, "thread {t}: chunks {c0}+{n}");
                    held.push((c0, n));
                    done += 1;
                }
                for (c0, n) in held {
                    be.decommit(range, c0 * g, n * g).unwrap();
                    for c in c0..c0 + n {
                        claims[c as usize].store(0, Ordering::Release);
                    }
                }
            });
        }
    });
    assert_eq!(be.committed_bytes(range), 0);
    assert_eq!(
        be.arena().physical_bytes(),
        after_reserve,
        "every chunk unmapped"
    );
    be.unreserve(range);
    assert_eq!(be.arena().physical_bytes(), phys0);
    assert_eq!(be.arena().num_reservations(), 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn commit_errors_leave_nothing_mapped() {
    let be = cuda_backend();
    let g = be.info().kv_commit_granularity;
    let range = be.reserve(16 * g).unwrap();
    let phys = be.arena().physical_bytes();
    // Committing twice, out of range or unaligned is an error value.
    be.commit(range, 0, g).unwrap();
    assert!(be.commit(range, 0, g).is_err());
    assert!(be.commit(range, 15 * g, 2 * g).is_err());
    assert!(be.commit(range, 1, g).is_err());
    assert!(be.decommit(range, 4 * g, g).is_err(), "not committed");
    be.decommit(range, 0, g).unwrap();
    assert_eq!(be.arena().physical_bytes(), phys);
    // A fault at the third chunk map of a 6-chunk commit undoes the first two.
    let faults = FaultInjector::new();
    be.set_faults(Some(faults.clone()));
    faults.fail_at(3);
    let err = be.commit(range, 2 * g, 6 * g).unwrap_err();
    assert!(err.to_string().contains("cuda chunk map"), "{err}");
    assert_eq!(be.committed_bytes(range), 0);
    assert_eq!(
        be.arena().physical_bytes(),
        phys,
        "nothing stays mapped after the fault"
    );
    faults.fail_at(0);
    be.commit(range, 2 * g, 6 * g).unwrap();
    assert_eq!(be.check_committed(range, 2 * g, 6 * g, 7).unwrap(), 0);
    be.set_faults(None);
    // Unreserving with chunks still mapped unmaps, releases and frees them.
    be.unreserve(range);
    assert_eq!(be.arena().physical_bytes(), 0);
    assert_eq!(be.arena().num_reservations(), 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_memory_follows_commits_and_returns_on_drop() {
    let be = cuda_backend();
    let g = be.info().kv_commit_granularity;
    let free0 = be.memory().unwrap().free_bytes;
    let range = be.reserve(4096 * g).unwrap(); // 8 GiB of address space
    let free_reserved = be.memory().unwrap().free_bytes;
    if expect_growable() {
        assert!(
            free0 - free_reserved.min(free0) < 64 << 20,
            "reserving 8 GiB takes no memory"
        );
        be.commit(range, 0, 512 * g).unwrap(); // 1 GiB
        let used = free0.saturating_sub(be.memory().unwrap().free_bytes);
        assert!(
            (1 << 30..(1 << 30) + (64 << 20)).contains(&used),
            "1 GiB committed: {used}"
        );
    } else {
        let used = free0.saturating_sub(free_reserved);
        assert!(
            used >= 8 << 30,
            "the fixed arena allocates the whole range: {used}"
        );
        be.commit(range, 0, 512 * g).unwrap();
    }
    drop(be); // drop with chunks mapped and the range reserved
    let be = cuda_backend();
    let free1 = be.memory().unwrap().free_bytes;
    assert!(
        free1 + (64 << 20) >= free0,
        "device memory back after drop: {free0} -> {free1}"
    );
}
