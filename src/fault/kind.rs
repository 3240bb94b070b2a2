//! The faults by name: what `boma-qvm fault VM <name>` takes and the `kind` of each record.

use crate::{Error, Result};

/// Every fault, by the name `boma-qvm fault VM <name>` and the `kind` field of its record use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    PowerCut,
    PowerOn,
    Reset,
    Reboot,
    LinkDown,
    LinkUp,
    Freeze,
    Thaw,
    DiskErrorsOn,
    DiskErrorsOff,
    EgressOff,
    EgressOn,
    Nmi,
}

impl Fault {
    pub const ALL: [Fault; 13] = [
        Fault::PowerCut,
        Fault::PowerOn,
        Fault::Reset,
        Fault::Reboot,
        Fault::LinkDown,
        Fault::LinkUp,
        Fault::Freeze,
        Fault::Thaw,
        Fault::DiskErrorsOn,
        Fault::DiskErrorsOff,
        Fault::EgressOff,
        Fault::EgressOn,
        Fault::Nmi,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::PowerCut => "power-cut",
            Fault::PowerOn => "power-on",
            Fault::Reset => "reset",
            Fault::Reboot => "reboot",
            Fault::LinkDown => "link-down",
            Fault::LinkUp => "link-up",
            Fault::Freeze => "freeze",
            Fault::Thaw => "thaw",
            Fault::DiskErrorsOn => "disk-errors-on",
            Fault::DiskErrorsOff => "disk-errors-off",
            Fault::EgressOff => "egress-off",
            Fault::EgressOn => "egress-on",
            Fault::Nmi => "nmi",
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = Error;
    fn from_str(s: &str) -> Result<Fault> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                Error::input(
                    format!("unknown fault `{s}`"),
                    format!("use one of: {}", all.join(", ")),
                )
            })
    }
}
