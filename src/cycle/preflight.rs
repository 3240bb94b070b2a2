//! Everything a cycle can check before the first boot, in a second or two: the repo layout and
//! HOST (one `ansible-inventory` run), the overlay, the cert tier, the user's `-e` values, the
//! machine's size, the network's config, the image, free RAM. Bad input fails here, leaving no
//! run directory and no VM behind.

use super::CycleConfig;
use crate::Result;
use crate::ansible::{Profile, extra};
use crate::error::{Error, show};
use crate::machine::provision::UpRequest;
use crate::paths::Dirs;

/// Check `cfg` and `req`; make relative `@FILE` extra vars absolute and add the overlay's DNS
/// names to `req`.
pub fn check(dirs: &Dirs, cfg: &mut CycleConfig, req: &mut UpRequest) -> Result<Profile> {
    // The real inventory is read with ansible-inventory confined to loopback (ADR-026).
    let confine = crate::ansible::Confine {
        exe: req.start.exe.clone(),
        state: dirs.state.clone(),
        netd: None,
        loopback_only: true,
    };
    let profile = Profile::load_confined(&cfg.repo, &cfg.host, Some(&confine))?;
    cfg.cert_plan()?;
    let overlay = overlay_vars(&profile)?;
    extra::refuse_local_connection(&overlay, &show(&profile.overlay))?;
    req.dns_names.extend(dns_names(&overlay));
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let mut checked = Vec::with_capacity(cfg.extra_vars.len());
    let mut maps = Vec::new();
    for raw in &cfg.extra_vars {
        let (passed, map) = extra::check(raw, &cwd)?;
        extra::refuse_local_connection(&map, &format!("-e '{raw}'"))?;
        checked.push(passed);
        maps.push((raw.clone(), map));
    }
    cfg.extra_vars = checked;
    check_secret_vars(cfg, &maps)?;
    req.check(dirs)?;
    Ok(profile)
}

/// `--secret-var` names: valid, given once, not also set by `-e` or by the cert tier, not a
/// connection var, and each set in the environment to a value long enough to scrub, which no
/// plain `-e` repeats (that would put it on the command line after all).
fn check_secret_vars(cfg: &CycleConfig, extra: &[(String, serde_yaml_ng::Mapping)]) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    let tier_var = cfg.cert_plan().ok().and_then(|p| p.secret).map(|s| s.var);
    for name in &cfg.secret_vars {
        let bad = |problem: String, fix: String| Err(Error::input(problem, fix));
        if !extra::valid_var_name(name) {
            return bad(
                format!("--secret-var {name}: not a valid variable name"),
                "give the var's name (letters, digits, '_'; not starting with a digit); its value \
                 comes from the environment variable of the same name"
                    .into(),
            );
        }
        if !seen.insert(name) {
            return bad(
                format!("--secret-var {name} is given twice"),
                format!("give --secret-var {name} once"),
            );
        }
        if tier_var.as_deref() == Some(name) {
            return bad(
                format!(
                    "--secret-var {name}: the --certs {} tier sets it already",
                    cfg.certs
                ),
                format!(
                    "drop --secret-var {name}; the tier reads it from ${}",
                    crate::ansible::certs::CREDENTIAL_ENV
                ),
            );
        }
        if let Some((raw, _)) = extra.iter().find(|(_, m)| m.contains_key(name.as_str())) {
            return bad(
                format!("--secret-var {name} and -e '{raw}' both set {name}"),
                format!("set {name} once: drop it from -e, or drop --secret-var {name}"),
            );
        }
        let connection = crate::ansible::Connection::new([0, 0, 0, 0].into(), "k".into());
        if connection.inventory_vars().contains_key(name.as_str())
            || name == "ansible_ssh_connection"
        {
            return bad(
                format!("--secret-var {name}: it is a connection var, which boma-qvm sets itself"),
                format!("drop --secret-var {name}; boma-qvm connects to the VM itself"),
            );
        }
    }
    for s in cfg.secrets()? {
        if let Some((raw, _)) = extra.iter().find(|(raw, _)| raw.contains(&s.value)) {
            let shown = crate::secrets::Scrubber::new([&s.value]).scrub(raw);
            return Err(Error::input(
                format!(
                    "-e '{shown}' holds the value of --secret-var {}: on the command line, any \
                     user's `ps` shows it",
                    s.var
                ),
                format!("remove it from -e; --secret-var {} passes it", s.var),
            ));
        }
    }
    Ok(())
}

/// The overlay file's vars: a YAML mapping (an empty file is none).
fn overlay_vars(profile: &Profile) -> Result<serde_yaml_ng::Mapping> {
    let path = &profile.overlay;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::input(
            format!("cannot read the overlay {}: {e}", show(path)),
            "make it a readable YAML file",
        )
    })?;
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text) {
        Ok(serde_yaml_ng::Value::Mapping(m)) => Ok(m),
        Ok(serde_yaml_ng::Value::Null) => Ok(Default::default()),
        Ok(_) => Err(Error::input(
            format!("the overlay {} is not a mapping of vars", show(path)),
            "write it as `name: value` lines (see tests/fixtures/boma/tests/integration/overrides/askari.yml)",
        )),
        Err(e) => Err(Error::input(
            format!("the overlay {} is not valid YAML: {e}", show(path)),
            "fix the overlay file",
        )),
    }
}

/// `integration_dns_names`: the names the VM's DNS answers with the VM itself.
fn dns_names(overlay: &serde_yaml_ng::Mapping) -> Vec<String> {
    overlay
        .get("integration_dns_names")
        .and_then(|v| v.as_sequence())
        .map(|s| {
            s.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
