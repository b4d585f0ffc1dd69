//! `pagoda chat` on a terminal, driven through tmux: Ctrl-C, Ctrl-D, slash
//! commands and type-ahead (issue 9, item 6). tmux is required: CI installs
//! it (.ci/run), and without it these tests fail rather than skip.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Numbers every session's socket: a server killed by one session's drop can
/// still be shutting down when the next session starts, and a client that
/// reached the dying server fails with "server exited unexpectedly".
static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// A chat session in a detached tmux server of its own.
struct Session {
    socket: String,
}

fn tmux_available() {
    let ok = Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "tmux is required for the chat terminal tests (apt-get install tmux; .ci/run installs it)"
    );
}

impl Session {
    fn start(name: &str, args: &[&str]) -> Session {
        tmux_available();
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let socket = format!("pagoda-chat-test-{}-{name}-{n}", std::process::id());
        let mut cmd = format!("'{}' chat", env!("CARGO_BIN_EXE_pagoda"));
        for a in args {
            cmd.push_str(&format!(" '{a}'"));
        }
        // Keep the pane after the exit so the exit status can be read.
        cmd.push_str("; echo EXITED:$?; sleep 600");
        let s = Session { socket };
        // A fresh server on a fresh socket; a start that lost a race with
        // the system (the server died before the client attached) is retried.
        let new_session = ["new-session", "-d", "-x", "200", "-y", "50", &cmd];
        let mut attempt = 0;
        while let Err(e) = s.try_tmux(&new_session) {
            attempt += 1;
            assert!(attempt < 3, "tmux {new_session:?}: {e}");
            std::thread::sleep(Duration::from_millis(200));
        }
        s.wait_for("the prompt", |lines| lines.last().is_some_and(|l| l == ">"));
        s
    }

    fn try_tmux(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .env("TERM", "xterm")
            .output()
            .expect("tmux runs");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn tmux(&self, args: &[&str]) -> String {
        self.try_tmux(args)
            .unwrap_or_else(|e| panic!("tmux {args:?}: {e}"))
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-l", text]);
    }

    /// Presses keys (`Enter`, `C-c`, `C-d`).
    fn key(&self, key: &str) {
        self.tmux(&["send-keys", key]);
    }

    fn line(&self, text: &str) {
        self.type_text(text);
        self.key("Enter");
    }

    /// The screen's non-empty lines (wrapped lines joined, trailing blanks trimmed).
    fn lines(&self) -> Vec<String> {
        self.tmux(&["capture-pane", "-p", "-J", "-S", "-"])
            .lines()
            .map(|l| l.trim_end().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn wait_for(&self, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let t0 = Instant::now();
        loop {
            let lines = self.lines();
            if done(&lines) {
                return lines;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}; screen:\n{}",
                lines.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types a line and waits for the next prompt or the exit; returns the
    /// lines printed in between.
    fn say(&self, text: &str) -> Vec<String> {
        let before = self.lines().len();
        self.line(text);
        let lines = self.wait_for("the next prompt", |l| {
            l.len() > before && (l.last().is_some_and(|x| x == ">") || exited(l).is_some())
        });
        // The prompt line now shows what was typed; the last line is the
        // next prompt (or the exit status).
        assert_eq!(lines[before - 1], format!("> {text}"), "{lines:?}");
        lines[before..lines.len() - 1].to_vec()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The exit status the pane printed, if the chat has ended.
fn exited(lines: &[String]) -> Option<String> {
    lines.iter().find_map(|l| {
        l.split_once("EXITED:")
            .map(|(before, code)| format!("{before}|{code}"))
    })
}

fn wait_exit(s: &Session) -> Vec<String> {
    s.wait_for("the exit", |l| exited(l).is_some())
}

/// The text of the banner line, and the lines after it.
fn after_banner(lines: &[String]) -> &[String] {
    let i = lines
        .iter()
        .position(|l| l.starts_with("pagoda chat:"))
        .expect("banner");
    &lines[i + 1..]
}

#[test]
fn ctrl_c_stops_the_answer_and_returns_to_the_prompt_then_quits() {
    let s = Session::start("ctrl-c", &["--greedy", "--max-tokens", "4000"]);
    let before = s.lines().len();
    s.line("Tell me a very long story about a dragon.");
    // Some answer text is out.
    s.wait_for("the answer to start", |l| {
        l.len() > before && l[before..].iter().map(|x| x.len()).sum::<usize>() > 40
    });
    // Typed during the answer: neither echoed nor kept for the prompt.
    s.type_text("zzqq");
    std::thread::sleep(Duration::from_millis(300));
    s.key("C-c");
    let t0 = Instant::now();
    let lines = s.wait_for("the prompt after Ctrl-C", |l| {
        l.last().is_some_and(|x| x == ">") || exited(l).is_some()
    });
    assert!(
        exited(&lines).is_none(),
        "Ctrl-C during the answer ended the chat:\n{}",
        lines.join("\n")
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the answer was not stopped"
    );
    assert!(
        !lines.iter().any(|l| l.contains("zzqq")),
        "type-ahead was echoed or kept:\n{}",
        lines.join("\n")
    );
    // The session goes on.
    let reply = s.say("/help");
    assert!(reply.iter().any(|l| l.contains("/clear")), "{reply:?}");
    // A second Ctrl-C, at the empty prompt, quits cleanly.
    s.key("C-c");
    let lines = wait_exit(&s);
    assert_eq!(exited(&lines).unwrap(), "|0", "{}", lines.join("\n"));
}

#[test]
fn ctrl_d_leaves_the_shell_prompt_on_its_own_line() {
    let s = Session::start("ctrl-d", &["--greedy", "--max-tokens", "8"]);
    s.key("C-d");
    let lines = wait_exit(&s);
    // "|0": nothing before EXITED on its line (the shell's prompt would be there).
    assert_eq!(exited(&lines).unwrap(), "|0", "{}", lines.join("\n"));
}

#[test]
fn slash_commands_and_exit_words_are_not_sent_to_the_model() {
    for quit in ["/bye", "exit", "quit", "/exit"] {
        let s = Session::start("slash", &["--greedy", "--max-tokens", "8"]);
        let help = s.say("/help");
        assert!(
            help.len() >= 4
                && help
                    .iter()
                    .all(|l| l.starts_with("  /") || l.starts_with("  Ctrl"))
                && help.iter().any(|l| l.contains("/clear"))
                && help.iter().any(|l| l.contains("/bye")),
            "{help:?}"
        );
        assert_eq!(
            s.say("/nope now"),
            ["unknown command /nope; /help lists the commands"]
        );
        assert_eq!(s.say("/clear"), ["(conversation cleared)"]);
        s.line(quit);
        let lines = wait_exit(&s);
        let tail = after_banner(&lines);
        // Nothing but the commands, their replies and the exit: no model text.
        let want_tail = [format!("> {quit}"), "EXITED:0".to_string()];
        assert_eq!(
            tail[tail.len() - 2..],
            want_tail,
            "{quit}:\n{}",
            lines.join("\n")
        );
    }
}

/// A greedy answer after `/clear` is the answer a fresh session gives.
#[test]
fn clear_forgets_the_conversation() {
    let args = ["--greedy", "--max-tokens", "16"];
    let fresh = Session::start("fresh", &args);
    let want = fresh.say("What is my name?");
    assert!(!want.is_empty());
    let s = Session::start("clear", &args);
    let first = s.say("Hi! My name is Bartholomew.");
    assert!(!first.is_empty());
    let remembered = s.say("What is my name?");
    assert_ne!(
        remembered, want,
        "the history should change the answer (else this test proves nothing)"
    );
    assert_eq!(s.say("/clear"), ["(conversation cleared)"]);
    assert_eq!(s.say("What is my name?"), want);
}

/// Without a terminal (piped input), commands work the same and stdout has
/// only answers.
#[test]
fn piped_commands_are_not_sent_to_the_model() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["chat", "--greedy", "--max-tokens", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"/help\n/clear\n/what\n\n/bye\nHello\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "stderr: {err}");
    assert!(err.contains("unknown command /what"), "{err}");
    assert!(err.contains("(conversation cleared)"), "{err}");
}
