//! PNG line charts of a run's metrics: the four plots of the seed's model card (loss, rewards, KL,
//! learning rate) and, when Enhanced KTO logged them, its component losses.
//!
//! Charts are drawn into an in-memory RGB buffer and encoded here (flate2 is already a dependency),
//! so plotting needs neither the `image` crate nor system fonts: text is rendered with Noto Sans
//! embedded in the binary, which keeps plots readable on bare CI machines.
use super::metrics_log::{read_metrics, MetricsLog};
use super::{METRICS_FILE, PLOTS_DIR};
use crate::util::atomic::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
/// The family plotters asks for by default; registering our font under it covers every text.
const FONT: &str = "sans-serif";

/// One curve of a chart.
#[derive(Debug, Clone, Copy)]
pub struct SeriesSpec {
    /// Metric name in `metrics.jsonl`.
    pub metric: &'static str,
    pub label: &'static str,
    pub color: RGBColor,
    /// Validation points: sparse, so drawn as markers joined by a thin line.
    pub eval: bool,
}

/// One PNG file.
#[derive(Debug, Clone, Copy)]
pub struct PlotSpec {
    /// File name inside `plots/`.
    pub file: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    pub series: &'static [SeriesSpec],
    /// The chart is drawn only when one of these metrics was logged (empty: any of its series).
    /// The component chart needs this: `delta` alone does not make a component-loss plot.
    pub requires: &'static [&'static str],
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(60, 60, 60);

const fn train(metric: &'static str, label: &'static str, color: RGBColor) -> SeriesSpec {
    SeriesSpec {
        metric,
        label,
        color,
        eval: false,
    }
}

const fn eval(metric: &'static str, label: &'static str, color: RGBColor) -> SeriesSpec {
    SeriesSpec {
        metric,
        label,
        color,
        eval: true,
    }
}

/// Every chart, in the order the model card shows them.
pub const PLOTS: [PlotSpec; 5] = [
    PlotSpec {
        file: "loss.png",
        title: "Training and validation loss",
        y_label: "loss",
        series: &[
            train("loss", "training loss", BLUE_),
            eval("eval_loss", "validation loss", ORANGE),
        ],
        requires: &[],
    },
    PlotSpec {
        file: "rewards.png",
        title: "Rewards",
        y_label: "reward (beta * log-ratio)",
        series: &[
            train("rewards/chosen", "chosen", GREEN_),
            train("rewards/rejected", "rejected", RED_),
            train("rewards/margins", "margins", BLUE_),
            eval("eval_rewards/chosen", "validation chosen", GREEN_),
            eval("eval_rewards/rejected", "validation rejected", RED_),
            eval("eval_rewards/margins", "validation margins", BLUE_),
        ],
        requires: &[],
    },
    PlotSpec {
        file: "kl.png",
        title: "KL reference point (z)",
        y_label: "KL",
        series: &[
            train("kl", "training KL", PURPLE),
            eval("eval_kl", "validation KL", ORANGE),
        ],
        requires: &[],
    },
    PlotSpec {
        file: "learning_rate.png",
        title: "Learning rate",
        y_label: "learning rate",
        series: &[train("learning_rate", "learning rate", GREY)],
        requires: &[],
    },
    PlotSpec {
        file: "components.png",
        title: "Enhanced KTO component losses",
        y_label: "loss",
        series: &[
            train("loss/pt", "prospect-theory loss (loss/pt)", BLUE_),
            train("loss/or", "odds-ratio loss (loss/or)", ORANGE),
            train("delta", "BCO shift (delta)", GREEN_),
        ],
        requires: &["loss/pt", "loss/or"],
    },
];

/// Draws every chart that has data from `run_dir/metrics.jsonl` into `run_dir/plots/` and returns
/// the files written. A chart with no data gets no file (and loses a stale one), so the folder and
/// the model card only ever show what the metrics hold.
pub fn draw_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let log = read_metrics(&run_dir.join(METRICS_FILE))?;
    draw_plots_from_log(&log, &run_dir.join(PLOTS_DIR))
}

/// [`draw_plots`] on an already parsed log, into `plots_dir`.
pub fn draw_plots_from_log(log: &MetricsLog, plots_dir: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let mut written = Vec::new();
    for spec in &PLOTS {
        let path = plots_dir.join(spec.file);
        match render(spec, log).with_context(|| format!("cannot draw {}", path.display()))? {
            Some(png) => {
                write_atomic(&path, &png)?;
                written.push(path);
            }
            None => {
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("cannot remove stale {}", path.display()))?;
                }
            }
        }
    }
    Ok(written)
}

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, notosans::REGULAR_TTF).is_ok()
    });
    if !ok {
        bail!("the embedded Noto Sans font could not be loaded");
    }
    Ok(())
}

/// Axis range with room around the data; a single value gets a unit-sized (or 10%) window so
/// that a run with one logging point still has a drawable axis.
fn padded(lo: f64, hi: f64, below: f64, above: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 0.0 {
        (lo - below * span, hi + above * span)
    } else {
        let half = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        (lo - half, hi + half)
    }
}

/// Tick labels with as many digits as the tick spacing needs, so that a narrow range (a loss that
/// moves in the fourth decimal, a learning rate of 2e-4) does not print the same label twice.
fn tick_label(v: f64, lo: f64, hi: f64) -> String {
    let step = ((hi - lo) / 8.0).abs().max(f64::MIN_POSITIVE);
    if v.abs() < step * 1e-6 {
        return "0".to_string();
    }
    let mag = lo.abs().max(hi.abs());
    if !(1e-3..1e5).contains(&mag) {
        let digits = (mag / step).log10().ceil().clamp(1.0, 6.0) as usize;
        format!("{v:.digits$e}")
    } else {
        let digits = (-step.log10()).ceil().clamp(0.0, 8.0) as usize;
        format!("{v:.digits$}")
    }
}

type Points = Vec<(f64, f64)>;

fn render(spec: &PlotSpec, log: &MetricsLog) -> Result<Option<Vec<u8>>> {
    let wanted = |m: &str| log.has(m);
    if !spec.requires.is_empty() && !spec.requires.iter().any(|m| wanted(m)) {
        return Ok(None);
    }
    let series: Vec<(&SeriesSpec, Points)> = spec
        .series
        .iter()
        .map(|s| (s, log.series(s.metric)))
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(None);
    }
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let fold = |f: fn(&(f64, f64)) -> f64| {
        all()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
    };
    let (x0, x1) = fold(|p| p.0);
    let (y0, y1) = fold(|p| p.1);
    let (x0, x1) = padded(x0, x1, 0.02, 0.02);
    // Headroom above the data for the legend, which sits in the upper right corner.
    let (y0, y1) = padded(y0, y1, 0.05, 0.1 + 0.08 * series.len() as f64);
    // One x label per step at most: ticks between integer steps would print fractional steps.
    let x_labels = ((x1 - x0).floor() as usize + 1).clamp(2, 10);

    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(spec.title, (FONT, 26))
            .margin(18)
            .x_label_area_size(50)
            .y_label_area_size(95)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        // Steps are whole numbers: print them so, even where the range is only a few steps wide.
        let x_fmt = |x: &f64| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                tick_label(*x, x0, x1)
            }
        };
        let y_fmt = |y: &f64| tick_label(*y, y0, y1);
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc(spec.y_label)
            .x_labels(x_labels)
            .y_labels(8)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(err)?;
        for (s, pts) in &series {
            let color = s.color;
            let line = ShapeStyle {
                color: color.to_rgba(),
                filled: true,
                stroke_width: if s.eval { 1 } else { 2 },
            };
            let marker = if s.eval { 5 } else { 3 };
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), line))
                .map_err(err)?
                .label(s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], line));
            // A lone training point draws no line, and validation points are the data themselves.
            if s.eval || pts.len() == 1 {
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&(x, y)| Circle::new((x, y), marker, color.filled())),
                    )
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 15))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(Some(encode_png(WIDTH, HEIGHT, &buf)?))
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

/// Encodes 8-bit RGB pixels as a PNG file. Each row uses the Sub filter, which turns the charts'
/// flat backgrounds into runs of zeros that deflate well.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>> {
    let row = width as usize * 3;
    if rgb.len() != row * height as usize {
        bail!(
            "{} bytes of pixels for a {width}x{height} RGB image",
            rgb.len()
        );
    }
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in rgb.chunks_exact(row) {
        raw.push(1u8);
        for i in 0..row {
            let left = if i >= 3 { line[i - 3] } else { 0 };
            raw.push(line[i].wrapping_sub(left));
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw)?;
    let idat = z.finish()?;
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}
