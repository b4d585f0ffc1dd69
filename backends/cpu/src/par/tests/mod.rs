//! Unit tests of the parent module.

use super::*;

#[test]
fn every_index_runs_once_in_aligned_ranges() {
    let pool = Pool::new(3).unwrap();
    for n in [1usize, 7, 64, 1000] {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for_ranges(Some(&pool), n, 4, |r| {
            assert!(r.start % 4 == 0);
            for i in r {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
    }
}

#[test]
fn long_waits_switch_to_solo_loops_short_ones_do_not() {
    let us = Duration::from_micros;
    let mut l = Lateness::default();
    for _ in 0..LATE_WINDOW {
        l.record(us(30), us(2));
    }
    assert!(l.solo_until.is_none());
    for _ in 0..LATE_WINDOW {
        l.record(us(30), us(500));
    }
    assert!(l.solo_until.is_some_and(|u| u > Instant::now()));
}

#[test]
fn a_panicking_chunk_panics_the_caller_and_the_pool_survives() {
    let pool = Pool::new(2).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        for_ranges(Some(&pool), 100, 1, |r| {
            if r.contains(&57) {
                panic!("boom");
            }
        })
    }));
    assert!(r.is_err());
    let count = AtomicUsize::new(0);
    for_ranges(Some(&pool), 100, 1, |r| {
        count.fetch_add(r.len(), Ordering::Relaxed);
    });
    assert_eq!(count.load(Ordering::Relaxed), 100);
}
