//! The report and the register as a person sees them: each page opened in
//! headless Chromium (Debian's package; `scripts/chromium` installs it and
//! the README's test command passes it as `GPDP_CHROMIUM`) at a desktop
//! width (1280 px) and a phone's (390 px) — in a frame of that width, as
//! headless Chromium lays no window out narrower than 500 px — a screenshot
//! taken of the whole page, and the charts' geometry read from the
//! browser's layout: no two labels of a chart overlap, every label lies
//! inside its chart, every plotted mark lies inside the area the chart's
//! axes span, and the page is no wider than the screen.
//!
//! The geometry comes from a copy of the page with a script appended (the
//! pages themselves stay script-free): for each `<svg>` it takes
//! `getBoundingClientRect()` of every `<text>`, of the chart's
//! `<rect class="plot-area">` and of its marks (`rect`, `circle`,
//! `polyline`, `path`: the convention of `src/page/chart.rs`), and writes
//! the result as JSON into `<pre id="gpdp-geometry">`, which
//! `chromium --dump-dom` prints. A positive control runs the same check on
//! a chart drawn wrong in this file (long labels under vertical bars, a bar
//! past its axis, a label cut off) and on a blank page's screenshot.
//!
//! The screenshots stay in the test's temporary directory (they show a
//! store's figures: never commit them); `GPDP_SHOTS=DIR` copies them into
//! DIR to look at.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Desktop and phone: CSS pixels wide, and the window's height for the
/// geometry run.
const WIDTHS: [(&str, u32, u32); 2] = [("desktop", 1280, 900), ("phone", 390, 844)];
/// Two boxes overlap when they share more than this, in CSS pixels, both
/// ways; a box is inside another when it sticks out by at most this.
const TOLERANCE: f64 = 0.5;
/// Chromium's screenshots are taken at most this tall.
const MAX_SHOT_HEIGHT: u64 = 16_000;

fn chromium_binary() -> PathBuf {
    std::env::var_os("GPDP_CHROMIUM")
        .filter(|p| !p.is_empty())
        .expect("GPDP_CHROMIUM: the path of a headless Chromium (the README's test command sets it with scripts/chromium)")
        .into()
}

/// Runs Chromium headless on `page` with `args`, in a fresh profile, and
/// returns its stdout; panics on failure or after two minutes.
fn chromium(page: &Path, width: u32, height: u32, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium_binary())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},{height}"))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("GPDP_CHROMIUM runs");
    // Read stdout and stderr on threads so a full pipe cannot stall it.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).map(|_| s)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium on {} did not finish in 2 minutes", page.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out.join().unwrap().unwrap_or_default();
    let err = err.join().unwrap().unwrap_or_default();
    assert!(
        status.success(),
        "chromium on {} failed ({status}): {err}",
        page.display()
    );
    out
}

/// Finds, in the browser's layout of every `<svg>`, labels that overlap or
/// stick out of their chart and marks outside the plot area; writes the
/// findings as JSON into `<pre id="gpdp-geometry">`.
const GEOMETRY: &str = r#"<script>
(() => {
  const tol = TOLERANCE;
  const box = (e) => { const r = e.getBoundingClientRect(); return { l: r.left, t: r.top, r: r.right, b: r.bottom }; };
  const overlap = (a, b) => Math.min(a.r, b.r) - Math.max(a.l, b.l) > tol && Math.min(a.b, b.b) - Math.max(a.t, b.t) > tol;
  const inside = (a, o) => a.l >= o.l - tol && a.r <= o.r + tol && a.t >= o.t - tol && a.b <= o.b + tol;
  const doc = document.documentElement;
  const out = { viewport: doc.clientWidth, page_width: doc.scrollWidth, page_height: doc.scrollHeight, charts: [] };
  document.querySelectorAll('svg').forEach((svg, i) => {
    const fig = svg.closest('figure');
    const cap = fig ? fig.querySelector('figcaption') : null;
    const c = { name: cap ? cap.textContent : (svg.getAttribute('aria-label') || ('svg #' + i)),
                texts: 0, unsized: [], overlaps: [], outside_chart: [], plot_area: false, marks: 0, outside_plot: [] };
    const frame = box(svg);
    const texts = [...svg.querySelectorAll('text')]
      .filter((t) => t.textContent.trim() !== '')
      .map((t) => ({ text: t.textContent, b: box(t) }));
    c.texts = texts.length;
    // A label drawn with no width (no font) would hide every overlap.
    texts.forEach((t) => { if (t.b.r - t.b.l < 1 || t.b.b - t.b.t < 1) c.unsized.push(t.text); });
    for (let a = 0; a < texts.length; a++) {
      for (let b = a + 1; b < texts.length; b++) {
        if (overlap(texts[a].b, texts[b].b)) c.overlaps.push([texts[a].text, texts[b].text]);
      }
      if (!inside(texts[a].b, frame)) c.outside_chart.push(texts[a].text);
    }
    const plot = svg.querySelector('rect.plot-area');
    if (plot) {
      c.plot_area = true;
      const p = box(plot);
      svg.querySelectorAll('rect, circle, polyline, path').forEach((m) => {
        if (m === plot || m.getAttribute('width') === '100%') return;
        c.marks++;
        let b = box(m);
        if (m.tagName === 'circle') {
          // A point is where its centre is.
          const x = (b.l + b.r) / 2, y = (b.t + b.b) / 2;
          b = { l: x, r: x, t: y, b: y };
        }
        if (!inside(b, p)) {
          c.outside_plot.push(m.tagName + ' ' + ['l', 't', 'r', 'b'].map((k) => Math.round(b[k] - p[k])).join(','));
        }
      });
    }
    out.charts.push(c);
  });
  // Into the frame's parent, whose DOM Chromium prints.
  const pre = parent.document.createElement('pre');
  pre.id = 'gpdp-geometry';
  pre.textContent = JSON.stringify(out);
  parent.document.body.appendChild(pre);
})();
</script>"#;

/// What the browser measured on one page at one width.
#[derive(Debug)]
struct Geometry {
    viewport: f64,
    page_width: f64,
    page_height: f64,
    charts: Vec<serde_json::Value>,
}

/// A page that shows `html` in a frame `width` × `height` CSS pixels,
/// written beside `page` as `page.NAME.html`. Headless Chromium lays a
/// window out at least 500 px wide, whatever `--window-size` says: a
/// frame is how a page gets a phone's 390 px viewport. The frame's
/// document is given inline (`srcdoc`): the pages are self-contained, and
/// the frame shares its parent's origin, so a script in it can write into
/// the parent.
fn framed(page: &Path, name: &str, html: &str, width: u32, height: u64) -> PathBuf {
    let frame = page.with_extension(format!("{name}.html"));
    std::fs::write(
        &frame,
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"></head><body style=\"margin:0\"><iframe style=\"border:0;display:block;width:{width}px;height:{height}px\" srcdoc=\"{}\"></iframe></body></html>",
            html.replace('&', "&amp;").replace('"', "&quot;")
        ),
    )
    .unwrap();
    frame
}

/// Lays out `page` in a frame `width` CSS pixels wide in Chromium, with
/// [`GEOMETRY`] appended, and returns what the script found.
fn geometry(page: &Path, width: u32, height: u32) -> Geometry {
    let html = std::fs::read_to_string(page).unwrap();
    assert!(
        !html.contains("<script"),
        "{} has a script of its own",
        page.display()
    );
    let script = GEOMETRY.replace("TOLERANCE", &TOLERANCE.to_string());
    let with_script = match html.rfind("</body>") {
        Some(i) => format!("{}{script}{}", &html[..i], &html[i..]),
        None => html + &script,
    };
    let copy = framed(
        page,
        &format!("geometry-{width}"),
        &with_script,
        width,
        u64::from(height),
    );
    let dom = chromium(
        &copy,
        width.max(500),
        height,
        &["--virtual-time-budget=3000", "--dump-dom"],
    );
    let start = dom
        .find("<pre id=\"gpdp-geometry\">")
        .unwrap_or_else(|| panic!("no geometry in the DOM of {}: {dom:.2000}", copy.display()))
        + "<pre id=\"gpdp-geometry\">".len();
    let json = &dom[start..start + dom[start..].find("</pre>").unwrap()];
    let json = json
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&");
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("geometry of {}: {e}: {json}", copy.display()));
    Geometry {
        viewport: v["viewport"].as_f64().unwrap(),
        page_width: v["page_width"].as_f64().unwrap(),
        page_height: v["page_height"].as_f64().unwrap(),
        charts: v["charts"].as_array().unwrap().clone(),
    }
}

/// Every fault the geometry shows, one line each, naming the chart and the
/// labels or marks.
fn faults(g: &Geometry) -> Vec<String> {
    let mut faults = Vec::new();
    if g.page_width > g.viewport + TOLERANCE {
        faults.push(format!(
            "the page is {} px wide on a {} px screen",
            g.page_width, g.viewport
        ));
    }
    for c in &g.charts {
        let name = c["name"].as_str().unwrap_or("?");
        for t in c["unsized"].as_array().unwrap() {
            faults.push(format!(
                "{name}: a label laid out with no size (no font?): {t}"
            ));
        }
        for pair in c["overlaps"].as_array().unwrap() {
            faults.push(format!("{name}: labels overlap: {pair}"));
        }
        for t in c["outside_chart"].as_array().unwrap() {
            faults.push(format!("{name}: label outside the chart: {t}"));
        }
        if c["plot_area"] != true {
            faults.push(format!("{name}: no plot-area rect"));
        } else if c["marks"] == 0 {
            faults.push(format!("{name}: nothing plotted"));
        }
        for m in c["outside_plot"].as_array().unwrap() {
            faults.push(format!(
                "{name}: a mark outside the axes' range (left, top, right, bottom from the plot area's): {m}"
            ));
        }
    }
    faults
}

/// Takes a screenshot of `page` in a frame `width` × `height` into `png`
/// and checks it is a PNG of that size with something drawn on it.
fn screenshot(page: &Path, width: u32, height: u64, png: &Path) -> Result<(), String> {
    let height = height.clamp(1, MAX_SHOT_HEIGHT) as u32;
    let html = std::fs::read_to_string(page).unwrap();
    let frame = framed(
        page,
        &format!("shot-{width}"),
        &html,
        width,
        u64::from(height),
    );
    chromium(
        &frame,
        width,
        height,
        &[&format!("--screenshot={}", png.display())],
    );
    let bytes = std::fs::read(png).map_err(|e| format!("{}: {e}", png.display()))?;
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return Err(format!("{} is not a PNG", png.display()));
    }
    let size = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    if (size(16), size(20)) != (width, height) {
        return Err(format!(
            "{} is {}×{}, not {width}×{height}",
            png.display(),
            size(16),
            size(20)
        ));
    }
    // A blank page compresses to well under 0.01 bytes a pixel; these pages,
    // all text and charts, to about 0.1.
    let per_pixel = bytes.len() as f64 / (f64::from(width) * f64::from(height));
    if per_pixel < 0.01 {
        return Err(format!(
            "{} looks blank: {} bytes for {width}×{height} ({per_pixel:.4} a pixel)",
            png.display(),
            bytes.len()
        ));
    }
    Ok(())
}

/// A small store with everything the two pages show: collected with the
/// NDOO list, linked hospital and death records, questions released and
/// refused; then `report.html` and `register.html` written from it.
fn pages() -> (Collected, Vec<(&'static str, PathBuf)>) {
    let c = collected_with_ndoo(3, 1200, 23, 5);
    let o = link(&c, &["--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for sql in [
        "SELECT sex, count(*) AS n FROM patients GROUP BY sex",
        "SELECT age_band, count(DISTINCT patient_id) AS n FROM patients GROUP BY age_band",
        "SELECT * FROM patients",
    ] {
        let _ = query_as_alice(&c.store, &[sql]);
    }
    let report_dir = c._dir.path().join("report");
    let o = report(&c, &report_dir, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let register = c._dir.path().join("register");
    let o = run(&[
        "register",
        "--store",
        c.store.to_str().unwrap(),
        "--out",
        register.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pages = vec![
        ("report", report_dir.join("report.html")),
        ("register", register.join("register.html")),
    ];
    (c, pages)
}

/// Copies `png` into `GPDP_SHOTS`, when set.
fn keep(png: &Path) {
    if let Some(dir) = std::env::var_os("GPDP_SHOTS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(png, dir.join(png.file_name().unwrap())).unwrap();
    }
}

/// The report and the register at desktop and phone widths: a screenshot
/// of each whole page, no label of any chart overlapping another or cut
/// off, every mark within its axes, and no page wider than the screen.
#[test]
#[ignore = "needs headless Chromium: run the README's test command (GPDP_CHROMIUM)"]
fn the_report_and_register_in_a_browser_at_desktop_and_phone_widths() {
    let _ = chromium_binary();
    let (c, pages) = pages();
    let shots = c._dir.path().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let report_html = std::fs::read_to_string(&pages[0].1).unwrap();
    let report_charts = report_html.matches("<svg").count();
    assert!(
        report_html.contains("7. Linked data") && report_charts >= 12,
        "the report lacks the linkage section or charts ({report_charts} charts)"
    );
    let mut failures = Vec::new();
    for (name, page) in &pages {
        let html = std::fs::read_to_string(page).unwrap();
        for (device, width, height) in WIDTHS {
            let g = geometry(page, width, height);
            assert_eq!(
                g.charts.len(),
                html.matches("<svg").count(),
                "{name} at {width} px: charts measured"
            );
            let texts: u64 = g.charts.iter().map(|c| c["texts"].as_u64().unwrap()).sum();
            eprintln!(
                "{name} at {width} px: {} charts, {texts} labels, page {}×{} px",
                g.charts.len(),
                g.page_width,
                g.page_height
            );
            for f in faults(&g) {
                failures.push(format!("{name} at {width} px ({device}): {f}"));
            }
            let png = shots.join(format!("{name}-{device}.png"));
            if let Err(e) = screenshot(page, width, g.page_height as u64, &png) {
                failures.push(e);
            }
            keep(&png);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The check above can fail: a bar chart drawn as the report's once were —
/// long labels centred under narrow vertical bars, a bar past the top of
/// its axis, a label past the chart's edge — is caught on each count, a
/// well-placed chart is not, and a blank page's screenshot is.
#[test]
#[ignore = "needs headless Chromium: run the README's test command (GPDP_CHROMIUM)"]
fn the_browser_check_catches_overlapping_labels_marks_off_the_axes_and_blank_shots() {
    let _ = chromium_binary();
    let dir = tempfile::tempdir().unwrap();
    let labels = [
        "sexually_transmitted_infection",
        "termination_of_pregnancy",
        "gender_reassignment",
    ];
    let mut bad = String::from(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="420" height="300" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><rect class="plot-area" x="60" y="20" width="300" height="230" fill="none"/>"#,
    );
    for (i, l) in labels.iter().enumerate() {
        let x = 110.0 + 90.0 * i as f64;
        // The last bar is twice the axis's height.
        let (y, h) = if i == 2 {
            (-210.0, 460.0)
        } else {
            (150.0, 100.0)
        };
        bad += &format!(
            r#"<rect x="{}" y="{y}" width="40" height="{h}" fill="blue"/><text x="{x}" y="270" text-anchor="middle">{l}</text>"#,
            x - 20.0
        );
    }
    bad += r#"<text x="400" y="14">cut off at the edge</text></svg>"#;
    let good = r#"<svg xmlns="http://www.w3.org/2000/svg" width="420" height="120" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><rect class="plot-area" x="20" y="10" width="380" height="80" fill="none"/><text x="20" y="22">termination_of_pregnancy</text><rect x="20" y="26" width="200" height="14" fill="blue"/><text x="20" y="58">sexually_transmitted_infection</text><rect x="20" y="62" width="380" height="14" fill="blue"/><circle cx="400" cy="90" r="3"/><text x="210" y="110" text-anchor="middle">rows</text></svg>"#;
    let page = dir.path().join("control.html");
    std::fs::write(
        &page,
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"></head><body><figure><figcaption>bad</figcaption>{bad}</figure><figure><figcaption>good</figcaption>{good}</figure></body></html>"
        ),
    )
    .unwrap();
    let g = geometry(&page, 1280, 900);
    let f = faults(&g);
    let of = |chart: &str, what: &str| {
        f.iter()
            .filter(|l| l.starts_with(&format!("{chart}: {what}")))
            .count()
    };
    assert!(of("bad", "labels overlap") >= 2, "{f:#?}");
    assert!(
        f.iter()
            .any(|l| l.contains("sexually_transmitted_infection")
                && l.contains("termination_of_pregnancy")),
        "{f:#?}"
    );
    assert_eq!(of("bad", "a mark outside"), 1, "{f:#?}");
    assert_eq!(of("bad", "label outside the chart"), 1, "{f:#?}");
    assert_eq!(of("good", ""), 0, "{f:#?}");

    let blank = dir.path().join("blank.html");
    std::fs::write(&blank, "<!doctype html><html><body></body></html>").unwrap();
    let e = screenshot(&blank, 390, 844, &dir.path().join("blank.png"))
        .expect_err("a blank page passed as a screenshot");
    assert!(e.contains("looks blank"), "{e}");
}
