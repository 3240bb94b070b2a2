//! `doctor`: find host firewall state that would silently break the VM network, most of all
//! another table's forward (or input) hook with policy drop: the bug class this tool exists to
//! catch (a default-deny forward chain eating forwarded traffic).

use std::fmt;

use serde_json::Value;

use super::config::NetConfig;
use super::nft;
use crate::tools;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n  fix: {}", self.problem, self.fix)
    }
}

/// Check the host for things that would break the VM network. Missing tools are warnings here.
pub fn doctor(cfg: &NetConfig) -> Result<Vec<Warning>> {
    let mut out = Vec::new();
    for p in ["nft", "dnsmasq"] {
        if let Err(Error::MissingTool { program, fix, .. }) = tools::require_all(&[p]) {
            out.push(Warning {
                problem: format!("`{program}` is not installed"),
                fix,
            });
        }
    }
    if tools::require_all(&["nft"]).is_ok() {
        let json = tools::stdout("nft", &["-j", "list", "ruleset"], None)?;
        out.extend(check_ruleset(&json, &cfg.bridge)?);
    }
    Ok(out)
}

/// The warnings for an `nft -j list ruleset` document.
pub fn check_ruleset(json: &str, bridge: &str) -> Result<Vec<Warning>> {
    let v: Value = serde_json::from_str(json).map_err(|e| {
        Error::network(
            format!("cannot parse `nft -j list ruleset`: {e}"),
            "report this as a bug",
        )
    })?;
    let objs: Vec<&Value> = v["nftables"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in objs.iter().filter_map(|o| o.get("chain")) {
        let (family, table, name) = (s(&c["family"]), s(&c["table"]), s(&c["name"]));
        let hook = s(&c["hook"]);
        if table == nft::TABLE || s(&c["policy"]) != "drop" || !matches!(family, "ip" | "inet") {
            continue;
        }
        let rules: Vec<Vec<&Value>> = objs
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| {
                s(&r["family"]) == family && s(&r["table"]) == table && s(&r["chain"]) == name
            })
            .map(|r| {
                r["expr"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default()
            })
            .collect();
        let accepts = |pred: &dyn Fn(&Value) -> bool| rules.iter().any(|r| accepts_when(r, pred));
        let from_bridge = accepts(&|m| matches_if(m, "iifname", bridge));
        let to_bridge = accepts(&|m| matches_if(m, "oifname", bridge));
        let established = accepts(&is_ct_established);
        let at = format!("table {family} {table}, chain {name} (hook {hook}, policy drop)");
        match hook {
            "forward" if !(from_bridge && (to_bridge || established)) => out.push(Warning {
                problem: format!("{at} would drop the VMs' forwarded traffic (no egress, no NAT replies)"),
                fix: format!(
                    "accept the VM bridge in that chain, now and in the host's firewall config:\n    \
                     nft insert rule {family} {table} {name} iifname \"{bridge}\" accept\n    \
                     nft insert rule {family} {table} {name} oifname \"{bridge}\" accept\n  \
                     (boma-qvm's own table still drops everything from the VMs to the LAN, the mesh and link-local)"
                ),
            }),
            "input" if !from_bridge => out.push(Warning {
                problem: format!("{at} would drop the VMs' DHCP and DNS requests to the host"),
                fix: format!(
                    "accept the VM bridge in that chain, now and in the host's firewall config:\n    \
                     nft insert rule {family} {table} {name} iifname \"{bridge}\" accept\n  \
                     (boma-qvm's own table still limits the VMs to DHCP and DNS on the host)"
                ),
            }),
            _ => {}
        }
    }
    Ok(out)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A rule that is exactly "<match> accept" (counters/logs/comments aside) with `pred(match)`.
fn accepts_when(exprs: &[&Value], pred: &dyn Fn(&Value) -> bool) -> bool {
    let core: Vec<&&Value> = exprs
        .iter()
        .filter(|e| e.get("counter").is_none() && e.get("log").is_none())
        .collect();
    matches!(core.as_slice(), [m, a] if a.get("accept").is_some() && m.get("match").is_some_and(pred))
}

fn matches_if(m: &Value, key: &str, bridge: &str) -> bool {
    if s(&m["left"]["meta"]["key"]) != key {
        return false;
    }
    let right = &m["right"];
    match s(&m["op"]) {
        "==" => {
            s(right) == bridge
                || right["set"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| s(x) == bridge))
        }
        "in" => right["set"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| s(x) == bridge)),
        _ => false,
    }
}

fn is_ct_established(m: &Value) -> bool {
    if s(&m["left"]["ct"]["key"]) != "state" || !matches!(s(&m["op"]), "==" | "in") {
        return false;
    }
    let r = &m["right"];
    s(r) == "established"
        || r.as_array()
            .is_some_and(|a| a.iter().any(|x| s(x) == "established"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(family: &str, table: &str, name: &str, hook: &str, policy: &str) -> String {
        format!(
            r#"{{"chain": {{"family": "{family}", "table": "{table}", "name": "{name}", "handle": 1, "type": "filter", "hook": "{hook}", "prio": 0, "policy": "{policy}"}}}}"#
        )
    }

    fn rule(family: &str, table: &str, chain: &str, m: &str) -> String {
        format!(
            r#"{{"rule": {{"family": "{family}", "table": "{table}", "chain": "{chain}", "handle": 2, "expr": [{m}, {{"counter": {{"packets": 0, "bytes": 0}}}}, {{"accept": null}}]}}}}"#
        )
    }

    fn doc(items: &[String]) -> String {
        format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6"}}}}, {}]}}"#,
            items.join(", ")
        )
    }

    const IIF: &str =
        r#"{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "boma-qvm0"}}"#;
    const OIF: &str =
        r#"{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "boma-qvm0"}}"#;
    const CT: &str = r#"{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}"#;

    #[test]
    fn flags_foreign_forward_drop_with_the_fix() {
        let w = check_ruleset(
            &doc(&[chain("inet", "filter", "forward", "forward", "drop")]),
            "boma-qvm0",
        )
        .unwrap();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].problem.contains("table inet filter, chain forward"),
            "{}",
            w[0]
        );
        assert!(
            w[0].fix
                .contains("nft insert rule inet filter forward iifname \"boma-qvm0\" accept"),
            "{}",
            w[0]
        );
    }

    #[test]
    fn accepting_chains_and_our_own_table_pass() {
        let ok = doc(&[
            chain("inet", "filter", "forward", "forward", "drop"),
            rule("inet", "filter", "forward", CT),
            rule("inet", "filter", "forward", IIF),
            chain("ip", "filter", "INPUT", "input", "drop"),
            rule("ip", "filter", "INPUT", IIF),
            chain("inet", "boma_qvm", "forward", "forward", "drop"),
            chain("inet", "other", "forward", "forward", "accept"),
            chain("ip6", "filter", "FORWARD", "forward", "drop"),
        ]);
        assert_eq!(check_ruleset(&ok, "boma-qvm0").unwrap(), vec![]);
        let with_oif = doc(&[
            chain("ip", "filter", "FORWARD", "forward", "drop"),
            rule("ip", "filter", "FORWARD", IIF),
            rule("ip", "filter", "FORWARD", OIF),
        ]);
        assert_eq!(check_ruleset(&with_oif, "boma-qvm0").unwrap(), vec![]);
    }

    #[test]
    fn half_fixes_and_other_bridges_still_warn() {
        let only_in = doc(&[
            chain("ip", "filter", "FORWARD", "forward", "drop"),
            rule("ip", "filter", "FORWARD", IIF),
        ]);
        assert_eq!(check_ruleset(&only_in, "boma-qvm0").unwrap().len(), 1);
        let other = doc(&[
            chain("inet", "filter", "input", "input", "drop"),
            rule(
                "inet",
                "filter",
                "input",
                &IIF.replace("boma-qvm0", "docker0"),
            ),
        ]);
        let w = check_ruleset(&other, "boma-qvm0").unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].problem.contains("DHCP and DNS"), "{}", w[0]);
    }
}
