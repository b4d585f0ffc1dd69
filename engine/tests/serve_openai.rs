//! The official `openai` Python client against `pagoda serve` (issue 14):
//! chat and text completions, streamed and not, usage, logprobs, `n`, and
//! errors as the client's exceptions. Python 3 with `openai` is required
//! (`pip install openai`; `.ci/run` installs it): the test fails without it.

mod support;

use std::path::Path;
use std::process::Command;

use support::Server;

#[test]
fn the_official_openai_client_works() {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the Python package `openai` is required for this test (pip install openai; .ci/run installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("python3 is required for this test (it drives the openai client): {e}"),
    }
    let s = Server::start(&["--max-seqs", "4", "--api-key", "test-key"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/openai_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([&s.base, "test-key"])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}
