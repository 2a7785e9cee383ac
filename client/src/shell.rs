//! The interactive shell (rustyline: history, tab completion, `help`) and the line mode
//! that runs one command per line when stdin is not a terminal.
//!
//! Lines are split like a POSIX shell (`put k "two words"`) and parsed by the same clap
//! definitions as the command line, so a command means the same thing everywhere.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

use clap::Parser;
use rustyline::completion::Completer;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use crate::cli::{execute, Command, Printer, COMMAND_NAMES, EXIT_OK, EXIT_USAGE};
use crate::Client;

/// Longest command line accepted in line mode: a put of a 1 MiB value with room to spare.
const MAX_LINE_BYTES: u64 = 8 * 1024 * 1024;
/// History entries kept on disk.
const HISTORY_ENTRIES: usize = 1000;

#[derive(Parser, Debug)]
#[command(no_binary_name = true, name = "capkv", disable_version_flag = true)]
struct Line {
    #[command(subcommand)]
    command: Command,
}

enum Parsed {
    Empty,
    Quit,
    Command(Command),
    /// Help text or a usage error, already rendered; `true` when it is an error.
    Message(String, bool),
}

fn parse_line(line: &str) -> Parsed {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Parsed::Empty;
    }
    if matches!(line, "exit" | "quit") {
        return Parsed::Quit;
    }
    let words = match shell_words::split(line) {
        Ok(w) => w,
        Err(e) => return Parsed::Message(format!("error: {e}\n"), true),
    };
    match Line::try_parse_from(words) {
        Ok(l) => Parsed::Command(l.command),
        Err(e) => {
            let is_error = e.use_stderr();
            Parsed::Message(e.render().to_string(), is_error)
        }
    }
}

struct ShellHelper;

impl Completer for ShellHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let head = &line[..pos];
        // Only the first word is a command name; past it there is nothing to complete.
        if head.contains(char::is_whitespace) {
            return Ok((pos, Vec::new()));
        }
        let names = COMMAND_NAMES.iter().chain(["help", "exit", "quit"].iter());
        let found = names
            .filter(|n| n.starts_with(head))
            .map(|n| format!("{n} "))
            .collect();
        Ok((0, found))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}
impl Highlighter for ShellHelper {}
impl Validator for ShellHelper {}
impl Helper for ShellHelper {}

fn history_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CAPKV_HISTORY") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".capkv_history"))
}

/// The interactive shell; returns the exit code (0 unless the terminal failed).
pub async fn interactive(client: &Client, json: bool) -> u8 {
    let config = rustyline::Config::builder()
        .max_history_size(HISTORY_ENTRIES)
        .map(|b| b.auto_add_history(true).build());
    let editor = config.and_then(Editor::<ShellHelper, DefaultHistory>::with_config);
    let mut rl = match editor {
        Ok(rl) => rl,
        Err(e) => {
            eprintln!("error: cannot open the terminal: {e}");
            return crate::cli::EXIT_ERROR;
        }
    };
    rl.set_helper(Some(ShellHelper));
    let history = history_path();
    if let Some(h) = &history {
        // A missing history file is normal on first use.
        let _ = rl.load_history(h);
    }
    println!("capkv shell: type `help` for commands, `exit` or Ctrl-D to leave.");
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    loop {
        let line = match rl.readline("capkv> ") {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("error: {e}");
                break;
            }
        };
        match parse_line(&line) {
            Parsed::Empty => {}
            Parsed::Quit => break,
            Parsed::Message(m, _) => print!("{m}"),
            Parsed::Command(cmd) => {
                let mut p = Printer {
                    json,
                    out: &mut out,
                    err: &mut err,
                };
                execute(client, &cmd, &mut p, false).await;
            }
        }
        let _ = std::io::stdout().flush();
    }
    if let Some(h) = &history {
        if let Err(e) = rl.save_history(h) {
            eprintln!("warning: cannot save history to {}: {e}", h.display());
        }
    }
    EXIT_OK
}

/// Runs one command per line of `input`. Returns 0 when every command succeeded, else the
/// exit code of the last one that failed.
pub async fn lines(
    client: &Client,
    json: bool,
    mut input: impl BufRead,
    p: &mut Printer<'_>,
) -> u8 {
    let _ = json;
    let mut status = EXIT_OK;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match input
            .by_ref()
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut buf)
        {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(p.err, "error: cannot read stdin: {e}");
                return crate::cli::EXIT_ERROR;
            }
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            let _ = writeln!(p.err, "error: input line is not UTF-8");
            status = EXIT_USAGE;
            continue;
        };
        match parse_line(line) {
            Parsed::Empty => {}
            Parsed::Quit => break,
            Parsed::Message(m, is_error) => {
                let _ = write!(if is_error { &mut *p.err } else { &mut *p.out }, "{m}");
                if is_error {
                    status = EXIT_USAGE;
                }
            }
            Parsed::Command(cmd) => {
                let code = execute(client, &cmd, p, false).await;
                if code != EXIT_OK {
                    status = code;
                }
            }
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quoted_lines() {
        match parse_line(r#"put greeting "hello world""#) {
            Parsed::Command(Command::Put { key, value, .. }) => {
                assert_eq!(key, "greeting");
                assert_eq!(value.unwrap(), "hello world");
            }
            _ => panic!("not a put"),
        }
        assert!(matches!(parse_line("  # comment"), Parsed::Empty));
        assert!(matches!(parse_line("quit"), Parsed::Quit));
        assert!(matches!(parse_line("help"), Parsed::Message(_, false)));
        assert!(matches!(parse_line("frobnicate"), Parsed::Message(_, true)));
    }
}
