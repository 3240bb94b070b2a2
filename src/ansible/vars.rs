//! The VM's connection vars, and the order in which extra vars are layered.
//!
//! Extra vars (`-e`) are Ansible's highest precedence, and later `-e` beat earlier ones. boma-qvm
//! passes, in this order:
//!
//! 1. `@tests/integration/overrides/HOST.yml`: the repo's explicit stubs for this host
//! 2. `@<session>/certs.json`: the `--certs` tier's vars
//! 3. `@<session>/secrets.json`: the tier's credential, if any (mode 0600, exists only while a
//!    playbook runs)
//! 4. the user's own `-e` values, in the order given (e.g. `docker_host_container_forward=true`)
//! 5. `@<session>/connection.json`: the VM's connection, last, so nothing can point the run at
//!    another machine. A playbook-adjacent `host_vars/HOST.yml` with the real `ansible_host`
//!    would otherwise win over any inventory value.
//!
//! Only ssh-plugin vars are passed as extra vars. Extra vars apply to every host, including the
//! implicit `localhost` a `delegate_to: localhost` task runs on: passing `ansible_connection` or
//! `ansible_python_interpreter` that way would turn verify's host-side probe into an SSH session
//! INTO the VM (measured), masking exactly the forwarded-port breakage it is there to see. Those
//! two go in the transient inventory's host vars instead, and the safety check confirms the
//! effective connection is ssh.

use serde_json::{Map, Value, json};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// ssh options for a throwaway VM: its host key is new every run and never recorded. `-F
/// /dev/null`: no ssh config file is read, neither the user's (a `Host *` ProxyJump would route
/// the VM's connection elsewhere) nor the system's. Inside the confined run's user namespace
/// root's files are owned by the overflow uid, and ssh refuses an included system file it
/// checks (Debian 13's systemd ships /etc/ssh/ssh_config.d/20-systemd-ssh-proxy.conf): "Bad
/// owner or permissions", and no apply could connect.
pub const SSH_COMMON_ARGS: &str = "-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
     -o IdentitiesOnly=yes -o ServerAliveInterval=5 -o ServerAliveCountMax=6 -o LogLevel=ERROR";

/// Ansible's default `ssh_args`, pinned so a repo's own (a ProxyJump to a bastion, say) cannot
/// route the VM's connection elsewhere.
pub const SSH_ARGS: &str = "-C -o ControlMaster=auto -o ControlPersist=60s";

/// How Ansible reaches the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The VM's DHCP lease address on the isolated bridge.
    pub address: Ipv4Addr,
    pub port: u16,
    pub user: String,
    /// The run's private key (`<vm run dir>/id_ed25519`).
    pub key: PathBuf,
}

impl Connection {
    /// The VM as cloud-init sets it up: user `ansible`, port 22.
    pub fn new(address: Ipv4Addr, key: PathBuf) -> Self {
        Connection {
            address,
            port: 22,
            user: "ansible".into(),
            key,
        }
    }

    /// The ssh-plugin vars passed as extra vars (both spellings where Ansible reads two: the
    /// ssh plugin lets `ansible_ssh_host` beat `ansible_host`, so a repo setting the legacy name
    /// must lose too).
    pub fn extra_vars(&self) -> Map<String, Value> {
        let key = self.key.display().to_string();
        let v = json!({
            "ansible_host": self.address.to_string(),
            "ansible_ssh_host": self.address.to_string(),
            "ansible_port": self.port,
            "ansible_ssh_port": self.port,
            "ansible_user": self.user,
            "ansible_ssh_user": self.user,
            "ansible_private_key_file": key,
            "ansible_ssh_private_key_file": key,
            "ansible_ssh_args": SSH_ARGS,
            "ansible_ssh_common_args": SSH_COMMON_ARGS,
            "ansible_ssh_extra_args": "",
            "ansible_ssh_executable": "ssh",
        });
        v.as_object().cloned().expect("an object literal")
    }

    /// Host vars for the transient inventory: the same, plus what must not be an extra var.
    pub fn inventory_vars(&self) -> Map<String, Value> {
        let mut m = self.extra_vars();
        m.insert("ansible_connection".into(), json!("ssh"));
        m.insert(
            "ansible_python_interpreter".into(),
            json!("/usr/bin/python3"),
        );
        m
    }
}
