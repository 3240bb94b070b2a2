//! The transient inventory: only the VM, under HOST's name, in HOST's real groups.
//!
//! Built from `ansible-inventory --list --export` of the real inventory (any format Ansible reads),
//! written as JSON (valid for Ansible's yaml inventory plugin, which also decodes the export's
//! `__ansible_vault` / `__ansible_unsafe` values back). Kept: HOST's direct groups and all their
//! ancestors with the parent/child edges among them (group depth decides group-var precedence),
//! their group vars, HOST's own inventory vars. Dropped: every other host and every group without
//! HOST. Connection vars are stripped and replaced by the VM's. If the real inventory directory
//! has `group_vars/`/`host_vars/`, they are symlinked next to the transient file so they apply at
//! their usual precedence.

use crate::error::{Error, IoContext, Result, show};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

/// Vars that decide where and how Ansible connects. Stripped from the copied vars; the VM's own
/// are set instead (and passed again as extra vars, see `vars`).
pub const CONNECTION_VARS: &[&str] = &[
    "ansible_host",
    "ansible_ssh_host",
    "ansible_port",
    "ansible_ssh_port",
    "ansible_user",
    "ansible_ssh_user",
    "ansible_connection",
    "ansible_private_key_file",
    "ansible_ssh_private_key_file",
    "ansible_password",
    "ansible_ssh_pass",
    "ansible_ssh_password",
    "ansible_ssh_args",
    "ansible_ssh_common_args",
    "ansible_ssh_extra_args",
    "ansible_ssh_executable",
    "ansible_control_path_dir",
    "ansible_python_interpreter",
];

/// `ansible-inventory --list --export` output.
#[derive(Debug, Clone)]
pub struct InventoryExport {
    root: Map<String, Value>,
}

impl InventoryExport {
    pub fn parse(json: &[u8]) -> Result<Self> {
        match serde_json::from_slice::<Value>(json) {
            Ok(Value::Object(root)) => Ok(InventoryExport { root }),
            Ok(_) | Err(_) => Err(Error::ansible(
                "ansible-inventory --list --export did not print a JSON object",
                "run it by hand in the repo and fix what it reports",
            )),
        }
    }

    fn group(&self, name: &str) -> Option<&Map<String, Value>> {
        if name == "_meta" {
            None
        } else {
            self.root.get(name).and_then(Value::as_object)
        }
    }

    fn names(&self, group: &str, key: &str) -> Vec<String> {
        self.group(group)
            .and_then(|g| g.get(key))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn groups(&self) -> impl Iterator<Item = &String> {
        self.root.keys().filter(|k| k.as_str() != "_meta")
    }

    /// Every host the inventory defines.
    pub fn hosts(&self) -> BTreeSet<String> {
        let mut hosts: BTreeSet<String> =
            self.groups().flat_map(|g| self.names(g, "hosts")).collect();
        if let Some(hv) = self
            .root
            .get("_meta")
            .and_then(|m| m.get("hostvars"))
            .and_then(Value::as_object)
        {
            hosts.extend(hv.keys().cloned());
        }
        hosts
    }

    /// Groups that list `host` directly.
    pub fn direct_groups(&self, host: &str) -> Vec<String> {
        self.groups()
            .filter(|g| self.names(g, "hosts").iter().any(|h| h == host))
            .cloned()
            .collect()
    }

    fn parents(&self) -> BTreeMap<String, Vec<String>> {
        let mut parents: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for g in self.groups() {
            for child in self.names(g, "children") {
                parents.entry(child).or_default().push(g.clone());
            }
        }
        parents
    }

    /// `host`'s direct groups plus all their ancestors (always including `all`).
    pub fn groups_with_ancestors(&self, host: &str) -> BTreeSet<String> {
        let parents = self.parents();
        let mut out = BTreeSet::from(["all".to_string()]);
        let mut todo = self.direct_groups(host);
        while let Some(g) = todo.pop() {
            if out.insert(g.clone()) {
                todo.extend(parents.get(&g).cloned().unwrap_or_default());
            }
        }
        out
    }

    fn vars_of_group(&self, group: &str) -> Map<String, Value> {
        self.group(group)
            .and_then(|g| g.get("vars"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }

    fn vars_of_host(&self, host: &str) -> Map<String, Value> {
        self.root
            .get("_meta")
            .and_then(|m| m.get("hostvars"))
            .and_then(|h| h.get(host))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }
}

/// The transient inventory document, and what was stripped from the copied vars.
#[derive(Debug, Clone)]
pub struct Transient {
    pub doc: Value,
    /// `group:var` / `host:var` entries removed because they are connection vars.
    pub stripped: Vec<String>,
}

fn strip(
    mut vars: Map<String, Value>,
    owner: &str,
    stripped: &mut Vec<String>,
) -> Map<String, Value> {
    for key in CONNECTION_VARS {
        if vars.remove(*key).is_some() {
            stripped.push(format!("{owner}:{key}"));
        }
    }
    vars
}

/// Build the document: only `host`, in its real groups, with `vm_vars` as its connection vars.
pub fn build(
    export: &InventoryExport,
    host: &str,
    vm_vars: &Map<String, Value>,
) -> Result<Transient> {
    if !export.hosts().contains(host) {
        return Err(Error::not_found(
            format!("host `{host}` in the inventory"),
            "pass a host the inventory defines",
        ));
    }
    let included = export.groups_with_ancestors(host);
    let mut stripped = Vec::new();
    let mut host_vars = strip(export.vars_of_host(host), host, &mut stripped);
    host_vars.extend(vm_vars.clone());
    let mut b = Builder {
        export,
        host,
        included: &included,
        seen: HashSet::new(),
        host_vars: Some(host_vars),
        stripped,
    };
    let all = b.group("all");
    Ok(Transient {
        doc: Value::Object(Map::from_iter([("all".to_string(), all)])),
        stripped: b.stripped,
    })
}

struct Builder<'a> {
    export: &'a InventoryExport,
    host: &'a str,
    included: &'a BTreeSet<String>,
    seen: HashSet<String>,
    host_vars: Option<Map<String, Value>>,
    stripped: Vec<String>,
}

impl Builder<'_> {
    /// A group's definition the first time it is reached, an empty reference after that
    /// (the yaml plugin merges a group named in several places, so edges are kept).
    fn group(&mut self, name: &str) -> Value {
        let mut def = Map::new();
        if !self.seen.insert(name.to_string()) {
            return Value::Object(def);
        }
        let vars = strip(self.export.vars_of_group(name), name, &mut self.stripped);
        if !vars.is_empty() {
            def.insert("vars".into(), Value::Object(vars));
        }
        if self
            .export
            .names(name, "hosts")
            .iter()
            .any(|h| h == self.host)
        {
            let hv = self.host_vars.take().unwrap_or_default();
            def.insert(
                "hosts".into(),
                Value::Object(Map::from_iter([(self.host.to_string(), Value::Object(hv))])),
            );
        }
        let mut children = Map::new();
        for child in self.export.names(name, "children") {
            if self.included.contains(&child) {
                let v = self.group(&child);
                children.insert(child, v);
            }
        }
        if !children.is_empty() {
            def.insert("children".into(), Value::Object(children));
        }
        Value::Object(def)
    }
}

/// A transient inventory written to disk.
#[derive(Debug, Clone)]
pub struct TransientInventory {
    /// The inventory file to pass with `-i`.
    pub path: PathBuf,
    pub stripped: Vec<String>,
}

/// The directory whose `group_vars/`/`host_vars/` Ansible loads next to an inventory source.
pub fn adjacent_dir(source: &Path) -> PathBuf {
    if source.is_dir() {
        source.to_path_buf()
    } else {
        source.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// Write `t` to `dir/hosts.json` (replacing what a previous run left) and symlink the real
/// inventory's adjacent `group_vars/`/`host_vars/` next to it.
pub fn write(dir: &Path, t: &Transient, sources: &[PathBuf]) -> Result<TransientInventory> {
    let with_vars: BTreeSet<PathBuf> = sources
        .iter()
        .map(|s| adjacent_dir(s))
        .filter(|d| d.join("group_vars").is_dir() || d.join("host_vars").is_dir())
        .collect();
    if with_vars.len() > 1 {
        let list: Vec<String> = with_vars.iter().map(|d| show(d)).collect();
        return Err(Error::input(
            format!(
                "several inventory sources have their own group_vars/host_vars: {}",
                list.join(", ")
            ),
            "keep inventory-adjacent vars in one inventory directory (or next to site.yml)",
        ));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .ctx(|| format!("removing the old transient inventory {}", show(dir)))?;
    }
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", show(dir)))?;
    let path = dir.join("hosts.json");
    let text = serde_json::to_string_pretty(&t.doc).expect("a JSON value serializes");
    std::fs::write(&path, text + "\n").ctx(|| format!("writing {}", show(&path)))?;
    if let Some(src) = with_vars.first() {
        for sub in ["group_vars", "host_vars"] {
            let target = src.join(sub);
            if target.is_dir() {
                std::os::unix::fs::symlink(&target, dir.join(sub))
                    .ctx(|| format!("linking {} into {}", show(&target), show(dir)))?;
            }
        }
    }
    Ok(TransientInventory {
        path,
        stripped: t.stripped.clone(),
    })
}
