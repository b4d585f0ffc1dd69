//! `pagoda`: the command-line interface.
//!
//! With `--json`, stdout holds exactly one JSON document; progress and logs go
//! to stderr. Errors print one clear message and exit non-zero.
//!
//! Layout (as cargo keeps its commands): `cli.rs` the command line and the
//! flag groups commands share, `backend.rs` the one place a backend is named,
//! `setup.rs` the helpers every command uses (model source, engine settings,
//! building), `commands/<name>.rs` one subcommand each with its flags and
//! `exec`.

#[macro_use]
mod backend;
mod cli;
mod commands;
mod setup;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match commands::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
