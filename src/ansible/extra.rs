//! The user's own `-e` values, checked before anything boots, the way `ansible-playbook` itself
//! reads them (`load_extra_vars`): `@FILE` (YAML or JSON, a mapping), a JSON/YAML mapping
//! starting with `{`, or `key=value` pairs. What Ansible would refuse only after minutes of
//! booting is refused here in milliseconds; what it would silently accept but cannot be meant
//! (`-e justaword` defines `_raw_params`) is refused too. A relative `@FILE` is made absolute,
//! because playbooks run from the repo, not from where the user typed the command.

use crate::error::{Error, Result, show};
use serde_yaml_ng::{Mapping, Value};
use std::path::Path;

/// Check one `-e` value and return it as it is to be passed (a relative `@FILE` made absolute
/// against `cwd`), with the mapping it defines.
pub fn check(raw: &str, cwd: &Path) -> Result<(String, Mapping)> {
    let bad = |problem: String| {
        Error::input(
            format!("-e '{raw}': {problem}"),
            "give key=value pairs (`-e docker_host_container_forward=true`), a JSON object \
             (`-e '{\"key\": [1, 2]}'`), or @FILE with a YAML/JSON mapping",
        )
    };
    if let Some(file) = raw.strip_prefix('@') {
        let path = cwd.join(file);
        let meta = std::fs::metadata(&path)
            .map_err(|e| bad(format!("cannot read {}: {e}", show(&path))))?;
        if !meta.is_file() {
            return Err(bad(format!("{} is not a regular file", show(&path))));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| bad(format!("cannot read {}: {e}", show(&path))))?;
        let passed = format!("@{}", path.display());
        if text.trim_start().starts_with("$ANSIBLE_VAULT;") {
            // Encrypted: only ansible-playbook (with the vault password) can read it.
            return Ok((passed, Mapping::new()));
        }
        let map = mapping(&text).map_err(|why| bad(format!("{}: {why}", show(&path))))?;
        return Ok((passed, map));
    }
    let map = match raw.chars().next() {
        None => return Err(bad("empty".into())),
        Some('/' | '.') => {
            return Err(bad(
                "looks like a file name; Ansible wants files as @FILE".into()
            ));
        }
        Some('{' | '[') => mapping(raw).map_err(bad)?,
        Some(_) => key_values(raw).map_err(bad)?,
    };
    Ok((raw.to_string(), map))
}

/// A YAML/JSON document that must be a mapping.
fn mapping(text: &str) -> std::result::Result<Mapping, String> {
    match serde_yaml_ng::from_str::<Value>(text) {
        Ok(Value::Mapping(m)) => Ok(m),
        Ok(Value::Null) => Err("is empty, not a mapping of vars".into()),
        Ok(other) => Err(format!(
            "is a {}, not a mapping of vars",
            match other {
                Value::Sequence(_) => "list",
                Value::String(_) => "string",
                _ => "scalar",
            }
        )),
        Err(e) => Err(format!("does not parse: {e}")),
    }
}

/// `k=v k2="v 2"`: whitespace-separated tokens (quotes group), every one `name=value`.
fn key_values(raw: &str) -> std::result::Result<Mapping, String> {
    let mut map = Mapping::new();
    for token in split_quoted(raw)? {
        let Some((k, v)) = token.split_once('=') else {
            return Err(format!(
                "`{token}` is not key=value (Ansible would define a var `_raw_params` and ignore it)"
            ));
        };
        if !valid_var_name(k) {
            return Err(format!(
                "`{k}` is not a valid variable name (letters, digits, '_'; not starting with a digit)"
            ));
        }
        map.insert(Value::String(k.into()), Value::String(v.into()));
    }
    Ok(map)
}

fn split_quoted(raw: &str) -> std::result::Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in raw.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => quote = Some(c),
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    tokens.push(std::mem::take(&mut cur));
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err("has an unclosed quote".into());
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    Ok(tokens)
}

pub fn valid_var_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Refuse a mapping that sets a non-ssh `ansible_connection` (from `-e` or the overlay): the
/// playbook would then run on this machine instead of the VM. The run's own scope check asks
/// Ansible again before every playbook; this says it before anything boots.
pub fn refuse_local_connection(map: &Mapping, source: &str) -> Result<()> {
    for key in ["ansible_connection", "ansible_ssh_connection"] {
        if let Some(v) = map.get(key) {
            let v = v.as_str().unwrap_or("?");
            if !super::safety::is_ssh_connection(v) {
                return Err(Error::input(
                    format!(
                        "{source} sets {key}={v}: the playbook would run on this machine, not on the VM"
                    ),
                    format!(
                        "remove {key} from {source}; boma-qvm connects to the VM over ssh itself"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> Mapping {
        check(raw, Path::new("/")).unwrap().1
    }

    fn refused(raw: &str) -> String {
        let e = check(raw, Path::new("/nonexistent-cwd")).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let text = e.to_string();
        assert!(text.contains("fix:"), "{text}");
        text
    }

    #[test]
    fn the_forms_ansible_reads_are_accepted() {
        assert_eq!(ok("docker_host_container_forward=true").len(), 1);
        assert_eq!(ok("a=1 b='two words' _c=").len(), 3);
        assert_eq!(ok(r#"{"a": [1, 2], "b": {"c": 3}}"#).len(), 2);
        assert_eq!(ok("{a: 1}").len(), 1);
    }

    #[test]
    fn what_ansible_would_refuse_late_or_misread_is_refused_now() {
        assert!(refused(r#"{"a": [1,}"#).contains("does not parse"));
        assert!(refused("justaword").contains("_raw_params"));
        assert!(refused("a=1 oops").contains("`oops`"));
        assert!(refused("1a=2").contains("not a valid variable name"));
        assert!(refused("[1, 2]").contains("list"));
        assert!(refused("a='x").contains("unclosed quote"));
        assert!(refused("./vars.yml").contains("@FILE"));
        assert!(refused("").contains("empty"));
        assert!(refused("@/nonexistent/vars.yml").contains("cannot read"));
        assert!(refused("@/").contains("not a regular file"));
    }

    #[test]
    fn files_are_read_and_made_absolute() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("v.yml"), "a: 1\nb: [x]\n").unwrap();
        std::fs::write(t.path().join("empty.yml"), "").unwrap();
        std::fs::write(t.path().join("list.yml"), "- a\n").unwrap();
        std::fs::write(
            t.path().join("vault.yml"),
            "$ANSIBLE_VAULT;1.1;AES256\n6162\n",
        )
        .unwrap();
        let (passed, map) = check("@v.yml", t.path()).unwrap();
        assert_eq!(passed, format!("@{}", t.path().join("v.yml").display()));
        assert_eq!(map.len(), 2);
        assert!(
            check("@vault.yml", t.path()).is_ok(),
            "vault files pass through"
        );
        for bad in ["@empty.yml", "@list.yml"] {
            let e = check(bad, t.path()).unwrap_err().to_string();
            assert!(e.contains("not a mapping"), "{e}");
        }
    }

    #[test]
    fn a_local_connection_is_refused() {
        for (raw, refused_it) in [
            ("ansible_connection=local", true),
            ("ansible_connection=ssh", false),
            ("x=1", false),
        ] {
            let r = refuse_local_connection(&ok(raw), "-e");
            assert_eq!(r.is_err(), refused_it, "{raw}");
        }
    }
}
