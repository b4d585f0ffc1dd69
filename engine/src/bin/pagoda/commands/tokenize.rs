//! `pagoda tokenize`: a prompt's token ids as a JSON array (no weights
//! loaded; a vocab-only GGUF without tensors is enough).

use anyhow::Result;
use pagoda::tokenizer::Tokenizer;

use crate::cli::{Common, PromptArgs};
use crate::setup::{model_source, read_prompt};

/// Flags of `pagoda tokenize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Treat control-token text as plain text.
    #[arg(long)]
    pub no_parse_special: bool,
    /// Add no BOS/EOS, whatever the model's metadata asks (by default they
    /// are added as `tokenizer.ggml.add_bos_token`/`add_eos_token` say, as
    /// llama-tokenize does).
    #[arg(long)]
    pub no_add_special: bool,
}

/// Runs `pagoda tokenize`.
pub fn exec(a: Args) -> Result<()> {
    let text = read_prompt(&a.prompt)?;
    let f = model_source(&a.common)?.header()?;
    let tok = Tokenizer::from_gguf(&f)?;
    let ids = tok.encode_with_special(&text, !a.no_add_special, !a.no_parse_special);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
