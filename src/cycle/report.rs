//! What a cycle leaves behind: `report.json` (verdict, every stage's start and duration,
//! versions, accelerator) and `junit.xml` for CI systems, both in the run's directory.

use crate::Result;
use crate::error::IoContext;
use crate::stage::StageRecord;
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
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageReport {
    pub name: String,
    pub reason: String,
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

    /// One JUnit test suite, one test case per stage.
    pub fn junit(&self) -> String {
        let failures = self.stages.iter().filter(|s| !s.ok).count();
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x.push_str(&format!(
            "<testsuites>\n  <testsuite name=\"boma-qvm cycle {}\" tests=\"{}\" failures=\"{failures}\" time=\"{:.1}\">\n",
            esc(&self.host),
            self.stages.len(),
            self.total_seconds
        ));
        for s in &self.stages {
            x.push_str(&format!(
                "    <testcase classname=\"cycle.{}\" name=\"{}\" time=\"{:.1}\"",
                esc(&self.host),
                esc(&s.name),
                s.seconds
            ));
            match &s.error {
                Some(e) if !s.ok => x.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    esc(e.lines().next().unwrap_or("failed")),
                    esc(e)
                )),
                _ => x.push_str("/>\n"),
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
            total_seconds: 5.0,
        }
    }

    #[test]
    fn junit_has_one_case_per_stage_and_escapes() {
        let x = report().junit();
        assert!(x.contains("tests=\"2\" failures=\"1\""), "{x}");
        assert!(x.contains("<testcase classname=\"cycle.askari\" name=\"apply\" time=\"2.5\"/>"));
        assert!(
            x.contains("&lt;8080&gt; dead &amp; &quot;gone&quot;"),
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
