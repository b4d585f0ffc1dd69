//! Device memory on the CUDA backend: zero-byte buffers and empty ops, the
//! engine's refusal of a plan that does not fit before a byte is loaded,
//! and budgets against the device's real memory. Ignored without a GPU:
//! `cargo test --release -- --ignored`.

use pagoda::plan::{Budget, human};
use pagoda::{Engine, EngineConfig};
use pagoda_backend::{
    AttentionDims, AttentionOps, Backend, BufRef, DType, DeviceMemory, FaultInjector, KvCacheOps,
    KvLayerRef, KvLayout, MatmulDims, MemoryTag, Pool, PoolConfig, SamplingOps, TensorOps,
};
use pagoda_cuda::CudaBackend;
use pagoda_tests::{cuda_backend, model_path};

const GIB: u64 = 1 << 30;

fn pool(b: &CudaBackend) -> Pool {
    Pool::new(
        b.raw_allocator(),
        PoolConfig {
            max_segment_bytes: b.info().max_buffer_bytes,
            ..PoolConfig::default()
        },
        FaultInjector::new(),
    )
}

/// Zero bytes everywhere: a 0-byte pool block, upload / copy / download of
/// 0 bytes, and ops with nothing to do (matmul with n = 0, paged attention
/// over 0 tokens, write_kv of 0 tokens, copy_pages with no pairs, argmax of
/// 0 rows) all succeed, allocate nothing and write nothing.
#[test]
#[ignore = "needs a CUDA GPU"]
fn zero_bytes_and_empty_ops_are_valid_on_the_gpu() {
    let b = cuda_backend();
    let start = b.allocator().live_bytes();
    {
        let p = pool(&b);
        let empty = p.alloc(0, MemoryTag::Scratch).expect("0-byte block");
        assert_eq!(empty.bytes(), 0);
        let e = empty.buf();
        assert!(e.is_empty());
        // Metric: pool segment bytes; bound: unchanged by a 0-byte block.
        assert_eq!(
            b.allocator().live_bytes(),
            start,
            "a 0-byte block takes no segment"
        );
        b.upload(e, &[]).expect("upload 0 bytes");
        b.copy(e, e).expect("copy 0 bytes");
        b.copy(BufRef::EMPTY, e).expect("copy 0 bytes from EMPTY");
        let mut none: [u8; 0] = [];
        b.download(e, &mut none).expect("download 0 bytes");
        b.synchronize().unwrap();
        drop(empty);
        assert_eq!(b.allocator().live_bytes(), start);
    }
    let p = pool(&b);
    // A small real weight and KV layer: 1 layer, 2 pages (null page included)
    // of 16 tokens, 1 KV head of 8, f32, pages zero.
    let (m, k) = (4usize, 32usize);
    let w = p.alloc((m * k * 4) as u64, MemoryTag::Weights).unwrap();
    b.upload(w.buf(), &vec![0u8; m * k * 4]).unwrap();
    let layout = KvLayout {
        num_layers: 1,
        num_pages: 2,
        page_size: 16,
        num_kv_heads: 1,
        head_dim: 8,
        dtype: DType::F32,
    };
    let page_bytes = 2 * 16 * 8 * 4;
    let kv = p.alloc(2 * page_bytes, MemoryTag::Kv).unwrap();
    b.upload(kv.buf(), &vec![0u8; 2 * page_bytes as usize])
        .unwrap();
    let table = p.alloc(16, MemoryTag::Kv).unwrap();
    let table_ids: [u32; 4] = [0, 0, 0, 1];
    b.upload(table.buf(), bytemuck::cast_slice(&table_ids))
        .unwrap();
    let pieces = [kv.buf()];
    let cache = || KvLayerRef {
        pieces: &pieces,
        page_table: table.buf(),
        layout,
    };
    let qsl = p.alloc(4, MemoryTag::Scratch).unwrap();
    b.upload(qsl.buf(), &0u32.to_le_bytes()).unwrap();
    let e = BufRef::EMPTY;
    let before = b.allocator().live_bytes();

    b.matmul(e, w.buf(), DType::F32, e, MatmulDims::new(0, k, m))
        .expect("matmul with n = 0");
    b.paged_attention(
        e,
        cache(),
        e,
        e,
        e,
        qsl.buf(),
        e,
        AttentionDims {
            num_tokens: 0,
            num_seqs: 0,
            num_heads: 1,
            max_blocks_per_seq: 0,
            scale: 1.0,
        },
    )
    .expect("paged_attention over 0 tokens");
    b.write_kv(cache(), e, e, e, 0)
        .expect("write_kv of 0 tokens");
    b.copy_pages(cache(), &[])
        .expect("copy_pages with no pairs");
    b.argmax_rows(e, e, 0, 16).expect("argmax of 0 rows");
    b.synchronize().expect("the stream is healthy");
    // Metric: pool segment bytes; bound: no op allocated.
    assert_eq!(b.allocator().live_bytes(), before);
    // Metric: the KV pages' bytes; bound: still all zero (nothing was written).
    let mut back = vec![1u8; 2 * page_bytes as usize];
    b.download(kv.buf(), &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0), "an empty op wrote KV");
    drop((w, kv, table, qsl, p));
    // Metric: pool segment bytes after the pool is gone; bound: the start.
    assert_eq!(b.allocator().live_bytes(), start);
}

/// A budget just below the plan's need (and an injected device just below
/// it) is refused at build time with the numbers, before a byte is loaded:
/// no pool segment, no arena memory, no device range afterwards.
#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_refuses_a_plan_that_does_not_fit_before_loading() {
    let b = cuda_backend();
    let cfg = EngineConfig {
        ctx: Some(2048),
        max_seqs: Some(4),
        budget: Budget::Bytes(8 * GIB),
        ..EngineConfig::default()
    };
    let builder = |cfg: EngineConfig| {
        Engine::builder()
            .model(model_path())
            .backend(b.clone())
            .config(cfg)
    };
    let plan = builder(cfg.clone()).plan().expect("fits in 8 GiB");
    assert_eq!(plan.backend, "cuda");
    assert!(plan.graph_bytes > 0, "CUDA plans graph memory");
    assert_eq!(b.allocator().live_bytes(), 0, "planning allocates nothing");
    // Everything but the headroom: the plan at this budget needs the same
    // parts plus a headroom of at least the minimum, so it cannot fit.
    let short = plan.total_bytes - plan.headroom_bytes;
    let nothing_held = |what: &str| {
        // Metric: pool segment bytes, arena bytes, live ranges; bound: 0.
        assert_eq!(b.allocator().live_bytes(), 0, "{what}: pool segments");
        assert_eq!(b.arena().physical_bytes(), 0, "{what}: arena memory");
        assert_eq!(b.live_ranges(), 0, "{what}: device ranges");
    };

    let err = builder(EngineConfig {
        budget: Budget::Bytes(short),
        ..cfg.clone()
    })
    .build()
    .expect_err("a budget below the need is refused")
    .to_string();
    assert!(
        err.contains("refused") && err.contains("the plan needs"),
        "{err}"
    );
    assert!(
        err.contains(&human(short)),
        "the budget {} is named: {err}",
        human(short)
    );
    assert!(err.contains("Nothing was loaded"), "{err}");
    nothing_held("budget below the need");

    // The same through the device: all of a device just below the need.
    let device = DeviceMemory {
        total_bytes: short,
        free_bytes: short,
    };
    let err = builder(EngineConfig {
        budget: Budget::Utilization(1.0),
        ..cfg
    })
    .device_memory(device)
    .build()
    .expect_err("a device below the need is refused")
    .to_string();
    assert!(
        err.contains("refused") && err.contains("the plan needs"),
        "{err}"
    );
    assert!(err.contains(&human(short)), "{err}");
    assert!(err.contains("Nothing was loaded"), "{err}");
    nothing_held("device below the need");
}

/// The real device: an H200 reports more than 100 GiB in total (the
/// 143 GB class) and free at most total; a utilization budget plans within
/// both, and a byte budget above the total is refused with both numbers.
#[test]
#[ignore = "needs a CUDA GPU"]
fn budgets_are_checked_against_the_real_device_memory() {
    let b = cuda_backend();
    let mem = b.memory().expect("cuMemGetInfo");
    eprintln!("device memory: {mem:?}");
    // Metric: total bytes; bound: > 100 GiB (an H200 has 143 GB).
    assert!(mem.total_bytes > 100 * GIB, "{mem:?}");
    // Metric: free bytes; bound: in (0, total].
    assert!(
        mem.free_bytes > 0 && mem.free_bytes <= mem.total_bytes,
        "{mem:?}"
    );
    let plan = Engine::builder()
        .model(model_path())
        .backend(b.clone())
        .config(EngineConfig {
            budget: Budget::Utilization(0.5),
            ..EngineConfig::default()
        })
        .plan()
        .expect("half the device fits the default model");
    assert_eq!(plan.device_total_bytes, mem.total_bytes);
    // Metric: the planned budget; bound: at most half the total and at most free now
    // (free measured again: it may have moved a little).
    let free_now = b.memory().unwrap().free_bytes;
    assert!(
        plan.budget_bytes <= mem.total_bytes / 2 + 1,
        "{}",
        plan.budget_bytes
    );
    assert!(
        plan.budget_bytes <= plan.device_free_bytes && plan.device_free_bytes <= mem.total_bytes,
        "{plan:?}"
    );
    assert!(plan.total_bytes <= plan.budget_bytes);
    assert!(free_now <= mem.total_bytes);
    let over = mem.total_bytes + GIB;
    let err = Engine::builder()
        .model(model_path())
        .backend(b.clone())
        .config(EngineConfig {
            budget: Budget::Bytes(over),
            ..EngineConfig::default()
        })
        .build()
        .expect_err("a budget above the device is refused")
        .to_string();
    assert!(
        err.contains(&human(over)) && err.contains(&human(mem.total_bytes)),
        "{err}"
    );
    assert_eq!(b.allocator().live_bytes(), 0, "nothing was loaded");
}
