//! Every shader module the backend builds parses and validates with naga (no GPU needed),
//! and every `.wgsl` file starts with its header.

use pagoda_wgpu::{
    ENTRY_POINTS, F16_ENTRY_POINTS, SHADER_FILES, Shader, ShaderFeatures, module_source,
};

/// Every variant: the fallback is validated without the f16 / subgroup capabilities, so it
/// cannot use them.
fn validate(shader: Shader, entry: &str) {
    for f in ShaderFeatures::ALL {
        validate_for(shader, entry, f);
    }
}

fn validate_for(shader: Shader, entry: &str, f: ShaderFeatures) {
    let src = module_source(shader, f);
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{shader:?} {f:?}: {}", e.emit_to_string(&src)));
    assert!(
        module.entry_points.iter().any(|e| e.name == entry),
        "{shader:?} has no entry point {entry}"
    );
    // What wgpu grants every device without a feature (unpack2x16float needs it).
    let mut caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if f.f16 {
        caps |= naga::valid::Capabilities::SHADER_FLOAT16;
    }
    if f.subgroup {
        caps |= naga::valid::Capabilities::SUBGROUP;
    }
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{shader:?}::{entry} {f:?}: {}", e.emit_to_string(&src)));
}

#[test]
fn every_module_parses_and_validates_with_naga() {
    for (shader, entry) in ENTRY_POINTS {
        validate(shader, entry);
    }
    // The f16-only shaders, with and without subgroups.
    for (shader, entry) in F16_ENTRY_POINTS {
        for f in ShaderFeatures::ALL.into_iter().filter(|f| f.f16) {
            validate_for(shader, entry, f);
        }
    }
    // The KV shaders for several piece counts, up to the engine's limit.
    for p in [2, 7, pagoda_backend::MAX_KV_PIECES as u32] {
        validate(Shader::KvCache(p), "write_kv");
        validate(Shader::KvCache(p), "copy_pages");
        validate(Shader::PagedAttention(p, 128, 8, 3), "paged_attention");
    }
}

#[test]
fn every_wgsl_file_starts_with_its_header() {
    for (name, text) in SHADER_FILES {
        let first = text.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&format!("// {name} — ")),
            "{name}: {first:?}"
        );
        // Bindings and workgroup layout are described where there are entry points.
        if text.contains("@compute") {
            assert!(
                text.contains("// Bindings:") || text.contains("Bindings"),
                "{name}: no bindings section"
            );
            assert!(text.contains("Workgroups:"), "{name}: no workgroup section");
        }
    }
}
