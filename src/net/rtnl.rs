//! Thin async helpers over `rtnetlink` 0.24: links, IPv4 addresses, IPv4 routes.
//! Everything link-level goes through netlink, never `ip`.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

use super::owned::LinkRecord;
use super::subnet::Subnet;
use crate::{Error, Result};

/// A netlink connection whose background task lives as long as this value.
pub struct Rtnl {
    pub handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A link as far as we care.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
    pub up: bool,
    /// `ip link set NAME alias ...`: our bridge carries the marker of the state that made it.
    pub alias: Option<String>,
}

/// An IPv4 route from any routing table.
#[derive(Debug, Clone)]
pub struct Route {
    pub dst: Subnet,
    pub oif: Option<u32>,
    pub table: u32,
    pub kind: RouteType,
}

fn nl_err(what: impl std::fmt::Display, e: rtnetlink::Error) -> Error {
    let perm = matches!(&e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EPERM);
    let fix = if perm {
        "run boma-qvm as root (it needs CAP_NET_ADMIN to build its network)"
    } else {
        "check the message; `boma-qvm prune` removes half-built network objects"
    };
    Error::network(format!("netlink: {what}: {e}"), fix)
}

fn link_from(msg: LinkMessage) -> Link {
    let mut l = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        controller: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        alias: None,
    };
    for a in msg.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Controller(c) => l.controller = Some(c),
            LinkAttribute::IfAlias(a) => l.alias = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k);
                    }
                }
            }
            _ => {}
        }
    }
    l
}

impl Rtnl {
    /// Open a netlink connection in the calling thread's network namespace.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Io {
            context: "opening a netlink socket".into(),
            source: e,
        })?;
        let task = tokio::spawn(conn);
        Ok(Rtnl { handle, task })
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("listing links", e))?;
        Ok(msgs.into_iter().map(link_from).collect())
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    pub async fn link_name(&self, index: u32) -> Result<String> {
        let name = self
            .links()
            .await?
            .into_iter()
            .find(|l| l.index == index)
            .map(|l| l.name);
        Ok(name.unwrap_or_else(|| format!("ifindex {index}")))
    }

    /// IPv4 addresses (address, prefix length) on link `index`.
    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("listing addresses", e))?;
        let mut out = Vec::new();
        for m in msgs {
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Every IPv4 route of every table (main, local, policy tables).
    pub async fn routes_v4(&self) -> Result<Vec<Route>> {
        let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("listing routes", e))?;
        let mut out = Vec::new();
        for m in msgs {
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut oif = None;
            let mut table = u32::from(m.header.table);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            let dst = Subnet::containing(dst, m.header.destination_prefix_length);
            out.push(Route {
                dst,
                oif,
                table,
                kind: m.header.kind,
            });
        }
        Ok(out)
    }

    /// Create a bridge with a fixed MAC (so it never changes as ports come and go), no STP delay.
    pub async fn add_bridge(&self, name: &str, mac: [u8; 6]) -> Result<()> {
        let msg = LinkBridge::new(name)
            .forward_delay(0)
            .address(mac.to_vec())
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| nl_err(format!("creating bridge {name}"), e))
    }

    pub async fn add_ipv4(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(|e| nl_err(format!("adding {ip}/{prefix}"), e))
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_err(format!("bringing up ifindex {index}"), e))
    }

    /// Make link `index` a port of bridge `controller` and bring it up.
    pub async fn enslave_up(&self, index: u32, controller: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(controller)
            .up()
            .build();
        self.handle.link().set(msg).execute().await.map_err(|e| {
            nl_err(
                format!("attaching ifindex {index} to bridge ifindex {controller}"),
                e,
            )
        })
    }

    /// Set link `index`'s alias (shown by `ip link`).
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).alias(alias).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_err(format!("setting the alias of ifindex {index}"), e))
    }

    /// Delete link `index`. A link that is already gone counts as deleted: a veth whose other
    /// end sat in a namespace that just died goes away on the kernel's own schedule, so it can
    /// vanish between the caller's lookup and this call.
    pub async fn delete(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENODEV => Ok(()),
            r => r.map_err(|e| nl_err(format!("deleting ifindex {index}"), e)),
        }
    }

    /// Delete the link `rec` names if it is still that link (same name, same ifindex); a link
    /// of that name that is not the recorded one is left alone. Returns whether it was deleted.
    pub async fn delete_recorded(&self, rec: &LinkRecord) -> Result<bool> {
        match self.link(&rec.name).await? {
            Some(l) if l.index == rec.ifindex => self.delete(l.index).await.map(|()| true),
            _ => Ok(false),
        }
    }
}
