//! SVG plots of kv-loadgen's results (`--plot DIR`), drawn with `plotters`' SVG backend
//! (no system fonts or libraries: text is left to the viewer, as SVG `<text>`).
//!
//! - [`spectrum_svg`]: the latency percentile spectrum of several targets in one case, as
//!   HdrHistogram's plotter draws it: latency against percentile on a log scale of
//!   1/(1-p), so 90%, 99%, 99.9%... are evenly spaced and the tail is visible.
//! - [`rate_svg`]: open-loop latency (p50, p99) against offered rate, one line per mix, over
//!   the achieved rate against the offered one: where the two part is the knee.
//! - [`durable_svg`]: durable puts/s and p99 at 1 and 50 writers, capkv and Redis.
//!
//! Every plot carries its conditions (date, commit, machine, pinning) as a caption line.

use plotters::prelude::*;

use crate::stats::SpectrumPoint;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 560;
/// The colours of successive series.
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// One target's spectrum in a case.
pub struct SpectrumSeries<'a> {
    pub label: &'a str,
    pub points: &'a [SpectrumPoint],
}

/// One open-loop step of a mix.
#[derive(Debug, Clone, Copy)]
pub struct RatePoint {
    pub offered_per_sec: f64,
    pub achieved_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl RatePoint {
    /// The step at `offered_per_sec` whose results are `all`.
    pub fn of(offered_per_sec: f64, all: &crate::stats::OpSummary) -> Self {
        Self {
            offered_per_sec,
            achieved_per_sec: all.ok_per_sec,
            p50_us: all.latency.p50_us,
            p99_us: all.latency.p99_us,
        }
    }
}

/// One durable-put case of one target.
#[derive(Debug, Clone, Copy)]
pub struct DurablePoint {
    pub writers: u32,
    pub puts_per_sec: f64,
    pub p99_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("nothing to plot: {0}")]
    Empty(&'static str),
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

/// Where percentile `p` (0-100) sits on the spectrum's x axis: -log10(1 - p/100), so 90% is
/// 1, 99% is 2, 99.9% is 3. 100% is drawn at `max_x`.
fn spectrum_x(percentile: f64, max_x: f64) -> f64 {
    let rest = 1.0 - percentile / 100.0;
    if rest <= 0.0 {
        max_x
    } else {
        (-rest.log10()).min(max_x)
    }
}

/// The percentile label of x on the spectrum axis ("90%", "99.9%").
fn spectrum_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = format!("{p:.3}");
    format!("{}%", digits.trim_end_matches('0').trim_end_matches('.'))
}

/// A chart on `area` with the margins and axis label room every plot here uses.
fn chart_builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(area);
    b.margin(12).x_label_area_size(40).y_label_area_size(70);
    b
}

/// The legend box, top left.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), PlotError> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)
}

/// A line through `points` with a dot at each, named `label` in the legend (when given).
fn dotted_line<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    label: Option<&str>,
) -> Result<(), PlotError>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
        .map_err(draw_err)?;
    let line = chart
        .draw_series(LineSeries::new(points, colour.stroke_width(2)))
        .map_err(draw_err)?;
    if let Some(label) = label {
        line.label(label).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
        });
    }
    Ok(())
}

/// The conditions line under a plot; then the plot is complete.
fn finish<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    foot: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
) -> Result<(), PlotError> {
    foot.draw_text(caption, &("sans-serif", 12).into_text_style(foot), (12, 8))
        .map_err(draw_err)?;
    root.present().map_err(draw_err)
}

/// Counts and rates without decimals.
fn whole(v: &f64) -> String {
    format!("{v:.0}")
}

/// A latency axis range (ms, log scale) holding every value, with some room.
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.001..1.0;
    }
    (lo / 1.5)..(hi * 1.5)
}

/// The latency percentile spectrum of `series` (one case), as SVG.
pub fn spectrum_svg(
    title: &str,
    caption: &str,
    series: &[SpectrumSeries<'_>],
) -> Result<String, PlotError> {
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::Empty("no latencies"));
    }
    // Up to 99.999%: past the samples' own resolution the curve is flat anyway.
    let max_x = 5.0;
    let y = log_range(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.us / 1e3)),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (chart_area, foot) = root.split_vertically(HEIGHT - 30);
        let mut chart = chart_builder(&chart_area)
            .caption(title, ("sans-serif", 20))
            .build_cartesian_2d(0.0..max_x, y.log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_labels(6)
            .x_label_formatter(&spectrum_label)
            .draw()
            .map_err(draw_err)?;
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (spectrum_x(p.percentile, max_x), p.us / 1e3))
                .collect();
            dotted_line(&mut chart, points, colour, Some(s.label))?;
        }
        legend(&mut chart)?;
        finish(&root, &foot, caption)?;
    }
    Ok(svg)
}

/// Open-loop latency against offered rate, one p50 and one p99 line per mix, above the
/// achieved rate against the offered one, as SVG.
pub fn rate_svg(
    title: &str,
    caption: &str,
    mixes: &[(String, Vec<RatePoint>)],
) -> Result<String, PlotError> {
    let all = || mixes.iter().flat_map(|(_, p)| p.iter());
    if all().next().is_none() {
        return Err(PlotError::Empty("no open-loop steps"));
    }
    let max_rate = all()
        .map(|p| p.offered_per_sec.max(p.achieved_per_sec))
        .fold(1.0, f64::max)
        * 1.05;
    let y = log_range(all().flat_map(|p| [p.p50_us / 1e3, p.p99_us / 1e3]));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT + 200)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (body, foot) = root.split_vertically(HEIGHT + 170);
        let (top, bottom) = body.split_vertically(HEIGHT - 100);
        let mut chart = chart_builder(&top)
            .caption(title, ("sans-serif", 20))
            .build_cartesian_2d(0.0..max_rate, y.log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("offered rate (calls/s)")
            .y_desc("latency (ms), p50 solid, p99 dashed")
            .x_label_formatter(&whole)
            .draw()
            .map_err(draw_err)?;
        for (i, (mix, points)) in mixes.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let p50: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.offered_per_sec, p.p50_us / 1e3))
                .collect();
            let p99: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.offered_per_sec, p.p99_us / 1e3))
                .collect();
            dotted_line(&mut chart, p50, colour, Some(&format!("{mix} p50 / p99")))?;
            chart
                .draw_series(DashedLineSeries::new(p99, 6, 4, colour.stroke_width(2)))
                .map_err(draw_err)?;
        }
        legend(&mut chart)?;
        let mut achieved = chart_builder(&bottom)
            .build_cartesian_2d(0.0..max_rate, 0.0..max_rate)
            .map_err(draw_err)?;
        achieved
            .configure_mesh()
            .x_desc("offered rate (calls/s)")
            .y_desc("achieved (calls/s)")
            .x_label_formatter(&whole)
            .y_label_formatter(&whole)
            .y_labels(4)
            .draw()
            .map_err(draw_err)?;
        achieved
            .draw_series(DashedLineSeries::new(
                vec![(0.0, 0.0), (max_rate, max_rate)],
                4,
                4,
                BLACK.mix(0.4).stroke_width(1),
            ))
            .map_err(draw_err)?;
        for (i, (_, points)) in mixes.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let line: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (p.offered_per_sec, p.achieved_per_sec))
                .collect();
            dotted_line(&mut achieved, line, colour, None)?;
        }
        finish(&root, &foot, caption)?;
    }
    Ok(svg)
}

/// Durable puts/s (bars' heights as lines over writers) and p99 at 1 and 50 writers per
/// target, side by side, as SVG.
pub fn durable_svg(
    title: &str,
    caption: &str,
    targets: &[(String, Vec<DurablePoint>)],
) -> Result<String, PlotError> {
    let all = || targets.iter().flat_map(|(_, p)| p.iter());
    if all().next().is_none() {
        return Err(PlotError::Empty("no durable cases"));
    }
    let max_writers = all().map(|p| p.writers).max().unwrap_or(1) as f64 * 1.1;
    let max_puts = all().map(|p| p.puts_per_sec).fold(1.0, f64::max) * 1.15;
    let y99 = log_range(all().map(|p| p.p99_ms));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (body, foot) = root.split_vertically(HEIGHT - 30);
        let (title_area, body) = body.split_vertically(36);
        title_area
            .titled(title, ("sans-serif", 20))
            .map_err(draw_err)?;
        let (left, right) = body.split_horizontally(WIDTH / 2);
        let mut rate = chart_builder(&left)
            .build_cartesian_2d(0.0..max_writers, 0.0..max_puts)
            .map_err(draw_err)?;
        rate.configure_mesh()
            .x_desc("writers")
            .y_desc("acknowledged puts/s")
            .x_label_formatter(&whole)
            .y_label_formatter(&whole)
            .draw()
            .map_err(draw_err)?;
        let mut tail = chart_builder(&right)
            .build_cartesian_2d(0.0..max_writers, y99.log_scale())
            .map_err(draw_err)?;
        tail.configure_mesh()
            .x_desc("writers")
            .y_desc("p99 (ms)")
            .x_label_formatter(&whole)
            .draw()
            .map_err(draw_err)?;
        for (i, (label, points)) in targets.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let puts: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (f64::from(p.writers), p.puts_per_sec))
                .collect();
            let p99: Vec<(f64, f64)> = points
                .iter()
                .map(|p| (f64::from(p.writers), p.p99_ms))
                .collect();
            dotted_line(&mut rate, puts, colour, Some(label))?;
            dotted_line(&mut tail, p99, colour, None)?;
        }
        legend(&mut rate)?;
        finish(&root, &foot, caption)?;
    }
    Ok(svg)
}

/// A file name for a case ("GET c=50 x16 in flight" -> "get-c50-x16-in-flight").
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `svg` as XML (well-formed) and returns its text content.
    fn texts(svg: &str) -> String {
        let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.is_text())
            .filter_map(|n| n.text())
            .collect::<Vec<_>>()
            .join("|")
    }

    fn spectrum(scale: f64) -> Vec<SpectrumPoint> {
        [0.0, 50.0, 90.0, 99.0, 99.9, 100.0]
            .iter()
            .enumerate()
            .map(|(i, &p)| SpectrumPoint {
                percentile: p,
                us: scale * (1.0 + i as f64),
            })
            .collect()
    }

    #[test]
    fn a_spectrum_plot_is_svg_with_its_series_axes_and_caption() {
        let (a, b) = (spectrum(100.0), spectrum(150.0));
        let svg = spectrum_svg(
            "GET c=50",
            "2026-12-02, commit abc1234, test machine",
            &[
                SpectrumSeries {
                    label: "capkv",
                    points: &a,
                },
                SpectrumSeries {
                    label: "redis",
                    points: &b,
                },
            ],
        )
        .unwrap();
        let t = texts(&svg);
        for want in [
            "GET c=50",
            "capkv",
            "redis",
            "percentile",
            "latency (ms)",
            "99%",
            "commit abc1234",
        ] {
            assert!(t.contains(want), "{want:?} missing from {t}");
        }
        assert!(svg.matches("<polyline").count() >= 2, "two series drawn");
    }

    #[test]
    fn a_rate_plot_and_a_durable_plot_are_svg_with_their_labels() {
        let step = |offered: f64, achieved: f64| RatePoint {
            offered_per_sec: offered,
            achieved_per_sec: achieved,
            p50_us: 100.0 * offered / achieved,
            p99_us: 900.0 * offered / achieved,
        };
        let svg = rate_svg(
            "open loop",
            "conditions",
            &[(
                "read 95/5".into(),
                vec![step(5_000.0, 5_000.0), step(40_000.0, 30_000.0)],
            )],
        )
        .unwrap();
        let t = texts(&svg);
        for want in [
            "open loop",
            "read 95/5 p50 / p99",
            "offered rate (calls/s)",
            "achieved (calls/s)",
        ] {
            assert!(t.contains(want), "{want:?} missing from {t}");
        }
        let point = |writers, puts_per_sec, p99_ms| DurablePoint {
            writers,
            puts_per_sec,
            p99_ms,
        };
        let svg = durable_svg(
            "durable puts",
            "conditions",
            &[
                (
                    "capkv".into(),
                    vec![point(1, 2_000.0, 0.9), point(50, 20_000.0, 4.0)],
                ),
                (
                    "redis".into(),
                    vec![point(1, 2_500.0, 0.8), point(50, 25_000.0, 9.0)],
                ),
            ],
        )
        .unwrap();
        let t = texts(&svg);
        for want in [
            "durable puts",
            "capkv",
            "redis",
            "acknowledged puts/s",
            "p99 (ms)",
            "writers",
        ] {
            assert!(t.contains(want), "{want:?} missing from {t}");
        }
        assert!(matches!(
            durable_svg("x", "y", &[]),
            Err(PlotError::Empty(_))
        ));
    }

    #[test]
    fn the_spectrum_axis_spaces_nines_evenly() {
        assert!((spectrum_x(90.0, 5.0) - 1.0).abs() < 1e-9);
        assert!((spectrum_x(99.9, 5.0) - 3.0).abs() < 1e-9);
        assert_eq!(spectrum_x(100.0, 5.0), 5.0);
        assert_eq!(spectrum_label(&2.0), "99%");
        assert_eq!(spectrum_label(&3.0), "99.9%");
        assert_eq!(slug("GET c=50 x16 in flight"), "get-c-50-x16-in-flight");
    }
}
