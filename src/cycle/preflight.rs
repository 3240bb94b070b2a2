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
    for raw in &cfg.extra_vars {
        let (passed, map) = extra::check(raw, &cwd)?;
        extra::refuse_local_connection(&map, &format!("-e '{raw}'"))?;
        checked.push(passed);
    }
    cfg.extra_vars = checked;
    req.check(dirs)?;
    Ok(profile)
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
