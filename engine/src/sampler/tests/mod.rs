//! Unit tests of the parent module.

use super::*;

#[test]
fn greedy_takes_the_lowest_id_on_ties() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    let mut s = Sampler::new(SamplingParams::greedy(), 4);
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0], &[]), 1);
}

#[test]
fn top_k_one_is_greedy() {
    let mut s = Sampler::new(
        SamplingParams {
            top_k: 1,
            seed: 5,
            ..Default::default()
        },
        5,
    );
    for _ in 0..20 {
        assert_eq!(s.sample(&[0.0, 1.0, 5.0, 4.9, -1.0], &[]), 2);
    }
}

#[test]
fn same_seed_same_tokens_and_min_p_filters() {
    let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let params = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 42,
        ..Default::default()
    };
    let mut a = Sampler::new(params.clone(), 100);
    let mut b = Sampler::new(params, 100);
    let ta: Vec<u32> = (0..50).map(|_| a.sample(&logits, &[])).collect();
    let tb: Vec<u32> = (0..50).map(|_| b.sample(&logits, &[])).collect();
    assert_eq!(ta, tb);
    assert!(
        ta.iter().collect::<std::collections::HashSet<_>>().len() > 5,
        "sampling is not degenerate"
    );
    // min-p 0.5 keeps only tokens with prob >= half the top one.
    let mut c = Sampler::new(
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        },
        3,
    );
    for _ in 0..50 {
        assert_ne!(c.sample(&[10.0, 9.9, 0.0], &[]), 2);
    }
}

#[test]
fn top_p_keeps_the_nucleus() {
    // probs ≈ [0.88, 0.12, ~0]: top-p 0.5 keeps only the first.
    let mut s = Sampler::new(
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: 3,
            ..Default::default()
        },
        3,
    );
    for _ in 0..50 {
        assert_eq!(s.sample(&[2.0, 0.0, -10.0], &[]), 0);
    }
}

#[test]
fn repetition_penalty_demotes_seen_tokens() {
    let p = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 2.0,
        ..Default::default()
    };
    let mut s = Sampler::new(p, 3);
    assert_eq!(s.sample(&[3.0, 2.0, 0.0], &[0]), 1);
    assert_eq!(s.sample(&[3.0, 2.0, 0.0], &[1]), 0);
}

#[test]
fn bad_params_are_rejected() {
    assert!(
        SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err()
    );
    assert!(
        SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err()
    );
    assert!(SamplingParams::default().validate().is_ok());
}
