//! The unprivileged side of netd: connect, send a request line, read the answer line (and a
//! tap's fd). Blocking and short: every request is a few netlink calls on the other side.

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use super::DEFAULT_GROUP;
use super::proto::{Answer, MAX_LINE, Reply, Request};
use crate::error::show;
use crate::{Error, Result};

/// How to reach netd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// One request on its own connection.
    pub fn call(&self, req: &Request) -> Result<Reply> {
        self.session()?.call(req)
    }

    /// One request whose answer carries an fd (a tap).
    pub fn call_for_fd(&self, req: &Request) -> Result<(Reply, OwnedFd)> {
        let mut s = self.session()?;
        let (reply, mut fds) = s.call_with_fds(req)?;
        let fd = fds.pop().ok_or_else(|| {
            Error::network(
                format!("netd at {} answered without the fd", show(&self.socket)),
                "check that netd is this version of boma-qvm (`boma-qvm --version` on both sides)",
            )
        })?;
        Ok((reply, fd))
    }

    /// A connection kept open: what netd hands out on it (a confinement address) is the
    /// caller's until it closes.
    pub fn session(&self) -> Result<Session> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| unreachable(&self.socket, e))?;
        Ok(Session { stream })
    }
}

/// Why netd cannot be reached, with the fix that applies.
fn unreachable(socket: &Path, e: std::io::Error) -> Error {
    let s = show(socket);
    let fix = match e.kind() {
        std::io::ErrorKind::PermissionDenied if member_since_login(DEFAULT_GROUP) => format!(
            "you are in group {DEFAULT_GROUP} (the set-up added you), but this login session \
             started before that: log in again, or run `newgrp {DEFAULT_GROUP}` in this shell, \
             then run this again"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "join group {DEFAULT_GROUP} (`usermod -aG {DEFAULT_GROUP} $USER`; the integration_test \
             role does it for integration_test_users), then log in again"
        ),
        _ => format!(
            "start it: `systemctl start boma-qvm-netd` (the integration_test role installs the \
             unit; where PID 1 is not systemd, run `boma-qvm netd --socket {s}` as root); or, \
             as root, set {}=none to work without netd",
            super::SOCKET_VAR
        ),
    };
    Error::network(format!("cannot reach boma-qvm netd at {s}: {e}"), fix)
}

/// This user is a member of `group` in the group database, but this process does not carry it
/// (the session began before the membership).
fn member_since_login(group: &str) -> bool {
    use nix::unistd::{Group, User, geteuid, getgroups};
    let (Ok(Some(g)), Ok(Some(me))) = (Group::from_name(group), User::from_uid(geteuid())) else {
        return false;
    };
    let listed = g.mem.contains(&me.name) || me.gid == g.gid;
    let carried =
        getgroups().is_ok_and(|gs| gs.contains(&g.gid)) || nix::unistd::getegid() == g.gid;
    listed && !carried
}

/// An open connection to netd.
pub struct Session {
    stream: UnixStream,
}

impl Session {
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        self.call_with_fds(req).map(|(r, _)| r)
    }

    /// Send `req`; the answer, and any fds that came with it.
    pub fn call_with_fds(&mut self, req: &Request) -> Result<(Reply, Vec<OwnedFd>)> {
        let mut line = serde_json::to_string(req).expect("a request serializes");
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| lost(&e))?;
        let (text, fds) = read_line_with_fds(&self.stream)?;
        let answer: Answer = serde_json::from_str(&text).map_err(|e| {
            Error::network(
                format!("netd answered something unreadable ({e}): {text:.200}"),
                "check that netd is this version of boma-qvm (`boma-qvm --version` on both sides)",
            )
        })?;
        match answer {
            Ok(reply) => Ok((reply, fds)),
            Err(w) => Err(w.into()),
        }
    }
}

fn lost(e: &std::io::Error) -> Error {
    Error::network(
        format!("the connection to boma-qvm netd broke: {e}"),
        "look at netd's log (`journalctl -u boma-qvm-netd`) and try again",
    )
}

/// Read up to and including the first newline (the peer sends one answer per request, so
/// nothing follows it), collecting any SCM_RIGHTS fds on the way.
fn read_line_with_fds(stream: &UnixStream) -> Result<(String, Vec<OwnedFd>)> {
    let mut out = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| lost(&e.into()))?;
        for c in msg.cmsgs().map_err(|e| lost(&e.into()))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in this process for us.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(Error::network(
                "boma-qvm netd closed the connection without an answer",
                "look at netd's log (`journalctl -u boma-qvm-netd`); it may have been stopped",
            ));
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(end) = out.iter().position(|b| *b == b'\n') {
            out.truncate(end);
            return Ok((String::from_utf8_lossy(&out).into_owned(), fds));
        }
        if out.len() > MAX_LINE {
            return Err(Error::network(
                "boma-qvm netd's answer is too long",
                "check that netd is this version of boma-qvm",
            ));
        }
    }
}
