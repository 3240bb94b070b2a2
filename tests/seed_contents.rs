//! The NoCloud seed: generate it with a real key pair, read the ISO back with `isoinfo` (no mount)
//! and parse the YAML cloud-init will read.

use std::path::Path;
use std::process::Command;

use boma_qvm::guest::seed::{self, SeedSpec};
use boma_qvm::guest::ssh;
use serde_yaml_ng::Value;

fn isoinfo(iso: &Path, args: &[&str]) -> String {
    let out = Command::new("isoinfo")
        .arg("-i")
        .arg(iso)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "isoinfo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A file from the ISO by its Rock Ridge name, parsed as YAML.
fn read_yaml(iso: &Path, name: &str) -> (String, Value) {
    let text = isoinfo(iso, &["-R", "-x", &format!("/{name}")]);
    let v = serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|e| panic!("{name} is not YAML ({e}):\n{text}"));
    (text, v)
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| {
        v.get(*k).unwrap_or_else(|| panic!("missing {k} in {v:?}"))
    })
}

#[test]
fn seed_iso_holds_the_user_key_hostname_and_network() {
    let dir = tempfile::tempdir().unwrap();
    let key = ssh::keygen(dir.path()).unwrap();
    let mut spec = SeedSpec::new("boma-it-askari-1a2b", "boma-it-askari", &key.public_key);
    spec.mac = Some("52:54:00:AB:cd:01".into());
    let iso = seed::write(dir.path(), &spec).unwrap();
    assert_eq!(iso, dir.path().join("seed.iso"));

    let pvd = isoinfo(&iso, &["-d"]);
    assert!(pvd.contains("Volume id: cidata"), "{pvd}");
    let listing = isoinfo(&iso, &["-R", "-f"]);
    let mut names: Vec<&str> = listing.lines().collect();
    names.sort();
    assert_eq!(names, ["/meta-data", "/network-config", "/user-data"]);

    let (text, ud) = read_yaml(&iso, "user-data");
    assert!(
        text.starts_with("#cloud-config\n"),
        "cloud-init ignores user-data without the header"
    );
    assert_eq!(s(&ud, &["hostname"]).as_str(), Some("boma-it-askari"));
    assert_eq!(s(&ud, &["manage_etc_hosts"]).as_bool(), Some(true));
    assert_eq!(s(&ud, &["ssh_pwauth"]).as_bool(), Some(false));
    let users = s(&ud, &["users"]).as_sequence().unwrap();
    assert_eq!(users.len(), 1, "only the ansible user, no default user");
    let u = &users[0];
    assert_eq!(s(u, &["name"]).as_str(), Some("ansible"));
    assert_eq!(s(u, &["sudo"]).as_str(), Some("ALL=(ALL) NOPASSWD:ALL"));
    assert_eq!(s(u, &["lock_passwd"]).as_bool(), Some(true));
    assert!(
        s(u, &["groups"])
            .as_sequence()
            .unwrap()
            .iter()
            .any(|g| g.as_str() == Some("docker"))
    );
    let keys: Vec<&str> = s(u, &["ssh_authorized_keys"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, [key.public_key.as_str()]);
    for forbidden in [
        "passwd",
        "plain_text_passwd",
        "hashed_passwd",
        "password",
        "chpasswd",
    ] {
        assert!(
            u.get(forbidden).is_none() && ud.get(forbidden).is_none(),
            "seed sets {forbidden}"
        );
    }

    let (_, md) = read_yaml(&iso, "meta-data");
    assert_eq!(
        s(&md, &["instance-id"]).as_str(),
        Some("boma-it-askari-1a2b")
    );
    assert_eq!(s(&md, &["local-hostname"]).as_str(), Some("boma-it-askari"));

    let (_, net) = read_yaml(&iso, "network-config");
    assert_eq!(s(&net, &["version"]).as_u64(), Some(2));
    let eths = s(&net, &["ethernets"]).as_mapping().unwrap();
    assert_eq!(eths.len(), 1);
    let nic = eths.values().next().unwrap();
    assert_eq!(
        s(nic, &["match", "macaddress"]).as_str(),
        Some("52:54:00:ab:cd:01")
    );
    assert_eq!(s(nic, &["dhcp4"]).as_bool(), Some(true));
    assert_eq!(s(nic, &["dhcp-identifier"]).as_str(), Some("mac"));
}

#[test]
fn without_a_mac_the_network_config_matches_any_en_nic_and_rewrites_replace_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let key = ssh::keygen(dir.path()).unwrap();
    seed::write(dir.path(), &SeedSpec::new("first", "vm-a", &key.public_key)).unwrap();
    let iso = seed::write(
        dir.path(),
        &SeedSpec::new("second", "vm-b", &key.public_key),
    )
    .unwrap();
    let (_, net) = read_yaml(&iso, "network-config");
    let nic = s(&net, &["ethernets"])
        .as_mapping()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(s(&nic, &["match", "name"]).as_str(), Some("en*"));
    let (_, md) = read_yaml(&iso, "meta-data");
    assert_eq!(s(&md, &["instance-id"]).as_str(), Some("second"));
    // Only the seed (and the key pair) remain in the run dir; no temp files.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["id_ed25519", "id_ed25519.pub", "seed.iso"]);
}

#[test]
fn a_bad_key_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let err = seed::write(dir.path(), &SeedSpec::new("i", "vm", "not a key")).unwrap_err();
    assert!(matches!(err, boma_qvm::Error::Input { .. }), "{err}");
    assert!(err.to_string().contains("SSH public key"), "{err}");
    assert!(!dir.path().join("seed.iso").exists());
}
