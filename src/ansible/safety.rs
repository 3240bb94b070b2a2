//! The safety invariants, decided on what Ansible itself reports (not on what we meant to write):
//!
//! 1. the transient inventory holds exactly one host, HOST;
//! 2. HOST's effective address (as the ssh plugin resolves it, after every var layer) is inside
//!    the isolated subnet, and its effective connection is ssh (a `local` connection would run
//!    the apply on this machine);
//! 3. the playbook, `--limit`ed to HOST, targets exactly HOST.
//!
//! `Session::check_scope` gathers the facts (`ansible all -m debug --tree`, `ansible-playbook
//! --list-hosts`); the functions here judge them and are unit-tested.

use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The isolated network's subnet type (one definition for the whole crate).
pub use crate::net::Subnet;

/// The template `ansible -m debug` evaluates per host: the address the ssh plugin would use
/// (`ansible_ssh_host` beats `ansible_host`, which beats the inventory name) and the connection.
pub const PROBE_MSG: &str = "msg={{ {'address': ansible_ssh_host | default(ansible_host) | \
     default(inventory_hostname), 'connection': ansible_connection | default('ssh')} }}";

/// Connection plugins that reach the machine at `address` over SSH.
const SSH_CONNECTIONS: &[&str] = &[
    "ssh",
    "ansible.builtin.ssh",
    "paramiko",
    "paramiko_ssh",
    "ansible.builtin.paramiko_ssh",
    "smart",
];

/// What the check established; goes into the run's log and report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScopeReport {
    pub host: String,
    pub address: Ipv4Addr,
    pub connection: String,
    pub subnet: String,
    pub playbook: String,
}

/// True for a connection plugin that reaches `address` over SSH.
pub fn is_ssh_connection(connection: &str) -> bool {
    SSH_CONNECTIONS.contains(&connection)
}

fn refuse(problem: String) -> Error {
    Error::ansible(
        format!("refusing to run: {problem}"),
        "this is a safety stop, not a flake: look at the transient inventory and the vars it names \
         (the VM must be the only host in scope, reached over ssh on the isolated subnet)",
    )
}

/// Judge `ansible all -m debug -a PROBE_MSG --tree DIR`: one result per host in the inventory
/// (file name = host, content = the module result).
pub fn judge_inventory(
    results: &BTreeMap<String, Value>,
    host: &str,
    subnet: Subnet,
) -> Result<(Ipv4Addr, String)> {
    let names: Vec<&str> = results.keys().map(String::as_str).collect();
    if names != [host] {
        return Err(refuse(format!(
            "the transient inventory must hold exactly one host, `{host}`, but Ansible sees {} ({})",
            names.len(),
            names.join(", ")
        )));
    }
    let msg = results[host].get("msg").cloned().unwrap_or(Value::Null);
    let address = msg
        .get("address")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let connection = msg
        .get("connection")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !is_ssh_connection(&connection) {
        return Err(refuse(format!(
            "`{host}`'s effective ansible_connection is `{connection}`, not ssh: the playbook would \
             not run on the VM (a repo var overrides it; boma-qvm needs ssh)"
        )));
    }
    let ip: Ipv4Addr = address.parse().map_err(|_| {
        refuse(format!(
            "`{host}`'s effective address is `{address}`, not an IPv4 address inside {subnet}"
        ))
    })?;
    if !subnet.contains(ip) {
        return Err(refuse(format!(
            "`{host}`'s effective address is {ip}, outside the isolated subnet {subnet}: the run \
             would reach a real machine"
        )));
    }
    Ok((ip, connection))
}

/// The hosts `ansible-playbook --list-hosts` prints (every `hosts (N):` block).
pub fn parse_list_hosts(stdout: &str) -> BTreeSet<String> {
    let mut hosts = BTreeSet::new();
    let mut pending = 0usize;
    for line in stdout.lines() {
        let t = line.trim();
        if pending > 0 && !t.is_empty() {
            hosts.insert(t.to_string());
            pending -= 1;
            continue;
        }
        if let Some(n) = t.strip_prefix("hosts (").and_then(|r| r.strip_suffix("):")) {
            pending = n.parse().unwrap_or(0);
        }
    }
    hosts
}

/// The playbook, limited to `host`, must target exactly `host`.
pub fn judge_playbook(hosts: &BTreeSet<String>, host: &str, playbook: &str) -> Result<()> {
    if hosts.len() == 1 && hosts.contains(host) {
        return Ok(());
    }
    if hosts.is_empty() {
        return Err(Error::ansible(
            format!("{playbook} has no play that targets `{host}`"),
            format!("check the plays' `hosts:` patterns against {host}'s groups"),
        ));
    }
    let list: Vec<&str> = hosts.iter().map(String::as_str).collect();
    Err(refuse(format!(
        "{playbook} limited to `{host}` would run on {}",
        list.join(", ")
    )))
}
