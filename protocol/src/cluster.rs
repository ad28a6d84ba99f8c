//! The `buildClusters` record and the rules every write must pass.
//!
//! Inputs arrive as JSON objects; they are checked for unknown fields first (so a typo is never
//! silently dropped), then typed, then validated as a whole record. A partial update is applied
//! to the stored record and the result is validated again, so no write can produce a record that
//! a create would have refused.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{FieldError, from_value, only_fields};

/// Who runs a cluster: Screwdriver's operators, or a team that brought its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ManagedBy {
    Screwdriver,
    External,
}

impl ManagedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ManagedBy::Screwdriver => "screwdriver",
            ManagedBy::External => "external",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "screwdriver" => Some(ManagedBy::Screwdriver),
            "external" => Some(ManagedBy::External),
            _ => None,
        }
    }
}

/// A cluster as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub id: i64,
    #[serde(flatten)]
    pub fields: NewCluster,
}

/// A valid cluster record without its id: what a create stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewCluster {
    pub name: String,
    pub scm_context: String,
    pub scm_organizations: Vec<String>,
    pub is_active: bool,
    /// Name of the environment variable holding the cluster's public key(s) as PEM.
    pub auth_key: String,
    /// Name of the environment variable holding the sign options JSON, if any.
    pub sign_option: Option<String>,
    pub managed_by: ManagedBy,
    pub managed_by_email: String,
    pub weightage: u8,
    pub group: String,
    pub description: Option<String>,
}

/// A partial update: only the fields present change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterPatch {
    fields: InputFields,
}

pub const DEFAULT_GROUP: &str = "default";
pub const DEFAULT_WEIGHTAGE: u8 = 100;

/// Field names accepted on input, including the seed's and Screwdriver's aliases.
const INPUT_FIELDS: &[&str] = &[
    "name",
    "scmContext",
    "scmOrganizations",
    "isActive",
    "authKey",
    "signOption",
    "managedBy",
    "managedByScrewdriver",
    "managedByEmail",
    "maintainer",
    "weightage",
    "group",
    "description",
];

/// `isActive` and `managedByScrewdriver` arrive as booleans or as the seed's 0/1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum Flag {
    Bool(bool),
    Int(i64),
}

impl Flag {
    fn get(self, field: &str) -> Result<bool, FieldError> {
        match self {
            Flag::Bool(b) => Ok(b),
            Flag::Int(0) => Ok(false),
            Flag::Int(1) => Ok(true),
            Flag::Int(_) => Err(FieldError::new(field, "must be true, false, 0 or 1")),
        }
    }
}

/// A list, or the seed's comma-separated string (`"iOS_org1, iOS_org2"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum Organizations {
    List(Vec<String>),
    Joined(String),
}

impl Organizations {
    fn into_list(self) -> Vec<String> {
        match self {
            Organizations::List(list) => list,
            Organizations::Joined(text) => text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InputFields {
    name: Option<String>,
    scm_context: Option<String>,
    scm_organizations: Option<Organizations>,
    is_active: Option<Flag>,
    auth_key: Option<String>,
    sign_option: Option<String>,
    managed_by: Option<String>,
    managed_by_screwdriver: Option<Flag>,
    managed_by_email: Option<String>,
    maintainer: Option<String>,
    weightage: Option<i64>,
    group: Option<String>,
    description: Option<String>,
}

impl InputFields {
    fn parse(body: Map<String, Value>) -> Result<Self, FieldError> {
        if body.contains_key("id") {
            return Err(FieldError::new(
                "id",
                "is assigned by the scheduler and cannot be set",
            ));
        }
        only_fields(&body, INPUT_FIELDS)?;
        from_value(Value::Object(body))
    }

    /// `managedBy` or its alias `managedByScrewdriver`; both given must agree.
    fn managed_by(&self) -> Result<Option<ManagedBy>, FieldError> {
        let named = match &self.managed_by {
            Some(text) => Some(ManagedBy::parse(text).ok_or_else(|| {
                FieldError::new("managedBy", "must be \"screwdriver\" or \"external\"")
            })?),
            None => None,
        };
        let flagged = match self.managed_by_screwdriver {
            Some(flag) => Some(if flag.get("managedByScrewdriver")? {
                ManagedBy::Screwdriver
            } else {
                ManagedBy::External
            }),
            None => None,
        };
        match (named, flagged) {
            (Some(a), Some(b)) if a != b => Err(FieldError::new(
                "managedByScrewdriver",
                "contradicts managedBy; send only one of them",
            )),
            (a, b) => Ok(a.or(b)),
        }
    }

    /// `managedByEmail` or its alias `maintainer`; both given must agree.
    fn email(&self) -> Result<Option<String>, FieldError> {
        match (&self.managed_by_email, &self.maintainer) {
            (Some(a), Some(b)) if a != b => Err(FieldError::new(
                "maintainer",
                "contradicts managedByEmail; send only one of them",
            )),
            (a, b) => Ok(a.clone().or_else(|| b.clone())),
        }
    }
}

// === impl NewCluster ===

impl NewCluster {
    /// Validates a create body.
    pub fn from_json(body: Map<String, Value>) -> Result<Self, FieldError> {
        let input = InputFields::parse(body)?;
        let managed_by = input.managed_by()?;
        let email = input.email()?;
        let record = NewCluster {
            name: input.name.ok_or_else(|| required("name"))?,
            scm_context: input.scm_context.ok_or_else(|| required("scmContext"))?,
            scm_organizations: input
                .scm_organizations
                .map(Organizations::into_list)
                .unwrap_or_default(),
            is_active: match input.is_active {
                Some(flag) => flag.get("isActive")?,
                None => true,
            },
            auth_key: input.auth_key.ok_or_else(|| required("authKey"))?,
            sign_option: input.sign_option,
            managed_by: managed_by.ok_or_else(|| {
                FieldError::new(
                    "managedBy",
                    "is required: \"screwdriver\" or \"external\" (or managedByScrewdriver: true/false)",
                )
            })?,
            managed_by_email: email.ok_or_else(|| required("managedByEmail"))?,
            weightage: weightage(input.weightage)?.unwrap_or(DEFAULT_WEIGHTAGE),
            group: input.group.unwrap_or_else(|| DEFAULT_GROUP.to_owned()),
            description: input.description,
        };
        record.validate()
    }

    /// Checks every rule of the data model; returns the record normalised (organizations
    /// deduplicated).
    pub fn validate(mut self) -> Result<Self, FieldError> {
        check_cluster_name(&self.name)?;
        check_text("scmContext", &self.scm_context, 200)?;
        if !self.scm_context.contains(':') || self.scm_context.chars().any(char::is_whitespace) {
            return Err(FieldError::new(
                "scmContext",
                "must look like \"github:github.com\" (type:host, no spaces)",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        self.scm_organizations
            .retain(|org| seen.insert(org.clone()));
        for (i, org) in self.scm_organizations.iter().enumerate() {
            let field = format!("scmOrganizations[{i}]");
            check_text(&field, org, 100)?;
            if org.contains('/') || org.contains(',') || org.chars().any(char::is_whitespace) {
                return Err(FieldError::new(
                    field,
                    "must not contain '/', ',' or spaces",
                ));
            }
        }
        if self.scm_organizations.join(",").chars().count() > 500 {
            return Err(FieldError::new(
                "scmOrganizations",
                "must be at most 500 characters when joined with commas",
            ));
        }
        if self.managed_by == ManagedBy::External && self.scm_organizations.is_empty() {
            return Err(FieldError::new(
                "scmOrganizations",
                "is required (non-empty) for an external cluster: list the SCM organizations allowed to build there",
            ));
        }
        check_env_name("authKey", &self.auth_key)?;
        if let Some(sign_option) = &self.sign_option {
            check_env_name("signOption", sign_option)?;
        }
        check_text("managedByEmail", &self.managed_by_email, 100)?;
        if !is_email(&self.managed_by_email) {
            return Err(FieldError::new(
                "managedByEmail",
                "must be an email address like team@example.com",
            ));
        }
        if self.weightage > 100 {
            return Err(FieldError::new(
                "weightage",
                "must be an integer from 0 to 100",
            ));
        }
        check_token("group", &self.group, 50)?;
        if let Some(description) = &self.description
            && description.chars().count() > 100
        {
            return Err(FieldError::new(
                "description",
                "must be at most 100 characters",
            ));
        }
        Ok(self)
    }

    /// Whether builds of `organization` may run here.
    pub fn allows_organization(&self, organization: &str) -> bool {
        match self.managed_by {
            ManagedBy::Screwdriver => true,
            ManagedBy::External => self.scm_organizations.iter().any(|o| o == organization),
        }
    }
}

// === impl ClusterPatch ===

impl ClusterPatch {
    /// Parses an update body; the result is checked against the record in [`ClusterPatch::apply`].
    pub fn from_json(body: Map<String, Value>) -> Result<Self, FieldError> {
        let fields = InputFields::parse(body)?;
        fields.managed_by()?;
        fields.email()?;
        Ok(Self { fields })
    }

    pub fn is_empty(&self) -> bool {
        self.fields == InputFields::default()
    }

    /// The record after this update, validated as a whole.
    pub fn apply(&self, current: &NewCluster) -> Result<NewCluster, FieldError> {
        let f = &self.fields;
        if let Some(name) = &f.name
            && name != &current.name
        {
            return Err(FieldError::new(
                "name",
                "cannot be changed; register a new cluster and delete this one",
            ));
        }
        let mut next = current.clone();
        if let Some(v) = &f.scm_context {
            next.scm_context = v.clone();
        }
        if let Some(v) = &f.scm_organizations {
            next.scm_organizations = v.clone().into_list();
        }
        if let Some(flag) = f.is_active {
            next.is_active = flag.get("isActive")?;
        }
        if let Some(v) = &f.auth_key {
            next.auth_key = v.clone();
        }
        if let Some(v) = &f.sign_option {
            next.sign_option = Some(v.clone());
        }
        if let Some(v) = f.managed_by()? {
            next.managed_by = v;
        }
        if let Some(v) = f.email()? {
            next.managed_by_email = v;
        }
        if let Some(v) = weightage(f.weightage)? {
            next.weightage = v;
        }
        if let Some(v) = &f.group {
            next.group = v.clone();
        }
        if let Some(v) = &f.description {
            next.description = Some(v.clone());
        }
        next.validate()
    }
}

// === rules ===

fn required(field: &str) -> FieldError {
    FieldError::new(field, "is required")
}

fn weightage(value: Option<i64>) -> Result<Option<u8>, FieldError> {
    match value {
        None => Ok(None),
        Some(w) => u8::try_from(w)
            .ok()
            .filter(|w| *w <= 100)
            .map(Some)
            .ok_or_else(|| FieldError::new("weightage", "must be an integer from 0 to 100")),
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

/// The registry's rule for a cluster name (1–100 of `[A-Za-z0-9_.-]`), for tools that take a
/// name before it is registered.
pub fn check_cluster_name(name: &str) -> Result<(), FieldError> {
    check_token("name", name, 100)?;
    if name == "." || name == ".." {
        return Err(FieldError::new(
            "name",
            "cannot be . or ..: URLs would read it as a step in the path",
        ));
    }
    if name == RESERVED_NAME {
        return Err(FieldError::new(
            "name",
            "is reserved: /v4/buildclusters/status answers every cluster's status",
        ));
    }
    Ok(())
}

/// The one name no cluster may take: its path is every cluster's status.
pub const RESERVED_NAME: &str = "status";

/// What makes two cluster names one cluster: names that differ only in case or in `-`, `.`
/// and `_` would share their key variables (`SD_CLUSTER_<key>_PUBLIC_KEY`, spelled from this),
/// so the registry keeps one of them at most.
pub fn cluster_name_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Names that end up in Redis keys and URLs: `^[A-Za-z0-9_.-]+$`.
fn check_token(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    check_text(field, value, max)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(FieldError::new(
            field,
            "may contain only letters, digits, '_', '.' and '-'",
        ));
    }
    Ok(())
}

/// `authKey`/`signOption` name environment variables; secrets never live in the table.
fn check_env_name(field: &str, value: &str) -> Result<(), FieldError> {
    check_text(field, value, 100)?;
    let mut chars = value.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(FieldError::new(
            field,
            "must be the NAME of an environment variable (letters, digits, '_'; not starting with a digit), not the key itself",
        ));
    }
    Ok(())
}

fn is_email(value: &str) -> bool {
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && !value.chars().any(|c| c.is_whitespace() || c.is_control())
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn valid() -> Value {
        json!({
            "name": "iOS",
            "scmContext": "github:github.com",
            "scmOrganizations": ["mobile"],
            "managedBy": "external",
            "managedByEmail": "mobile@example.com",
            "authKey": "IOS_PUBLIC_KEY",
        })
    }

    fn refused(patch: Value) -> FieldError {
        let mut v = valid();
        for (k, val) in body(patch) {
            v[k] = val;
        }
        NewCluster::from_json(body(v)).unwrap_err()
    }

    /// Found by tests/properties.rs: an empty key was refused naming the field "".
    #[test]
    fn an_unknown_field_is_named_only_when_printable() {
        assert_eq!(refused(json!({"colour": 1})).field, "colour");
        for key in ["", "a\u{7}b", &"k".repeat(65)] {
            let e = refused(json!({ key: null }));
            assert_eq!(e.field, "body", "{key:?}");
            assert!(e.reason.contains("allowed fields are name,"), "{e}");
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let c = NewCluster::from_json(body(valid())).unwrap();
        assert!(c.is_active);
        assert_eq!(c.weightage, 100);
        assert_eq!(c.group, "default");
        assert_eq!(c.sign_option, None);
    }

    #[test]
    fn seed_aliases_are_accepted() {
        let c = NewCluster::from_json(body(json!({
            "name": "sd1",
            "scmContext": "github:github.com",
            "isActive": 0,
            "scmOrganizations": "org1, org2",
            "managedByScrewdriver": 1,
            "maintainer": "ops@example.com",
            "authKey": "SD1_KEY",
            "signOption": "SD1_SIGN",
        })))
        .unwrap();
        assert!(!c.is_active);
        assert_eq!(c.managed_by, ManagedBy::Screwdriver);
        assert_eq!(c.managed_by_email, "ops@example.com");
        assert_eq!(c.scm_organizations, vec!["org1", "org2"]);
    }

    #[test]
    fn names_that_share_key_variables_share_a_key() {
        let key = cluster_name_key("ios-farm");
        assert_eq!(key, "IOS_FARM");
        for other in ["ios.farm", "IOS_FARM", "Ios-Farm", "ios_farm"] {
            assert_eq!(cluster_name_key(other), key, "{other}");
        }
        assert_ne!(cluster_name_key("iosfarm"), key);
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases = [
            (json!({"name": "bad name"}), "name"),
            (json!({"name": "x".repeat(101)}), "name"),
            (json!({"name": "."}), "name"),
            (json!({"name": ".."}), "name"),
            (json!({"name": "status"}), "name"),
            (json!({"name": ""}), "name"),
            (json!({"managedByEmail": "nope"}), "managedByEmail"),
            (json!({"managedByEmail": "a@b"}), "managedByEmail"),
            (json!({"scmOrganizations": []}), "scmOrganizations"),
            (json!({"weightage": 101}), "weightage"),
            (json!({"weightage": -1}), "weightage"),
            (json!({"weightage": 1.5}), "weightage"),
            (json!({"isActive": 2}), "isActive"),
            (json!({"isActive": "yes"}), "isActive"),
            (json!({"managedBy": "them"}), "managedBy"),
            (
                json!({"managedByScrewdriver": true}),
                "managedByScrewdriver",
            ),
            (json!({"authKey": "-----BEGIN PUBLIC KEY-----"}), "authKey"),
            (json!({"signOption": "1X"}), "signOption"),
            (json!({"group": "a b"}), "group"),
            (json!({"scmContext": "github"}), "scmContext"),
            (json!({"scmOrganizations": ["a/b"]}), "scmOrganizations[0]"),
            (json!({"description": "d".repeat(101)}), "description"),
            (json!({"colour": "blue"}), "colour"),
            (json!({"id": 7}), "id"),
        ];
        for (patch, field) in cases {
            let err = refused(patch.clone());
            assert_eq!(err.field, field, "{patch} gave {err}");
        }
    }

    #[test]
    fn required_fields_are_named() {
        for field in [
            "name",
            "scmContext",
            "authKey",
            "managedBy",
            "managedByEmail",
        ] {
            let mut v = valid();
            v.as_object_mut().unwrap().remove(field);
            let err = NewCluster::from_json(body(v)).unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.reason.contains("required"), "{err}");
        }
    }

    #[test]
    fn organizations_joined_length_is_capped() {
        let orgs: Vec<String> = (0..60).map(|i| format!("organization{i:02}")).collect();
        assert_eq!(
            refused(json!({ "scmOrganizations": orgs })).field,
            "scmOrganizations"
        );
    }

    #[test]
    fn patch_is_validated_against_the_whole_record() {
        let current = NewCluster::from_json(body(valid())).unwrap();
        let pause = ClusterPatch::from_json(body(json!({"isActive": false}))).unwrap();
        assert!(!pause.apply(&current).unwrap().is_active);
        let empty_orgs = ClusterPatch::from_json(body(json!({"scmOrganizations": []}))).unwrap();
        assert_eq!(
            empty_orgs.apply(&current).unwrap_err().field,
            "scmOrganizations"
        );
        let rename = ClusterPatch::from_json(body(json!({"name": "other"}))).unwrap();
        assert_eq!(rename.apply(&current).unwrap_err().field, "name");
        assert_eq!(
            ClusterPatch::from_json(body(json!({"nope": 1})))
                .unwrap_err()
                .field,
            "nope"
        );
    }

    #[test]
    fn organization_rule() {
        let ext = NewCluster::from_json(body(valid())).unwrap();
        assert!(ext.allows_organization("mobile"));
        assert!(!ext.allows_organization("web"));
        let managed = NewCluster {
            managed_by: ManagedBy::Screwdriver,
            ..ext
        };
        assert!(managed.allows_organization("web"));
    }

    #[test]
    fn record_serialises_flat_in_camel_case() {
        let c = Cluster {
            id: 3,
            fields: NewCluster::from_json(body(valid())).unwrap(),
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["id"], 3);
        assert_eq!(v["scmContext"], "github:github.com");
        assert_eq!(v["managedBy"], "external");
        assert_eq!(v["weightage"], 100);
    }
}
