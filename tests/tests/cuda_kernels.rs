//! Every CUDA kernel compiles for the H200 (`sm_90`) with NVRTC 13.0.88, on
//! any machine (no GPU, no CUDA toolkit: NVRTC comes from PyPI), and
//! `kernels/` documents what it holds.

use std::collections::BTreeSet;
use std::path::PathBuf;

use pagoda_cuda::kernels::{FILES, compile, full_source, nvrtc_version};

fn kernels_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../backends/cuda/kernels")
}

#[test]
fn every_kernel_compiles_for_sm_90() {
    pagoda_tests::nvrtc::load_nvrtc().expect("NVRTC");
    assert_eq!(nvrtc_version().expect("version"), (13, 0));
    let mut failures = Vec::new();
    for file in FILES {
        match compile(file, "sm_90") {
            Ok(cubin) => {
                // An ELF image with every symbol in it.
                assert_eq!(&cubin[..4], b"\x7fELF", "{}", file.stem);
                for sym in file.symbols {
                    assert!(
                        cubin.windows(sym.len()).any(|w| w == sym.as_bytes()),
                        "{} lacks {sym}",
                        file.stem
                    );
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_broken_kernel_is_an_error_with_the_log() {
    pagoda_tests::nvrtc::load_nvrtc().expect("NVRTC");
    let broken = pagoda_cuda::kernels::KernelFile {
        stem: "broken",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        symbols: &["k"],
    };
    let err = compile(&broken, "sm_90").expect_err("must not compile");
    let msg = err.to_string();
    assert!(
        msg.contains("broken.cu") && msg.contains("undefined_name"),
        "{msg}"
    );
}

#[test]
fn kernel_files_have_headers_and_the_readme_lists_every_symbol() {
    let dir = kernels_dir();
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("kernels/README.md");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    let listed: BTreeSet<String> = FILES.iter().map(|f| f.stem.to_string()).collect();
    assert_eq!(on_disk, listed, "kernels/*.cu and kernels::FILES differ");
    let cpu = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../backends/cpu/src");
    for file in FILES {
        assert!(
            cpu.join(format!("{}.rs", file.stem)).exists(),
            "kernels/{}.cu has no CPU reference file of the same stem",
            file.stem
        );
        let head: String = file
            .source
            .lines()
            .take_while(|l| l.starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for word in ["Launch", "reference"] {
            assert!(
                head.contains(word),
                "kernels/{}.cu header lacks {word:?}",
                file.stem
            );
        }
        for sym in file.symbols {
            assert!(
                head.contains(sym),
                "kernels/{}.cu header does not describe {sym}",
                file.stem
            );
            assert!(
                readme.contains(&format!("`{sym}`")),
                "README.md does not list `{sym}`"
            );
            assert!(
                full_source(file).contains(&format!("void {sym}("))
                    || full_source(file).contains(&format!("\n{sym}("))
                    || macro_kernel(file.source, sym).is_some(),
                "{sym} not defined in {}",
                file.stem
            );
        }
    }
}

/// The definition of a kernel written as a macro invocation `MACRO(sym, ...)` on a line of
/// its own: the text of `#define MACRO(` up to the macro's last (unescaped) line.
fn macro_kernel<'a>(src: &'a str, sym: &str) -> Option<&'a str> {
    let call = src
        .lines()
        .find(|l| l.contains(&format!("({sym}, ")) && !l.trim_start().starts_with("//"))?;
    let name = call.split('(').next()?.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let at = src.find(&format!("#define {name}("))?;
    let mut end = at;
    for line in src[at..].split_inclusive('\n') {
        end += line.len();
        if !line.trim_end().ends_with('\\') {
            break;
        }
    }
    Some(&src[at..end])
}

/// The text of the function whose definition starts at `at` (its first `{` to the matching
/// `}`), or `None` when the braces do not close.
fn body_at(src: &str, at: usize) -> Option<&str> {
    let open = at + src[at..].find('{')?;
    let mut depth = 0;
    for (i, c) in src[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&src[open..open + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Programmatic dependent launch lets a kernel start while the previous one still runs,
/// so every kernel must wait (`pdl_begin` / `pdl_wait`, common.cuh) before touching memory
/// other kernels write: each `extern "C"` kernel calls one itself or through a helper
/// (a `__device__` function of the same file whose body calls it).
#[test]
fn every_kernel_waits_for_the_previous_one() {
    let waits = |body: &str| body.contains("pdl_begin()") || body.contains("pdl_wait()");
    for file in FILES {
        let src = file.source;
        // Helpers that wait: `name(` / `name<` of every function (template or not) whose
        // body waits or calls a helper that does (to a fixed point).
        let mut fns = Vec::new();
        for (at, _) in src.match_indices("__device__ __forceinline__") {
            let sig_end = at + src[at..].find('{').unwrap();
            let sig = &src[at..sig_end];
            let Some(name) = sig
                .split('(')
                .next()
                .and_then(|s| s.split_whitespace().last())
            else {
                continue;
            };
            if let Some(body) = body_at(src, at) {
                fns.push((name, body));
            }
        }
        let mut helpers: Vec<String> = Vec::new();
        loop {
            let before = helpers.len();
            for &(name, body) in &fns {
                let calls = |h: &String| body.contains(h.as_str());
                if !helpers.contains(&format!("{name}("))
                    && (waits(body) || helpers.iter().any(calls))
                {
                    helpers.push(format!("{name}<"));
                    helpers.push(format!("{name}("));
                }
            }
            if helpers.len() == before {
                break;
            }
        }
        for sym in file.symbols {
            let at = src
                .find(&format!("void {sym}("))
                .or_else(|| src.find(&format!("\n{sym}(")));
            let body = match at {
                Some(at) => body_at(src, at).unwrap_or_else(|| panic!("{sym}: unbalanced braces")),
                None => macro_kernel(src, sym)
                    .unwrap_or_else(|| panic!("{sym} not defined in {}", file.stem)),
            };
            assert!(
                waits(body) || helpers.iter().any(|h| body.contains(h.as_str())),
                "kernels/{}.cu: {sym} never calls pdl_begin()/pdl_wait()",
                file.stem
            );
        }
    }
}
