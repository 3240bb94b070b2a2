//! Reading `ansible-playbook` output (default stdout callback): colour codes, the recap, failures.

use serde_json::Value;

/// Remove ANSI escape sequences (the terminal gets colour, the log file plain text).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters and intermediates, then one final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// Replace every secret value in `line` (empty values are ignored); see [`crate::secrets`].
pub fn redact(line: &str, secrets: &[String]) -> String {
    crate::secrets::Scrubber::new(secrets).scrub(line)
}

/// One host's `PLAY RECAP` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recap {
    pub ok: u32,
    pub changed: u32,
    pub unreachable: u32,
    pub failed: u32,
    pub skipped: u32,
    pub rescued: u32,
    pub ignored: u32,
}

/// `host`'s recap from the (colour-stripped) output, if the run got that far.
pub fn parse_recap(lines: &[String], host: &str) -> Option<Recap> {
    let start = lines.iter().rposition(|l| l.starts_with("PLAY RECAP"))?;
    lines[start + 1..].iter().find_map(|l| {
        let (name, counts) = l.split_once(" : ")?;
        if name.trim() != host {
            return None;
        }
        let mut r = Recap::default();
        for tok in counts.split_whitespace() {
            let (k, v) = tok.split_once('=')?;
            let v: u32 = v.parse().ok()?;
            match k {
                "ok" => r.ok = v,
                "changed" => r.changed = v,
                "unreachable" => r.unreachable = v,
                "failed" => r.failed = v,
                "skipped" => r.skipped = v,
                "rescued" => r.rescued = v,
                "ignored" => r.ignored = v,
                _ => {}
            }
        }
        Some(r)
    })
}

/// A task that failed (and was not ignored) or a host that was unreachable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskFailure {
    pub task: String,
    pub unreachable: bool,
    pub message: String,
}

/// Failures from the output: `fatal: [h]: FAILED! => {json}` (or `UNREACHABLE!`, or a loop item's
/// `failed: [h] (item=..) => {json}`), skipping those followed by `...ignoring`.
pub fn parse_failures(lines: &[String]) -> Vec<TaskFailure> {
    let mut out = Vec::new();
    let mut task = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = &lines[i];
        if let Some(rest) = line
            .strip_prefix("TASK [")
            .or_else(|| line.strip_prefix("RUNNING HANDLER ["))
        {
            task = rest
                .rsplit_once(']')
                .map(|(t, _)| t.to_string())
                .unwrap_or_default();
        }
        let is_failure = line.starts_with("fatal: [") || line.starts_with("failed: [");
        let Some((head, body)) = line.split_once(" => ").filter(|_| is_failure) else {
            i += 1;
            continue;
        };
        let mut json = body.to_string();
        if body.trim() == "{" {
            while i + 1 < lines.len() {
                i += 1;
                json.push('\n');
                json.push_str(&lines[i]);
                if lines[i] == "}" {
                    break;
                }
            }
        }
        let ignored = lines[i + 1..]
            .iter()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.starts_with("...ignoring"));
        if !ignored {
            out.push(TaskFailure {
                task: task.clone(),
                unreachable: head.contains("UNREACHABLE!"),
                message: message_of(&json),
            });
        }
        i += 1;
    }
    out
}

fn message_of(json: &str) -> String {
    match serde_json::from_str::<Value>(json) {
        Ok(v) => match v.get("msg") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => v
                .get("stderr")
                .and_then(Value::as_str)
                .map(String::from)
                .unwrap_or_else(|| short(json)),
        },
        Err(_) => short(json),
    }
}

fn short(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 400 {
        format!("{}...", s.chars().take(400).collect::<String>())
    } else {
        s.to_string()
    }
}
