//! Charts as hand-written SVG, for the report, the register and the
//! benchmark's page: horizontal bar charts, diverging bar charts (each
//! group's difference from an overall rate, around 0) and line charts.
//!
//! Every chart is one `<figure class="chart">`: its title is the
//! `<figcaption>` (HTML, so it wraps at any width and is never scaled),
//! then one `<svg>` drawn [`WIDTH`] pixels wide, which the page's
//! stylesheet scales to the column, up to 560 px (its labels then about
//! the size of the page's text; on a phone, about 10 px). Inside the SVG, by
//! convention — the page test (`tests/it/pages.rs`) checks the geometry in
//! a browser relying on it:
//! - the first `<rect>` is the white background, and one invisible
//!   `<rect class="plot-area">` is the area the axes span;
//! - data are `<rect>`, `<circle>` and `<polyline>` elements (reference
//!   lines too), all inside the plot area, because each axis is rounded
//!   out from the data it shows;
//! - axes, gridlines and legend swatches are `<line>` elements;
//! - every label is horizontal `<text>`, placed so no two overlap: a bar's
//!   label sits on its own line above the bar, its value beside the bar's
//!   end in a margin kept for values, tick labels at least their width
//!   apart, one legend entry per line.
//!
//! Text widths are estimated, as nothing here measures fonts: 0.62 em a
//! character, wider than the average of the common sans-serif fonts
//! (DejaVu Sans, Liberation Sans, Arial).

use std::fmt::Write as _;

use super::escape::esc;

/// The natural width of every chart, in pixels: narrow enough that a
/// phone (390 px, less the page's margins) scales it by no more than about
/// 0.8, so 12 px labels stay near 10 px.
pub(crate) const WIDTH: f64 = 440.0;
const FONT: f64 = 12.0;
const SMALL: f64 = 11.0;
const EM: f64 = 0.62;
const PAD: f64 = 10.0;
/// A bar chart's row: its label's line, then the bar, then a gap.
const LABEL_LINE: f64 = 16.0;
const BAR: f64 = 14.0;
const ROW: f64 = LABEL_LINE + BAR + 8.0;
const BLUE: &str = "#2e6f8e";
const RED: &str = "#b3261e";
const ORANGE: &str = "#c85028";
const GRID: &str = "#e3e9ec";
const INK: &str = "#1d2a33";
/// A white outline drawn under a label's letters, so a gridline or a
/// reference line under it does not cross them out.
const HALO: &str =
    r#" stroke="white" stroke-width="3" stroke-linejoin="round" paint-order="stroke""#;

/// The estimated width of `s` drawn at `size` pixels.
fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * EM * size
}

/// At most `n` characters, with an ellipsis when cut.
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n.saturating_sub(1)).collect::<String>() + "…"
    }
}

/// `s` in lines of at most `n` characters, broken at spaces where it can.
fn wrap(s: &str, n: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in s.split_whitespace() {
        let word = truncate(word, n);
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > n {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line += &word;
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// A value as a bar's label: whole numbers with thousands separators,
/// others to three significant figures or one decimal.
fn value_label(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        let digits = format!("{}", v.abs() as u64);
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A difference in percentage points, signed, to one decimal — or two
/// when one would show a difference as 0.0.
fn points_label(v: f64) -> String {
    if v.abs() >= 0.05 {
        format!("{v:+.1}")
    } else if v.abs() >= 0.005 {
        format!("{v:+.2}")
    } else {
        "0.0".to_owned()
    }
}

/// An axis: from `lo` to `hi` in ticks `step` apart (both ends on ticks).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    /// `+` before positive tick labels (differences).
    signed: bool,
}

impl Axis {
    /// The narrowest axis of round ticks that spans `lo..=hi` with at most
    /// 6 intervals, each (in `pixels` for the whole axis) wider than its
    /// tick labels — or, for a `vertical` axis, than a line of text; for
    /// `whole` numbers (counts), no tick between two whole numbers.
    fn spanning(lo: f64, hi: f64, pixels: f64, signed: bool, vertical: bool, whole: bool) -> Axis {
        let (lo, hi) = if lo.is_finite() && hi.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (lo.min(0.0).min(hi), lo.max(hi).max(0.0) + 1.0)
        };
        let mut exponent = (hi - lo).log10().floor() as i32 - 2;
        loop {
            for m in [1.0, 2.0, 2.5, 5.0] {
                let step = m * 10f64.powi(exponent);
                if whole && (step < 1.0 || step.fract() != 0.0) {
                    continue;
                }
                // (A bound on a tick is not pushed out past it.)
                let axis = Axis {
                    lo: (lo / step + 1e-9).floor() * step,
                    hi: (hi / step - 1e-9).ceil() * step,
                    step,
                    signed,
                };
                let n = axis.intervals();
                let gap = if vertical { 20.0 } else { axis.widest() + 10.0 };
                if n <= 6 && pixels / n as f64 >= gap {
                    return axis;
                }
            }
            exponent += 1;
        }
    }

    fn intervals(&self) -> usize {
        ((self.hi - self.lo) / self.step).round().max(1.0) as usize
    }

    fn ticks(&self) -> impl Iterator<Item = f64> + '_ {
        (0..=self.intervals()).map(|i| self.lo + i as f64 * self.step)
    }

    /// A tick's label, in thousands or millions when the ticks are.
    fn label(&self, v: f64) -> String {
        let big = self.lo.abs().max(self.hi.abs());
        let (scale, suffix) = if big >= 1e6 && self.step >= 1e5 {
            (1e6, "M")
        } else if big >= 1e4 && self.step >= 1e3 {
            (1e3, "k")
        } else {
            (1.0, "")
        };
        let step = self.step / scale;
        let decimals = (0..4)
            .find(|d| {
                let s = step * 10f64.powi(*d);
                (s - s.round()).abs() < 1e-6
            })
            .unwrap_or(4);
        if v.abs() < self.step * 1e-6 {
            return "0".to_owned();
        }
        let s = format!("{:.*}{suffix}", decimals as usize, v / scale);
        if self.signed && v > 0.0 {
            format!("+{s}")
        } else {
            s
        }
    }

    /// The position of `v` between `left` and `right` pixels.
    fn at(&self, v: f64, left: f64, right: f64) -> f64 {
        left + (v - self.lo) / (self.hi - self.lo) * (right - left)
    }

    /// The widest tick label.
    fn widest(&self) -> f64 {
        self.ticks()
            .map(|t| text_width(&self.label(t), SMALL))
            .fold(0.0, f64::max)
    }
}

/// The figure, its caption and the SVG's opening with its background.
fn open(title: &str, height: f64) -> String {
    format!(
        r#"<figure class="chart"><figcaption>{t}</figcaption><svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="{FONT}" fill="{INK}" role="img" aria-label="{t}"><rect width="100%" height="100%" fill="white"/>"#,
        t = esc(title),
    )
}

fn close(svg: String) -> String {
    svg + "</svg></figure>"
}

/// The invisible rectangle the axes span.
fn plot_area(svg: &mut String, left: f64, top: f64, right: f64, bottom: f64) {
    let _ = write!(
        svg,
        r#"<rect class="plot-area" x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="none"/>"#,
        right - left,
        bottom - top
    );
}

/// Lines of centred text from `y` down, 14 pixels apart; returns the
/// baseline after the last.
fn centred_lines(svg: &mut String, text: &str, cx: f64, mut y: f64) -> f64 {
    let chars = ((WIDTH - 2.0 * PAD) / (EM * SMALL)) as usize;
    for line in wrap(text, chars) {
        let _ = write!(
            svg,
            r#"<text x="{cx:.1}" y="{y:.1}" text-anchor="middle" font-size="{SMALL}">{}</text>"#,
            esc(&line)
        );
        y += 14.0;
    }
    y
}

/// One row of a horizontal bar chart.
struct Row {
    label: String,
    value: f64,
    value_label: String,
    colour: &'static str,
}

/// Horizontal bars, one row each: the label on its own line, the bar from
/// 0 below it, its value beside its end; ticks and `x_desc` below; an
/// optional reference as a dashed vertical line.
fn rows_chart(
    title: &str,
    rows: &[Row],
    x_desc: &str,
    reference: Option<f64>,
    signed: bool,
) -> String {
    let values = rows.iter().map(|r| r.value).chain(reference);
    let whole = values.clone().all(|v| v.fract() == 0.0);
    let (mut lo, mut hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if signed {
        // Symmetric around 0, at least ±1.
        hi = hi.max(-lo).max(1.0);
        lo = -hi;
    }
    let value_w = rows
        .iter()
        .map(|r| text_width(&r.value_label, SMALL) + 6.0)
        .fold(0.0, f64::max);
    // The margins keep values beside the bars' ends and the end ticks'
    // labels inside the SVG; the axis is chosen for the width they leave
    // (a first guess of the ticks' width, then the axis's own).
    let margins = |ticks_w: f64| {
        let left = PAD + (if lo < 0.0 { value_w } else { 0.0 }).max(ticks_w / 2.0);
        let right = WIDTH - PAD - value_w.max(ticks_w / 2.0);
        (left, right)
    };
    let (left, right) = margins(30.0);
    let axis = Axis::spanning(lo, hi, right - left, signed, false, whole);
    let (left, right) = margins(axis.widest());
    let x = |v: f64| axis.at(v, left, right);
    let top = PAD;
    let bottom = top + ROW * rows.len().max(1) as f64;
    let desc_lines = wrap(x_desc, ((WIDTH - 2.0 * PAD) / (EM * SMALL)) as usize).len();
    let height = bottom + 34.0 + 14.0 * desc_lines as f64 - 14.0 + PAD;
    let mut svg = open(title, height);
    plot_area(&mut svg, left, top, right, bottom);
    for t in axis.ticks() {
        let p = x(t);
        let _ = write!(
            svg,
            r#"<line x1="{p:.1}" y1="{top:.1}" x2="{p:.1}" y2="{bottom:.1}" stroke="{GRID}"/><text x="{p:.1}" y="{ty:.1}" text-anchor="middle" font-size="{SMALL}">{label}</text>"#,
            ty = bottom + 15.0,
            label = esc(&axis.label(t)),
        );
    }
    let zero = x(0.0);
    let _ = write!(
        svg,
        r#"<line x1="{zero:.1}" y1="{top:.1}" x2="{zero:.1}" y2="{bottom:.1}" stroke="{INK}" stroke-width="1.5"/><line x1="{left:.1}" y1="{bottom:.1}" x2="{right:.1}" y2="{bottom:.1}" stroke="{INK}"/>"#,
    );
    centred_lines(&mut svg, x_desc, (left + right) / 2.0, bottom + 32.0);
    let bar = |v: f64| {
        let v = if v.is_finite() { v } else { 0.0 };
        (v, zero.min(x(v)), zero.max(x(v)))
    };
    for (i, r) in rows.iter().enumerate() {
        let (_, from, to) = bar(r.value);
        let _ = write!(
            svg,
            r#"<rect x="{from:.1}" y="{by:.1}" width="{w:.1}" height="{BAR}" fill="{c}"/>"#,
            by = top + ROW * i as f64 + LABEL_LINE,
            w = to - from,
            c = r.colour,
        );
    }
    // The reference over the bars, the labels (with a white halo) over both.
    if let Some(r) = reference {
        let p = x(r);
        let _ = write!(
            svg,
            r#"<polyline points="{p:.1},{top:.1} {p:.1},{bottom:.1}" fill="none" stroke="{ORANGE}" stroke-width="2" stroke-dasharray="6 4"/>"#,
        );
    }
    // Labels start at the plot's left edge, or, when bars go left of 0,
    // at the chart's.
    let label_x = if lo < 0.0 { PAD } else { left + 3.0 };
    let label_chars = ((WIDTH - PAD - label_x) / (EM * FONT)) as usize;
    for (i, r) in rows.iter().enumerate() {
        let y = top + ROW * i as f64;
        let (v, from, to) = bar(r.value);
        let (end, anchor) = if v < 0.0 {
            (from - 4.0, "end")
        } else {
            (to + 4.0, "start")
        };
        let _ = write!(
            svg,
            r#"<text x="{label_x:.1}" y="{ly:.1}"{HALO}>{l}</text><text x="{end:.1}" y="{vy:.1}" text-anchor="{anchor}" font-size="{SMALL}"{HALO}>{vl}</text>"#,
            ly = y + LABEL_LINE - 4.0,
            l = esc(&truncate(&r.label, label_chars)),
            vy = y + LABEL_LINE + BAR - 3.0,
            vl = esc(&r.value_label),
        );
    }
    close(svg)
}

/// A bar chart: one horizontal bar per label, each label on its own line
/// above its bar (so long labels never collide), the value at the bar's
/// end, and an optional reference drawn as a dashed vertical line.
pub(crate) fn bar_chart(
    title: &str,
    labels: &[String],
    values: &[f64],
    x_desc: &str,
    reference: Option<f64>,
) -> String {
    let rows: Vec<Row> = labels
        .iter()
        .zip(values)
        .map(|(l, v)| Row {
            label: l.clone(),
            value: *v,
            value_label: value_label(*v),
            colour: BLUE,
        })
        .collect();
    rows_chart(title, &rows, x_desc, reference, false)
}

/// One group in a [`difference_chart`]: its label, its difference from the
/// overall rate in percentage points, and how many it counts (shown beside
/// the label, so a large difference in a small group reads as such).
pub(crate) struct Difference<'a> {
    pub label: &'a str,
    pub points: f64,
    pub count: u64,
}

/// A diverging bar chart: one row per group, its bar drawn from 0 to the
/// group's difference from the overall rate in percentage points (left,
/// red, for under-represented; right, blue, for over-represented), its
/// label and count above the bar and the difference at the bar's end. The
/// axis is symmetric around 0 and spans every bar (at least ±1 point).
pub(crate) fn difference_chart(title: &str, unit: &str, groups: &[Difference]) -> String {
    let rows: Vec<Row> = groups
        .iter()
        .map(|g| {
            let v = if g.points.is_finite() { g.points } else { 0.0 };
            Row {
                label: format!("{} (n={})", g.label, value_label(g.count as f64)),
                value: v,
                value_label: points_label(v),
                colour: if v < 0.0 { RED } else { BLUE },
            }
        })
        .collect();
    rows_chart(title, &rows, unit, None, true)
}

/// A line chart: each series a line with points, each reference a dashed
/// horizontal line; the y axis spans `y_range` (ticks inside it), the x
/// axis from 0 to past the last point; the y axis's description above it
/// and the legend below the chart, one entry a line.
pub(crate) fn line_chart(
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    references: &[(String, f64)],
    (x_desc, y_desc): (&str, &str),
    y_range: std::ops::Range<f64>,
) -> String {
    const COLOURS: [&str; 4] = [BLUE, ORANGE, "#5a8c3c", "#785096"];
    const PLOT_HEIGHT: f64 = 220.0;
    let x_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let y_axis = {
        let mut a = Axis::spanning(y_range.start, y_range.end, PLOT_HEIGHT, false, true, false);
        // Ticks inside the range given; the axis is the range itself.
        a.lo = y_range.start;
        a.hi = y_range.end;
        a
    };
    let y_ticks: Vec<f64> = {
        let first = (y_axis.lo / y_axis.step - 1e-9).ceil() as i64;
        let last = (y_axis.hi / y_axis.step + 1e-9).floor() as i64;
        (first..=last).map(|i| i as f64 * y_axis.step).collect()
    };
    let y_labels_w = y_ticks
        .iter()
        .map(|t| text_width(&y_axis.label(*t), SMALL))
        .fold(0.0, f64::max);
    let left = PAD + y_labels_w + 8.0;
    let x_axis_guess = Axis::spanning(0.0, x_max, WIDTH - left - PAD - 15.0, false, false, false);
    let right = WIDTH - PAD - x_axis_guess.widest() / 2.0;
    let x_axis = Axis::spanning(0.0, x_max, right - left, false, false, false);
    let top = PAD + 26.0;
    let bottom = top + PLOT_HEIGHT;
    let legend: Vec<(&str, &str, bool)> = series
        .iter()
        .enumerate()
        .map(|(i, (l, _))| (l.as_str(), COLOURS[i % COLOURS.len()], false))
        .chain(
            references
                .iter()
                .enumerate()
                .map(|(i, (l, _))| (l.as_str(), COLOURS[i % COLOURS.len()], true)),
        )
        .collect();
    let legend_top = bottom + 52.0;
    let height = legend_top + 18.0 * legend.len() as f64 + PAD;
    let x = |v: f64| x_axis.at(v, left, right);
    let y = |v: f64| y_axis.at(v, bottom, top);
    let mut svg = open(title, height);
    plot_area(&mut svg, left, top, right, bottom);
    let _ = write!(
        svg,
        r#"<text x="{PAD}" y="{:.1}" font-size="{SMALL}">{}</text>"#,
        PAD + 12.0,
        esc(y_desc)
    );
    for t in &y_ticks {
        let p = y(*t);
        let _ = write!(
            svg,
            r#"<line x1="{left:.1}" y1="{p:.1}" x2="{right:.1}" y2="{p:.1}" stroke="{GRID}"/><text x="{lx:.1}" y="{ty:.1}" text-anchor="end" font-size="{SMALL}">{l}</text>"#,
            lx = left - 6.0,
            ty = p + 4.0,
            l = esc(&y_axis.label(*t)),
        );
    }
    for t in x_axis.ticks() {
        let p = x(t);
        let _ = write!(
            svg,
            r#"<line x1="{p:.1}" y1="{bottom:.1}" x2="{p:.1}" y2="{tb:.1}" stroke="{INK}"/><text x="{p:.1}" y="{ty:.1}" text-anchor="middle" font-size="{SMALL}">{l}</text>"#,
            tb = bottom + 4.0,
            ty = bottom + 16.0,
            l = esc(&x_axis.label(t)),
        );
    }
    let _ = write!(
        svg,
        r#"<line x1="{left:.1}" y1="{top:.1}" x2="{left:.1}" y2="{bottom:.1}" stroke="{INK}"/><line x1="{left:.1}" y1="{bottom:.1}" x2="{right:.1}" y2="{bottom:.1}" stroke="{INK}"/>"#,
    );
    centred_lines(&mut svg, x_desc, (left + right) / 2.0, bottom + 34.0);
    for (i, (_, ry)) in references.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<polyline points="{left:.1},{p:.1} {right:.1},{p:.1}" fill="none" stroke="{c}" stroke-opacity="0.6" stroke-dasharray="6 4"/>"#,
            p = y(*ry),
            c = COLOURS[i % COLOURS.len()],
        );
    }
    for (i, (_, points)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let coords: Vec<String> = points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            coords.join(" ")
        );
        for &(px, py) in points {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                x(px),
                y(py)
            );
        }
    }
    let label_chars = ((WIDTH - 2.0 * PAD - 24.0) / (EM * SMALL)) as usize;
    for (i, (label, c, dashed)) in legend.iter().enumerate() {
        let ly = legend_top + 18.0 * i as f64;
        let _ = write!(
            svg,
            r#"<line x1="{PAD}" y1="{sy:.1}" x2="{sx:.1}" y2="{sy:.1}" stroke="{c}" stroke-width="2"{dash}/><text x="{tx:.1}" y="{ly:.1}" font-size="{SMALL}">{l}</text>"#,
            sy = ly - 4.0,
            sx = PAD + 18.0,
            dash = if *dashed {
                r#" stroke-dasharray="6 4" stroke-opacity="0.6""#
            } else {
                ""
            },
            tx = PAD + 24.0,
            l = esc(&truncate(label, label_chars)),
        );
    }
    close(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_span_their_data_on_round_ticks() {
        let a = Axis::spanning(-3.2, 3.2, 400.0, true, false, false);
        assert!(a.lo <= -3.2 && a.hi >= 3.2, "{a:?}");
        assert_eq!(a.label(a.hi), format!("+{}", a.hi));
        let a = Axis::spanning(0.0, 96.4, 460.0, false, false, false);
        assert!(a.hi >= 96.4 && a.hi <= 120.0 && a.lo == 0.0, "{a:?}");
        let a = Axis::spanning(0.0, 1_234_567.0, 460.0, false, false, true);
        assert!(a.hi >= 1_234_567.0 && a.intervals() <= 6, "{a:?}");
        assert!(
            a.label(a.hi).ends_with('M') || a.label(a.hi).ends_with('k'),
            "{a:?}"
        );
        // No data: still an axis.
        let a = Axis::spanning(0.0, 0.0, 460.0, false, false, true);
        assert!(a.hi > a.lo);
        // Counts: whole ticks only.
        let a = Axis::spanning(0.0, 2.0, 400.0, false, false, true);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 2.0, 1.0));
    }

    #[test]
    fn values_and_wrapping() {
        assert_eq!(value_label(1234567.0), "1,234,567");
        assert_eq!(value_label(-1000.0), "-1,000");
        assert_eq!(value_label(96.44), "96.4");
        assert_eq!(value_label(0.034), "0.03");
        assert_eq!(wrap("a bb ccc dddd", 6), ["a bb", "ccc", "dddd"]);
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(points_label(-3.04), "-3.0");
        assert_eq!(points_label(-0.04), "-0.04");
        assert_eq!(points_label(0.001), "0.0");
    }
}
