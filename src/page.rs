//! The pieces shared by gpdp's self-contained HTML pages (the report, the
//! public register, the benchmark's charts): escaping, key-value tables,
//! the stylesheet, and SVG bar and line charts drawn with plotters. No
//! scripts and nothing fetched, so every page reads offline and prints.

use std::fmt::Write as _;

use plotters::prelude::*;

/// One bar chart as an SVG element, with an optional horizontal reference line.
pub(crate) fn bar_chart(
    title: &str,
    labels: &[String],
    values: &[f64],
    y_desc: &str,
    reference: Option<f64>,
) -> anyhow::Result<String> {
    let mut svg = String::new();
    let width = (140 + 90 * labels.len() as u32).clamp(420, 900);
    {
        let root = SVGBackend::with_string(&mut svg, (width, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let top = values
            .iter()
            .copied()
            .chain(reference)
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.15;
        let n = labels.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            // A segmented range a..b has a slot for b too: end it at the
            // last bar, so no empty slot is drawn after it.
            .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), 0.0..top)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc(y_desc)
            .y_label_formatter(&|y| format_axis(*y))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(chart_err)?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(RGBColor(46, 111, 142).filled())
                    .margin(8)
                    .data(values.iter().enumerate().map(|(i, v)| (i, *v))),
            )
            .map_err(chart_err)?;
        if let Some(r) = reference {
            chart
                .draw_series(LineSeries::new(
                    [(SegmentValue::Exact(0), r), (SegmentValue::Last, r)],
                    RGBColor(200, 80, 40).stroke_width(2),
                ))
                .map_err(chart_err)?;
        }
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

/// One line chart as an SVG element: each series a labelled line with
/// points, each reference a labelled dashed horizontal line; the y axis
/// spans `y_range`.
pub(crate) fn line_chart(
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    references: &[(String, f64)],
    (x_desc, y_desc): (&str, &str),
    y_range: std::ops::Range<f64>,
) -> anyhow::Result<String> {
    const COLOURS: [RGBColor; 4] = [
        RGBColor(46, 111, 142),
        RGBColor(200, 80, 40),
        RGBColor(90, 140, 60),
        RGBColor(120, 80, 150),
    ];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let x_max = series
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.0))
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max * 1.02, y_range)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|x| format_axis(*x))
            .y_label_formatter(&|y| format_axis(*y))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(chart_err)?;
        for (i, (label, points)) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(chart_err)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(chart_err)?;
        }
        for (i, (label, y)) in references.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()].mix(0.6);
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, *y), (x_max * 1.02, *y)],
                    6,
                    4,
                    colour.stroke_width(1),
                ))
                .map_err(chart_err)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(201, 212, 218))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(chart_err)?;
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

/// One group in a [`difference_chart`]: its label, its difference from the
/// overall rate in percentage points, and how many it counts (shown beside
/// the label, so a large difference in a small group reads as such).
pub(crate) struct Difference<'a> {
    pub label: &'a str,
    pub points: f64,
    pub count: u64,
}

/// A diverging bar chart as an SVG element: one row per group, each bar
/// drawn from 0 to the group's difference from the overall rate in
/// percentage points (left, in red, for under-represented; right, in blue,
/// for over-represented), with the group's label and count on the left and
/// the difference at the bar's end. Rows are a fixed height apart and
/// labels are horizontal, so no two labels can overlap; the axis is
/// symmetric around 0 and spans every bar (at least ±1 point).
pub(crate) fn difference_chart(title: &str, unit: &str, groups: &[Difference]) -> String {
    const ROW: f64 = 24.0;
    const LABELS: f64 = 230.0;
    const PLOT: f64 = 460.0;
    const TOP: f64 = 46.0;
    let width = LABELS + PLOT + 70.0;
    let height = TOP + ROW * groups.len().max(1) as f64 + 40.0;
    let span = groups
        .iter()
        .map(|g| g.points.abs())
        .filter(|p| p.is_finite())
        .fold(1.0f64, f64::max);
    // Round the axis out to a step that gives 2 to 5 ticks each side.
    let step = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 25.0, 50.0]
        .into_iter()
        .find(|s| span / s <= 4.0)
        .unwrap_or(100.0);
    let half = (span / step).ceil() * step;
    let x = |v: f64| LABELS + PLOT / 2.0 + v / half * (PLOT / 2.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" role="img"><title>{t}</title><rect width="100%" height="100%" fill="white"/><text x="{cx}" y="22" text-anchor="middle" font-size="16">{t}</text>"#,
        t = esc(title),
        cx = width / 2.0,
    );
    let axis_y = TOP + ROW * groups.len().max(1) as f64;
    let mut tick = -half;
    while tick <= half + step / 2.0 {
        let _ = write!(
            svg,
            r##"<line x1="{p:.1}" y1="{TOP}" x2="{p:.1}" y2="{axis_y}" stroke="#e3e9ec"/><text x="{p:.1}" y="{ty}" text-anchor="middle" font-size="11">{label}</text>"##,
            p = x(tick),
            ty = axis_y + 14.0,
            label = if tick.abs() < step / 2.0 {
                "0".to_owned()
            } else {
                format!("{tick:+}")
            },
        );
        tick += step;
    }
    let _ = write!(
        svg,
        r##"<line x1="{z:.1}" y1="{top}" x2="{z:.1}" y2="{axis_y}" stroke="#1d2a33" stroke-width="1.5"/><text x="{cx}" y="{uy}" text-anchor="middle" font-size="11">{unit}</text>"##,
        z = x(0.0),
        top = TOP - 6.0,
        cx = LABELS + PLOT / 2.0,
        uy = axis_y + 32.0,
        unit = esc(unit),
    );
    for (i, g) in groups.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let v = if g.points.is_finite() { g.points } else { 0.0 };
        let (from, to) = (x(0.0).min(x(v)), x(0.0).max(x(v)));
        let colour = if v < 0.0 { "#b3261e" } else { "#2e6f8e" };
        let (end, anchor) = if v < 0.0 {
            (from - 4.0, "end")
        } else {
            (to + 4.0, "start")
        };
        let _ = write!(
            svg,
            r#"<text x="{lx}" y="{ty:.1}" text-anchor="end" font-size="11">{label} (n={count})</text><rect x="{from:.1}" y="{by:.1}" width="{w:.1}" height="{bh}" fill="{colour}"/><text x="{end:.1}" y="{ty:.1}" text-anchor="{anchor}" font-size="11">{v:+.1}</text>"#,
            lx = LABELS - 8.0,
            ty = y + ROW / 2.0 + 4.0,
            label = esc(&truncate(g.label, 28)),
            count = g.count,
            by = y + 4.0,
            w = (to - from).max(0.5),
            bh = ROW - 8.0,
        );
    }
    svg + "</svg>"
}

/// At most `n` characters, with an ellipsis when cut.
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e:?}")
}

fn format_axis(y: f64) -> String {
    if y.abs() >= 1e6 {
        format!("{:.1}M", y / 1e6)
    } else if y.abs() >= 1e4 {
        format!("{:.0}k", y / 1e3)
    } else if y.fract() == 0.0 {
        format!("{y:.0}")
    } else {
        format!("{y:.1}")
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub(crate) fn kv_table(rows: &[(&str, String)]) -> String {
    let mut t = String::from("<table>");
    for (k, v) in rows {
        let _ = write!(t, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    t + "</table>"
}

pub(crate) const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1d2a33;line-height:1.45}\
h1{font-size:1.6em}h2{border-bottom:2px solid #2e6f8e;padding-bottom:.2em;margin-top:2em}\
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}td,th{border:1px solid #c9d4da;padding:.3em .6em;text-align:left;vertical-align:top}\
th{background:#eef3f6}.pass{color:#1f7a3a;font-weight:600}.fail{color:#b3261e;font-weight:700}\
.verdict{font-size:1.15em;padding:.6em 1em;border-radius:6px;display:inline-block}.ok{background:#e3f4e8}.bad{background:#fbe4e2}\
svg{max-width:100%;height:auto;display:block;margin:.6em 0}.note{color:#56656f;font-size:.9em}\
@media print{h2{page-break-after:avoid}svg{page-break-inside:avoid}}";
