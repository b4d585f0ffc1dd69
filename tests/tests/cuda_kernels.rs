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
                    || full_source(file).contains(&format!("\n{sym}(")),
                "{sym} not defined in {}",
                file.stem
            );
        }
    }
}
