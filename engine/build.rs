//! Embeds the git commit the binary is built from as `PAGODA_GIT_COMMIT`
//! (`pagoda bench` reports it). Without git, or outside a repository (a
//! source tarball), it is `unknown`; the build never fails over it.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PAGODA_GIT_COMMIT={commit}");
    // Re-run when HEAD moves (a commit, a checkout); paths resolve inside
    // worktrees too. Without git, only when this script changes.
    for p in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", p])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
