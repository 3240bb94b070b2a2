//! Bad input to `cycle` is refused before anything boots: the right exit code, a fix line, no
//! run directory, no VM, nothing built, and no report claiming a VM was kept. The cache is
//! private and empty, so a check that ran only after the image stage would start a golden
//! image build instead of failing (the process is killed after a minute, and the test fails).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Case {
    args: Vec<String>,
    exit: i32,
    says: &'static str,
}

fn case(args: &[&str], exit: i32, says: &'static str) -> Case {
    Case {
        args: args.iter().map(|s| s.to_string()).collect(),
        exit,
        says,
    }
}

/// A secret var's value (in the environment as `bq_secret`): never printed.
const SECRET: &str = "bq-s3cret-value-0123";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/boma")
}

/// A copy of the fixture repo with one file replaced.
fn repo_with(tmp: &Path, tag: &str, rel: &str, content: Option<&str>) -> PathBuf {
    let dst = tmp.join(format!("repo-{tag}"));
    let st = Command::new("cp")
        .arg("-a")
        .arg(fixture())
        .arg(&dst)
        .status()
        .unwrap();
    assert!(st.success());
    match content {
        Some(c) => std::fs::write(dst.join(rel), c).unwrap(),
        None => std::fs::remove_file(dst.join(rel)).unwrap(),
    }
    dst
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bad_input_is_refused_before_anything_boots() {
    let tmp = tempfile::Builder::new()
        .prefix("bqr")
        .tempdir_in("/tmp")
        .unwrap();
    let (state, cache, runs) = (
        tmp.path().join("state"),
        tmp.path().join("cache"),
        tmp.path().join("runs"),
    );
    let vars = tmp.path().join("list.yml");
    std::fs::write(&vars, "- a\n").unwrap();
    let bad_overlay = repo_with(
        tmp.path(),
        "bad-overlay",
        "tests/integration/overrides/askari.yml",
        Some("integration_dns_names: [unclosed\n"),
    );
    let local_overlay = repo_with(
        tmp.path(),
        "local-overlay",
        "tests/integration/overrides/askari.yml",
        Some("ansible_connection: local\n"),
    );
    let no_verify = repo_with(
        tmp.path(),
        "no-verify",
        "tests/integration/verify.yml",
        None,
    );
    let repo = |p: &Path| p.display().to_string();
    let cases = [
        case(&["-e", r#"{"a": [1,}"#], 2, "does not parse"),
        case(&["-e", "justaword"], 2, "not key=value"),
        case(&["-e", "@/nonexistent/vars.yml"], 2, "cannot read"),
        case(&["-e", &format!("@{}", vars.display())], 2, "not a mapping"),
        case(&["-e", "ansible_connection=local"], 2, "not on the VM"),
        case(&["--image", "nosuchimg"], 4, "nosuchimg"),
        case(&["--image", "auto"], 2, "--image auto is gone"),
        case(&["--subnet", "8.8.8.0/24"], 2, "8.8.8.0/24"),
        case(&["--memory", "0"], 2, "--memory 0"),
        case(&["--cpus", "0"], 2, "--cpus 0"),
        case(&["--cpus", "1000"], 2, "--cpus 1000"),
        case(&["--disk-gib", "17179869185"], 2, "--disk-gib 17179869185"),
        case(&["--max-vms", "0"], 2, "--max-vms 0"),
        case(&["--min-free-mib", "99999999"], 6, "MiB needed"),
        case(&["--certs", "le-staging", "--no-egress"], 2, "egress"),
        case(&["--repo", &repo(&bad_overlay)], 2, "not valid YAML"),
        case(
            &["--repo", &repo(&local_overlay)],
            2,
            "ansible_connection=local",
        ),
        case(&["--repo", &repo(&no_verify)], 4, "verify.yml"),
        case(
            &["--secret-var", "bq_unset"],
            2,
            "the environment variable bq_unset is not set",
        ),
        case(&["--secret-var", "bq_short"], 2, "cannot be scrubbed"),
        case(&["--secret-var", "1bad"], 2, "not a valid variable name"),
        case(&["--secret-var", "ansible_host"], 2, "connection var"),
        case(
            &["--secret-var", "bq_secret", "--secret-var", "bq_secret"],
            2,
            "given twice",
        ),
        case(
            &["--secret-var", "bq_secret", "-e", "bq_secret=x"],
            2,
            "both set bq_secret",
        ),
        case(
            &["--secret-var", "bq_secret", "-e", &format!("note={SECRET}")],
            2,
            "holds the value of --secret-var bq_secret",
        ),
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let started = Instant::now();
        let mut cmd = Command::new("timeout");
        cmd.args([
            "-s",
            "KILL",
            "60",
            env!("CARGO_BIN_EXE_boma-qvm"),
            "cycle",
            "askari",
        ]);
        if !c.args.iter().any(|a| a == "--repo") {
            cmd.arg("--repo").arg(fixture());
        }
        let out = cmd
            .args(&c.args)
            .env("BOMA_QVM_STATE_DIR", &state)
            .env("BOMA_QVM_CACHE_DIR", &cache)
            .env("BOMA_QVM_RUNS_DIR", &runs)
            .env("bq_secret", SECRET)
            .env("bq_short", "abc")
            .env_remove("bq_unset")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut wrong = Vec::new();
        if out.status.code() != Some(c.exit) {
            wrong.push(format!("exit {:?}, want {}", out.status.code(), c.exit));
        }
        if !text.contains(c.says) || !text.contains("fix:") {
            wrong.push(format!("message lacks `{}` or a fix line", c.says));
        }
        if text.contains(SECRET) {
            wrong.push("printed the secret".into());
        }
        if text.contains("kept for inspection") {
            wrong.push("claims a VM was kept".into());
        }
        for (what, dir) in [("run dir", &runs), ("image", &cache)] {
            if !entries(dir).is_empty() {
                wrong.push(format!("left a {what}: {:?}", entries(dir)));
            }
        }
        if !entries(&state.join("vms")).is_empty() {
            wrong.push(format!("made a VM: {:?}", entries(&state.join("vms"))));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "cycle askari {:?} ({:.1}s): {}\n{text}",
                c.args,
                started.elapsed().as_secs_f64(),
                wrong.join("; ")
            ));
        }
        let _ = std::fs::remove_dir_all(&runs);
        let _ = std::fs::remove_dir_all(&cache);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
