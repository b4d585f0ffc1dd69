//! `pagoda`: the command-line interface.
//!
//! With `--json`, stdout holds exactly one JSON document; progress and logs go
//! to stderr. Errors print one clear message and exit non-zero.

mod cli;
mod commands;

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
