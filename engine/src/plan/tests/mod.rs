//! Unit tests of the parent module.

use super::*;

fn cfg() -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        num_layers: 30,
        hidden_dim: 576,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        ffn_dim: 1536,
        rms_eps: 1e-5,
        rope_freq_base: 1e5,
        rope_dim: 64,
        context_len: 8192,
        vocab_size: 49152,
    }
}

fn info() -> BackendInfo {
    BackendInfo {
        name: "cpu".into(),
        device: "test".into(),
        weight_dtypes: vec![],
        kv_dtypes: vec![DType::F32, DType::F16, DType::Q8_0],
        alignment: 64,
        can_grow_kv: false,
        supports_graphs: false,
        host_memory: true,
    }
}

fn req(ctx: Option<usize>, seqs: Option<usize>, kv: DType, budget: u64) -> PlanRequest {
    PlanRequest {
        ctx,
        max_seqs: seqs,
        kv_dtype: kv,
        page_size: 16,
        max_num_batched_tokens: 512,
        max_logits_rows: 16,
        budget: Budget::Bytes(budget),
    }
}

const DEV: DeviceMemory = DeviceMemory {
    total_bytes: 32 << 30,
    free_bytes: 30 << 30,
};

#[test]
fn plan_refuses_oom_before_loading_with_advice() {
    // f16 KV for 64 × 8192 tokens is 12 GB: does not fit 8 GiB.
    let err = plan(
        &cfg(),
        98 << 20,
        &req(Some(8192), Some(64), DType::F16, 8 << 30),
        DEV,
        &info(),
    )
    .unwrap_err();
    assert!(err.message.contains("refused"), "{}", err.message);
    assert!(err.message.contains("--kv-dtype q8_0"), "{}", err.message);
    assert!(err.message.contains("--max-seqs"), "{}", err.message);
    assert_eq!(err.plan.page_bytes, 16 * 30 * 2 * 3 * 64 * 2);
    // Q8_0 pages are 68/128 the size and fit.
    let ok = plan(
        &cfg(),
        98 << 20,
        &req(Some(8192), Some(64), DType::Q8_0, 8 << 30),
        DEV,
        &info(),
    )
    .unwrap();
    assert_eq!(ok.page_bytes, 16 * 30 * 2 * 3 * 68);
    assert!(ok.total_bytes <= ok.budget_bytes);
}

#[test]
fn plan_refuses_when_weights_do_not_fit() {
    let err = plan(
        &cfg(),
        9 << 30,
        &req(Some(512), Some(1), DType::F16, 8 << 30),
        DEV,
        &info(),
    )
    .unwrap_err();
    assert!(err.message.contains("weights alone"), "{}", err.message);
    assert!(err.message.contains("smaller quantization"));
}

#[test]
fn budget_only_derives_page_count() {
    let p = plan(
        &cfg(),
        98 << 20,
        &req(Some(8192), None, DType::F16, 2 << 30),
        DEV,
        &info(),
    )
    .unwrap();
    let fixed = p.weights_bytes + p.workspace_bytes + p.headroom_bytes;
    assert_eq!(p.num_pages as u64, (p.budget_bytes - fixed) / p.page_bytes);
    assert!(p.total_bytes <= p.budget_bytes);
    assert!(p.budget_bytes - p.total_bytes < p.page_bytes);
    assert_eq!(p.kv_tokens, p.num_pages * 16);
}

#[test]
fn explicit_page_count_keeps_the_plan_consistent() {
    let mut p = plan(
        &cfg(),
        98 << 20,
        &req(Some(512), Some(8), DType::F16, 2 << 30),
        DEV,
        &info(),
    )
    .unwrap();
    assert_eq!(p.num_pages, 8 * 32);
    let fixed = p.total_bytes - p.kv_bytes;
    p.set_num_pages(40).unwrap();
    assert_eq!(p.num_pages, 40);
    assert_eq!(p.kv_bytes, 40 * p.page_bytes);
    assert_eq!(p.kv_tokens, 40 * 16);
    assert_eq!(p.total_bytes, fixed + p.kv_bytes);
    let msg = p.set_num_pages(31).unwrap_err();
    assert!(msg.contains("less than one sequence"), "{msg}");
    let msg = p.set_num_pages(1 << 30).unwrap_err();
    assert!(msg.contains("budget"), "{msg}");
    assert_eq!(p.num_pages, 40, "a refused count changes nothing");
}

#[test]
fn parses_sizes() {
    assert_eq!(parse_bytes("8GiB"), Some(8 << 30));
    assert_eq!(parse_bytes("512 MiB"), Some(512 << 20));
    assert_eq!(parse_bytes("1000"), Some(1000));
    assert_eq!(parse_bytes("lots"), None);
}

#[test]
fn swap_space_is_whole_host_page_slots_outside_the_device_total() {
    let mut p = plan(
        &cfg(),
        98 << 20,
        &req(Some(1024), Some(4), DType::F32, 8 << 30),
        DEV,
        &info(),
    )
    .unwrap();
    let total = p.total_bytes;
    assert!(
        !table(&p).contains("host swap"),
        "no line without swap space"
    );
    // One f32 page of this model: 16 tokens × 30 layers × 3 heads × 64 × 2 × 4 B.
    assert_eq!(p.page_bytes, 737_280);
    p.set_swap_space(4 << 30);
    assert_eq!(p.swap_slots, (4u64 << 30) as usize / 737_280);
    assert_eq!(p.swap_slots, 5825);
    assert_eq!(p.swap_bytes, 5825 * 737_280);
    assert_eq!(p.total_bytes, total, "host swap is not device memory");
    let t = table(&p);
    let line = t.lines().find(|l| l.contains("host swap")).unwrap();
    assert!(
        line.contains("5825 page slots") && line.contains("4.00 GiB"),
        "{line}"
    );
}
