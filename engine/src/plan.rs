//! The memory plan: what a model run will take, computed before any weight
//! is loaded, against a budget, with a clear refusal when it does not fit.
//!
//! total = weights + activation workspace (largest step) + KV pages + graph
//! memory (what the backend says its graphs take: 0 on the CPU) + headroom.
//! Headroom is 5% of the budget (at least 64 MiB): pool rounding (256-byte
//! blocks, 2 MiB segments), host-side buffers and allocator slack. Nothing is
//! ever offloaded silently: when the weights do not fit, the plan refuses.
//!
//! The byte counts of weights, workspace, KV and graphs are exactly what the
//! engine will request from its pool under each tag (`PoolStats::requested`);
//! the workspace is built from [`MemoryPlan::workspace_dims`], so the plan is
//! the one source of the workspace's size. (What the pool *holds* per tag is
//! larger by its block rounding, which the headroom covers.)
//!
//! Budget: `Utilization(f)` is `f ×` the device's total, capped by what is
//! free now. `Bytes(b)` above the device's total is refused; above what is
//! free (but within the total) it is accepted with a warning
//! ([`MemoryPlan::warnings`]).

use std::fmt::Write as _;

use pagoda_backend::{
    BackendInfo, DType, DeviceMemory, GraphPlanInput, KvGeometry, KvLayout,
    decode_graph_batch_sizes,
};

use crate::model::{LlamaConfig, Workspace, WorkspaceDims};

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// Smallest headroom kept free.
pub const MIN_HEADROOM_BYTES: u64 = 64 << 20;
/// Headroom as a fraction of the budget.
pub const HEADROOM_FRACTION: f64 = 0.05;

/// How much device memory the engine may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A fraction of total device memory (vLLM's `gpu_memory_utilization`).
    Utilization(f64),
    /// An absolute number of bytes.
    Bytes(u64),
}

/// What to plan for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    /// Context length per sequence; `None` = the model's (and derive pages from the budget).
    pub ctx: Option<usize>,
    /// Concurrent sequences; `None` = derive from the budget (at `ctx`).
    pub max_seqs: Option<usize>,
    /// KV element type.
    pub kv_dtype: DType,
    /// Tokens per KV page.
    pub page_size: usize,
    /// Per-step token budget (sizes the workspace).
    pub max_num_batched_tokens: usize,
    /// Logits rows per step (sizes the workspace).
    pub max_logits_rows: usize,
    /// The budget.
    pub budget: Budget,
}

/// A computed plan. Byte counts are exact for weights, workspace and KV.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    /// Backend name.
    pub backend: String,
    /// Device total bytes.
    pub device_total_bytes: u64,
    /// Device free bytes at planning time.
    pub device_free_bytes: u64,
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// How the budget was derived.
    pub budget_source: String,
    /// Weights.
    pub weights_bytes: u64,
    /// Activation workspace for the largest step.
    pub workspace_bytes: u64,
    /// KV cache (all pages, all layers).
    pub kv_bytes: u64,
    /// Graph memory (0 where graphs are not captured).
    pub graph_bytes: u64,
    /// Headroom kept free.
    pub headroom_bytes: u64,
    /// Sum of the above.
    pub total_bytes: u64,
    /// KV pages.
    pub num_pages: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Bytes of one page over all layers.
    pub page_bytes: u64,
    /// KV dtype name.
    pub kv_dtype: String,
    /// Whether the KV arena grows and shrinks with load (CUDA VMM, the CPU's
    /// lazily committed mapping); when false the whole KV is allocated up front.
    pub kv_growable: bool,
    /// Context length per sequence.
    pub ctx: usize,
    /// Concurrent sequences.
    pub max_seqs: usize,
    /// Tokens the KV cache holds in total.
    pub kv_tokens: usize,
    /// Workspace sizing.
    pub max_num_batched_tokens: usize,
    /// Logits rows per step the workspace holds.
    pub max_logits_rows: usize,
    /// The workspace the engine builds: the one source of its size.
    #[serde(skip)]
    pub workspace_dims: WorkspaceDims,
    /// Things the plan accepted but a person should know (printed by the CLI).
    pub warnings: Vec<String>,
    /// The KV arena geometry inputs (device limits), to recompute `kv_bytes`.
    #[serde(skip)]
    pub kv_limits: KvLimits,
    /// Host page slots for swapped-out KV pages (`--swap-space`).
    pub swap_slots: usize,
    /// Host bytes of those slots: `swap_slots * page_bytes`. Host memory,
    /// outside the device budget and `total_bytes`.
    pub swap_bytes: u64,
}

/// Target bytes of one KV commit unit per layer (CUDA maps 2 MiB VMM chunks).
pub const KV_COMMIT_UNIT_BYTES: u64 = 2 << 20;

/// The device limits that shape the KV arena (see `pagoda_backend::KvGeometry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvLimits {
    /// Largest buffer.
    pub max_buffer_bytes: u64,
    /// Largest binding.
    pub max_binding_bytes: u64,
    /// Commit granularity.
    pub granularity: u64,
    /// The layout with one page (shape and dtype).
    pub layout: Option<KvLayout>,
    /// Target bytes of one commit unit per layer ([`KV_COMMIT_UNIT_BYTES`]).
    pub unit_bytes: u64,
}

impl KvLimits {
    /// Limits of `info` for KV pages of `layout`'s shape.
    pub fn new(info: &BackendInfo, layout: KvLayout) -> Self {
        KvLimits {
            max_buffer_bytes: info.max_buffer_bytes,
            max_binding_bytes: info.max_binding_bytes,
            granularity: info.kv_commit_granularity,
            layout: Some(layout),
            unit_bytes: KV_COMMIT_UNIT_BYTES,
        }
    }

    /// The geometry of `num_pages` usable pages (plus the null page).
    pub fn geometry(&self, num_pages: usize) -> Option<KvGeometry> {
        let layout = KvLayout {
            num_pages: num_pages.checked_add(1)?,
            ..self.layout?
        };
        KvGeometry::new(
            layout,
            self.max_buffer_bytes,
            self.max_binding_bytes,
            self.granularity,
            self.unit_bytes,
        )
    }

    /// KV bytes of `num_pages` usable pages: the arena reservation (null page
    /// and granule rounding included) plus the page tables. `u64::MAX` when
    /// the device cannot hold such an arena.
    pub fn kv_bytes(&self, num_pages: usize) -> u64 {
        self.geometry(num_pages).map_or(u64::MAX, |g| {
            g.reserved_bytes() + g.page_table_bytes() * g.layout.num_layers as u64
        })
    }
}

/// The plan does not fit: numbers and advice in the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    /// Human-readable refusal with the table and advice.
    pub message: String,
    /// The plan that did not fit (for `--json`).
    pub plan: Box<MemoryPlan>,
}

/// Formats bytes as GiB/MiB.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB * 1024.0 {
        format!("{:.2} TiB", b / (GIB * 1024.0))
    } else if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= MIB || bytes == 0 {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Parses `8GiB`, `512MiB`, `1.5GB`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => MIB,
        "g" | "gb" => 1e9,
        "gib" => GIB,
        "t" | "tb" => 1e12,
        "tib" => GIB * 1024.0,
        _ => return None,
    };
    (v.is_finite() && v >= 0.0).then_some((v * mult) as u64)
}

fn kv_layout(cfg: &LlamaConfig, dtype: DType, page_size: usize, num_pages: usize) -> KvLayout {
    KvLayout {
        num_layers: cfg.num_layers,
        num_pages,
        page_size,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        dtype,
    }
}

/// The workspace dimensions for `max_seqs` sequences of `ctx` tokens.
fn workspace_dims(req: &PlanRequest, max_seqs: usize, ctx: usize) -> WorkspaceDims {
    WorkspaceDims {
        max_tokens: req.max_num_batched_tokens.max(max_seqs),
        max_seqs,
        max_blocks_per_seq: ctx.div_ceil(req.page_size),
        max_logits_rows: req.max_logits_rows.max(max_seqs),
        max_top_k: crate::model::DEVICE_TOP_K,
    }
}

/// The budget in bytes, how it was derived, and warnings; refuses a budget
/// the device cannot hold.
fn resolve_budget(
    budget: Budget,
    device: DeviceMemory,
    info: &BackendInfo,
) -> Result<(u64, String, Vec<String>), String> {
    let what = if info.host_memory {
        "host RAM"
    } else {
        "device memory"
    };
    let (total, free) = (device.total_bytes, device.free_bytes);
    match budget {
        Budget::Bytes(b) if b > total => Err(format!(
            "the memory budget of {} is more than the {what} in total on this {} device, {} ({b} > {total} bytes)",
            human(b),
            info.name,
            human(total)
        )),
        Budget::Bytes(b) => {
            let mut warnings = Vec::new();
            if b > free {
                warnings.push(format!(
                    "the memory budget of {} is more than the {} free now ({} of {}); allocations may fail",
                    human(b),
                    what,
                    human(free),
                    human(total)
                ));
            }
            Ok((b, format!("--memory-budget {}", human(b)), warnings))
        }
        Budget::Utilization(u) if !(u > 0.0 && u <= 1.0) => Err(format!(
            "--gpu-memory-utilization must be in (0, 1], got {u}"
        )),
        Budget::Utilization(u) => {
            let want = (total as f64 * u) as u64;
            if want > free {
                Ok((
                    free,
                    format!("{what} free ({} of {u:.2} × {})", human(free), human(total)),
                    Vec::new(),
                ))
            } else {
                Ok((
                    want,
                    format!("{u:.2} × {} {what}", human(total)),
                    Vec::new(),
                ))
            }
        }
    }
}

/// Computes the plan; refuses with numbers and advice when it does not fit.
///
/// `graph_memory` is the backend's answer to "how much do your graphs take
/// for this workspace" ([`pagoda_backend::Backend::graph_memory_bytes`]).
pub fn plan(
    cfg: &LlamaConfig,
    weights_bytes: u64,
    req: &PlanRequest,
    device: DeviceMemory,
    info: &BackendInfo,
    graph_memory: impl Fn(&GraphPlanInput) -> u64,
) -> Result<MemoryPlan, PlanError> {
    let ctx = req.ctx.unwrap_or(cfg.context_len);
    let page_bytes = kv_layout(cfg, req.kv_dtype, req.page_size, 1).page_bytes_all_layers() as u64;
    let pages_per_seq = ctx.div_ceil(req.page_size);
    let budget = resolve_budget(req.budget, device, info);
    let (budget_bytes, budget_source, warnings) = match &budget {
        Ok(b) => b.clone(),
        Err(_) => (0, String::new(), Vec::new()),
    };
    let headroom = ((budget_bytes as f64 * HEADROOM_FRACTION) as u64).max(MIN_HEADROOM_BYTES);
    // Workspace and graphs for `seqs` concurrent sequences.
    let fixed_for = |seqs: usize| {
        let dims = workspace_dims(req, seqs, ctx);
        let ws = Workspace::planned_bytes(cfg, &dims);
        let graphs = graph_memory(&GraphPlanInput {
            batch_sizes: decode_graph_batch_sizes(seqs),
            max_tokens: dims.max_tokens,
            num_layers: cfg.num_layers,
            workspace_bytes: ws,
        });
        (dims, ws, graphs)
    };
    let pages_left = |ws: u64, graphs: u64| {
        let fixed = weights_bytes
            .saturating_add(ws)
            .saturating_add(graphs)
            .saturating_add(headroom);
        usize::try_from(budget_bytes.saturating_sub(fixed) / page_bytes.max(1))
            .unwrap_or(usize::MAX)
    };
    // Never more sequences than an engine plans for: the counts below cannot overflow.
    let max_derived = crate::engine::MAX_SEQS;
    let (seqs, num_pages, (dims, workspace_bytes, graph_bytes)) = match req.max_seqs {
        Some(seqs) => {
            // Saturating: a count no arena could hold is refused, never wrapped.
            let pages = seqs.saturating_mul(pages_per_seq);
            (seqs, pages, fixed_for(seqs))
        }
        None => {
            // Derive: every byte left after the fixed parts becomes KV pages,
            // and the workspace must hold as many sequences as those pages do.
            // The workspace grows with the sequence count, so: size it for one
            // sequence, derive the count, size it for that count, derive again
            // (never more than before); the second count with its workspace is
            // consistent (a smaller workspace leaves at least as many pages).
            let one = fixed_for(1);
            let first = (pages_left(one.1, one.2) / pages_per_seq.max(1)).clamp(1, max_derived);
            let at_first = fixed_for(first);
            let seqs = (pages_left(at_first.1, at_first.2) / pages_per_seq.max(1)).clamp(1, first);
            let fixed = fixed_for(seqs);
            let pages = pages_left(fixed.1, fixed.2);
            (seqs, pages, fixed)
        }
    };
    debug_assert_eq!(
        dims.max_seqs, seqs,
        "the workspace holds the planned sequences"
    );
    let mut p = MemoryPlan {
        backend: info.name.clone(),
        device_total_bytes: device.total_bytes,
        device_free_bytes: device.free_bytes,
        budget_bytes,
        budget_source,
        weights_bytes,
        workspace_bytes,
        kv_bytes: (num_pages as u64).saturating_mul(page_bytes),
        graph_bytes,
        headroom_bytes: headroom,
        total_bytes: 0,
        num_pages,
        page_size: req.page_size,
        page_bytes,
        kv_dtype: req.kv_dtype.name().into(),
        kv_growable: info.can_grow_kv,
        ctx,
        max_seqs: seqs,
        kv_tokens: num_pages.saturating_mul(req.page_size),
        max_num_batched_tokens: dims.max_tokens,
        max_logits_rows: dims.max_logits_rows,
        workspace_dims: dims,
        warnings,
        kv_limits: KvLimits::new(info, kv_layout(cfg, req.kv_dtype, req.page_size, 1)),
        swap_slots: 0,
        swap_bytes: 0,
    };
    let fixed = p
        .weights_bytes
        .saturating_add(p.workspace_bytes)
        .saturating_add(p.graph_bytes)
        .saturating_add(p.headroom_bytes);
    if req.max_seqs.is_none() {
        // The null page, the page tables and granule rounding come on top of
        // the pages: take the most pages whose reservation fits what is left.
        let left = budget_bytes.saturating_sub(fixed);
        let mut n = p.num_pages;
        while n > 0 && p.kv_limits.kv_bytes(n) > left {
            let over = p.kv_limits.kv_bytes(n).saturating_sub(left);
            n = n.saturating_sub((over / page_bytes.max(1)).max(1) as usize);
        }
        while p.kv_limits.kv_bytes(n + 1) <= left {
            n += 1;
        }
        p.num_pages = n;
        p.kv_tokens = n.saturating_mul(req.page_size);
    }
    p.kv_bytes = p.kv_limits.kv_bytes(p.num_pages);
    p.total_bytes = fixed.saturating_add(p.kv_bytes);
    if let Err(why) = budget {
        return Err(PlanError {
            message: format!(
                "memory plan refused: {why}.\nTry a smaller --memory-budget, or --gpu-memory-utilization.\nNothing was loaded."
            ),
            plan: Box::new(p),
        });
    }

    let mut problems = Vec::new();
    if p.weights_bytes.saturating_add(p.headroom_bytes) > budget_bytes {
        problems.push(format!(
            "the weights alone need {} (+ {} headroom) but the budget is {}",
            human(p.weights_bytes),
            human(p.headroom_bytes),
            human(budget_bytes)
        ));
    } else if p.total_bytes > budget_bytes {
        problems.push(format!(
            "the plan needs {} but the budget is {}",
            human(p.total_bytes),
            human(budget_bytes)
        ));
    } else if p.num_pages < pages_per_seq {
        problems.push(format!(
            "after weights and workspace, {} is left for KV: {} tokens, less than one sequence of {ctx} tokens",
            human(budget_bytes.saturating_sub(fixed)),
            p.kv_tokens
        ));
    }
    if problems.is_empty() {
        return Ok(p);
    }
    let mut msg = format!(
        "memory plan refused: {}.\n\n{}\n",
        problems.join("; "),
        table(&p)
    );
    let avail_kv = budget_bytes.saturating_sub(fixed);
    let tokens_fit = (avail_kv / page_bytes.max(1)) as usize * req.page_size;
    if p.weights_bytes.saturating_add(p.headroom_bytes) > budget_bytes {
        let _ = writeln!(msg, "Try:");
        let _ = writeln!(
            msg,
            "  - a smaller quantization of the model (the weights take {})",
            human(p.weights_bytes)
        );
        let _ = writeln!(
            msg,
            "  - a larger budget (--memory-budget / --gpu-memory-utilization)"
        );
    } else {
        let seqs = p.max_seqs.max(1);
        let _ = writeln!(
            msg,
            "At most {tokens_fit} KV tokens fit in {}. Try:",
            human(avail_kv)
        );
        if tokens_fit / seqs >= req.page_size {
            let _ = writeln!(
                msg,
                "  - a shorter context: --ctx {} with --max-seqs {seqs}",
                (tokens_fit / seqs) / req.page_size * req.page_size
            );
        }
        if tokens_fit / ctx >= 1 {
            let _ = writeln!(
                msg,
                "  - fewer sequences: --max-seqs {} with --ctx {ctx}",
                tokens_fit / ctx
            );
        }
        if req.kv_dtype != DType::Q8_0 && info.supports_kv(DType::Q8_0) {
            let q8 = kv_layout(cfg, DType::Q8_0, req.page_size, 1).page_bytes_all_layers() as u64;
            let need = fixed.saturating_add((p.num_pages as u64).saturating_mul(q8));
            let verdict = if need <= budget_bytes {
                "fits"
            } else {
                "still does not fit"
            };
            let _ = writeln!(
                msg,
                "  - a quantized KV cache: --kv-dtype q8_0 needs {} in total ({verdict})",
                human(need)
            );
        }
        let _ = writeln!(
            msg,
            "  - a smaller quantization of the model (the weights take {})",
            human(p.weights_bytes)
        );
    }
    msg.push_str("Nothing was loaded; Pagoda never offloads layers silently.");
    Err(PlanError {
        message: msg,
        plan: Box::new(p),
    })
}

impl MemoryPlan {
    /// The host swap tier: `num_slots` page slots of `page_bytes` each.
    pub fn set_swap_slots(&mut self, num_slots: usize) {
        self.swap_slots = num_slots;
        self.swap_bytes = num_slots as u64 * self.page_bytes;
    }

    /// The host swap tier of `swap_space_bytes` (`--swap-space`): whole
    /// page slots only.
    pub fn set_swap_space(&mut self, swap_space_bytes: u64) {
        self.set_swap_slots((swap_space_bytes / self.page_bytes.max(1)) as usize);
    }

    /// Commit units of `unit_bytes` per layer instead of the default
    /// ([`KV_COMMIT_UNIT_BYTES`]); recomputes the KV reservation (pieces hold
    /// whole units) and refuses one over the budget.
    pub fn set_kv_commit_unit_bytes(&mut self, unit_bytes: u64) -> Result<(), String> {
        let old = self.kv_limits;
        self.kv_limits.unit_bytes = unit_bytes.max(1);
        let n = self.num_pages;
        if let Err(e) = self.set_num_pages(n) {
            self.kv_limits = old;
            return Err(e);
        }
        Ok(())
    }

    /// Replaces the derived KV page count with an explicit one, keeping the
    /// plan consistent (`kv_bytes`, `kv_tokens`, `total_bytes`). Refuses
    /// fewer pages than one sequence of `ctx` tokens needs, and a total over
    /// the budget.
    pub fn set_num_pages(&mut self, num_pages: usize) -> Result<(), String> {
        let pages_per_seq = self.ctx.div_ceil(self.page_size.max(1));
        if num_pages < pages_per_seq {
            return Err(format!(
                "{num_pages} KV pages of {} tokens hold less than one sequence of {} tokens ({pages_per_seq} pages)",
                self.page_size, self.ctx
            ));
        }
        let kv_bytes = self.kv_limits.kv_bytes(num_pages);
        let total = self
            .total_bytes
            .saturating_sub(self.kv_bytes)
            .saturating_add(kv_bytes);
        if total > self.budget_bytes {
            return Err(format!(
                "{num_pages} KV pages take {}: the plan would need {} but the budget is {}",
                human(kv_bytes),
                human(total),
                human(self.budget_bytes)
            ));
        }
        self.num_pages = num_pages;
        self.kv_bytes = kv_bytes;
        self.kv_tokens = num_pages.saturating_mul(self.page_size);
        self.total_bytes = total;
        Ok(())
    }
}

/// The plan as a table.
pub fn table(p: &MemoryPlan) -> String {
    // Rows are collected first: the detail column is as wide as its widest
    // entry (at least 48 characters), so every row has the same width.
    let mut rows: Vec<(&str, String, u64)> = Vec::new();
    let row =
        |rows: &mut Vec<(&str, String, u64)>, name: &'static str, what: String, bytes: u64| {
            rows.push((name, what, bytes));
        };
    row(
        &mut rows,
        "weights",
        "model tensors".into(),
        p.weights_bytes,
    );
    row(
        &mut rows,
        "activations",
        format!(
            "workspace for {} tokens / {} seqs per step",
            p.max_num_batched_tokens, p.max_seqs
        ),
        p.workspace_bytes,
    );
    row(
        &mut rows,
        "kv cache",
        format!(
            "{} pages × {} tokens × {} per page ({})",
            p.num_pages,
            p.page_size,
            human(p.page_bytes),
            p.kv_dtype
        ),
        p.kv_bytes,
    );
    row(
        &mut rows,
        "graphs",
        if p.graph_bytes == 0 {
            "none on this backend".into()
        } else {
            "captured decode graphs".into()
        },
        p.graph_bytes,
    );
    row(
        &mut rows,
        "headroom",
        format!(
            "{:.0}% of budget, at least {}",
            HEADROOM_FRACTION * 100.0,
            human(MIN_HEADROOM_BYTES)
        ),
        p.headroom_bytes,
    );
    row(&mut rows, "total", String::new(), p.total_bytes);
    row(&mut rows, "budget", p.budget_source.clone(), p.budget_bytes);
    if p.swap_slots > 0 {
        row(
            &mut rows,
            "host swap",
            format!(
                "{} page slots in host memory (not in the total)",
                p.swap_slots
            ),
            p.swap_bytes,
        );
    }
    let width = rows
        .iter()
        .map(|(_, what, _)| what.chars().count())
        .max()
        .unwrap_or(0)
        .max(48);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {:<12} {:<width$} {:>12}",
        "component", "detail", "bytes"
    );
    for (name, what, bytes) in rows {
        let _ = writeln!(s, "  {name:<12} {what:<width$} {:>12}", human(bytes));
    }
    let _ = writeln!(
        s,
        "  KV holds {} tokens: {} sequences × {} context",
        p.kv_tokens, p.max_seqs, p.ctx
    );
    let _ = writeln!(
        s,
        "  KV arena: {}",
        if p.kv_growable {
            format!(
                "growable: memory is committed in {} chunks as pages are used and given back when idle",
                human(p.kv_limits.granularity)
            )
        } else {
            "fixed: allocated whole before the first request (this device cannot grow KV in place)"
                .to_string()
        }
    );
    s
}

#[cfg(test)]
mod tests;
