//! The load benchmark's charts: SVG files drawn with `plotters` (SVG backend
//! only, no font files: text is written as SVG `<text>` and laid out with
//! estimated sizes), every column of a scenario side by side in one chart.
//!
//! - a latency chart per load scenario: each column's per-event latency as a
//!   percentile curve, p0 to p99.9 on a "nines" axis, latency on a log axis;
//! - bar charts: CPU per event (proxy and Redis stacked) and, for the
//!   open-streams scenario, RSS per open stream with the target line.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::pct;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 540;
const FONT: &str = "sans-serif";

/// One colour per column of the tables (same order as `Col::ALL`), so a
/// column keeps its colour in every chart.
pub fn color(column: usize) -> RGBColor {
    const PALETTE: [RGBColor; 5] = [
        RGBColor(127, 127, 127), // direct
        RGBColor(31, 119, 180),  // pass-through
        RGBColor(214, 39, 40),   // Redis
        RGBColor(255, 127, 14),  // embedded
        RGBColor(44, 160, 44),   // nginx
    ];
    PALETTE[column % PALETTE.len()]
}

/// One column's latency samples, sorted (µs).
pub struct Curve<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub sorted_us: &'a [u32],
}

/// Percentile `100 × (1 − 10^−x)` at "nines" position `x` (0 → p0,
/// 1 → p90, 2 → p99, 3 → p99.9).
fn percentile_at(x: f64) -> f64 {
    100.0 * (1.0 - 10f64.powf(-x))
}

/// `0.0123` → "0.012", `12.3` → "12": a millisecond figure on a log axis.
fn ms_label(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else if v >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn draw_err(e: impl std::fmt::Display) -> String {
    format!("chart: {e}")
}

/// Per-event latency percentile curves, one per column, into `path`.
pub fn latency(path: &Path, title: &str, curves: &[Curve]) -> Result<(), String> {
    const NINES: f64 = 3.0; // up to p99.9
    let pts: Vec<Vec<(f64, f64)>> = curves
        .iter()
        .map(|c| {
            (0..=300)
                .filter_map(|i| {
                    let x = NINES * i as f64 / 300.0;
                    // At least 1 µs: a log axis has no zero.
                    let us = pct(c.sorted_us, percentile_at(x))?.max(1);
                    Some((x, us as f64 / 1000.0))
                })
                .collect()
        })
        .collect();
    let all = || pts.iter().flatten().map(|p| p.1);
    let (Some(lo), Some(hi)) = (
        all().min_by(|a, b| a.total_cmp(b)),
        all().max_by(|a, b| a.total_cmp(b)),
    ) else {
        return Err("chart: no latency samples".into());
    };
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let x_axis = 0f64..NINES;
    let y_axis = (lo * 0.8..hi * 1.25).log_scale();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x_axis, y_axis)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_labels(4) // p0, p90, p99, p99.9
        .x_desc("percentile of events")
        .y_desc("latency, ms (log scale)")
        .x_label_formatter(&|x| {
            let p = percentile_at(*x);
            if (p - p.round()).abs() < 0.01 {
                format!("p{p:.0}")
            } else {
                format!("p{p:.1}")
            }
        })
        .y_label_formatter(&|v| ms_label(*v))
        .label_style((FONT, 14))
        .draw()
        .map_err(draw_err)?;
    for (c, p) in curves.iter().zip(pts) {
        let style = c.color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(p, style))
            .map_err(draw_err)?
            .label(c.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)
}

/// One bar: a column, and its stacked parts (bottom first).
pub struct Bar<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub parts: Vec<f64>,
}

/// A bar chart of one figure per column, parts stacked: part 0 in the
/// column's colour, later parts lighter (named in `part_names`). `target`
/// draws a horizontal line with its label.
pub fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    part_names: &[&str],
    bars: &[Bar],
    target: Option<(f64, String)>,
) -> Result<(), String> {
    if bars.is_empty() {
        return Err("chart: no bars".into());
    }
    let n = bars.len() as i32;
    let top = bars
        .iter()
        .map(|b| b.parts.iter().sum::<f64>())
        .chain(target.as_ref().map(|t| t.0))
        .fold(0f64, f64::max);
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        // `a..b` of integers has b − a + 1 segments; at least two (one bar
        // alone would make an empty range).
        .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), 0f64..top)
        .map_err(draw_err)?;
    let names: Vec<&str> = bars.iter().map(|b| b.name).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() + 1)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).unwrap_or(&"").to_string(),
            _ => String::new(),
        })
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .draw()
        .map_err(draw_err)?;
    let parts = part_names.len().max(1);
    for k in 0..parts {
        let rects = bars.iter().enumerate().filter_map(|(i, b)| {
            let v = *b.parts.get(k)?;
            let base: f64 = b.parts[..k].iter().sum();
            let fill = if k == 0 {
                b.color.filled()
            } else {
                b.color.mix(0.4).filled()
            };
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i as i32), base),
                    (SegmentValue::Exact(i as i32 + 1), base + v),
                ],
                fill,
            );
            r.set_margin(0, 0, 24, 24);
            Some(r)
        });
        let drawn = chart.draw_series(rects).map_err(draw_err)?;
        if let Some(name) = part_names.get(k).filter(|_| part_names.len() > 1) {
            let fill = if k == 0 {
                BLACK.mix(0.8).filled()
            } else {
                BLACK.mix(0.3).filled()
            };
            drawn
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], fill));
        }
    }
    // The figure above each bar (its parts' sum).
    let label = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let total: f64 = b.parts.iter().sum();
            Text::new(
                format!("{total:.1}"),
                (SegmentValue::CenterOf(i as i32), total),
                label.clone(),
            )
        }))
        .map_err(draw_err)?;
    let has_target = target.is_some();
    if let Some((y, name)) = target {
        let style = RED.stroke_width(2);
        chart
            .draw_series(LineSeries::new(
                [(SegmentValue::Exact(0), y), (SegmentValue::Exact(n), y)],
                style,
            ))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    if part_names.len() > 1 || has_target {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
    }
    root.present().map_err(draw_err)
}
