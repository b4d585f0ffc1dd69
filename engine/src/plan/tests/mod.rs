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
        max_buffer_bytes: u64::MAX,
        max_binding_bytes: u64::MAX,
        max_top_k: 1024,
        kv_commit_granularity: 64 << 10,
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
        |_| 0,
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
        |_| 0,
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
        |_| 0,
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
        |_| 0,
    )
    .unwrap();
    let fixed = p.weights_bytes + p.workspace_bytes + p.headroom_bytes;
    // The most pages whose reservation (null page, page tables, granule
    // rounding included) fits what is left.
    let left = p.budget_bytes - fixed;
    assert!(p.kv_limits.kv_bytes(p.num_pages) <= left);
    assert!(p.kv_limits.kv_bytes(p.num_pages + 1) > left);
    assert!(p.total_bytes <= p.budget_bytes);
    assert!(p.budget_bytes - p.total_bytes < 2 * p.page_bytes + (1 << 20));
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
        |_| 0,
    )
    .unwrap();
    assert_eq!(p.num_pages, 8 * 32);
    let fixed = p.total_bytes - p.kv_bytes;
    p.set_num_pages(40).unwrap();
    assert_eq!(p.num_pages, 40);
    assert_eq!(p.kv_bytes, p.kv_limits.kv_bytes(40));
    // 40 pages + the null page, rounded up to 64 KiB granules per layer,
    // plus one (41, 2) u32 page table per layer.
    let l = p.kv_limits.layout.unwrap();
    let per_layer = (41 * l.page_bytes() as u64).div_ceil(64 << 10) * (64 << 10) + 41 * 8;
    assert_eq!(p.kv_bytes, per_layer * l.num_layers as u64);
    assert!(p.kv_bytes >= 40 * p.page_bytes);
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

fn plan0(req: &PlanRequest, dev: DeviceMemory) -> Result<MemoryPlan, PlanError> {
    plan(&cfg(), 98 << 20, req, dev, &info(), |_| 0)
}

fn with_budget(budget: Budget) -> PlanRequest {
    PlanRequest {
        budget,
        ..req(Some(1024), Some(4), DType::F16, 0)
    }
}

#[test]
fn utilization_is_a_fraction_of_total_capped_by_free() {
    let p = plan0(&with_budget(Budget::Utilization(0.5)), DEV).unwrap();
    assert_eq!(p.budget_bytes, 16 << 30);
    assert!(p.warnings.is_empty());
    // 0.95 × 32 GiB = 30.4 GiB, but only 30 GiB is free.
    let p = plan0(&with_budget(Budget::Utilization(0.95)), DEV).unwrap();
    assert_eq!(p.budget_bytes, 30 << 30);
    assert!(p.budget_source.contains("free"), "{}", p.budget_source);
    // Also on a device that is not host memory.
    let gpu = BackendInfo {
        host_memory: false,
        ..info()
    };
    let p = plan(
        &cfg(),
        98 << 20,
        &with_budget(Budget::Utilization(0.95)),
        DEV,
        &gpu,
        |_| 0,
    )
    .unwrap();
    assert_eq!(p.budget_bytes, 30 << 30);
    assert!(plan0(&with_budget(Budget::Utilization(1.5)), DEV).is_err());
    assert!(plan0(&with_budget(Budget::Utilization(0.0)), DEV).is_err());
}

#[test]
fn an_explicit_budget_above_the_device_total_is_refused_with_both_numbers() {
    let err = plan0(&with_budget(Budget::Bytes(40 << 30)), DEV).unwrap_err();
    assert!(err.message.contains("40.00 GiB"), "{}", err.message);
    assert!(err.message.contains("32.00 GiB"), "{}", err.message);
    assert!(
        err.message.contains("Nothing was loaded"),
        "{}",
        err.message
    );
}

#[test]
fn an_explicit_budget_above_free_is_accepted_with_a_warning() {
    let p = plan0(&with_budget(Budget::Bytes(31 << 30)), DEV).unwrap();
    assert_eq!(p.budget_bytes, 31 << 30);
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(p.warnings[0].contains("free"), "{}", p.warnings[0]);
    let p = plan0(&with_budget(Budget::Bytes(8 << 30)), DEV).unwrap();
    assert!(p.warnings.is_empty());
}

#[test]
fn graph_memory_is_what_the_backend_says() {
    let seen = std::cell::RefCell::new(Vec::new());
    let p = plan(
        &cfg(),
        98 << 20,
        &req(Some(1024), Some(12), DType::F16, 8 << 30),
        DEV,
        &info(),
        |g| {
            seen.borrow_mut().push(g.clone());
            (g.batch_sizes.len() as u64) << 20
        },
    )
    .unwrap();
    let last = seen.borrow().last().cloned().unwrap();
    assert_eq!(last.batch_sizes, vec![1, 2, 4, 8, 12]);
    assert_eq!(last.workspace_bytes, p.workspace_bytes);
    assert_eq!(last.num_layers, 30);
    assert_eq!(p.graph_bytes, 5 << 20);
    assert_eq!(
        p.total_bytes,
        p.weights_bytes + p.workspace_bytes + p.kv_bytes + p.graph_bytes + p.headroom_bytes
    );
    assert!(table(&p).contains("captured decode graphs"));
}

#[test]
fn a_derived_sequence_count_gets_a_workspace_for_that_many() {
    // ctx 256 = 16 pages per sequence: a 2 GiB budget holds dozens.
    let p = plan0(&req(Some(256), None, DType::F16, 2 << 30), DEV).unwrap();
    assert!(p.max_seqs > 8, "{}", p.max_seqs);
    let d = p.workspace_dims;
    assert_eq!(d.max_seqs, p.max_seqs);
    assert_eq!(d.max_logits_rows, p.max_seqs.max(16));
    assert_eq!(d.max_tokens, p.max_seqs.max(512));
    assert_eq!(d.max_blocks_per_seq, 16);
    assert_eq!(p.workspace_bytes, Workspace::planned_bytes(&cfg(), &d));
    assert!(
        p.num_pages >= p.max_seqs * 16,
        "the pages hold every sequence"
    );
    assert!(p.total_bytes <= p.budget_bytes);
}

#[test]
fn swap_space_is_whole_host_page_slots_outside_the_device_total() {
    let mut p = plan0(&req(Some(1024), Some(4), DType::F32, 8 << 30), DEV).unwrap();
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
