//! `boma-qvm fault VM FAULT`: inject one fault from the shell (for Ansible- or shell-driven
//! tests). The work is `Machine::inject`; this prints what it did.

use boma_qvm::Result;
use boma_qvm::fault::Fault;
use boma_qvm::machine::Machine;
use boma_qvm::paths::Dirs;
use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};

#[derive(Args, Debug)]
pub struct FaultArgs {
    /// VM or host name (`askari` or `boma-it-askari`).
    pub vm: String,
    /// power-cut (SIGKILL QEMU: no guest shutdown), power-on (boot the same overlay again),
    /// reset, reboot (clean), link-down, link-up, freeze, thaw, disk-errors-on (reads and writes
    /// fail with EIO), disk-errors-off, egress-off (cut outbound NAT), egress-on, nmi.
    #[arg(value_parser = fault_parser())]
    pub fault: Fault,
}

fn fault_parser() -> impl TypedValueParser<Value = Fault> {
    PossibleValuesParser::new(Fault::ALL.map(Fault::name))
        .map(|s| s.parse::<Fault>().expect("a listed fault name parses"))
}

pub async fn fault(dirs: &Dirs, a: FaultArgs) -> Result<()> {
    let m = Machine::attach(dirs, &a.vm)?;
    let rec = m.inject(a.fault).await?;
    println!(
        "{}: {}: {}",
        m.name(),
        a.fault.name(),
        rec.data["detail"].as_str().unwrap_or("done")
    );
    Ok(())
}
