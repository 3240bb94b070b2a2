//! Our nftables table `inet boma_qvm`: rendered from `net/boma_qvm.nft.tmpl`, loaded atomically
//! with `nft -f`, per-VM egress switched by editing one set. No other table is ever touched.

use std::net::Ipv4Addr;
use std::path::Path;

use super::config::NetConfig;
use crate::error::IoContext;
use crate::tools;
use crate::{Error, Result, error::show};

/// Family and name of our table.
pub const TABLE: &str = "boma_qvm";
const FAMILY: &str = "inet";
const SET_NO_EGRESS: &str = "no_egress";
const TEMPLATE: &str = include_str!("../../net/boma_qvm.nft.tmpl");

/// The ruleset text for `cfg`, with `no_egress` VM addresses in the egress-off set, marked as
/// loaded by the state `owner` (see `owned::marker`).
pub fn render(cfg: &NetConfig, no_egress: &[Ipv4Addr], owner: &str) -> String {
    let elements = if no_egress.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = no_egress.iter().map(|ip| ip.to_string()).collect();
        format!("elements = {{ {} }}", list.join(", "))
    };
    TEMPLATE
        .replace("@OWNER@", &owner.replace('"', "'"))
        .replace("@BRIDGE@", &cfg.bridge)
        .replace("@SUBNET@", &cfg.subnet.to_string())
        .replace("@GATEWAY@", &cfg.gateway().to_string())
        .replace("@BROADCAST@", &cfg.subnet.broadcast().to_string())
        .replace("@CONFINED@", &{
            let (a, b) = cfg.confine_range();
            format!("{a}-{b}")
        })
        .replace("@NO_EGRESS@", &elements)
}

/// Write the rendered ruleset to `file` (kept for diagnostics) and load it in one transaction.
pub fn load(cfg: &NetConfig, no_egress: &[Ipv4Addr], owner: &str, file: &Path) -> Result<()> {
    std::fs::write(file, render(cfg, no_egress, owner))
        .ctx(|| format!("writing {}", show(file)))?;
    tools::stdout("nft", &["-f", &file.to_string_lossy()], None).map_err(|e| match e {
        Error::Command { stderr, .. } => Error::network(
            format!("nft refused boma-qvm's table (from {}): {stderr}", show(file)),
            "check that the kernel has nf_tables with inet/nat support (`nft list ruleset` works as root)",
        ),
        other => other,
    })?;
    Ok(())
}

/// Is a table `inet boma_qvm` loaded (whoever loaded it)?
pub fn table_exists() -> Result<bool> {
    Ok(table_owner()?.is_some())
}

/// Who loaded the table `inet boma_qvm` in this network namespace: `None` when there is none,
/// `Some(comment)` when there is one (an empty comment: not a boma-qvm that marks its table).
pub fn table_owner() -> Result<Option<String>> {
    let out = tools::output("nft", &["list", "table", FAMILY, TABLE], None)?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(comment_of(&String::from_utf8_lossy(&out.stdout))))
}

/// The table's `comment "..."` in `nft list table` output (nft 1.0.6's JSON leaves it out).
pub fn comment_of(listing: &str) -> String {
    listing
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("comment \"")?.strip_suffix('"'))
        .unwrap_or_default()
        .to_string()
}

/// Is the live table the one `owner` loaded?
pub fn table_is(owner: &str) -> Result<bool> {
    Ok(table_owner()?.is_some_and(|c| c == owner.replace('"', "'")))
}

/// Remove our table if it exists and `owner` loaded it (create-then-delete in one transaction:
/// idempotent, and works on nft 1.0.6, which has no `destroy`). Returns whether it was removed;
/// a table another state loaded is left alone.
pub fn delete_table(owner: &str) -> Result<bool> {
    if !table_is(owner)? {
        return Ok(false);
    }
    let script = format!("table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n");
    tools::stdout("nft", &["-f", "-"], Some(&script))?;
    Ok(true)
}

/// Switch egress for one VM address on a live table: `on` removes it from the no-egress set,
/// off adds it. Idempotent (the delete is preceded by an add in the same transaction).
pub fn set_egress(ip: Ipv4Addr, on: bool) -> Result<()> {
    let add = format!("add element {FAMILY} {TABLE} {SET_NO_EGRESS} {{ {ip} }}\n");
    let script = if on {
        format!("{add}delete element {FAMILY} {TABLE} {SET_NO_EGRESS} {{ {ip} }}\n")
    } else {
        add
    };
    tools::stdout("nft", &["-f", "-"], Some(&script)).map_err(|e| match e {
        Error::Command { stderr, .. } => Error::network(
            format!("could not switch egress for {ip}: {stderr}"),
            "bring the network up first (`boma-qvm net up`)",
        ),
        other => other,
    })?;
    Ok(())
}

/// Addresses currently in the live no-egress set.
pub fn no_egress_members() -> Result<Vec<Ipv4Addr>> {
    let out = tools::stdout(
        "nft",
        &["-j", "list", "set", FAMILY, TABLE, SET_NO_EGRESS],
        None,
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
        Error::network(
            format!("unparsable `nft -j` output: {e}"),
            "report this as a bug",
        )
    })?;
    let mut ips = Vec::new();
    for obj in v["nftables"].as_array().into_iter().flatten() {
        for el in obj["set"]["elem"].as_array().into_iter().flatten() {
            if let Some(ip) = el.as_str().and_then(|s| s.parse().ok()) {
                ips.push(ip);
            }
        }
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_every_placeholder() {
        let cfg = NetConfig::default();
        let text = render(&cfg, &[], "boma-qvm /s/net");
        let unfilled = text
            .split('@')
            .skip(1)
            .step_by(2)
            .find(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
        assert_eq!(unfilled, None, "unfilled placeholder in:\n{text}");
        assert!(
            text.contains(
                "iifname \"boma-qvm0\" ip daddr != 192.168.231.0/24 ip daddr { 10.0.0.0/8"
            )
        );
        assert!(
            text.contains(
                "ip daddr { 192.168.231.1, 192.168.231.255, 255.255.255.255 } udp dport 67"
            )
        );
        assert!(text.contains("masquerade"));
        assert_eq!(
            text.matches("iifname \"boma-qvm0\" ip saddr 192.168.231.2-192.168.231.9 drop")
                .count(),
            2,
            "confined processes reach neither the host (input) nor beyond the subnet (forward)"
        );
        assert!(!text.contains("elements"));
        assert_eq!(
            comment_of(&text),
            "boma-qvm /s/net",
            "the table names its state"
        );
        assert!(
            !text
                .lines()
                .any(|l| !l.trim_start().starts_with('#') && l.contains("flush")),
            "must never flush"
        );
        let with = render(
            &cfg,
            &[
                "192.168.231.20".parse().unwrap(),
                "192.168.231.21".parse().unwrap(),
            ],
            "x",
        );
        assert!(with.contains("elements = { 192.168.231.20, 192.168.231.21 }"));
    }

    #[test]
    fn render_replaces_only_our_table() {
        let text = render(&NetConfig::default(), &[], "x");
        let tables: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("table ") || l.starts_with("delete "))
            .collect();
        assert_eq!(
            tables,
            [
                "table inet boma_qvm {}",
                "delete table inet boma_qvm",
                "table inet boma_qvm {"
            ],
            "the file may create/delete only our table"
        );
    }
}
