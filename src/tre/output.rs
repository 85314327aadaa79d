//! Released results as the researcher reads them: CSV, a table with the
//! rule set that controlled it underneath, or JSON. A redacted statistic is
//! `[REDACTED]` in text and null in JSON; nothing here sees more than the
//! controlled result (the operator's figures stay in the audit log).

use arrow::array::Array;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Value, json};

use crate::tre::control::{ColumnKind, Controlled, describe};
use crate::tre::release::Released;

/// Text of one released cell; redacted statistics read `[REDACTED]`.
fn cell(r: &Controlled, formatters: &[ArrayFormatter], row: usize, col: usize) -> String {
    if r.batch.column(col).is_null(row) && r.kinds[col] != ColumnKind::Key {
        "[REDACTED]".into()
    } else {
        formatters[col].value(row).to_string()
    }
}

fn formatters(r: &Controlled) -> Vec<ArrayFormatter<'_>> {
    let options = FormatOptions::default();
    r.batch
        .columns()
        .iter()
        .filter_map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok())
        .collect()
}

/// CSV; redacted statistics read `[REDACTED]`.
pub fn to_csv(r: &Controlled) -> String {
    let f = formatters(r);
    let schema = r.batch.schema();
    let mut out = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    for row in 0..r.batch.num_rows() {
        let cells: Vec<String> = (0..r.batch.num_columns())
            .map(|c| cell(r, &f, row, c))
            .collect();
        out.push_str(
            &cells
                .iter()
                .map(|c| {
                    if c.contains(',') {
                        format!("\"{c}\"")
                    } else {
                        c.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    out
}

fn column_names(c: &Controlled) -> Vec<String> {
    c.batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// A human table, then the rule set that controlled it.
pub fn to_table(r: &Released) -> String {
    let c = &r.result;
    let f = formatters(c);
    let names = column_names(c);
    let rows: Vec<Vec<String>> = (0..c.batch.num_rows())
        .map(|row| (0..names.len()).map(|col| cell(c, &f, row, col)).collect())
        .collect();
    let mut out = grid(&names, &rows);
    out.push_str(&format!(
        "({} rows; {})\n",
        c.batch.num_rows(),
        describe(&r.disclosure)
    ));
    if let Some(p) = &r.privacy {
        out.push_str(&format!("(noise: {})\n", p.describe(&names)));
    }
    out
}

/// Record batches as received by a client (nulls as `null`), as a table.
pub fn batches_to_table(batches: &[arrow::array::RecordBatch]) -> String {
    let Some(first) = batches.first() else {
        return "(no rows)\n".into();
    };
    let names: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut rows = Vec::new();
    for b in batches {
        let f: Vec<_> = b
            .columns()
            .iter()
            .filter_map(|c| ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()).ok())
            .collect();
        for row in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .zip(&f)
                    .map(|(c, f)| {
                        if c.is_null(row) {
                            "null".to_owned()
                        } else {
                            f.value(row).to_string()
                        }
                    })
                    .collect(),
            );
        }
    }
    grid(&names, &rows) + &format!("({} rows)\n", rows.len())
}

/// Right-aligned columns under a header and a rule.
fn grid(names: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..names.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([names[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(names) + "\n";
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// JSON: columns, rows (redacted statistics as null) and the rule set.
pub fn to_json(r: &Released) -> Value {
    let c = &r.result;
    let f = formatters(c);
    let names = column_names(c);
    let rows: Vec<Value> = (0..c.batch.num_rows())
        .map(|row| {
            let mut o = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let column = c.batch.column(i);
                let v = if column.is_null(row) {
                    Value::Null
                } else {
                    let text = f[i].value(row).to_string();
                    match c.kinds.get(i) {
                        Some(ColumnKind::Count) => text
                            .parse::<i64>()
                            .map(Value::from)
                            .unwrap_or(Value::String(text)),
                        Some(ColumnKind::Statistic) => text
                            .parse::<f64>()
                            .map(Value::from)
                            .unwrap_or(Value::String(text)),
                        _ => Value::String(text),
                    }
                };
                o.insert(name.clone(), v);
            }
            Value::Object(o)
        })
        .collect();
    let privacy = r.privacy.as_ref().map(|p| p.to_json(&names));
    json!({
        "privacy": privacy,
        "columns": names,
        "kinds": c.kinds.iter().map(|k| format!("{k:?}").to_lowercase()).collect::<Vec<_>>(),
        "rows": rows,
        "disclosure": r.disclosure.name,
        "disclosure_rules": describe(&r.disclosure),
        "redact_at_or_below": r.disclosure.redact_at_or_below,
        "round_to": r.disclosure.round_to,
        "redacted_cells": c.redacted_cells,
        "result_sha256": r.checksum,
        "plan_fingerprint": r.fingerprint,
    })
}
