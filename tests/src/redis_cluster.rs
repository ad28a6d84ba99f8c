//! A Redis Cluster of real `redis-server` processes (no replicas), as ElastiCache runs one with
//! cluster mode enabled, and the faults a cluster has: a slot resharded to another node (what
//! `MOVED`, `ASK` and `TRYAGAIN` answer during and after) and a node down (`CLUSTERDOWN` from the
//! others once they mark it failed).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::RedisServer;

/// How long a node may be silent before the others mark it failed: short, so a test sees
/// `CLUSTERDOWN` within a second or two.
const NODE_TIMEOUT_MS: &str = "1000";

/// Nodes sharing the 16384 slots evenly, killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` nodes, gives each an even share of the slots, and waits until every node
    /// says the cluster is `ok`.
    pub fn start(n: usize) -> Result<Self> {
        let nodes = (0..n)
            .map(|_| {
                RedisServer::start_with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    NODE_TIMEOUT_MS,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let cluster = Self { nodes };
        for (i, node) in cluster.nodes.iter().enumerate() {
            let (first, last) = (i * 16384 / n, (i + 1) * 16384 / n - 1);
            cmd(
                node,
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &first.to_string(),
                    &last.to_string(),
                ],
            )?;
        }
        let port = cluster.nodes[0].port().to_string();
        for node in &cluster.nodes[1..] {
            cmd(node, &["CLUSTER", "MEET", "127.0.0.1", &port])?;
        }
        cluster.wait_until(true, Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// The URL of node `i` (a client finds the others from any one).
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The slot of `key` (its hash tag's).
    pub fn slot(&self, key: &str) -> Result<u16> {
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.nodes[0].conn())?;
        Ok(u16::try_from(slot)?)
    }

    /// The node that serves `slot`, as node 0 (or the first node up) sees it.
    pub fn owner(&self, slot: u16) -> Result<usize> {
        for node in &self.nodes {
            if node.pid().is_none() {
                continue;
            }
            let id = owner_id(node, slot)?;
            return self.index_of(&id);
        }
        bail!("no node is up")
    }

    /// Moves `slot` to node `to` as `redis-cli --cluster reshard` does: marked importing and
    /// migrating, its keys moved one `MIGRATE` at a time with `pause` between them (clients
    /// meanwhile get `ASK` or `TRYAGAIN`), then given to `to` on every node (`MOVED` after).
    /// Returns how many keys moved.
    pub fn move_slot(&self, slot: u16, to: usize, pause: Duration) -> Result<usize> {
        let from = self.owner(slot)?;
        if from == to {
            bail!("slot {slot} is on node {to} already");
        }
        let (src, dst) = (&self.nodes[from], &self.nodes[to]);
        let (src_id, dst_id) = (my_id(src)?, my_id(dst)?);
        let slot_arg = slot.to_string();
        cmd(
            dst,
            &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &src_id],
        )?;
        cmd(
            src,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &dst_id],
        )?;
        let dst_port = dst.port().to_string();
        let mut moved = 0;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1)
                .query(&mut src.conn())?;
            let Some(key) = keys.first() else { break };
            cmd(src, &["MIGRATE", "127.0.0.1", &dst_port, key, "0", "5000"])?;
            moved += 1;
            std::thread::sleep(pause);
        }
        for node in [dst, src] {
            cmd(node, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &dst_id])?;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if i != from && i != to && node.pid().is_some() {
                cmd(node, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &dst_id])?;
            }
        }
        Ok(moved)
    }

    /// Kills node `i`, as a crash would, and waits until the nodes left mark the cluster failed
    /// (they then answer `CLUSTERDOWN`).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill();
        self.wait_until(false, Duration::from_secs(20))
    }

    /// Starts node `i` again on its port, with its `nodes.conf`, and waits until the cluster is
    /// `ok` again.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart()?;
        self.wait_until(true, Duration::from_secs(20))
    }

    /// Keys node `i` holds.
    pub fn keys_on(&self, i: usize) -> Result<u64> {
        Ok(redis::cmd("DBSIZE").query(&mut self.nodes[i].conn())?)
    }

    /// Error replies the running nodes sent since they started, by kind (`MOVED`, `ASK`,
    /// `TRYAGAIN`, `CLUSTERDOWN`…), from `INFO errorstats`: proof a fault reached the client.
    pub fn errors(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut errors = std::collections::BTreeMap::new();
        for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
            let info: String = redis::cmd("INFO")
                .arg("errorstats")
                .query(&mut node.conn())?;
            // errorstat_MOVED:count=3
            for line in info.lines() {
                let Some((kind, rest)) = line
                    .strip_prefix("errorstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let count = rest
                    .strip_prefix("count=")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                *errors.entry(kind.to_owned()).or_default() += count;
            }
        }
        Ok(errors)
    }

    /// Waits until every running node reports `cluster_state:ok` (knowing all nodes), or every
    /// running one reports `fail`.
    fn wait_until(&self, ok: bool, within: Duration) -> Result<()> {
        let want = if ok { "ok" } else { "fail" };
        let deadline = Instant::now() + within;
        loop {
            let states: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.pid().is_some())
                .map(|n| {
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query(&mut n.conn())
                        .unwrap_or_default();
                    let field = |name: &str| {
                        info.lines()
                            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                            .unwrap_or("?")
                            .trim()
                            .to_owned()
                    };
                    format!(
                        "{}/{}",
                        field("cluster_state"),
                        field("cluster_known_nodes")
                    )
                })
                .collect();
            let known = self.nodes.len().to_string();
            if states
                .iter()
                .all(|s| s.split_once('/') == Some((want, known.as_str())))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not become {want} within {within:?}: {states:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn index_of(&self, id: &str) -> Result<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.pid().is_some() && my_id(node)? == id {
                return Ok(i);
            }
        }
        bail!("no running node has id {id}")
    }
}

fn cmd(node: &RedisServer, args: &[&str]) -> Result<()> {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query::<redis::Value>(&mut node.conn())
        .with_context(|| format!("{} on port {}", args.join(" "), node.port()))?;
    Ok(())
}

fn my_id(node: &RedisServer) -> Result<String> {
    Ok(redis::cmd("CLUSTER").arg("MYID").query(&mut node.conn())?)
}

/// The id of the node serving `slot`, from `CLUSTER NODES` (`id addr flags master ping pong
/// epoch link slot-ranges…`).
fn owner_id(node: &RedisServer, slot: u16) -> Result<String> {
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut node.conn())?;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let serves = fields.iter().skip(8).any(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            match (first.parse::<u16>(), last.parse::<u16>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                _ => false,
            }
        });
        if serves {
            return Ok(fields[0].to_owned());
        }
    }
    bail!("no node serves slot {slot}")
}
