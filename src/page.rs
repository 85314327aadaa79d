//! The pieces shared by gpdp's self-contained HTML pages (the report, the
//! public register, the benchmark's charts): escaping, key-value tables,
//! the stylesheet, and the charts ([`chart`]: SVG written by hand). No
//! scripts and nothing fetched, so every page reads offline and prints.

mod chart;
mod escape;

use std::fmt::Write as _;

pub(crate) use chart::{Difference, bar_chart, difference_chart, line_chart};
pub(crate) use escape::esc;

pub(crate) fn kv_table(rows: &[(&str, String)]) -> String {
    let mut t = String::from("<table>");
    for (k, v) in rows {
        let _ = write!(t, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    t + "</table>"
}

pub(crate) const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1d2a33;line-height:1.45;overflow-wrap:break-word}\
h1{font-size:1.6em}h2{border-bottom:2px solid #2e6f8e;padding-bottom:.2em;margin-top:2em}\
table{border-collapse:collapse;margin:.8em 0;font-size:.92em;display:block;max-width:100%;overflow-x:auto}td,th{border:1px solid #c9d4da;padding:.3em .6em;text-align:left;vertical-align:top}.hash{overflow-wrap:anywhere}\
th{background:#eef3f6}.pass{color:#1f7a3a;font-weight:600}.fail{color:#b3261e;font-weight:700}\
.verdict{font-size:1.15em;padding:.6em 1em;border-radius:6px;display:inline-block}.ok{background:#e3f4e8}.bad{background:#fbe4e2}\
figure.chart{margin:1.2em 0}figcaption{font-weight:600;margin-bottom:.3em}figure.chart svg{width:100%;max-width:560px;height:auto;display:block}.note{color:#56656f;font-size:.9em}\
@media print{h2{page-break-after:avoid}svg{page-break-inside:avoid}}";
