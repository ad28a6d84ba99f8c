//! The measurements, each from intake to the pod's creation in the Kubernetes API: what a
//! pipeline's author waits for.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;

use super::stats::{Latency, Usage, usage};
use super::world::{CLUSTER, CommandStats, Incarnation, LOCAL_TAG, MASTER_TAG, World};

/// Longest any batch of builds may take to have its pods; past it they count as lost.
const LOST_AFTER: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Throughput {
    pub builds: u64,
    pub seconds: f64,
    pub builds_per_s: f64,
    /// What each build cost each process, on the cores they all share.
    pub cpu_ms_per_build: CpuPerBuild,
}

/// CPU milliseconds (user + system) per build over a phase, by process: what an end-to-end
/// rate on two shared cores is made of.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuPerBuild {
    pub scheduler: f64,
    pub agent: f64,
    /// The load generator and the fake Kubernetes API (this process).
    pub bench: f64,
    pub master_redis: f64,
    pub local_redis: f64,
}

impl CpuPerBuild {
    fn between(before: [f64; 5], after: [f64; 5], builds: u64) -> Self {
        let per = |i: usize| (after[i] - before[i]) * 1e3 / builds.max(1) as f64;
        Self {
            scheduler: per(0),
            agent: per(1),
            bench: per(2),
            master_redis: per(3),
            local_redis: per(4),
        }
    }
}

/// `n` builds submitted `concurrency` at a time: first intake request → last pod created.
/// The pods stay running (the caller ends them).
pub async fn throughput(
    world: &mut World,
    n: u64,
    concurrency: usize,
) -> Result<(Throughput, Vec<u64>)> {
    let ids: Vec<u64> = world.next_ids(n);
    let cpu_before = world.cpu_seconds()?;
    let t0 = Instant::now();
    world.submit_all(&ids, concurrency).await?;
    let last = world.wait_created(&ids, LOST_AFTER).await?;
    let seconds = last.duration_since(t0).as_secs_f64();
    let cpu_ms_per_build = CpuPerBuild::between(cpu_before, world.cpu_seconds()?, n);
    Ok((
        Throughput {
            builds: n,
            seconds,
            builds_per_s: n as f64 / seconds,
            cpu_ms_per_build,
        },
        ids,
    ))
}

/// Builds offered at a steady `rate` for `seconds` (open loop: a slow answer does not slow
/// the offer): intake request sent → pod created, per build.
pub async fn pickup(world: &mut World, rate: u32, seconds: u64) -> Result<Latency> {
    let n = u64::from(rate) * seconds;
    let ids: Vec<u64> = world.next_ids(n);
    let every = Duration::from_secs(1) / rate;
    let t0 = tokio::time::Instant::now();
    let mut sent = Vec::with_capacity(ids.len());
    {
        let world = &*world;
        let mut pending = FuturesUnordered::new();
        for (i, &id) in ids.iter().enumerate() {
            let due = t0 + every * u32::try_from(i)?;
            // Answers that came meanwhile are collected while waiting for the next slot.
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => break,
                    Some(r) = pending.next(), if !pending.is_empty() => { let () = r?; }
                }
            }
            sent.push((id, Instant::now()));
            pending.push(world.submit(id, &[]));
        }
        while let Some(r) = pending.next().await {
            r?;
        }
    }
    world.wait_created(&ids, LOST_AFTER).await?;
    let latencies = sent
        .iter()
        .map(|&(id, at)| {
            world
                .created_at(id)
                .map(|c| c.duration_since(at))
                .context("created")
        })
        .collect::<Result<Vec<_>>>()?;
    world.finish(&ids).await?;
    Ok(Latency::of(latencies))
}

/// Where the pickup time goes, from the agent's own histograms over the same builds (means):
/// the scheduler's intake to the agent's local queue (intake, long-poll, push), and the
/// local queue to the pod created (launcher and API).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PickupSplit {
    pub intake_to_local_ms: f64,
    pub local_to_created_ms: f64,
}

/// The agent's start-latency and queue-wait histograms: (sum, count) of each.
pub async fn launch_histograms(world: &World) -> Result<[f64; 4]> {
    Ok([
        world
            .agent_metric("sd_agent_start_latency_seconds_sum")
            .await?,
        world
            .agent_metric("sd_agent_start_latency_seconds_count")
            .await?,
        world
            .agent_metric("sd_agent_queue_wait_seconds_sum")
            .await?,
        world
            .agent_metric("sd_agent_queue_wait_seconds_count")
            .await?,
    ])
}

/// The split of the builds launched between two readings of [`launch_histograms`].
pub fn pickup_split(before: [f64; 4], after: [f64; 4]) -> PickupSplit {
    let mean = |sum: usize, count: usize| {
        let n = after[count] - before[count];
        if n > 0.0 {
            (after[sum] - before[sum]) / n * 1000.0
        } else {
            f64::NAN
        }
    };
    let whole = mean(0, 1);
    let local = mean(2, 3);
    PickupSplit {
        intake_to_local_ms: whole - local,
        local_to_created_ms: local,
    }
}

/// A build blocked by a running one: the blocker's pod succeeds → the blocked build's pod
/// created, `samples` times one after the other.
pub async fn blocked_release(world: &mut World, samples: usize) -> Result<Latency> {
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let ids: Vec<u64> = world.next_ids(2);
        let (blocker, blocked) = (ids[0], ids[1]);
        world.submit(blocker, &[]).await?;
        world.wait_created(&[blocker], LOST_AFTER).await?;
        world.submit(blocked, &[blocker]).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if world.created_at(blocked).is_some() {
            bail!("build {blocked} was launched while the build blocking it ran");
        }
        let t0 = Instant::now();
        world.kube.terminate(&blocker.to_string(), 0);
        let created = world.wait_created(&[blocked], LOST_AFTER).await?;
        latencies.push(created.duration_since(t0));
        world.finish(&[blocked]).await?;
    }
    Ok(Latency::of(latencies))
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Takeover {
    /// Builds submitted; those in the killed agent's hands were taken and not launched.
    pub builds: u64,
    pub in_hand_at_kill: u64,
    /// `kill -9` → the last of the builds' pods created (by the next agent).
    pub seconds: f64,
}

/// The agent is killed (SIGKILL) while holding builds it took and could not launch yet (the
/// API holds their creates, then times them out: nothing was stored); the next agent is
/// started at once. How long until every build has its pod.
pub async fn takeover(world: &mut World, next: Incarnation, n: u64) -> Result<Takeover> {
    let local = sd_queue::Queues::connect(&world.local.url(), LOCAL_TAG)?;
    let master = sd_queue::Queues::connect(&world.master.url(), MASTER_TAG)?;
    world.kube.hold_creates();
    let ids: Vec<u64> = world.next_ids(n);
    world.submit_all(&ids, 32).await?;
    // Every build delivered and acknowledged into the local queue, launches in hand held.
    let deadline = Instant::now() + Duration::from_secs(60);
    let in_hand = loop {
        let [ready, leased, ..] = master.depths(CLUSTER).await?;
        let [_, local_leased, ..] = local.depths(CLUSTER).await?;
        if ready + leased == 0
            && local_leased > 0
            && world.kube.held_creates() as u64 >= local_leased
        {
            break local_leased;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not take the builds in 60 s (master ready {ready} leased {leased}, local leased {local_leased})"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    world.agent.as_mut().context("no agent")?.kill9();
    let t0 = Instant::now();
    world.kube.release_creates(true);
    world.start_agent(next).await?;
    let last = world.wait_created(&ids, LOST_AFTER).await?;
    let seconds = last.duration_since(t0).as_secs_f64();
    world.finish(&ids).await?;
    Ok(Takeover {
        builds: n,
        in_hand_at_kill: in_hand,
        seconds,
    })
}

/// Resident memory and CPU of the scheduler and the agent over `window`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Footprint {
    pub scheduler: Usage,
    pub agent: Usage,
}

pub async fn footprint(world: &World, window: Duration) -> Result<Footprint> {
    let (scheduler, agent) = tokio::join!(
        usage(world.scheduler.pid(), window),
        usage(world.agent_pid()?, window)
    );
    Ok(Footprint {
        scheduler: scheduler?,
        agent: agent?,
    })
}

/// Redis's work per build, through the whole path (intake, delivery, local queue, launch,
/// the build's end), net of what the same Redis does idle over as long.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RedisWork {
    pub clusters: usize,
    pub queued_elsewhere: u64,
    pub builds: u64,
    /// Master Redis: commands and microseconds (in scripts) per build.
    pub master_commands: f64,
    pub master_usec: f64,
    pub master_script_usec: f64,
    /// The cluster's local Redis, likewise.
    pub local_commands: f64,
    pub local_usec: f64,
    /// Idle master commands per second (heartbeats, sweeps), already taken out of the above.
    pub master_idle_commands_per_s: f64,
}

pub async fn redis_work(
    world: &mut World,
    clusters: usize,
    queued_elsewhere: u64,
    n: u64,
    idle_window: Duration,
) -> Result<RedisWork> {
    let mut master = world.master.conn();
    let mut local = world.local.conn();
    let idle0 = (
        CommandStats::read(&mut master)?,
        CommandStats::read(&mut local)?,
    );
    tokio::time::sleep(idle_window).await;
    let idle1 = (
        CommandStats::read(&mut master)?,
        CommandStats::read(&mut local)?,
    );
    let idle_s = idle_window.as_secs_f64();
    let master_idle = idle1.0.since(&idle0.0);
    let local_idle = idle1.1.since(&idle0.1);

    let t0 = Instant::now();
    let (_, ids) = throughput(world, n, 32).await?;
    world.finish(&ids).await?;
    let busy_s = t0.elapsed().as_secs_f64();
    let m = CommandStats::read(&mut master)?.since(&idle1.0);
    let l = CommandStats::read(&mut local)?.since(&idle1.1);
    let net =
        |busy: u64, idle: u64| (busy as f64 - idle as f64 / idle_s * busy_s).max(0.0) / n as f64;
    Ok(RedisWork {
        clusters,
        queued_elsewhere,
        builds: n,
        master_commands: net(m.0, master_idle.0),
        master_usec: net(m.1, master_idle.1),
        master_script_usec: net(m.2, master_idle.2),
        local_commands: net(l.0, local_idle.0),
        local_usec: net(l.1, local_idle.1),
        master_idle_commands_per_s: master_idle.0 as f64 / idle_s,
    })
}
