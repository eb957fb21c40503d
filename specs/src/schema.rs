//! JSON Schemas of the spec files, generated from the types.

use crate::{ClusterSpec, HostSpec, VmSpec};

/// `(file name, pretty JSON)` for every schema the project publishes in `schemas/`.
pub fn all() -> Vec<(&'static str, String)> {
    let render = |schema: schemars::Schema| {
        let mut text = serde_json::to_string_pretty(&schema).expect("a schema always serialises");
        text.push('\n');
        text
    };
    vec![
        ("vm.schema.json", render(schemars::schema_for!(VmSpec))),
        ("host.schema.json", render(schemars::schema_for!(HostSpec))),
        (
            "cluster.schema.json",
            render(schemars::schema_for!(ClusterSpec)),
        ),
    ]
}
