//! The commands behind the CLI, one file per subcommand, each with its own
//! `Args` and one `exec`. Shared helpers are in `crate::setup`, the backend
//! choice in `crate::backend`.

pub mod bench;
pub mod chat;
pub mod compare;
pub mod devices;
pub mod generate;
pub mod logits;
pub mod perplexity;
pub mod plan;
pub mod quantize;
pub mod serve;
pub mod tokenize;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::exec(a),
        Command::Chat(a) => chat::exec(a),
        Command::Tokenize(a) => tokenize::exec(a),
        Command::Logits(a) => logits::exec(a),
        Command::Perplexity(a) => perplexity::exec(a),
        Command::Bench(a) => bench::exec(a),
        Command::Plan(a) => plan::exec(a),
        Command::Devices(a) => devices::exec(a),
        Command::Compare(a) => compare::exec(a),
        Command::Quantize(a) => quantize::exec(a),
        Command::Serve(a) => serve::exec(a),
    }
}
