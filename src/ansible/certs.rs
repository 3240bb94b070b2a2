//! `--certs` tiers and the vars they map to (layered after the overlay, see `vars`).
//!
//! - `internal` (default): Caddy `tls internal`; no egress, no credential, instant.
//! - `le-staging`: real DNS-01 ACME against Let's Encrypt's staging CA (untrusted root, no real
//!   rate limits); needs egress and the Gandi LiveDNS key to write the TXT record.
//! - `le-prod-wildcard`: a real trusted wildcard from Let's Encrypt production; on demand only,
//!   behind an explicit opt-in, with its accepted risk returned for the run's report.
//!
//! The credential is read from the environment, never from the command line; it reaches Ansible
//! through a 0600 extra-vars file that exists only while a playbook runs, and its value is scrubbed
//! from everything boma-qvm echoes or logs.

use crate::error::{Error, Result};
use serde_json::{Map, Value, json};
use std::fmt;
use std::str::FromStr;

pub const LE_STAGING_CA: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
pub const LE_PROD_CA: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Where the DNS-01 credential comes from.
pub const CREDENTIAL_ENV: &str = "GANDI_API_KEY";
/// The extra var that carries it.
pub const CREDENTIAL_VAR: &str = "gandi_api_key";
pub const DEFAULT_WILDCARD: &str = "*.test.wingu.me";

pub const PROD_ACCEPTED_RISK: &str = "le-prod-wildcard: the production Gandi LiveDNS credential \
     (GANDI_API_KEY) was handed to an ephemeral test VM, and a transient _acme-challenge TXT record \
     was written into the real wingu.me zone to issue a trusted wildcard certificate. Accepted on \
     demand for this run (see docs/security/accepted-risks.md).";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertTier {
    #[default]
    Internal,
    LeStaging,
    LeProdWildcard,
}

impl CertTier {
    pub const ALL: [CertTier; 3] = [
        CertTier::Internal,
        CertTier::LeStaging,
        CertTier::LeProdWildcard,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CertTier::Internal => "internal",
            CertTier::LeStaging => "le-staging",
            CertTier::LeProdWildcard => "le-prod-wildcard",
        }
    }

    /// Whether the tier talks to the internet (ACME + the DNS API).
    pub fn needs_egress(self) -> bool {
        self != CertTier::Internal
    }

    /// The vars for this tier, or a clear refusal. `env` reads the environment (a closure so
    /// tests need not touch the process environment).
    pub fn plan(
        self,
        opts: &CertOptions,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<CertPlan> {
        if self.needs_egress() && !opts.egress {
            return Err(Error::input(
                format!(
                    "--certs {self} needs egress (ACME and the Gandi API), but this run has no egress"
                ),
                "drop --no-egress, or use --certs internal (a no-egress run always uses internal certs)",
            ));
        }
        if self == CertTier::LeProdWildcard && !opts.prod_opt_in {
            return Err(Error::input(
                "--certs le-prod-wildcard is on demand only: it hands the production Gandi credential \
                 to a throwaway VM and writes a TXT record into the real zone",
                "re-run with the explicit opt-in (--accept-prod-cert-risk; the risk is written to the \
                 run's report), or use --certs le-staging",
            ));
        }
        let secret = if self.needs_egress() {
            let value = env(CREDENTIAL_ENV).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                Error::input(
                    format!("--certs {self} needs the Gandi LiveDNS API key in ${CREDENTIAL_ENV}"),
                    format!("export {CREDENTIAL_ENV}=... in this shell (never pass it on the command line)"),
                )
            })?;
            if value.len() < crate::secrets::MIN_LEN {
                return Err(Error::input(
                    format!(
                        "${CREDENTIAL_ENV} is {} characters long: too short to be a Gandi API key, \
                         and too short to scrub from logs without masking ordinary text",
                        value.len()
                    ),
                    format!("export the real key as {CREDENTIAL_ENV}"),
                ));
            }
            Some(Secret {
                var: CREDENTIAL_VAR.to_string(),
                value,
            })
        } else {
            None
        };
        let dns01 = |ca: &str| format!("tls {{\n\tca {ca}\n\tdns gandi {{env.GANDI_API_KEY}}\n}}");
        let vars = match self {
            CertTier::Internal => json!({
                "integration_cert_tier": self.as_str(),
                "reverse_proxy_tls_mode": "internal",
                "reverse_proxy_acme_ca": "",
                "caddy_tls_directive": "tls internal",
            }),
            CertTier::LeStaging => json!({
                "integration_cert_tier": self.as_str(),
                "reverse_proxy_tls_mode": "acme_dns01",
                "reverse_proxy_acme_ca": LE_STAGING_CA,
                "reverse_proxy_acme_dns_provider": "gandi",
                "caddy_tls_directive": dns01(LE_STAGING_CA),
            }),
            CertTier::LeProdWildcard => json!({
                "integration_cert_tier": self.as_str(),
                "reverse_proxy_tls_mode": "acme_dns01",
                "reverse_proxy_acme_ca": LE_PROD_CA,
                "reverse_proxy_acme_dns_provider": "gandi",
                "reverse_proxy_tls_wildcard": opts.wildcard,
                "caddy_tls_directive": dns01(LE_PROD_CA),
            }),
        };
        let accepted_risk =
            (self == CertTier::LeProdWildcard).then(|| PROD_ACCEPTED_RISK.to_string());
        Ok(CertPlan {
            tier: self,
            vars: vars.as_object().cloned().unwrap_or_default(),
            secret,
            accepted_risk,
        })
    }
}

impl fmt::Display for CertTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CertTier {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        CertTier::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::input(
                    format!("unknown cert tier `{s}`"),
                    "use --certs internal, le-staging or le-prod-wildcard",
                )
            })
    }
}

/// What the run allows.
#[derive(Debug, Clone)]
pub struct CertOptions {
    /// The VM has outbound NAT (`--no-egress` turns it off).
    pub egress: bool,
    /// The explicit opt-in for `le-prod-wildcard`.
    pub prod_opt_in: bool,
    /// The wildcard name `le-prod-wildcard` issues.
    pub wildcard: String,
}

impl Default for CertOptions {
    fn default() -> Self {
        CertOptions {
            egress: true,
            prod_opt_in: false,
            wildcard: DEFAULT_WILDCARD.to_string(),
        }
    }
}

/// A tier resolved for one run.
#[derive(Debug, Clone)]
pub struct CertPlan {
    pub tier: CertTier,
    /// Non-secret vars (written to `certs.json`).
    pub vars: Map<String, Value>,
    /// The credential, if the tier needs one.
    pub secret: Option<Secret>,
    /// Text for the run's report when the tier carries an accepted risk.
    pub accepted_risk: Option<String>,
}

impl CertPlan {
    /// The default tier: no egress, no credential.
    pub fn internal() -> CertPlan {
        CertTier::Internal
            .plan(&CertOptions::default(), |_| None)
            .expect("internal always plans")
    }
}

/// `$GANDI_API_KEY` when it is set and long enough to be a key: scrubbed from everything a run
/// writes whatever the tier, since a repo can read it itself (`lookup('env', 'GANDI_API_KEY')`).
pub fn credential_in_env() -> Option<String> {
    std::env::var(CREDENTIAL_ENV)
        .ok()
        .filter(|v| v.len() >= crate::secrets::MIN_LEN)
}

/// A credential, or an extra var marked secret. `Debug` never shows the value.
#[derive(Clone)]
pub struct Secret {
    pub var: String,
    pub value: String,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret {{ var: {:?}, value: <redacted> }}", self.var)
    }
}
