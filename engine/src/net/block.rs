//! Hold off the peers of migrated connections during the switchover: an
//! nftables table of ours that silently drops TCP to the service address
//! and ports (inbound) and from them (outbound), so that neither host
//! answers with a reset; the peers retransmit and get through once the
//! table is gone.
//!
//! The table is `inet ferry_TAG`, one per migration, with two chains at
//! priority -300 (before conntrack and every other filter): `inbound` on
//! the prerouting hook (daddr and dport match) and `outbound` on the output
//! hook (saddr and sport match), each rule with a counter. It is made and
//! removed in one nft transaction each, through the `nft` program with JSON
//! input (`nft -j -f -`): nftables' own front end, whose JSON schema is
//! stable, rather than a Rust netlink implementation of nf_tables
//! expressions (none is well kept; the C library needs bindings). It needs
//! the nftables package (scripts/setup and .ci/run install it).
//!
//! [`Block`] deletes its table when dropped (in the network namespace it
//! was made in, wherever it is dropped); [`cleanup`] deletes every table of
//! ours, for an agent that starts after a crash.

use super::{in_netns, this_netns, NetError, Result};
use serde_json::{json, Value};
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Our tables are `ferry` or `ferry_*` in the inet family.
pub const TABLE_PREFIX: &str = "ferry";
const FAMILY: &str = "inet";

/// Whether `name` is one of our tables.
fn ours(name: &str) -> bool {
    name == TABLE_PREFIX
        || name
            .strip_prefix(TABLE_PREFIX)
            .is_some_and(|rest| rest.starts_with('_'))
}

/// Run `nft ARGS` with `input` on stdin in this thread's network namespace;
/// its stdout.
fn nft(args: &[&str], input: Option<&Value>, what: &str) -> Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NetError::NftMissing,
            _ => NetError::Nft {
                what: what.to_string(),
                detail: format!("run nft: {e}"),
            },
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // An error here shows as nft's failure below.
        let _ = stdin.write_all(input.to_string().as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError::Nft {
        what: what.to_string(),
        detail: format!("wait for nft: {e}"),
    })?;
    if !out.status.success() {
        return Err(NetError::Nft {
            what: what.to_string(),
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `nftables` array of `nft -j list ...` output.
fn listing(out: &str, what: &str) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(out).map_err(|e| NetError::Nft {
        what: what.to_string(),
        detail: format!("unreadable JSON from nft: {e}"),
    })?;
    Ok(v.get("nftables")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

/// The match of one address, as source or destination.
fn addr_match(addr: IpAddr, field: &str) -> Value {
    let proto = if addr.is_ipv4() { "ip" } else { "ip6" };
    json!({"match": {"op": "==",
        "left": {"payload": {"protocol": proto, "field": field}},
        "right": addr.to_string()}})
}

fn port_match(ports: &[u16], field: &str) -> Option<Value> {
    let right = match ports {
        [] => return None,
        [p] => json!(p),
        ps => json!({"set": ps}),
    };
    Some(json!({"match": {"op": "==",
        "left": {"payload": {"protocol": "tcp", "field": field}},
        "right": right}}))
}

/// The nft commands that make table `table` dropping TCP to and from
/// `addrs` (on `ports`, or every port when empty).
fn ruleset(table: &str, addrs: &[IpAddr], ports: &[u16]) -> Value {
    let mut cmds = vec![json!({"create": {"table": {"family": FAMILY, "name": table}}})];
    for (chain, hook) in [("inbound", "prerouting"), ("outbound", "output")] {
        cmds.push(json!({"add": {"chain": {"family": FAMILY, "table": table,
            "name": chain, "type": "filter", "hook": hook, "prio": -300,
            "policy": "accept"}}}));
    }
    for &addr in addrs {
        for (chain, afield, pfield) in [
            ("inbound", "daddr", "dport"),
            ("outbound", "saddr", "sport"),
        ] {
            let mut expr = vec![
                json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}),
                addr_match(addr, afield),
            ];
            expr.extend(port_match(ports, pfield));
            expr.push(json!({"counter": null}));
            expr.push(json!({"drop": null}));
            cmds.push(json!({"add": {"rule": {"family": FAMILY, "table": table,
                "chain": chain, "expr": expr}}}));
        }
    }
    json!({ "nftables": cmds })
}

/// A table of ours dropping the service's TCP; deleted on drop.
#[derive(Debug)]
pub struct Block {
    table: String,
    netns: File,
    armed: bool,
}

/// Drop TCP to and from `addrs` (on `ports`; every port when empty) in this
/// thread's network namespace, in a table named after `tag` (letters,
/// digits, '_'; unique among the migrations running on this host).
pub fn install(tag: &str, addrs: &[IpAddr], ports: &[u16]) -> Result<Block> {
    let table = format!("{TABLE_PREFIX}_{tag}");
    if tag.is_empty()
        || tag.len() > 64
        || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(NetError::Nft {
            what: format!("make table {FAMILY} {table}"),
            detail: "the tag must be 1 to 64 letters, digits or '_'".into(),
        });
    }
    if addrs.is_empty() {
        return Err(NetError::Nft {
            what: format!("make table {FAMILY} {table}"),
            detail: "no address to block".into(),
        });
    }
    let netns = this_netns()?;
    let what = format!("make table {FAMILY} {table}");
    nft(&["-j", "-f", "-"], Some(&ruleset(&table, addrs, ports)), &what).map_err(|e| match e {
        NetError::Nft { what, detail } if detail.contains("File exists") => NetError::Nft {
            what,
            detail: format!(
                "the table already exists: another migration with this tag runs, or one that crashed left it (remove it with `nft delete table {FAMILY} {table}`)"
            ),
        },
        e => e,
    })?;
    tracing::info!(
        "blocking TCP to and from {addrs:?} (ports {ports:?}) in table {FAMILY} {table}"
    );
    Ok(Block {
        table,
        netns,
        armed: true,
    })
}

impl Block {
    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Packets the inbound rules dropped so far.
    pub fn dropped(&self) -> Result<u64> {
        let what = format!("list table {FAMILY} {}", self.table);
        let out = in_netns(&self.netns, || {
            nft(&["-j", "list", "table", FAMILY, &self.table], None, &what)
        })?;
        let n = listing(&out, &what)?
            .iter()
            .filter_map(|v| v.get("rule"))
            .filter(|r| r.get("chain").and_then(Value::as_str) == Some("inbound"))
            .filter_map(|r| r.get("expr")?.as_array().cloned())
            .flatten()
            .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
            .sum();
        Ok(n)
    }

    /// Delete the table now.
    pub fn remove(mut self) -> Result<()> {
        self.armed = false;
        self.delete()
    }

    fn delete(&self) -> Result<()> {
        let cmd =
            json!({"nftables": [{"delete": {"table": {"family": FAMILY, "name": self.table}}}]});
        let what = format!("delete table {FAMILY} {}", self.table);
        in_netns(&self.netns, || nft(&["-j", "-f", "-"], Some(&cmd), &what))?;
        tracing::info!("unblocked: deleted table {FAMILY} {}", self.table);
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.delete() {
                tracing::error!("{e}");
            }
        }
    }
}

/// The names of our tables in this thread's network namespace.
pub fn tables() -> Result<Vec<String>> {
    let what = "list tables";
    let out = nft(&["-j", "list", "tables"], None, what)?;
    Ok(listing(&out, what)?
        .iter()
        .filter_map(|v| v.get("table"))
        .filter(|t| t.get("family").and_then(Value::as_str) == Some(FAMILY))
        .filter_map(|t| t.get("name")?.as_str())
        .filter(|n| ours(n))
        .map(str::to_string)
        .collect())
}

/// Delete every table of ours in this thread's network namespace (left by
/// an agent that died mid-migration); the names deleted. Only for when no
/// migration runs on this host.
pub fn cleanup() -> Result<Vec<String>> {
    let stale = tables()?;
    if stale.is_empty() {
        return Ok(stale);
    }
    let cmds: Vec<Value> = stale
        .iter()
        .map(|t| json!({"delete": {"table": {"family": FAMILY, "name": t}}}))
        .collect();
    nft(
        &["-j", "-f", "-"],
        Some(&json!({ "nftables": cmds })),
        "delete stale tables",
    )?;
    tracing::warn!("deleted stale tables of an earlier migration: {stale:?}");
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_tables_are_told_apart() {
        assert!(ours("ferry"));
        assert!(ours("ferry_1234"));
        assert!(!ours("ferryboat"));
        assert!(!ours("filter"));
    }

    #[test]
    fn the_ruleset_matches_address_and_ports_both_ways() {
        let a: IpAddr = "198.18.0.100".parse().unwrap();
        let a6: IpAddr = "2001:2:0:1::100".parse().unwrap();
        let v = ruleset("ferry_t", &[a, a6], &[80, 443]);
        let cmds = v["nftables"].as_array().unwrap();
        // Table, two chains, two rules per address.
        assert_eq!(cmds.len(), 1 + 2 + 4);
        assert_eq!(cmds[0]["create"]["table"]["name"], "ferry_t");
        let rules: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("rule")).collect();
        let text = serde_json::to_string(&rules).unwrap();
        for needle in [
            "\"daddr\"",
            "\"saddr\"",
            "\"dport\"",
            "\"sport\"",
            "\"ip6\"",
            "443",
        ] {
            assert!(text.contains(needle), "{needle} missing: {text}");
        }
        // One port is a value, none is no port match at all.
        let one = ruleset("ferry_t", &[a], &[80]).to_string();
        assert!(one.contains("\"right\":80"), "{one}");
        let all = ruleset("ferry_t", &[a], &[]).to_string();
        assert!(!all.contains("dport"), "{all}");
    }
}
