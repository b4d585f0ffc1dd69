//! `pagoda chat`: turns with the model's chat template, one (`--message`) or
//! interactive.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, anyhow, bail};
use pagoda::chat::Message;
use pagoda::engine::{Completion, Engine, GenerationParams};
use pagoda::sequence::FinishReason;
use pagoda_backend::Backend;
use serde_json::json;

use crate::cli::{Common, MemoryArgs, SamplingArgs};
use crate::setup::{ModelSource, build, engine_config, model_source, reason_str, sampling};

/// Flags of `pagoda chat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// One user turn, answered, then exit.
    #[arg(long)]
    pub message: Option<String>,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Print one JSON document (with --message).
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda chat`.
pub fn exec(a: Args) -> Result<()> {
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, b))
}

fn run<B: Backend>(a: &Args, source: &ModelSource, backend: Arc<B>) -> Result<()> {
    let mut engine = build(source, backend, engine_config(&a.memory, 1)?)?;
    let mut history: Vec<Message> = Vec::new();
    if let Some(sys) = &a.system {
        history.push(Message::new("system", sys));
    }
    let params = GenerationParams {
        max_tokens: a.max_tokens,
        sampling: sampling(&a.sampling),
        ..GenerationParams::default()
    };
    if let Some(m) = &a.message {
        if m.is_empty() {
            bail!("the message is empty");
        }
        let (answer, c) = turn(&mut engine, &params, &mut history, m.clone(), !a.json, None)?;
        if a.json {
            let doc = json!({
                "reply": answer,
                "stop_reason": reason_str(&c.finish_reason),
                "prompt_tokens": c.prompt_tokens.len(),
                "generated_tokens": c.generated_tokens.len(),
                "seed": params.sampling.seed,
            });
            println!("{}", serde_json::to_string(&doc)?);
        } else {
            println!();
        }
        return Ok(());
    }
    interactive(&mut engine, &params, &mut history)
}

const HELP: &str = concat!(
    "  /help      this list (also /?)\n",
    "  /clear     forget the conversation (the --system message stays)\n",
    "  /bye       quit (also /exit, /quit, exit, quit, Ctrl-D)\n",
    "  Ctrl-C     stop the answer; at an empty prompt, quit",
);

/// What a line typed at the prompt asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Message(String),
    Empty,
    Quit,
    Clear,
    Help,
    Unknown(String),
}

fn parse_command(line: &str) -> Command {
    let t = line.trim();
    match t {
        "" => Command::Empty,
        "exit" | "quit" | "/bye" | "/exit" | "/quit" => Command::Quit,
        "/clear" => Command::Clear,
        "/help" | "/?" => Command::Help,
        _ if t.starts_with('/') => {
            Command::Unknown(t.split_whitespace().next().unwrap_or(t).to_string())
        }
        _ => Command::Message(line.trim_end_matches(['\n', '\r']).to_string()),
    }
}

/// What the prompt returned.
enum Input {
    Line(String),
    /// Ctrl-C at an empty prompt.
    Interrupted,
    /// Ctrl-D or end of input.
    Eof,
}

/// Ctrl-C at the prompt: clears a non-empty line, interrupts (quits) at an
/// empty one.
struct CtrlC;

impl rustyline::ConditionalEventHandler for CtrlC {
    fn handle(
        &self,
        _evt: &rustyline::Event,
        _n: rustyline::RepeatCount,
        _positive: bool,
        ctx: &rustyline::EventContext,
    ) -> Option<rustyline::Cmd> {
        if ctx.line().is_empty() {
            None
        } else {
            Some(rustyline::Cmd::Kill(rustyline::Movement::WholeLine))
        }
    }
}

/// The prompt: a line editor on a terminal, plain lines otherwise.
struct Prompt {
    editor: Option<rustyline::DefaultEditor>,
}

impl Prompt {
    fn new() -> Result<Prompt> {
        use std::io::IsTerminal;
        let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
        let editor = if tty {
            let mut ed = rustyline::DefaultEditor::new()?;
            ed.bind_sequence(
                rustyline::KeyEvent::ctrl('C'),
                rustyline::EventHandler::Conditional(Box::new(CtrlC)),
            );
            Some(ed)
        } else {
            None
        };
        Ok(Prompt { editor })
    }

    fn read(&mut self) -> Result<Input> {
        use rustyline::error::ReadlineError;
        let Some(ed) = self.editor.as_mut() else {
            eprint!("> ");
            let mut line = String::new();
            return Ok(match std::io::stdin().lock().read_line(&mut line)? {
                0 => Input::Eof,
                _ => Input::Line(line),
            });
        };
        match ed.readline("> ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = ed.add_history_entry(line.as_str());
                }
                Ok(Input::Line(line))
            }
            Err(ReadlineError::Interrupted) => Ok(Input::Interrupted),
            Err(ReadlineError::Eof) => Ok(Input::Eof),
            Err(e) => Err(e.into()),
        }
    }
}

/// The interactive loop. Ctrl-C during an answer stops it (the partial
/// answer stays in the history) and returns to the prompt; Ctrl-C at an
/// empty prompt, Ctrl-D, `/bye`, `exit` or `quit` ends the session.
fn interactive<B: Backend>(
    engine: &mut Engine<B>,
    params: &GenerationParams,
    history: &mut Vec<Message>,
) -> Result<()> {
    let generating = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (generating, interrupted) = (generating.clone(), interrupted.clone());
        // On a terminal the line editor reads Ctrl-C as a key at the prompt;
        // the signal arrives only while an answer is generated, or at a plain
        // (piped) prompt, where it quits.
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                interrupted.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })?;
    }
    let keep = history.len(); // the --system message
    let mut prompt = Prompt::new()?;
    eprintln!(
        "pagoda chat: type a message; /help lists commands; Ctrl-C stops an answer, Ctrl-D or /bye quits"
    );
    loop {
        let line = match prompt.read()? {
            Input::Line(l) => l,
            Input::Interrupted => break,
            Input::Eof => {
                // Leave the shell's prompt on a line of its own.
                println!();
                break;
            }
        };
        match parse_command(&line) {
            Command::Empty => {}
            Command::Quit => break,
            Command::Clear => {
                history.truncate(keep);
                eprintln!("(conversation cleared)");
            }
            Command::Help => eprintln!("{HELP}"),
            Command::Unknown(c) => eprintln!("unknown command {c}; /help lists the commands"),
            Command::Message(text) => {
                interrupted.store(false, Ordering::SeqCst);
                generating.store(true, Ordering::SeqCst);
                let r = {
                    let _quiet = TypeAhead::hide();
                    turn(engine, params, history, text, true, Some(&interrupted))
                };
                generating.store(false, Ordering::SeqCst);
                r?;
                println!();
            }
        }
    }
    Ok(())
}

/// While alive, keys typed on the terminal are not echoed (so they do not
/// mix into the answer); when dropped, what was typed meanwhile is
/// discarded and the terminal restored.
struct TypeAhead {
    #[cfg(unix)]
    saved: Option<libc::termios>,
}

impl TypeAhead {
    fn hide() -> TypeAhead {
        #[cfg(unix)]
        {
            // SAFETY: termios is plain C data; all-zero is a valid value to overwrite.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: isatty only inspects fd 0; tcgetattr writes into `t`, which we own, and fails (checked) when stdin is not a terminal.
            let is_tty = unsafe { libc::isatty(0) == 1 && libc::tcgetattr(0, &mut t) == 0 };
            if !is_tty {
                return TypeAhead { saved: None };
            }
            let mut quiet = t;
            quiet.c_lflag &= !(libc::ECHO | libc::ECHONL);
            // SAFETY: `quiet` is a valid termios read from this terminal.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) };
            TypeAhead { saved: Some(t) }
        }
        #[cfg(not(unix))]
        TypeAhead {}
    }
}

impl Drop for TypeAhead {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(t) = self.saved.as_ref() {
            // SAFETY: fd 0 is the terminal whose settings `t` holds.
            unsafe {
                libc::tcflush(0, libc::TCIFLUSH);
                libc::tcsetattr(0, libc::TCSANOW, t);
            }
        }
    }
}

/// One user turn: appends it and the answer to `history`, streaming the
/// answer to stdout when `print`. When `stop` becomes true the answer is cut
/// there (and kept, as far as it got). Returns the answer and the
/// request's completion.
fn turn<B: Backend>(
    engine: &mut Engine<B>,
    params: &GenerationParams,
    history: &mut Vec<Message>,
    text: String,
    print: bool,
    stop: Option<&AtomicBool>,
) -> Result<(String, Completion)> {
    history.push(Message::new("user", &text));
    let prompt = engine.render_chat(history)?;
    let id = engine.add_request(engine.tokenize(&prompt), params.clone())?;
    let mut out = std::io::stdout().lock();
    while engine.has_unfinished() {
        if stop.is_some_and(|s| s.swap(false, Ordering::SeqCst)) {
            engine.abort(id)?;
            break;
        }
        for ev in engine.step()? {
            if ev.id == id && print && !ev.text.is_empty() {
                write!(out, "{}", ev.text)?;
                out.flush()?;
            }
        }
    }
    let c = engine
        .take_completion(id)
        .ok_or_else(|| anyhow!("chat turn did not finish"))?;
    if let FinishReason::Error(e) = &c.finish_reason {
        bail!("chat turn failed: {e}");
    }
    // The engine's text holds no end-of-generation token.
    history.push(Message::new("assistant", &c.text));
    Ok((c.text.clone(), c))
}
