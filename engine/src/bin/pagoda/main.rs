//! `pagoda`: the command-line interface.
//!
//! With `--json`, stdout holds exactly one JSON document; progress and logs go
//! to stderr. Errors print one clear message and exit non-zero.
//!
//! Layout (as cargo keeps its commands): `cli.rs` the command line and the
//! flag groups commands share, `backend.rs` the one place a backend is named,
//! `setup.rs` the helpers every command uses (model source, engine settings,
//! building), `commands/<name>.rs` one subcommand each with its flags and
//! `exec`, `server/` the HTTP server behind `pagoda serve`.

#[macro_use]
mod backend;
mod cli;
mod commands;
mod server;
mod setup;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    restore_sigpipe();
    let args = cli::Cli::parse();
    let _ = backend::ADAPTER.set(args.adapter.clone());
    match commands::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`pagoda ... | head`) is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// Gives SIGPIPE back its default action, so that a write to a closed stdout
/// ends the program quietly, killed by SIGPIPE, as `cat`, `grep` or `yes`
/// are (`pagoda logits ... | head -c 200`). Rust's runtime ignores SIGPIPE,
/// which turns such a write into an EPIPE error: `println!` then panics and
/// `write!` returns an error. Restoring the signal covers every write to
/// stdout or stderr (the commands' `println!`s included) in one place.
/// Sockets are not affected: std writes to them with `MSG_NOSIGNAL`.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any thread is started; setting a signal's disposition to SIG_DFL has no other precondition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether an I/O error "broken pipe" is anywhere in `e`'s chain (on systems
/// without SIGPIPE, the way a closed stdout shows up).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, joined by `: ` as `{:#}` does, but leaving out
/// a cause whose text an outer message already holds: library errors such as
/// `GgufError::Io` name their cause in their own text and also return it as
/// `source()`, which `{:#}` would print twice.
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
