//! `kiln inspect`: the IR after the passes, after each pass, one pass as a diff, the fusion
//! report, and Graphviz. Every view is byte-stable across runs: no times, no addresses.

use anyhow::{bail, Context, Result};
use kiln_ir::{json, text, Graph, Summary};
use kiln_passes::memory::MemoryPlan;
use kiln_passes::{report, Pipeline};
use std::collections::HashMap;
use std::path::Path;

/// What to print.
pub enum View {
    /// The graph after all passes, with its summary.
    Final,
    /// The graph after every pass.
    AfterEach,
    /// A unified diff of one pass.
    Diff(String),
    /// The fusion report.
    Report,
    /// The memory plan of the final graph.
    Memory,
}

/// How to print it.
pub struct Options<'a> {
    pub view: View,
    pub json: bool,
    pub dims: &'a [(String, i64)],
    pub dot: Option<&'a Path>,
}

pub fn inspect(graph: &Graph, pipeline: &Pipeline, options: &Options) -> Result<()> {
    let stages = pipeline.run_stages(graph)?;
    let last = stages.last().map_or(graph, |s| &s.graph);
    match &options.view {
        View::Final if options.json => println!("{}", json::to_json(last)),
        View::Final => {
            let bindings = bindings(last, options.dims)?;
            let summary = Summary::of(last, &bindings).context("counting FLOPs")?;
            print!("{}", text::print(last));
            println!("{summary}");
        }
        View::AfterEach if options.json => {
            let stages: Vec<serde_json::Value> = stages
                .iter()
                .map(|s| {
                    let graph: serde_json::Value = serde_json::from_str(&json::to_json(&s.graph))
                        .expect("the IR's JSON parses");
                    serde_json::json!({"pass": s.pass, "notes": s.notes, "graph": graph})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&stages)?);
        }
        View::AfterEach => {
            println!("# frontend");
            print!("{}", text::print(graph));
            for stage in &stages {
                println!("\n# after pass {}", stage.pass);
                for note in &stage.notes {
                    println!("#   {note}");
                }
                print!("{}", text::print(&stage.graph));
            }
        }
        View::Diff(pass) => {
            let Some(at) = stages.iter().position(|s| s.pass == pass) else {
                kiln_passes::pipeline::find(pass)?;
                bail!("pass `{pass}` is not in the pipeline being run");
            };
            let before = if at == 0 {
                graph
            } else {
                &stages[at - 1].graph
            };
            let (old, new) = (text::print(before), text::print(&stages[at].graph));
            let diff = similar::TextDiff::from_lines(&old, &new);
            print!(
                "{}",
                diff.unified_diff()
                    .context_radius(3)
                    .header(&format!("before {pass}"), &format!("after {pass}"))
            );
        }
        View::Memory => {
            let plan = MemoryPlan::new(last, &last.order()).map_err(anyhow::Error::msg)?;
            print!("{}", plan.display(last));
        }
        View::Report => {
            let report = report::fusion_report(last);
            if options.json {
                println!("{}", serde_json::to_string_pretty(&report.to_json())?);
            } else {
                print!("{report}");
            }
        }
    }
    if let Some(path) = options.dot {
        write_dot(last, path)?;
    }
    Ok(())
}

fn bindings(graph: &Graph, dims: &[(String, i64)]) -> Result<HashMap<String, i64>> {
    let unknown: Vec<&str> = dims
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| !graph.symbols().iter().any(|s| s.name == *name))
        .collect();
    if !unknown.is_empty() {
        bail!("--dim names unknown symbols: {}", unknown.join(", "));
    }
    Ok(dims.iter().cloned().collect())
}

/// Writes Graphviz, and an SVG beside it when the `dot` program is installed.
fn write_dot(graph: &Graph, path: &Path) -> Result<()> {
    std::fs::write(path, report::to_dot(graph))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    let svg = path.with_extension("svg");
    match std::process::Command::new("dot")
        .arg("-Tsvg")
        .arg(path)
        .arg("-o")
        .arg(&svg)
        .status()
    {
        Ok(status) if status.success() => eprintln!("wrote {}", svg.display()),
        Ok(status) => bail!("dot -Tsvg failed ({status})"),
        Err(_) => eprintln!("`dot` is not installed: no SVG"),
    }
    Ok(())
}
