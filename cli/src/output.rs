//! `-o table|json|yaml` for the commands scripts read (`status`,
//! `dlq list`). The JSON and YAML shapes come from the row structs' serde
//! derives (camelCase field names) and are documented in docs/cli.md.

use std::io::Write;

use anyhow::Result;
use clap::ValueEnum;
use serde::Serialize;

/// Output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// Pretty-printed JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Write `value` as JSON or YAML; `false` for [`Format::Table`], which
/// the caller renders itself.
pub fn structured<T: Serialize>(out: &mut impl Write, format: Format, value: &T) -> Result<bool> {
    match format {
        Format::Table => return Ok(false),
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        Format::Yaml => out.write_all(spillway_api::to_yaml(value)?.as_bytes())?,
    }
    Ok(true)
}

/// A list of rows, `{"items": [...]}` like `kubectl get -o json`.
#[derive(Debug, Serialize)]
pub struct List<'a, T: Serialize> {
    /// The rows.
    pub items: &'a [T],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Row {
        dead_letters: u64,
    }

    #[test]
    fn json_and_yaml_use_the_serde_names() {
        let rows = [Row { dead_letters: 3 }];
        let mut out = Vec::new();
        assert!(structured(&mut out, Format::Json, &List { items: &rows }).unwrap());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["items"][0]["deadLetters"], 3);
        let mut out = Vec::new();
        assert!(structured(&mut out, Format::Yaml, &rows[0]).unwrap());
        assert_eq!(String::from_utf8(out).unwrap(), "deadLetters: 3\n");
        assert!(!structured(&mut Vec::new(), Format::Table, &rows[0]).unwrap());
    }
}
