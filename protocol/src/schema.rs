//! The OpenAPI schemas of the request bodies whose rules the derived schemas cannot state: the
//! registry's input (aliases, `0`/`1` flags, a list or a comma-separated string, defaults,
//! fields that depend on each other) and the worker bodies (whose parsers are hand-written).
//!
//! Each schema is written to accept exactly what the body's `from_json` accepts, so a client
//! that validates against the document is not refused by the scheduler. What JSON Schema cannot
//! say (a rule across list items, a rule against the stored record or the scheduler's
//! configuration) is said in the description; `scheduler/tests/openapi.rs` checks both against
//! the API.
//!
//! Character classes are spelled out rather than written `\s`: Rust's `char::is_whitespace`,
//! which the rules use, and ECMA-262's `\s`, which JSON Schema patterns use, differ (U+0085,
//! U+FEFF).

use serde_json::{Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, ArrayBuilder, ObjectBuilder, OneOfBuilder,
    Schema, SchemaType, Type,
};

use crate::workers::{MAX_DELIVERY_IDS, MAX_MESSAGE_CHARS};
use crate::{AckBody, NackBody};

/// The code points `char::is_whitespace` takes for white space (Unicode's `White_Space`).
pub const WHITE_SPACE: &[(char, char)] = &[
    ('\u{9}', '\u{d}'),
    (' ', ' '),
    ('\u{85}', '\u{85}'),
    ('\u{a0}', '\u{a0}'),
    ('\u{1680}', '\u{1680}'),
    ('\u{2000}', '\u{200a}'),
    ('\u{2028}', '\u{2029}'),
    ('\u{202f}', '\u{202f}'),
    ('\u{205f}', '\u{205f}'),
    ('\u{3000}', '\u{3000}'),
];

/// The code points `char::is_control` takes for control characters (category `Cc`).
pub const CONTROL: &[(char, char)] = &[('\u{0}', '\u{1f}'), ('\u{7f}', '\u{9f}')];

/// The inside of a regular-expression character class holding `ranges`, as `\uXXXX` escapes
/// (understood alike by ECMA-262 and Rust's `regex`).
fn class(ranges: &[(char, char)]) -> String {
    ranges
        .iter()
        .map(|&(from, to)| {
            if from == to {
                format!("\\u{:04x}", u32::from(from))
            } else {
                format!("\\u{:04x}-\\u{:04x}", u32::from(from), u32::from(to))
            }
        })
        .collect()
}

fn ws() -> String {
    class(WHITE_SPACE)
}

/// `^[A-Za-z0-9_.-]+$`: cluster names and groups (they end up in Redis keys and URLs).
pub const TOKEN_PATTERN: &str = "^[A-Za-z0-9_.-]+$";

/// The name of an environment variable: letters, digits and `_`, not starting with a digit.
pub const ENV_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// An SCM context: `type:host`, no white space.
pub fn scm_context_pattern() -> String {
    let ws = ws();
    format!("^[^{ws}]*:[^{ws}]*$")
}

/// One SCM organization: no `/`, `,` or white space.
pub fn organization_pattern() -> String {
    format!("^[^/,{}]+$", ws())
}

/// The seed's comma-separated organizations: items of 1–100 characters without `/` or white
/// space, with white space and empty items around the commas ignored.
pub fn organizations_joined_pattern() -> String {
    let ws = ws();
    let item = format!("[^/,{ws}]{{1,100}}[{ws}]*");
    format!("^[{ws}]*(?:{item})?(?:,[{ws}]*(?:{item})?)*$")
}

/// An email address as the registry takes it: one `@`, something before it, a domain of at
/// least two non-empty dot-separated labels after it, no white space or control characters.
pub fn email_pattern() -> String {
    let c = format!("{}{}", class(CONTROL), ws());
    format!("^[^@{c}]+@[^@.{c}]+(?:\\.[^@.{c}]+)+$")
}

/// Holds at least one character that is not white space.
pub fn not_blank_pattern() -> String {
    format!("[^{}]", ws())
}

/// `organization/repository`: something before the first `/` and something after it.
pub const PIPELINE_NAME_PATTERN: &str = "^[^/]+/[\\s\\S]";

// === building blocks ===

fn typed(types: &[Type]) -> ObjectBuilder {
    let schema_type = match types {
        [one] => SchemaType::new(one.clone()),
        many => many.iter().cloned().collect(),
    };
    ObjectBuilder::new().schema_type(schema_type)
}

/// A string (or, when `nullable`, also `null`) matching `pattern`, of `min` to `max` characters.
fn text(
    nullable: bool,
    min: Option<usize>,
    max: Option<usize>,
    pattern: Option<String>,
) -> ObjectBuilder {
    let types: &[Type] = if nullable {
        &[Type::String, Type::Null]
    } else {
        &[Type::String]
    };
    typed(types)
        .min_length(min)
        .max_length(max)
        .pattern(pattern)
}

/// Schemas with no `type`: constraints that apply to whatever value is there.
fn untyped() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(SchemaType::AnyValue)
}

/// `true`/`false` or the seed's `0`/`1`, or `null` (the default).
fn flag(description: &str) -> Schema {
    OneOfBuilder::new()
        .item(typed(&[Type::Boolean]))
        .item(typed(&[Type::Integer]).enum_values(Some([0, 1])))
        .item(typed(&[Type::Null]))
        .description(Some(description))
        .into()
}

/// An id: 1 to 2^63-1.
pub fn id_schema(nullable: bool, description: &str) -> ObjectBuilder {
    let types: &[Type] = if nullable {
        &[Type::Integer, Type::Null]
    } else {
        &[Type::Integer]
    };
    typed(types)
        .minimum(Some(1))
        .maximum(Some(crate::build::MAX_ID))
        .description(Some(description))
}

// === the registry ===

/// Said of every registry body: what the schema cannot say.
const INTEGERS: &str = "Integers are written as integers (`1`, not `1.0` or `1e0`).";

/// The fields of a create and of an update; on an update every field may be `null` (no change).
fn cluster_properties(object: ObjectBuilder, update: bool) -> ObjectBuilder {
    let organizations = OneOfBuilder::new()
        .item(
            ArrayBuilder::new().items(
                text(false, None, Some(100), Some(organization_pattern()))
                    .description(Some("An SCM organization: at most 100 characters, no '/', ',' or white space.")),
            ),
        )
        .item(text(false, None, None, Some(organizations_joined_pattern())).description(Some(
            "The seed's form: organizations separated by commas (white space around them and empty items are ignored).",
        )))
        .item(typed(&[Type::Null]))
        .description(Some(
            "The SCM organizations whose builds may run here (an external cluster runs no others; required, non-empty, for one). Duplicates are dropped; joined with commas they must be at most 500 characters.",
        ));
    let email = |what: &str| {
        text(true, None, Some(100), Some(email_pattern())).description(Some(what.to_owned()))
    };
    object
        .property(
            "name",
            text(update, Some(1), Some(100), Some(TOKEN_PATTERN.to_owned())).description(Some(
                if update {
                    "The cluster's name; may be given only unchanged."
                } else {
                    "The cluster's name, unique: names equal once upper-cased with '-' and '.' read as '_' share key variables, and the second is refused with 409."
                },
            )),
        )
        .property(
            "scmContext",
            text(update, None, Some(200), Some(scm_context_pattern()))
                .description(Some("`type:host`, e.g. `github:github.com`.")),
        )
        .property("scmOrganizations", organizations)
        .property(
            "isActive",
            flag("Whether routing may pick the cluster: true/false or 0/1; default true."),
        )
        .property(
            "authKey",
            text(update, None, Some(100), Some(ENV_NAME_PATTERN.to_owned())).description(Some(
                "The NAME of the environment variable holding the cluster's public key(s) as PEM, never the key. It must start with `registry.variable_prefix` (default `SD_CLUSTER_`), be set on every scheduler replica, hold keys for the sign options' algorithm, and belong to no other cluster (409).",
            )),
        )
        .property(
            "signOption",
            text(true, None, Some(100), Some(ENV_NAME_PATTERN.to_owned())).description(Some(
                "The NAME of the environment variable holding the sign options JSON, if any; under the same prefix, set on every replica.",
            )),
        )
        .property(
            "managedBy",
            typed(&[Type::String, Type::Null])
                .enum_values(Some([json!("screwdriver"), json!("external"), Value::Null]))
                .description(Some(
                    "Who runs the cluster. This or `managedByScrewdriver` is required on a create; both given must agree.",
                )),
        )
        .property(
            "managedByScrewdriver",
            flag("The seed's alias of `managedBy`: true/1 = screwdriver, false/0 = external."),
        )
        .property(
            "managedByEmail",
            email("Who to ask about the cluster. This or `maintainer` is required on a create; both given must be equal."),
        )
        .property("maintainer", email("The seed's alias of `managedByEmail`."))
        .property(
            "weightage",
            typed(&[Type::Integer, Type::Null])
                .minimum(Some(0))
                .maximum(Some(100))
                .description(Some("Routing weight among a group's clusters, 0–100; default 100.")),
        )
        .property(
            "group",
            text(true, Some(1), Some(50), Some(TOKEN_PATTERN.to_owned()))
                .description(Some("The routing group; default `default`.")),
        )
        .property(
            "description",
            text(true, None, Some(100), None).description(Some("At most 100 characters.")),
        )
}

/// `managedBy` and `managedByScrewdriver` agree; an external cluster (on a create) lists
/// organizations.
fn who_runs_it(create: bool) -> Schema {
    let screwdriver = untyped()
        .property(
            "managedBy",
            untyped().enum_values(Some([json!("screwdriver"), Value::Null])),
        )
        .property(
            "managedByScrewdriver",
            untyped().enum_values(Some([json!(true), json!(1), Value::Null])),
        );
    let mut external = untyped()
        .property(
            "managedBy",
            untyped().enum_values(Some([json!("external"), Value::Null])),
        )
        .property(
            "managedByScrewdriver",
            untyped().enum_values(Some([json!(false), json!(0), Value::Null])),
        );
    if create {
        let listed = AnyOfBuilder::new()
            .item(ArrayBuilder::new().items(untyped()).min_items(Some(1)))
            .item(typed(&[Type::String]).pattern(Some(format!("[^,{}]", ws()))));
        external = external
            .required("scmOrganizations")
            .property("scmOrganizations", listed);
    }
    AnyOfBuilder::new().item(screwdriver).item(external).into()
}

/// Requires `a` or `b` to be present and not `null`.
fn one_of_present(a: (&str, ObjectBuilder), b: (&str, ObjectBuilder)) -> Schema {
    AnyOfBuilder::new()
        .item(untyped().required(a.0).property(a.0, a.1))
        .item(untyped().required(b.0).property(b.0, b.1))
        .into()
}

/// `POST /v4/buildclusters`: a new cluster, in the API's field names or the seed's aliases.
pub struct ClusterCreate;

impl utoipa::PartialSchema for ClusterCreate {
    fn schema() -> RefOr<Schema> {
        let fields = cluster_properties(
            strict_object()
                .required("name")
                .required("scmContext")
                .required("authKey"),
            false,
        );
        AllOfBuilder::new()
            .item(fields)
            .item(one_of_present(
                ("managedBy", typed(&[Type::String])),
                ("managedByScrewdriver", typed(&[Type::Boolean, Type::Integer])),
            ))
            .item(one_of_present(
                ("managedByEmail", typed(&[Type::String])),
                ("maintainer", typed(&[Type::String])),
            ))
            .item(who_runs_it(true))
            .description(Some(format!(
                "A cluster to register. Unknown fields (and `id`) are refused. Rules beyond the schema: `managedByEmail` and `maintainer`, when both are given, must be equal; `scmOrganizations` joined with commas, duplicates dropped, is at most 500 characters; the variables `authKey` and `signOption` name must exist on the scheduler as described. {INTEGERS}"
            )))
            .into()
    }
}

impl utoipa::ToSchema for ClusterCreate {}

/// `PUT /v4/buildclusters/{name}`: any subset of a create's fields.
pub struct ClusterUpdate;

impl utoipa::PartialSchema for ClusterUpdate {
    fn schema() -> RefOr<Schema> {
        let fields = cluster_properties(strict_object(), true);
        AllOfBuilder::new()
            .item(fields)
            .item(who_runs_it(false))
            .description(Some(format!(
                "Any subset of a create's fields, e.g. `{{\"isActive\":false}}`; `null` or an absent field leaves it unchanged. Rules beyond the schema: `name`, if given, must be the cluster's own; the record after the update must pass every rule of `ClusterCreate` (e.g. an external cluster keeps a non-empty `scmOrganizations`); `managedByEmail` and `maintainer`, when both are given, must be equal. {INTEGERS}"
            )))
            .into()
    }
}

impl utoipa::ToSchema for ClusterUpdate {}

// === the start message ===

/// `blockedBy`: ids of jobs.
pub fn blocked_by() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(id_schema(false, "A job id."))
        .description(Some("Job ids whose running builds hold this one back."))
}

/// A start message's `annotations`: free-form, but the build-cluster keys must be strings.
pub fn start_annotations() -> ObjectBuilder {
    typed(&[Type::Object])
        .property(
            crate::build::ANNOTATION_BUILD_CLUSTER,
            typed(&[Type::String]).description(Some(
                "The cluster the job must run in: it must exist for the pipeline's scmContext (else 422) and, if external, list the pipeline's organization (else 403).",
            )),
        )
        .property(
            crate::build::ANNOTATION_BUILD_CLUSTER_SHORT,
            typed(&[Type::String]).description(Some("The seed's short form of the above.")),
        )
        .additional_properties(Some(
            AdditionalProperties::FreeForm(true),
        ))
        .description(Some("The job's annotations, passed on to the agent."))
}

/// The build's image: not blank.
pub fn container() -> ObjectBuilder {
    typed(&[Type::String])
        .pattern(Some(not_blank_pattern()))
        .description(Some("The image the build runs in; not blank."))
}

/// `pipeline.name`.
pub fn pipeline_name() -> ObjectBuilder {
    typed(&[Type::String])
        .pattern(Some(PIPELINE_NAME_PATTERN))
        .description(Some(
            "`organization/repository`; the organization decides which external clusters may run it.",
        ))
}

// === the worker bodies ===

fn delivery_ids() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(typed(&[Type::String]))
        .min_items(Some(1))
        .max_items(Some(MAX_DELIVERY_IDS))
        .description(Some("Delivery ids as the long-poll returned them."))
}

/// An object with no fields but those its schema names.
fn strict_object() -> ObjectBuilder {
    typed(&[Type::Object]).additional_properties(Some(AdditionalProperties::FreeForm(false)))
}

impl utoipa::PartialSchema for AckBody {
    fn schema() -> RefOr<Schema> {
        strict_object()
            .required("deliveryIds")
            .property("deliveryIds", delivery_ids())
            .description(Some(
                "The body of an ack (these transfers succeeded) and of a renew (extend these leases).",
            ))
            .into()
    }
}

impl utoipa::ToSchema for AckBody {}

impl utoipa::PartialSchema for NackBody {
    fn schema() -> RefOr<Schema> {
        strict_object()
            .required("deliveryIds")
            .property("deliveryIds", delivery_ids())
            .property(
                "reason",
                typed(&[Type::String])
                    .max_length(Some(MAX_MESSAGE_CHARS))
                    .description(Some("Why they are given back (optional).")),
            )
            .description(Some("The body of a nack: give these leases back now."))
            .into()
    }
}

impl utoipa::ToSchema for NackBody {}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
        ranges.iter().any(|&(from, to)| (from..=to).contains(&c))
    }

    #[test]
    fn white_space_is_what_char_is_whitespace_takes() {
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            assert_eq!(in_ranges(WHITE_SPACE, c), c.is_whitespace(), "{:?}", c);
        }
    }

    #[test]
    fn control_is_what_char_is_control_takes() {
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            assert_eq!(in_ranges(CONTROL, c), c.is_control(), "{:?}", c);
        }
    }

    #[test]
    fn classes_are_escaped_code_points() {
        assert_eq!(
            class(&[('\u{9}', '\u{d}'), (' ', ' ')]),
            "\\u0009-\\u000d\\u0020"
        );
    }
}
