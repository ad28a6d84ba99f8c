//! Where a build goes. Pure: a function of the cluster snapshot, cluster health, the build's
//! facts and a random source, so every rule is unit-tested without I/O.
//!
//! Architecture invariant: an `external` cluster is only ever chosen for an organization it
//! lists, whether named or reached by fallback.

use rand::Rng;
use sd_protocol::{Cluster, ManagedBy};

/// What routing needs to know about a build.
#[derive(Debug, Clone, Copy)]
pub struct BuildFacts<'a> {
    pub scm_context: &'a str,
    pub organization: &'a str,
    /// The cluster named by annotation or `buildClusterName`.
    pub requested: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Cluster(String),
    /// No eligible cluster now; the build waits and is routed when one becomes eligible.
    Hold(String),
}

/// The build must be refused: no cluster will ever be chosen without a registry change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "build cluster {cluster} does not accept builds of SCM organization {organization}; ask its maintainers to add {organization} to its scmOrganizations, or remove the screwdriver.cd/buildCluster annotation"
    )]
    OrganizationRefused {
        cluster: String,
        organization: String,
    },
    #[error(
        "no build cluster named {cluster} exists for scmContext {scm_context}; check the screwdriver.cd/buildCluster annotation (GET /v4/buildclusters lists the clusters)"
    )]
    UnknownCluster {
        cluster: String,
        scm_context: String,
    },
}

pub fn route(
    clusters: &[Cluster],
    healthy: impl Fn(&str) -> bool,
    build: &BuildFacts<'_>,
    rng: &mut impl Rng,
) -> Result<Decision, RouteError> {
    let eligible = |c: &Cluster| {
        c.fields.is_active
            && healthy(&c.fields.name)
            && c.fields.scm_context == build.scm_context
            && c.fields.allows_organization(build.organization)
    };
    let Some(name) = build.requested else {
        let candidates: Vec<&Cluster> = clusters
            .iter()
            .filter(|c| c.fields.managed_by == ManagedBy::Screwdriver && eligible(c))
            .collect();
        return Ok(match pick(&candidates, rng) {
            Some(c) => Decision::Cluster(c.fields.name.clone()),
            None => Decision::Hold(format!(
                "no active, healthy Screwdriver-managed cluster with a weightage above 0 for scmContext {}",
                build.scm_context
            )),
        });
    };
    let named = clusters
        .iter()
        .find(|c| c.fields.name == name && c.fields.scm_context == build.scm_context)
        .ok_or_else(|| RouteError::UnknownCluster {
            cluster: name.to_owned(),
            scm_context: build.scm_context.to_owned(),
        })?;
    if !named.fields.allows_organization(build.organization) {
        return Err(RouteError::OrganizationRefused {
            cluster: name.to_owned(),
            organization: build.organization.to_owned(),
        });
    }
    if eligible(named) {
        return Ok(Decision::Cluster(name.to_owned()));
    }
    // Stand-ins: same group (an iOS farm's builds never land on Linux), same kind of manager.
    let candidates: Vec<&Cluster> = clusters
        .iter()
        .filter(|c| {
            c.fields.name != name
                && c.fields.group == named.fields.group
                && c.fields.managed_by == named.fields.managed_by
                && eligible(c)
        })
        .collect();
    Ok(match pick(&candidates, rng) {
        Some(c) => Decision::Cluster(c.fields.name.clone()),
        None => Decision::Hold(format!(
            "build cluster {name} is {} and no other active {} cluster of group {} can take the build",
            if named.fields.is_active {
                "unhealthy"
            } else {
                "inactive"
            },
            named.fields.managed_by.as_str(),
            named.fields.group,
        )),
    })
}

/// Weighted random choice; weightage 0 is never picked.
fn pick<'a>(candidates: &[&'a Cluster], rng: &mut impl Rng) -> Option<&'a Cluster> {
    let total: u32 = candidates
        .iter()
        .map(|c| u32::from(c.fields.weightage))
        .sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.random_range(0..total);
    for c in candidates {
        let w = u32::from(c.fields.weightage);
        if ticket < w {
            return Some(c);
        }
        ticket -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use sd_protocol::NewCluster;
    use std::collections::HashMap;

    const GH: &str = "github:github.com";

    fn cluster(name: &str, managed_by: ManagedBy, orgs: &[&str], weightage: u8) -> Cluster {
        Cluster {
            id: 0,
            fields: NewCluster {
                name: name.into(),
                scm_context: GH.into(),
                scm_organizations: orgs.iter().map(|s| (*s).into()).collect(),
                is_active: true,
                auth_key: "K".into(),
                sign_option: None,
                managed_by,
                managed_by_email: "a@b.c".into(),
                weightage,
                group: "default".into(),
                description: None,
            },
        }
    }

    fn facts<'a>(org: &'a str, requested: Option<&'a str>) -> BuildFacts<'a> {
        BuildFacts {
            scm_context: GH,
            organization: org,
            requested,
        }
    }

    fn fixture() -> Vec<Cluster> {
        let mut ios = cluster("iOS", ManagedBy::External, &["mobile"], 100);
        ios.fields.group = "macos".into();
        let mut ios2 = cluster("iOS-backup", ManagedBy::External, &["mobile"], 100);
        ios2.fields.group = "macos".into();
        vec![
            cluster("sd1", ManagedBy::Screwdriver, &[], 50),
            cluster("sd2", ManagedBy::Screwdriver, &[], 50),
            cluster("named-only", ManagedBy::Screwdriver, &[], 0),
            ios,
            ios2,
        ]
    }

    fn go(clusters: &[Cluster], f: BuildFacts<'_>) -> Result<Decision, RouteError> {
        route(clusters, |_| true, &f, &mut StdRng::seed_from_u64(7))
    }

    #[test]
    fn unnamed_goes_to_a_managed_cluster_never_external_or_weight_zero() {
        let clusters = fixture();
        for seed in 0..200 {
            let d = route(
                &clusters,
                |_| true,
                &facts("mobile", None),
                &mut StdRng::seed_from_u64(seed),
            )
            .unwrap();
            let Decision::Cluster(name) = d else {
                panic!("held")
            };
            assert!(name == "sd1" || name == "sd2", "{name}");
        }
    }

    #[test]
    fn named_cluster_is_used_and_weight_zero_is_reachable_by_name() {
        let clusters = fixture();
        assert_eq!(
            go(&clusters, facts("web", Some("named-only"))).unwrap(),
            Decision::Cluster("named-only".into())
        );
        assert_eq!(
            go(&clusters, facts("mobile", Some("iOS"))).unwrap(),
            Decision::Cluster("iOS".into())
        );
    }

    #[test]
    fn external_cluster_refuses_other_organizations_with_a_clear_error() {
        let err = go(&fixture(), facts("web", Some("iOS"))).unwrap_err();
        assert_eq!(
            err,
            RouteError::OrganizationRefused {
                cluster: "iOS".into(),
                organization: "web".into()
            }
        );
        assert!(err.to_string().contains("iOS") && err.to_string().contains("web"));
    }

    #[test]
    fn unknown_or_other_scm_context_is_refused() {
        let clusters = fixture();
        assert!(matches!(
            go(&clusters, facts("x", Some("nope"))),
            Err(RouteError::UnknownCluster { .. })
        ));
        let f = BuildFacts {
            scm_context: "gitlab:gitlab.com",
            organization: "mobile",
            requested: Some("iOS"),
        };
        assert!(matches!(
            go(&clusters, f),
            Err(RouteError::UnknownCluster { .. })
        ));
    }

    #[test]
    fn inactive_named_falls_back_within_group_and_kind() {
        let mut clusters = fixture();
        clusters[3].fields.is_active = false; // iOS
        assert_eq!(
            go(&clusters, facts("mobile", Some("iOS"))).unwrap(),
            Decision::Cluster("iOS-backup".into())
        );
        // Managed named cluster down: another managed one of its group, weight > 0.
        clusters[0].fields.is_active = false; // sd1
        assert_eq!(
            go(&clusters, facts("web", Some("sd1"))).unwrap(),
            Decision::Cluster("sd2".into())
        );
    }

    #[test]
    fn fallback_still_checks_organizations() {
        let mut clusters = fixture();
        clusters[3].fields.is_active = false; // iOS
        clusters[4].fields.scm_organizations = vec!["other".into()]; // backup no longer lists mobile
        assert!(matches!(
            go(&clusters, facts("mobile", Some("iOS"))).unwrap(),
            Decision::Hold(_)
        ));
    }

    #[test]
    fn external_builds_never_fall_back_to_managed_clusters() {
        let mut clusters = fixture();
        clusters[3].fields.is_active = false;
        clusters[4].fields.is_active = false;
        let d = go(&clusters, facts("mobile", Some("iOS"))).unwrap();
        let Decision::Hold(reason) = d else {
            panic!("{d:?}")
        };
        assert!(
            reason.contains("inactive") && reason.contains("macos"),
            "{reason}"
        );
    }

    #[test]
    fn unhealthy_named_cluster_falls_back() {
        let clusters = fixture();
        let d = route(
            &clusters,
            |n| n != "iOS",
            &facts("mobile", Some("iOS")),
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        assert_eq!(d, Decision::Cluster("iOS-backup".into()));
    }

    #[test]
    fn nothing_eligible_holds() {
        let mut clusters = fixture();
        clusters[0].fields.is_active = false;
        clusters[1].fields.is_active = false;
        let d = go(&clusters, facts("web", None)).unwrap();
        assert!(
            matches!(d, Decision::Hold(ref r) if r.contains(GH)),
            "{d:?}"
        );
        assert!(matches!(
            go(&[], facts("web", None)).unwrap(),
            Decision::Hold(_)
        ));
    }

    /// 60,000 draws over weights 10/30/60: each share within 5 standard deviations of its weight.
    #[test]
    fn weights_set_the_shares() {
        let clusters = vec![
            cluster("a", ManagedBy::Screwdriver, &[], 10),
            cluster("b", ManagedBy::Screwdriver, &[], 30),
            cluster("c", ManagedBy::Screwdriver, &[], 60),
            cluster("zero", ManagedBy::Screwdriver, &[], 0),
        ];
        let n = 60_000u32;
        let mut rng = StdRng::seed_from_u64(42);
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..n {
            let Decision::Cluster(name) =
                route(&clusters, |_| true, &facts("o", None), &mut rng).unwrap()
            else {
                panic!("held")
            };
            *counts.entry(name).or_default() += 1;
        }
        assert_eq!(counts.get("zero"), None);
        for (name, weight) in [("a", 0.1), ("b", 0.3), ("c", 0.6)] {
            let expected = f64::from(n) * weight;
            let sd = (f64::from(n) * weight * (1.0 - weight)).sqrt();
            let got = f64::from(counts[name]);
            assert!(
                (got - expected).abs() < 5.0 * sd,
                "{name}: {got} vs {expected} ± {sd}"
            );
        }
    }
}
