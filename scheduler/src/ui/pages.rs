//! The status pages as HTML, from what the API answers: pure functions of their data, so what a
//! page shows is tested without a server. Maud escapes every value put in a page.

use maud::{DOCTYPE, Markup, html};

use crate::builds::{BuildRow, Step};
use crate::status::{AllStatus, ClusterStatus, DeadLetters, Health, Minute, human};

/// The page frame: title, the stylesheet, a header linking home.
fn frame(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sd-scheduler" }
                link rel="stylesheet" href="/ui/style.css";
            }
            body {
                header {
                    a.home href="/ui/" { "sd-scheduler" }
                    span.where { (title) }
                }
                main { (body) }
            }
        }
    }
}

fn health_class(health: Health) -> &'static str {
    match health {
        Health::Healthy => "healthy",
        Health::Silent => "silent",
        Health::NeverPolled => "never",
        Health::Paused => "paused",
    }
}

fn health_label(health: Health) -> &'static str {
    match health {
        Health::Healthy => "healthy",
        Health::Silent => "silent",
        Health::NeverPolled => "never polled",
        Health::Paused => "paused",
    }
}

fn seconds(s: u64) -> String {
    human(std::time::Duration::from_secs(s))
}

/// `/ui/`: one row per cluster.
pub fn clusters(all: &AllStatus) -> Markup {
    frame(
        "Build clusters",
        html! {
            @if all.clusters.is_empty() {
                p.empty { "No cluster is registered." }
            } @else {
                table id="clusters" {
                    thead { tr {
                        th { "Cluster" } th { "Health" } th { "Last poll" } th { "Agents" }
                        th.n { "In flight" } th.n { "Ready" } th.n { "Leased" } th.n { "Blocked" }
                        th.n { "Deferred" } th.n { "Dead" } th { "Oldest waiting" } th.n { "Last hour" }
                    } }
                    tbody {
                        @for c in &all.clusters {
                            @let (held, capacity) = c.agents.iter().fold((0, 0), |(h, cap), a| {
                                (h + a.in_flight.unwrap_or(0), cap + a.capacity.unwrap_or(0))
                            });
                            @let unknown = c.agents.iter().filter(|a| a.version.is_none()).count();
                            tr data-cluster=(c.name) {
                                td { a href={ "/ui/clusters/" (c.name) } { (c.name) } }
                                td { span class={ "health " (health_class(c.health)) } title=(c.reason) { (health_label(c.health)) } }
                                td { @match c.silent_for_seconds { Some(s) => { (seconds(s)) " ago" }, None => "never" } }
                                td.agents { (c.agents.len()) @if unknown > 0 { " (" (unknown) " unknown)" } }
                                td.n.in-flight { (held) "/" (capacity) }
                                td.n.ready { (c.queue.ready) }
                                td.n.leased { (c.queue.leased) }
                                td.n.blocked { (c.queue.blocked) }
                                td.n.deferred { (c.queue.deferred) }
                                td.n.dead { (c.queue.dead) }
                                td { @match &c.oldest_waiting {
                                    Some(o) => { a href={ "/ui/builds/" (o.build_id) } { (o.build_id) } " · " (seconds(o.age_seconds)) },
                                    None => "–",
                                } }
                                td.n.dispatched { (c.dispatched_last_hour) }
                            }
                        }
                    }
                }
                @let troubled: Vec<_> = all.clusters.iter().filter(|c| c.health != Health::Healthy).collect();
                @if !troubled.is_empty() {
                    ul.reasons {
                        @for c in troubled {
                            li { strong { (c.name) } ": " (c.reason) }
                        }
                    }
                }
            }
            p.at { "As of " (all.clusters.first().map(|c| c.at.as_str()).unwrap_or("now")) " (Redis's clock). The page does not refresh itself." }
        },
    )
}

/// `/ui/clusters/{name}`: the figures, the agents, and the builds waiting, blocked or dead.
pub fn cluster(status: &ClusterStatus, waiting: &[BuildRow], dead: &DeadLetters) -> Markup {
    frame(
        &status.name,
        html! {
            p { span class={ "health " (health_class(status.health)) } { (health_label(status.health)) } " — " (status.reason) }
            (chart(status))
            @if let Some(minutes) = &status.last_hour { (hour_chart(minutes)) }
            h2 { "Agents" }
            @if status.agents.is_empty() {
                p.empty { "No agent polled in the last hour." }
            } @else {
                table id="agents" {
                    thead { tr { th { "Instance" } th { "Host" } th { "Version" } th { "Executor" } th.n { "In flight" } th { "Last seen" } } }
                    tbody { @for a in &status.agents { tr {
                        td { (a.instance.as_deref().unwrap_or("unknown")) }
                        td { (a.host.as_deref().unwrap_or("–")) }
                        td { (a.version.as_deref().unwrap_or("unknown")) }
                        td { (a.executor.as_deref().unwrap_or("unknown")) }
                        td.n { @match (a.in_flight, a.capacity) { (Some(h), Some(c)) => { (h) "/" (c) }, _ => "unknown" } }
                        td { (seconds(a.seconds_since)) " ago" }
                    } } }
                }
            }
            h2 { "Waiting" }
            @if waiting.is_empty() {
                p.empty { "No build waits." }
            } @else {
                table id="waiting" {
                    thead { tr { th { "Build" } th { "Job" } th { "Waiting since" } th { "Why" } } }
                    tbody { @for b in waiting { tr {
                        td { a href={ "/ui/builds/" (b.build_id) } { (b.build_id) } }
                        td { (b.job_id) }
                        td { (timestamp(b.created_at)) }
                        td { (b.reason.as_deref().unwrap_or("ready for an agent")) }
                    } } }
                }
            }
            h2 { "Dead letters" }
            @if dead.dead_letters.is_empty() {
                p.empty { "None." }
            } @else {
                table id="dead" {
                    thead { tr { th { "Id" } th { "Given up" } th { "Held until" } th { "Pipeline" } th { "Why" } } }
                    tbody { @for d in &dead.dead_letters { tr {
                        td { @match d.build_id { Some(id) => { a href={ "/ui/builds/" (id) } { (d.id) } }, None => (d.id) } }
                        td { (d.dead_since) }
                        td { (d.held_until) }
                        td { (d.pipeline.as_deref().unwrap_or("–")) }
                        td { "delivered too many times without an acknowledgement" }
                    } } }
                }
                @if dead.total > dead.dead_letters.len() as u64 { p { "The latest " (dead.dead_letters.len()) " of " (dead.total) "." } }
                p { "Requeue or fail them with " code { "sd-scheduler dead-letters " (status.name) " requeue|fail ID" } "; one still held at its time is failed (a build) or dropped (a stop)." }
            }
        },
    )
}

/// A bar per figure of the queue now, and the builds dispatched in the last hour: inline SVG,
/// no script.
fn chart(status: &ClusterStatus) -> Markup {
    let q = &status.queue;
    let bars = [
        ("ready", q.ready),
        ("leased", q.leased),
        ("blocked", q.blocked),
        ("deferred", q.deferred),
        ("dead", q.dead),
        ("dispatched, last hour", status.dispatched_last_hour),
    ];
    let top = bars.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let width = 360u64;
    html! {
        svg.chart role="img" aria-label="queue now and dispatches in the last hour" width=(width + 220) height=(bars.len() * 24) {
            @for (i, (label, n)) in bars.iter().enumerate() {
                @let y = i * 24;
                text x="0" y=(y + 16) { (label) }
                rect class={ "bar " (label.split(',').next().unwrap_or("")) } x="150" y=(y + 4) height="16" width=(1 + n * width / top) {}
                text x=(156 + n * width / top) y=(y + 16) { (n) }
            }
        }
    }
}

/// The last hour minute by minute: a bar per minute for the builds dispatched, a line for the
/// builds waiting (broken where no agent polled). Each on its own scale, both labelled with
/// their highest value.
fn hour_chart(minutes: &[Minute]) -> Markup {
    const W: u64 = 6;
    const H: u64 = 80;
    let top_dispatched = minutes
        .iter()
        .map(|m| m.dispatched)
        .max()
        .unwrap_or(0)
        .max(1);
    let top_waiting = minutes
        .iter()
        .filter_map(|m| m.waiting)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for (i, m) in minutes.iter().enumerate() {
        match m.waiting {
            Some(n) => {
                let x = i as u64 * W + W / 2;
                let y = H - n * H / top_waiting;
                current.push_str(&format!("{x},{y} "));
            }
            None if !current.is_empty() => lines.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    html! {
        figure.hour {
            svg.chart role="img" aria-label="the last hour: builds dispatched and waiting per minute" width=(minutes.len() as u64 * W) height=(H) {
                @for (i, m) in minutes.iter().enumerate() {
                    @if m.dispatched > 0 {
                        rect.bar.dispatched x=(i as u64 * W) y=(H - m.dispatched * H / top_dispatched) width=(W - 1) height=(m.dispatched * H / top_dispatched) {}
                    }
                }
                @for points in &lines {
                    polyline.waiting points=(points.trim_end()) {}
                }
            }
            figcaption {
                "The last hour, a minute a step: "
                span.dispatched { "dispatched" } " (bars, up to " (top_dispatched) "), "
                span.waiting { "waiting" } " (line, up to " (top_waiting) "; broken where no agent polled)."
            }
        }
    }
}

/// `/ui/builds/{id}`: the build and its steps.
pub fn build(row: &BuildRow, steps: &[Step]) -> Markup {
    frame(
        &format!("Build {}", row.build_id),
        html! {
            dl.build {
                dt { "State" } dd id="state" { (row.state.as_str()) }
                dt { "Cluster" } dd { @match &row.cluster { Some(c) => { a href={ "/ui/clusters/" (c) } { (c) } }, None => "none yet" } }
                dt { "Why" } dd { (row.reason.as_deref().unwrap_or("–")) }
                dt { "Job" } dd { (row.job_id) }
                dt { "Pipeline" } dd { (row.pipeline_id) }
            }
            h2 { "History" }
            ol id="history" {
                @for s in steps {
                    li {
                        time { (timestamp(s.at)) }
                        " "
                        strong.state { (s.state.as_str()) }
                        @if let Some(c) = &s.cluster { " on " (c) }
                        @if let Some(r) = &s.reason { span.reason { " — " (r) } }
                    }
                }
            }
        },
    )
}

/// A page that only says something (not found, unavailable).
pub fn message(text: &str) -> Markup {
    frame(
        "sd-scheduler",
        html! { p.error { (text) } p { a href="/ui/" { "All clusters" } } },
    )
}

/// `/ui/login`: asks once for a token; `error` says why the last one was refused.
pub fn login(next: &str, error: Option<&str>) -> Markup {
    frame(
        "Sign in",
        html! {
            p { "The status pages need a Screwdriver API token with scope " code { "user" } " or " code { "admin" } ". It is kept in a cookie for this site only." }
            @if let Some(e) = error { p.error { (e) } }
            form method="post" action="/ui/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input id="token" type="password" name="token" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

fn timestamp(ms: i64) -> String {
    let since = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + since).to_string()
}

/// The stylesheet, compiled in.
pub const STYLE: &str = include_str!("style.css");

/// Nothing in a page needs script; this says so to the browser.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{AgentStatus, OldestWaiting, QueueDepths};

    fn status(name: &str) -> ClusterStatus {
        ClusterStatus {
            name: name.to_owned(),
            health: Health::Silent,
            reason: "silent for 3m <b>".into(),
            last_poll: None,
            silent_for_seconds: Some(180),
            agents: vec![AgentStatus {
                instance: None,
                host: None,
                version: None,
                executor: None,
                in_flight: None,
                capacity: None,
                last_seen: "2026-12-03T10:00:00Z".into(),
                seconds_since: 180,
            }],
            queue: QueueDepths {
                ready: 3,
                leased: 1,
                deferred: 0,
                blocked: 2,
                dead: 0,
                complete: true,
            },
            oldest_waiting: Some(OldestWaiting {
                build_id: "17".into(),
                age_seconds: 65,
            }),
            dispatched_last_hour: 9,
            at: "2026-12-03T10:03:00Z".into(),
            last_hour: Some(
                (0..60)
                    .map(|i| Minute {
                        minute: format!("2026-12-03T09:{i:02}:00Z"),
                        dispatched: i % 3,
                        waiting: (i % 10 != 0).then_some(i),
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn the_table_shows_each_figure_and_escapes_what_it_quotes() {
        let page = clusters(&AllStatus {
            clusters: vec![status("east")],
        })
        .into_string();
        assert!(page.contains(r#"<tr data-cluster="east">"#), "{page}");
        assert!(
            page.contains(
                r#"<span class="health silent" title="silent for 3m &lt;b&gt;">silent</span>"#
            ),
            "{page}"
        );
        assert!(
            page.contains(r#"<td class="agents">1 (1 unknown)</td>"#),
            "{page}"
        );
        assert!(page.contains(r#"<td class="n ready">3</td>"#), "{page}");
        assert!(
            page.contains(r#"<a href="/ui/builds/17">17</a> · 1m 5s"#),
            "{page}"
        );
        assert!(!page.contains("<b>"), "quoted text is escaped");
        assert!(!page.contains("<script"), "no script");
    }

    #[test]
    fn an_old_agent_is_shown_as_unknown() {
        let dead = DeadLetters {
            total: 0,
            dead_letters: vec![],
        };
        let page = cluster(&status("east"), &[], &dead).into_string();
        assert!(page.contains("<td>unknown</td>"), "{page}");
        assert!(page.contains("No build waits."), "{page}");
        // Six waiting lines: minutes 0, 10, 20… have no poll, so each break starts a new one.
        assert_eq!(
            page.matches(r#"<polyline class="waiting""#).count(),
            6,
            "{page}"
        );
        assert!(page.contains("dispatched</span> (bars, up to 2)"), "{page}");
    }
}
