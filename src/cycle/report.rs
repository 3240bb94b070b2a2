//! What a cycle leaves behind: `report.json` (verdict, every stage's start and duration,
//! versions, accelerator) and `junit.xml` for CI systems, both in the run's directory.

use super::drift::StateDiff;
use crate::Result;
use crate::error::{FailureClass, IoContext};
use crate::stage::{Retry, StageRecord};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub host: String,
    pub vm: String,
    pub verdict: Verdict,
    /// One sentence: what went wrong (or "all checks passed across the reboot").
    pub summary: String,
    pub stages: Vec<StageRecord>,
    pub accel: String,
    pub certs: String,
    pub egress: bool,
    /// Extra vars the user layered on (`-e`), as given.
    pub extra_vars: Vec<String>,
    /// Names of the extra vars marked secret (`--secret-var`); their values are never written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_vars: Vec<String>,
    pub versions: Versions,
    /// The golden image asked for and why it was chosen.
    pub image: ImageReport,
    /// Set when the cert tier carries an accepted risk (le-prod-wildcard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_risk: Option<String>,
    /// Whether the VM was kept (failure, or --keep) and how to inspect it.
    pub vm_kept: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspect: Option<String>,
    /// Whose fault a failure is: infrastructure, lockout, test, input (none on a pass).
    #[serde(default)]
    pub class: Option<FailureClass>,
    /// The exit code of the cycle (0, or its class's: README, "Exit codes").
    #[serde(default)]
    pub exit_code: i32,
    /// Infrastructure failures retried automatically (first boot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<Retry>,
    /// What the reboot changed: the diff of the guest's state after the apply and after the
    /// reboot (state-before-reboot.json, state-after-reboot.json, reboot-diff.txt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_diff: Option<StateDiff>,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageReport {
    pub name: String,
    pub reason: String,
    /// How the VM's first boot happened: `warm: restored from <template dir>`, or `cold`.
    #[serde(default)]
    pub start: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    pub boma_qvm: String,
    pub qemu: String,
    pub ansible: String,
    pub image: String,
}

impl Report {
    /// The report with every secret `scrubber` knows replaced, in every string it holds (the
    /// summary, stage errors, extra vars, ...).
    pub fn scrubbed(&self, scrubber: &crate::secrets::Scrubber) -> Report {
        let mut v = serde_json::to_value(self).expect("report serialises");
        scrubber.scrub_json(&mut v);
        serde_json::from_value(v).expect("a scrubbed report is still a report")
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("report serialises");
        std::fs::write(dir.join("report.json"), json)
            .ctx(|| format!("writing {}/report.json", dir.display()))?;
        std::fs::write(dir.join("junit.xml"), self.junit())
            .ctx(|| format!("writing {}/junit.xml", dir.display()))
    }

    /// One JUnit test suite, one test case per stage. A failed stage is a `<failure>` when the
    /// change under test failed (test failure, lockout) and an `<error>` when the harness or
    /// the input did (infrastructure, input/tool); a retried one is `<skipped>`. The diff of
    /// the reboot is the `<system-out>` of its stage ("what the reboot changed").
    pub fn junit(&self) -> String {
        let failed = |s: &&StageRecord| !s.ok && !s.retried;
        let is_failure = matches!(self.class, Some(FailureClass::Test | FailureClass::Lockout));
        let n = self.stages.iter().filter(failed).count();
        let (failures, errors) = if is_failure { (n, 0) } else { (0, n) };
        let skipped = self.stages.iter().filter(|s| s.retried).count();
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x.push_str(&format!(
            "<testsuites>\n  <testsuite name=\"boma-qvm cycle {}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{:.1}\">\n",
            esc(&self.host),
            self.stages.len(),
            self.total_seconds
        ));
        let class = self.class.map(FailureClass::as_str).unwrap_or("failed");
        for s in &self.stages {
            x.push_str(&format!(
                "    <testcase classname=\"cycle.{}\" name=\"{}\" time=\"{:.1}\"",
                esc(&self.host),
                esc(&s.name),
                s.seconds
            ));
            let mut body = String::new();
            let e = s.error.as_deref().unwrap_or("failed");
            let first = esc(e.lines().next().unwrap_or("failed"));
            if s.retried {
                body.push_str(&format!(
                    "      <skipped message=\"retried (infrastructure): {first}\"/>\n"
                ));
            } else if !s.ok {
                let tag = if is_failure { "failure" } else { "error" };
                body.push_str(&format!(
                    "      <{tag} type=\"{}\" message=\"{first}\">{}</{tag}>\n",
                    esc(class),
                    esc(e)
                ));
            }
            if s.name == "what the reboot changed"
                && let Some(d) = &self.reboot_diff
            {
                body.push_str(&format!(
                    "      <system-out>{}</system-out>\n",
                    esc(&d.render(usize::MAX))
                ));
            }
            if body.is_empty() {
                x.push_str("/>\n");
            } else {
                x.push_str(&format!(">\n{body}    </testcase>\n"));
            }
        }
        x.push_str("  </testsuite>\n</testsuites>\n");
        x
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, ok: bool, error: Option<&str>) -> StageRecord {
        StageRecord {
            name: name.into(),
            started: 1.0,
            seconds: 2.5,
            ok,
            error: error.map(String::from),
            retried: false,
        }
    }

    fn report() -> Report {
        Report {
            host: "askari".into(),
            vm: "boma-it-askari".into(),
            verdict: Verdict::Fail,
            summary: "verify after reboot failed".into(),
            stages: vec![
                stage("apply", true, None),
                stage(
                    "verify after reboot",
                    false,
                    Some("published port <8080> dead & \"gone\""),
                ),
            ],
            accel: "tcg".into(),
            certs: "internal".into(),
            egress: true,
            extra_vars: vec![],
            secret_vars: vec![],
            versions: Versions::default(),
            image: ImageReport::default(),
            accepted_risk: None,
            vm_kept: true,
            inspect: Some("boma-qvm console askari".into()),
            class: Some(FailureClass::Test),
            exit_code: 14,
            retries: vec![],
            reboot_diff: None,
            total_seconds: 5.0,
        }
    }

    #[test]
    fn junit_has_one_case_per_stage_and_escapes() {
        let x = report().junit();
        assert!(
            x.contains("tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"0\""),
            "{x}"
        );
        assert!(x.contains("<testcase classname=\"cycle.askari\" name=\"apply\" time=\"2.5\"/>"));
        assert!(x.contains("<failure type=\"test failure\""), "{x}");
        assert!(
            x.contains("&lt;8080&gt; dead &amp; &quot;gone&quot;"),
            "{x}"
        );
    }

    #[test]
    fn junit_says_error_for_infrastructure_skipped_for_a_retry_and_carries_the_diff() {
        let mut r = report();
        r.class = Some(FailureClass::Infrastructure);
        r.stages = vec![
            StageRecord {
                retried: true,
                ..stage(
                    "dhcp lease",
                    false,
                    Some("timed out after 300s waiting for a DHCP lease"),
                )
            },
            stage("dhcp lease", false, Some("timed out again")),
        ];
        let x = r.junit();
        assert!(
            x.contains("failures=\"0\" errors=\"1\" skipped=\"1\""),
            "{x}"
        );
        assert!(
            x.contains("<skipped message=\"retried (infrastructure): timed out after 300s"),
            "{x}"
        );
        assert!(
            x.contains("<error type=\"infrastructure\" message=\"timed out again\""),
            "{x}"
        );
        assert!(!x.contains("<failure"), "{x}");

        let mut r = report();
        r.class = Some(FailureClass::Lockout);
        let d = crate::cycle::drift::StateDiff {
            before: "before reboot".into(),
            after: "after reboot".into(),
            boot_changed: Some(true),
            findings: vec![],
            notes: vec![],
            sections: vec![],
        };
        r.reboot_diff = Some(d);
        r.stages.push(stage("what the reboot changed", true, None));
        let x = r.junit();
        assert!(x.contains("<failure type=\"lockout\""), "{x}");
        assert!(
            x.contains("name=\"what the reboot changed\" time=\"2.5\">\n      <system-out>what changed from before reboot to after reboot (a new boot):"),
            "{x}"
        );
    }

    #[test]
    fn a_scrubbed_report_holds_no_secret_in_json_or_junit() {
        let secret = "t0p-s3cret-<&>";
        let mut r = report();
        r.summary = format!("verify failed: {secret}");
        r.stages[1].error = Some(format!("console: {secret}"));
        r.extra_vars = vec![format!("x={secret}")];
        r.inspect = Some(secret.into());
        let r = r.scrubbed(&crate::secrets::Scrubber::new([secret]));
        let d = tempfile::tempdir().unwrap();
        r.write(d.path()).unwrap();
        for f in ["report.json", "junit.xml"] {
            let text = std::fs::read_to_string(d.path().join(f)).unwrap();
            assert!(!text.contains("t0p-s3cret"), "{f}: {text}");
            assert!(text.contains("********"), "{f}: {text}");
        }
        assert_eq!(r.verdict, Verdict::Fail);
    }

    #[test]
    fn report_round_trips() {
        let d = tempfile::tempdir().unwrap();
        report().write(d.path()).unwrap();
        let back: Report =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(back, report());
        assert!(d.path().join("junit.xml").exists());
    }
}
