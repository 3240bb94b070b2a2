//! The cloud-init NoCloud seed: `meta-data`, `user-data` and `network-config` rendered from the
//! templates in `cloud-init/`, packed into `seed.iso`, which QEMU attaches as the second virtio
//! disk (`/dev/vdb`, read-only).
//!
//! Why ISO9660 (`genisoimage -V cidata -r -J`) rather than vfat: cloud-init's NoCloud finds either
//! by the `cidata` label, but an ISO is built by one unprivileged command from plain files (no
//! `mkfs.vfat` + `mcopy`/mtools and no loop mount), is read-only media by nature (the guest cannot
//! change its own seed), and is what Debian's cloud images are tested with. `genisoimage` is
//! already a dependency, and `isoinfo` from the same package reads a seed back without mounting.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result, show};

const USER_DATA: &str = include_str!("../../cloud-init/user-data");
const META_DATA: &str = include_str!("../../cloud-init/meta-data");
const NETWORK_CONFIG: &str = include_str!("../../cloud-init/network-config");

pub const ISO: &str = "seed.iso";

/// What goes into a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    /// New per VM: cloud-init runs its first-boot modules once per instance-id.
    pub instance_id: String,
    pub hostname: String,
    /// The admin user Ansible logs in as (normally [`crate::guest::ssh::USER`]).
    pub user: String,
    /// One OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
    pub ssh_pubkey: String,
    /// The NIC's MAC; the network config matches it, or any `en*` NIC when `None`.
    pub mac: Option<String>,
}

impl SeedSpec {
    /// A seed for user `ansible`, matching any `en*` NIC.
    pub fn new(instance_id: &str, hostname: &str, ssh_pubkey: &str) -> Self {
        SeedSpec {
            instance_id: instance_id.into(),
            hostname: hostname.into(),
            user: crate::guest::ssh::USER.into(),
            ssh_pubkey: ssh_pubkey.trim().into(),
            mac: None,
        }
    }
}

/// The three rendered NoCloud files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

fn bad(what: &str, value: &str, fix: &str) -> Error {
    Error::input(
        format!("invalid {what} for the cloud-init seed: {value:?}"),
        fix,
    )
}

fn validate(spec: &SeedSpec) -> Result<()> {
    let id_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    if !id_ok(&spec.instance_id) {
        return Err(bad(
            "instance-id",
            &spec.instance_id,
            "use letters, digits, '.', '_' and '-'",
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if spec.hostname.len() > 253 || !spec.hostname.split('.').all(label_ok) {
        return Err(bad(
            "hostname",
            &spec.hostname,
            "use letters, digits and '-' (RFC 1123), at most 63 per label",
        ));
    }
    let u = &spec.user;
    if u.is_empty()
        || u.len() > 32
        || !u.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        || !u
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
    {
        return Err(bad(
            "user name",
            u,
            "use a lower-case POSIX user name such as `ansible`",
        ));
    }
    let k = spec.ssh_pubkey.trim();
    let key_type = k.split_whitespace().next().unwrap_or("");
    if !(key_type.starts_with("ssh-")
        || key_type.starts_with("ecdsa-")
        || key_type.starts_with("sk-"))
        || k.split_whitespace().count() < 2
        || k.chars().any(char::is_control)
    {
        return Err(bad(
            "SSH public key",
            k,
            "pass one OpenSSH public key line (the contents of id_ed25519.pub)",
        ));
    }
    if let Some(mac) = &spec.mac {
        let octets: Vec<&str> = mac.split(':').collect();
        if octets.len() != 6
            || !octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad("MAC address", mac, "use the form 52:54:00:12:34:56"));
        }
    }
    Ok(())
}

/// A YAML double-quoted scalar (a JSON string is one).
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

fn fill(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    debug_assert!(!out.contains("{{"), "unfilled placeholder in {out}");
    out
}

/// Render the templates for `spec` (validated first).
pub fn render(spec: &SeedSpec) -> Result<Rendered> {
    validate(spec)?;
    let matcher = match &spec.mac {
        Some(mac) => format!("{{macaddress: {}}}", q(&mac.to_ascii_lowercase())),
        None => format!("{{name: {}}}", q("en*")),
    };
    let vars = [
        ("instance_id", q(&spec.instance_id)),
        ("hostname", q(&spec.hostname)),
        ("user", q(&spec.user)),
        ("ssh_pubkey", q(spec.ssh_pubkey.trim())),
        ("match", matcher),
    ];
    Ok(Rendered {
        meta_data: fill(META_DATA, &vars),
        user_data: fill(USER_DATA, &vars),
        network_config: fill(NETWORK_CONFIG, &vars),
    })
}

/// Write `dir/seed.iso` (replacing an older one) and return its path.
pub fn write(dir: &Path, spec: &SeedSpec) -> Result<PathBuf> {
    let r = render(spec)?;
    crate::tools::require("genisoimage", "apt-get install genisoimage")?;
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", show(dir)))?;
    let src = tempfile::Builder::new()
        .prefix(".seed-")
        .tempdir_in(dir)
        .ctx(|| format!("creating a temp dir in {}", show(dir)))?;
    for (name, text) in [
        ("meta-data", &r.meta_data),
        ("user-data", &r.user_data),
        ("network-config", &r.network_config),
    ] {
        let p = src.path().join(name);
        std::fs::write(&p, text).ctx(|| format!("writing {}", show(&p)))?;
    }
    let iso = dir.join(ISO);
    let tmp = src.path().join(ISO);
    crate::tools::run(
        Command::new("genisoimage")
            .current_dir(src.path())
            .args(["-quiet", "-V", "cidata", "-r", "-J", "-output"])
            .arg(&tmp)
            .args(["user-data", "meta-data", "network-config"]),
    )?;
    std::fs::rename(&tmp, &iso).ctx(|| format!("moving the seed to {}", show(&iso)))?;
    tracing::debug!(
        "cloud-init seed {} (instance-id {})",
        show(&iso),
        spec.instance_id
    );
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SeedSpec {
        SeedSpec::new("i-1", "boma-it-askari", "ssh-ed25519 AAAAC3Nza key@x")
    }

    #[test]
    fn placeholders_are_all_filled() {
        let r = render(&spec()).unwrap();
        for t in [&r.meta_data, &r.user_data, &r.network_config] {
            assert!(!t.contains("{{"), "{t}");
        }
        assert!(r.user_data.starts_with("#cloud-config\n"));
    }

    #[test]
    fn hostile_values_are_refused() {
        let cases: [fn(&mut SeedSpec); 5] = [
            |s| s.hostname = "a\nb: c".into(),
            |s| s.user = "Root".into(),
            |s| s.ssh_pubkey = "ssh-ed25519 AAA\n- evil".into(),
            |s| s.instance_id = "".into(),
            |s| s.mac = Some("52:54:00:zz:00:01".into()),
        ];
        for f in cases {
            let mut s = spec();
            f(&mut s);
            assert!(matches!(render(&s), Err(Error::Input { .. })), "{s:?}");
        }
    }
}
