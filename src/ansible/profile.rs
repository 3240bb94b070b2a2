//! A profile: an Ansible repo laid out like boma, and the inventory host the VM is to become.

use super::inventory::InventoryExport;
use super::{base_env, find_tool};
use crate::error::{Error, Result, show};
use std::path::{Path, PathBuf};

/// Where the pieces of a boma-like repo live, relative to its root.
pub const SITE: &str = "site.yml";
pub const VERIFY: &str = "tests/integration/verify.yml";
pub const OVERRIDES_DIR: &str = "tests/integration/overrides";

/// Inventory locations tried when `ansible.cfg` names none (first that exists wins).
const INVENTORY_CANDIDATES: &[&str] = &[
    "inventory",
    "inventory.yml",
    "inventory.yaml",
    "inventory.ini",
    "hosts.yml",
    "hosts.yaml",
    "hosts",
];

#[derive(Debug, Clone)]
pub struct Profile {
    /// The repo root (absolute).
    pub repo: PathBuf,
    /// The inventory host the VM becomes (e.g. `askari`).
    pub host: String,
    /// The real inventory sources (files or directories), as `ansible.cfg` or the layout names them.
    pub inventories: Vec<PathBuf>,
    pub site: PathBuf,
    pub verify: PathBuf,
    /// `tests/integration/overrides/HOST.yml`: the explicit stubs.
    pub overlay: PathBuf,
    /// `ansible-inventory --list --export` of the real inventory, read once.
    pub export: InventoryExport,
}

impl Profile {
    /// Check the repo layout, read the real inventory with `ansible-inventory` and make sure `host`
    /// is in it. Runs one short `ansible-inventory` process.
    pub fn load(repo: &Path, host: &str) -> Result<Profile> {
        Profile::load_confined(repo, host, None)
    }

    /// `load`, with `ansible-inventory` confined to loopback (a cycle: the real inventory's
    /// plugins and scripts reach nothing).
    pub fn load_confined(
        repo: &Path,
        host: &str,
        confine: Option<&super::Confine>,
    ) -> Result<Profile> {
        validate_host_name(host)?;
        if repo.exists() && !repo.is_dir() {
            return Err(Error::input(
                format!("the Ansible repo {} is a file, not a directory", show(repo)),
                "pass --repo DIR: the repo's top directory (the one holding the inventory, \
                 site.yml and tests/integration/; see tests/fixtures/boma)",
            ));
        }
        if !repo.is_dir() {
            return Err(Error::not_found(
                format!("Ansible repo {}", show(repo)),
                "pass --repo DIR pointing at an Ansible repo laid out like boma \
                 (inventory, site.yml, tests/integration/; see tests/fixtures/boma)",
            ));
        }
        let repo = repo.canonicalize().map_err(|e| {
            Error::input(
                format!("cannot resolve {}: {e}", show(repo)),
                "pass a readable directory",
            )
        })?;
        let inventories = find_inventories(&repo)?;
        let site = require_file(
            &repo,
            SITE,
            "the playbook boma-qvm applies (`ansible-playbook site.yml`)",
        )?;
        let verify = require_file(
            &repo,
            VERIFY,
            "the outcome checks run after the apply and after the reboot (see tests/fixtures/boma)",
        )?;
        let export = read_inventory(&repo, &inventories, confine)?;
        let known = export.hosts();
        if !known.contains(host) {
            let list: Vec<&str> = known.iter().map(String::as_str).collect();
            return Err(Error::not_found(
                format!(
                    "host `{host}` in the inventory ({})",
                    show_all(&inventories)
                ),
                format!("pass one of its hosts: {}", list.join(", ")),
            ));
        }
        let overlay = require_file(
            &repo,
            &format!("{OVERRIDES_DIR}/{host}.yml"),
            "the explicit stubs for this host (cert tier, in-VM coordinator, local names); \
             copy tests/fixtures/boma/tests/integration/overrides/askari.yml and adapt it",
        )?;
        Ok(Profile {
            repo,
            host: host.to_string(),
            inventories,
            site,
            verify,
            overlay,
            export,
        })
    }

    /// The real inventory's groups that hold `self.host` directly.
    pub fn groups(&self) -> Vec<String> {
        self.export.direct_groups(&self.host)
    }
}

/// A host name usable as an exact `--limit` pattern: no pattern syntax, no special names.
pub fn validate_host_name(host: &str) -> Result<()> {
    let ok_chars = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !host.starts_with(['-', '.']);
    if !ok_chars || matches!(host, "all" | "localhost" | "ungrouped") {
        return Err(Error::input(
            format!("`{host}` is not a plain inventory host name"),
            "name one host of the inventory (letters, digits, '-', '_', '.'; not a pattern or group)",
        ));
    }
    Ok(())
}

fn require_file(repo: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    let p = repo.join(rel);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::not_found(
            format!("{} in {}", rel, show(repo)),
            format!("create {}: {what}", show(&p)),
        ))
    }
}

fn show_all(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| show(p)).collect::<Vec<_>>().join(", ")
}

/// The inventory sources: `[defaults] inventory` in the repo's ansible.cfg, else the first
/// conventional location that exists.
pub fn find_inventories(repo: &Path) -> Result<Vec<PathBuf>> {
    let cfg = repo.join("ansible.cfg");
    let configured = std::fs::read_to_string(&cfg)
        .ok()
        .and_then(|t| ini_value(&t, "defaults", "inventory"));
    if let Some(value) = configured {
        let sources: Vec<PathBuf> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| repo.join(s))
            .collect();
        for s in &sources {
            if !s.exists() {
                return Err(Error::not_found(
                    format!("inventory {} (named by {})", show(s), show(&cfg)),
                    "create it, or fix `inventory =` in ansible.cfg",
                ));
            }
        }
        if !sources.is_empty() {
            return Ok(sources);
        }
    }
    INVENTORY_CANDIDATES
        .iter()
        .map(|c| repo.join(c))
        .find(|p| p.exists())
        .map(|p| vec![p])
        .ok_or_else(|| {
            Error::not_found(
                format!("an inventory in {}", show(repo)),
                format!(
                    "add `inventory = <path>` to ansible.cfg's [defaults], or create one of: {}",
                    INVENTORY_CANDIDATES.join(", ")
                ),
            )
        })
}

/// `key = value` from `[section]` of an INI file (Ansible's ansible.cfg dialect: `#`/`;` comments).
pub fn ini_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_string();
            continue;
        }
        if current == section
            && let Some((k, v)) = line.split_once(['=', ':'])
            && k.trim() == key
        {
            return Some(v.trim().to_string());
        }
    }
    None
}

/// `ansible-inventory --list --export` over the real inventory (run from the repo, so its
/// ansible.cfg applies). `--export` keeps group vars on their groups instead of flattening them.
fn read_inventory(
    repo: &Path,
    inventories: &[PathBuf],
    confine: Option<&super::Confine>,
) -> Result<InventoryExport> {
    let program = find_tool("ansible-inventory")?;
    let mut cmd = match confine {
        Some(c) => {
            let (exe, args) = c.loopback().wrap(&program);
            let mut cmd = std::process::Command::new(exe);
            cmd.args(args);
            cmd
        }
        None => std::process::Command::new(&program),
    };
    cmd.current_dir(repo)
        .envs(base_env())
        .env("ANSIBLE_NOCOLOR", "1");
    for inv in inventories {
        cmd.arg("-i").arg(inv);
    }
    cmd.args(["--list", "--export"]);
    let out = cmd.output().map_err(|e| Error::Io {
        context: format!("running {}", show(&program)),
        source: e,
    })?;
    if !out.status.success() {
        return Err(Error::ansible(
            format!(
                "ansible-inventory could not read {}: {}",
                show_all(inventories),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "fix the inventory so `ansible-inventory --list` succeeds in the repo",
        ));
    }
    InventoryExport::parse(&out.stdout)
}
