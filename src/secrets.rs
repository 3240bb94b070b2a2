//! Secrets out of everything a run writes.
//!
//! A run knows two kinds of secret: the cert tier's credential (`GANDI_API_KEY`, see
//! `ansible::certs`) and extra vars the operator marks secret (`cycle --secret-var NAME`: the
//! value of var NAME is read from the environment variable NAME, never from the command line).
//! Both reach Ansible only through a 0600 extra-vars file that exists while a playbook runs.
//!
//! A [`Scrubber`] holds their values and replaces every occurrence with `********` in what boma-qvm
//! writes itself (playbook logs and their headers, the terminal echo, report.json, junit.xml,
//! cycle.json, INSPECT.txt, the post-mortem's console and event copies and guest command
//! outputs), and masks them in place (`*` for each byte, so the file keeps its length) in the
//! files others write while a VM runs: QEMU's console log, the supervisor's events and log.
//!
//! Each value is looked for as it is, JSON-escaped (events.jsonl, Ansible's result dumps), with
//! non-ASCII `\uXXXX`-escaped, and, for a multi-line value, line by line. A value shorter than
//! [`MIN_LEN`] is refused where it is given: scrubbing it would mask every occurrence of a short
//! common string.

use std::path::{Path, PathBuf};

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;

use crate::error::{Error, IoContext, Result, show};

/// What a secret is replaced with in text boma-qvm writes.
pub const MASK: &str = "********";

/// The shortest secret boma-qvm accepts (and scrubs).
pub const MIN_LEN: usize = 8;

/// Finds and masks secret values. `Debug` shows how many, never what.
#[derive(Clone, Default)]
pub struct Scrubber {
    matcher: Option<AhoCorasick>,
    count: usize,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber {{ {} pattern(s) }}", self.count)
    }
}

/// `s` as it appears inside a JSON string (without the quotes).
fn json_body(s: &str) -> String {
    let q = serde_json::to_string(s).expect("a string serialises");
    q[1..q.len() - 1].to_string()
}

/// `s` JSON-escaped with every non-ASCII character as `\uXXXX` (Python's `ensure_ascii`).
fn json_ascii_body(s: &str) -> String {
    let mut out = String::new();
    for c in json_body(s).chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

impl Scrubber {
    /// A scrubber for `secrets` (empty values are ignored).
    pub fn new<I, S>(secrets: I) -> Scrubber
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut needles: Vec<String> = Vec::new();
        for secret in secrets {
            let v = secret.as_ref();
            if v.is_empty() {
                continue;
            }
            let mut forms = vec![v.to_string(), json_body(v), json_ascii_body(v)];
            let lines: Vec<&str> = v.lines().map(str::trim).collect();
            if lines.len() > 1 {
                for l in lines.into_iter().filter(|l| l.len() >= MIN_LEN) {
                    forms.extend([l.to_string(), json_body(l), json_ascii_body(l)]);
                }
            }
            needles.extend(forms);
        }
        needles.sort();
        needles.dedup();
        let count = needles.len();
        let matcher = (!needles.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&needles)
                .expect("plain strings always build")
        });
        Scrubber { matcher, count }
    }

    /// Nothing to scrub.
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn scrub(&self, text: &str) -> String {
        match &self.matcher {
            None => text.to_string(),
            Some(m) => m.replace_all(text, &vec![MASK; self.count]),
        }
    }

    /// `bytes` (not necessarily UTF-8) with every secret replaced by [`MASK`].
    pub fn scrub_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        match &self.matcher {
            None => bytes.to_vec(),
            Some(m) => m.replace_all_bytes(bytes, &vec![MASK.as_bytes(); self.count]),
        }
    }

    /// Overwrite every secret in `bytes` with as many `*`, keeping the length. Returns how many
    /// were found.
    pub fn mask(&self, bytes: &mut [u8]) -> usize {
        let Some(m) = &self.matcher else { return 0 };
        let found: Vec<(usize, usize)> =
            m.find_iter(&*bytes).map(|x| (x.start(), x.end())).collect();
        for &(a, b) in &found {
            bytes[a..b].fill(b'*');
        }
        found.len()
    }

    /// Scrub every string value in `v`. Object keys are left as they are: they are the field
    /// names of what boma-qvm serialises (report.json, cycle.json), which must still parse.
    pub fn scrub_json(&self, v: &mut Value) {
        if self.is_empty() {
            return;
        }
        match v {
            Value::String(s) => *s = self.scrub(s),
            Value::Array(a) => a.iter_mut().for_each(|x| self.scrub_json(x)),
            Value::Object(o) => o.values_mut().for_each(|x| self.scrub_json(x)),
            _ => {}
        }
    }

    /// The error with every secret scrubbed from its text.
    pub fn error(&self, e: Error) -> Error {
        if self.is_empty() {
            return e;
        }
        e.map_text(&|s: &str| self.scrub(s))
    }

    /// Write `contents` to `path`, scrubbed.
    pub fn write(&self, path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
        std::fs::write(path, self.scrub_bytes(contents.as_ref()))
            .ctx(|| format!("writing {}", show(path)))
    }

    /// Copy `from` to `to`, scrubbed.
    pub fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        let bytes = std::fs::read(from).ctx(|| format!("reading {}", show(from)))?;
        self.write(to, bytes)
    }

    /// Mask every secret in the file at `path` in place (same length, so a process appending to
    /// it meanwhile loses nothing and its offsets stay right). Returns how many were masked.
    pub fn mask_file(&self, path: &Path) -> Result<usize> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        if self.is_empty() {
            return Ok(0);
        }
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .ctx(|| format!("opening {}", show(path)))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut bytes)
            .ctx(|| format!("reading {}", show(path)))?;
        let original = bytes.clone();
        let n = self.mask(&mut bytes);
        if n > 0 {
            // Write back only the changed ranges: never the bytes appended since the read.
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] != original[i] {
                    let start = i;
                    while i < bytes.len() && bytes[i] != original[i] {
                        i += 1;
                    }
                    f.write_all_at(&bytes[start..i], start as u64)
                        .ctx(|| format!("writing {}", show(path)))?;
                } else {
                    i += 1;
                }
            }
        }
        Ok(n)
    }

    /// [`Scrubber::mask_file`] for every regular file under `dir` (recursively, never following
    /// a symlink) except those `skip` names (disk images: the guest's own disk holds what the
    /// guest was given). Returns the files that held a secret; a file that cannot be scrubbed
    /// is logged.
    pub fn mask_tree(&self, dir: &Path, skip: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
        let mut hit = Vec::new();
        if self.is_empty() {
            return hit;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return hit;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                hit.extend(self.mask_tree(&path, skip));
            } else if t.is_file() && !skip(&path) {
                match self.mask_file(&path) {
                    Ok(0) => {}
                    Ok(_) => hit.push(path),
                    Err(e) => tracing::warn!("cannot scrub {}: {e}", show(&path)),
                }
            }
        }
        hit
    }
}

/// Disk images and ISOs in a VM's run directory: not scanned (gigabytes, and the guest's own).
pub fn is_disk_image(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e == "qcow2" || e == "iso" || e == "raw")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "s3cr3t-mark3r-\"v\u{e9}\"";

    #[test]
    fn every_form_of_a_secret_is_scrubbed() {
        let sc = Scrubber::new([S, ""]);
        assert_eq!(sc.scrub(&format!("a {S} b {S}")), "a ******** b ********");
        // As Ansible and events.jsonl write it: JSON-escaped, or with non-ASCII escaped too.
        let json = serde_json::to_string(&serde_json::json!({ "msg": S })).unwrap();
        assert!(!sc.scrub(&json).contains("mark3r"), "{json}");
        assert_eq!(sc.scrub(r#"x s3cr3t-mark3r-\"v\u00e9\" y"#), "x ******** y");
        // Not UTF-8 around it.
        let mut b = b"\xff\xfe ".to_vec();
        b.extend_from_slice(S.as_bytes());
        assert_eq!(sc.scrub_bytes(&b), b"\xff\xfe ********");
        assert!(format!("{sc:?}").starts_with("Scrubber {"));
        assert!(!format!("{sc:?}").contains("mark3r"));
        assert_eq!(Scrubber::new::<_, &str>([]).scrub("x"), "x");
    }

    #[test]
    fn a_multi_line_secret_is_scrubbed_line_by_line_too() {
        let key = "-----BEGIN KEY-----\nAAAABBBBCCCCDDDD\nshort\n-----END KEY-----";
        let sc = Scrubber::new([key]);
        let log = "line: AAAABBBBCCCCDDDD\nshort stays\n";
        assert_eq!(sc.scrub(log), "line: ********\nshort stays\n");
    }

    #[test]
    fn json_values_are_scrubbed_and_field_names_kept() {
        let sc = Scrubber::new([S, "snapshot"]);
        let mut v = serde_json::json!({"summary": format!("failed: {S}"), "snapshot": [S, 1]});
        sc.scrub_json(&mut v);
        let text = v.to_string();
        assert!(!text.contains("mark3r"), "{text}");
        assert_eq!(v["summary"], "failed: ********");
        assert_eq!(
            v["snapshot"][0], MASK,
            "a secret equal to a field name leaves the field"
        );
    }

    #[test]
    fn files_are_masked_in_place_keeping_their_length() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("console.log");
        let text = format!("boot\n{S}\nmore {S} end\n");
        std::fs::write(&f, &text).unwrap();
        let sc = Scrubber::new([S]);
        assert_eq!(sc.mask_file(&f).unwrap(), 2);
        let after = std::fs::read_to_string(&f).unwrap();
        assert_eq!(after.len(), text.len());
        assert!(
            !after.contains("mark3r") && after.starts_with("boot\n***"),
            "{after}"
        );
        assert_eq!(sc.mask_file(&f).unwrap(), 0);

        let sub = t.path().join("ansible");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("x.json"), S).unwrap();
        std::fs::write(t.path().join("disk.qcow2"), S).unwrap();
        std::os::unix::fs::symlink(t.path().join("disk.qcow2"), t.path().join("link")).unwrap();
        let hit = sc.mask_tree(t.path(), &is_disk_image);
        assert_eq!(hit, [sub.join("x.json")]);
        assert_eq!(
            std::fs::read_to_string(t.path().join("disk.qcow2")).unwrap(),
            S
        );
    }

    #[test]
    fn errors_keep_their_kind_and_lose_the_secret() {
        let sc = Scrubber::new([S]);
        let e = Error::verify_failed(format!("task said {S}"), "fix it")
            .with_evidence("console tail", format!("guest: {S}"));
        let e = sc.error(e);
        assert_eq!(e.exit_code(), 14);
        assert!(!e.to_string().contains("mark3r"), "{e}");
        assert!(e.to_string().contains("task said ********"), "{e}");
    }

    #[test]
    fn writes_and_copies_are_scrubbed() {
        let t = tempfile::tempdir().unwrap();
        let sc = Scrubber::new([S]);
        let a = t.path().join("a");
        sc.write(&a, format!("x {S}")).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "x ********");
        std::fs::write(&a, S).unwrap();
        sc.copy(&a, &t.path().join("b")).unwrap();
        assert_eq!(std::fs::read_to_string(t.path().join("b")).unwrap(), MASK);
    }
}
