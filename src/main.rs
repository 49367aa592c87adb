//! The `kiln` command line: inspect and run models.

mod inspect;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln_frontend::InputShapes;
use kiln_ir::{interp, Graph, Tensor};
use kiln_passes::Pipeline;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// kiln: an ahead-of-time compiler for transformer models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's verified IR and a summary: op histogram, parameters, FLOPs.
    Inspect {
        /// A `.kir` file or a safetensors model directory.
        model: PathBuf,
        /// Input dims: `input_ids=1x128`, or symbolic with maxima `input_ids=batch:8xseq:512`.
        #[arg(long = "shape", value_name = "INPUT=DIMS")]
        shapes: Vec<String>,
        /// Bind a symbolic dim for the FLOPs estimate, e.g. `--dim seq=128` (default: its maximum).
        #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_binding)]
        dims: Vec<(String, i64)>,
        /// Print JSON instead of text: the IR, or with `--report` the fusion report.
        #[arg(long)]
        json: bool,
        /// Print the IR after every pass, with the pass's notes.
        #[arg(long, conflicts_with_all = ["diff", "report"])]
        after_each: bool,
        /// Print a unified diff of the IR before and after one pass.
        #[arg(long, value_name = "PASS", conflicts_with = "report")]
        diff: Option<String>,
        /// Print the fusion report: for each pattern, the sites fused and why the others were not.
        #[arg(long)]
        report: bool,
        /// Print the memory plan: each buffer's arena offset, size and lifetime, and the peak.
        #[arg(long, conflicts_with_all = ["after_each", "diff", "report"])]
        memory: bool,
        /// Write the final graph as Graphviz to FILE (and FILE.svg when `dot` is installed).
        #[arg(long, value_name = "FILE")]
        dot: Option<PathBuf>,
        #[command(flatten)]
        passes: PassArgs,
    },
    /// Time a model: one-time load and compile costs, then the latency of `run` after warm-up.
    Bench {
        /// An `.onnx` file, a safetensors model directory, a `.gguf` or a `.kir` file.
        model: PathBuf,
        /// Input dims: `input_ids=1x128`, or symbolic with maxima `input_ids=batch:8xseq:512`.
        #[arg(long = "shape", value_name = "INPUT=DIMS")]
        shapes: Vec<String>,
        /// Inputs to run on; without it, every input is filled (integers with 1, floats with 0.5)
        /// at its symbols' `--dim` values or maxima.
        #[arg(long)]
        inputs: Option<PathBuf>,
        /// Bind a symbolic dim of the synthetic inputs, e.g. `--dim seq=128`.
        #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_binding)]
        dims: Vec<(String, i64)>,
        /// Timed runs.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Threads for the parallel loops (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// How to execute the model.
        #[arg(long, value_enum, default_value_t = Backend::Jit)]
        backend: Backend,
        #[command(flatten)]
        passes: PassArgs,
    },
    /// Compile a model into an object file, a shared library with its C header, and an executable
    /// with the `--inputs`/`--output` contract of `kiln run`.
    Compile {
        /// An `.onnx` file, a safetensors model directory, a `.gguf` or a `.kir` file.
        model: PathBuf,
        /// Input dims: `input_ids=1x128`, or symbolic with maxima `input_ids=batch:8xseq:512`.
        #[arg(long = "shape", value_name = "INPUT=DIMS")]
        shapes: Vec<String>,
        /// The directory to write `NAME.o`, `NAME.h`, `libNAME.so` and `NAME` into.
        #[arg(short, long)]
        output: PathBuf,
        /// The C name of the model (default: the model file's name, as an identifier).
        #[arg(long)]
        name: Option<String>,
        /// Where the weights go: in the object, or in `NAME.weights` beside it (memory-mapped).
        #[arg(long, value_enum, default_value_t = Weights::Embedded)]
        weights: Weights,
        /// Print the time each stage took: load, every pass, codegen, linking.
        #[arg(long)]
        timings: bool,
        #[command(flatten)]
        passes: PassArgs,
    },
    /// Report which of a model's ops kiln supports (ONNX), or whether it loads (other formats).
    Check {
        /// An `.onnx` file, a safetensors model directory, a `.gguf` or a `.kir` file.
        model: PathBuf,
    },
    /// Run a model on inputs from a safetensors file and write its outputs to another.
    Run {
        /// A `.kir` file or a safetensors model directory.
        model: PathBuf,
        /// Input dims: `input_ids=1x128`, or symbolic with maxima `input_ids=batch:8xseq:512`.
        #[arg(long = "shape", value_name = "INPUT=DIMS")]
        shapes: Vec<String>,
        /// Inputs, keyed by graph input name.
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the outputs, keyed by graph output name.
        #[arg(long)]
        output: PathBuf,
        /// How to execute the model.
        #[arg(long, value_enum, default_value_t = Backend::Jit)]
        backend: Backend,
        /// Threads for the parallel loops (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        passes: PassArgs,
    },
}

/// Which passes run between the frontend and codegen.
#[derive(Args, Clone, Default)]
struct PassArgs {
    /// Run exactly these passes, comma-separated, in this order; `none` runs none.
    #[arg(long, value_delimiter = ',', value_name = "PASS,...")]
    passes: Option<Vec<String>>,
    /// Leave a pass out of the pipeline; may be repeated.
    #[arg(long = "disable-pass", value_name = "PASS")]
    disable: Vec<String>,
}

impl PassArgs {
    fn pipeline(&self) -> Result<Pipeline> {
        let mut pipeline = match &self.passes {
            None => Pipeline::default(),
            Some(names) if names.iter().all(|n| n == "none") => Pipeline::empty(),
            Some(names) => Pipeline::only(names)?,
        };
        for name in &self.disable {
            pipeline = pipeline.without(name)?;
        }
        Ok(pipeline)
    }
}

/// Execution backends.
#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The reference interpreter: slow, exact, the oracle for every other backend.
    Interp,
    /// Native code compiled in memory with Cranelift.
    Jit,
    /// The executable `kiln compile` makes, built in a temporary directory and run.
    Aot,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Interp => "interp",
            Backend::Jit => "jit",
            Backend::Aot => "aot",
        }
    }
}

/// Where compiled weights go.
#[derive(Clone, Copy, ValueEnum)]
enum Weights {
    /// In a read-only section of the object.
    Embedded,
    /// In `NAME.weights` beside the artifacts, memory-mapped at run time.
    External,
}

fn parse_binding(arg: &str) -> Result<(String, i64), String> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got `{arg}`"))?;
    let value = value
        .parse()
        .map_err(|_| format!("`{value}` is not an integer"))?;
    Ok((name.to_string(), value))
}

fn load_model(path: &Path, shape_args: &[String]) -> Result<Graph> {
    let mut shapes = InputShapes::new();
    for arg in shape_args {
        shapes.parse_arg(arg).map_err(anyhow::Error::msg)?;
    }
    Ok(kiln_frontend::load(path, &shapes)?)
}

/// Loads a model and runs the pass pipeline on it.
fn load_and_optimize(path: &Path, shape_args: &[String], passes: &PassArgs) -> Result<Graph> {
    let graph = load_model(path, shape_args)?;
    let pipeline = passes.pipeline()?;
    pipeline
        .run(&graph)
        .with_context(|| format!("optimizing {}", path.display()))
}

/// Inputs for every graph input at the given symbol values (maxima otherwise): integers 1
/// (a valid token id, type id and unmasked position), floats 0.5.
fn synthetic_inputs(graph: &Graph, dims: &[(String, i64)]) -> Result<HashMap<String, Tensor>> {
    let mut bindings = graph.maxima();
    bindings.extend(dims.iter().cloned());
    graph
        .inputs()
        .iter()
        .map(|&id| {
            let node = graph.node(id);
            let shape = node
                .ty
                .shape
                .eval(&bindings)
                .with_context(|| format!("input `{}`", node.name))?;
            let numel: usize = shape.iter().product();
            let tensor = if node.ty.dtype.is_float() {
                Tensor::from_f64s(node.ty.dtype, shape, vec![0.5; numel])
            } else {
                Tensor::from_i64s(node.ty.dtype, shape, vec![1; numel])
            };
            Ok((node.name.clone(), tensor))
        })
        .collect()
}

/// The `q`-quantile of sorted values, by nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[allow(clippy::too_many_arguments)]
fn bench(
    model: &Path,
    shapes: &[String],
    inputs: Option<&Path>,
    dims: &[(String, i64)],
    iters: usize,
    warmup: usize,
    threads: Option<usize>,
    backend: Backend,
    passes: &PassArgs,
) -> Result<()> {
    let threads = threads_or_all(threads)?;
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let started = std::time::Instant::now();
    let graph = load_and_optimize(model, shapes, passes)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let feed = match inputs {
        Some(path) => kiln_ir::load_tensors(path)?.into_iter().collect(),
        None => synthetic_inputs(&graph, dims)?,
    };
    let shapes: Vec<String> = feed.iter().map(|(name, t)| format!("{name}={t}")).collect();
    println!(
        "{} ({}), inputs {}",
        model.display(),
        backend.name(),
        shapes.join(" ")
    );
    if let Backend::Aot = backend {
        return bench_executable(&graph, &feed, load_ms, iters, warmup, threads);
    }
    let started = std::time::Instant::now();
    let mut jit = match backend {
        Backend::Jit => {
            let mut jit = kiln_codegen::compile_jit(&graph)?;
            jit.set_threads(threads)?;
            Some(jit)
        }
        _ => None,
    };
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut run_once = || -> Result<()> {
        match jit.as_mut() {
            Some(jit) => jit.run(&feed).map(|_| ())?,
            None => interp::run(&graph, &feed).map(|_| ())?,
        }
        Ok(())
    };
    for _ in 0..warmup {
        run_once()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let started = std::time::Instant::now();
        run_once()?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!("load and passes: {load_ms:.1} ms, compile: {compile_ms:.1} ms");
    println!(
        "run: median {:.3} ms, p10 {:.3} ms, p90 {:.3} ms ({iters} runs after {warmup} warm-up, {})",
        quantile(&times, 0.5),
        quantile(&times, 0.1),
        quantile(&times, 0.9),
        match (backend, threads) {
            (Backend::Interp, _) | (_, 1) => "1 thread".to_string(),
            (_, n) => format!("{n} threads"),
        }
    );
    Ok(())
}

/// `--threads`, or every core the process may use.
fn threads_or_all(threads: Option<usize>) -> Result<usize> {
    match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map_or(1, usize::from)),
    }
}

/// Compiles the graph into an executable (weights external) in a temporary directory and times
/// it with its own `--bench` mode, which runs the model in-process after warm-up.
fn bench_executable(
    graph: &Graph,
    feed: &HashMap<String, Tensor>,
    load_ms: f64,
    iters: usize,
    warmup: usize,
    threads: usize,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let started = std::time::Instant::now();
    let artifacts =
        kiln_codegen::aot::compile(graph, "model", kiln_codegen::aot::WeightPlacement::External)?;
    kiln_codegen::aot::link(&artifacts, dir.path())?;
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let input_file = dir.path().join("inputs.safetensors");
    let mut inputs: Vec<(String, Tensor)> =
        feed.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    kiln_ir::save_tensors(&input_file, &inputs)?;
    let output = std::process::Command::new(dir.path().join("model"))
        .arg("--inputs")
        .arg(&input_file)
        .args([
            "--bench",
            &iters.to_string(),
            "--warmup",
            &warmup.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .output()
        .context("running the compiled executable")?;
    if !output.status.success() {
        bail!(
            "the compiled executable failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let executable_load = stdout
        .lines()
        .find_map(|l| l.strip_prefix("load: "))
        .unwrap_or("?");
    println!(
        "load: {load_ms:.1} ms, compile and link: {compile_ms:.1} ms, executable start: {executable_load}"
    );
    for line in stdout.lines().filter(|l| l.starts_with("run: ")) {
        println!("{line}");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compile(
    model: &Path,
    shapes: &[String],
    output: &Path,
    name: Option<&str>,
    weights: Weights,
    timings: bool,
    passes: &PassArgs,
) -> Result<()> {
    let mut times: Vec<(String, std::time::Duration)> = Vec::new();
    let started = std::time::Instant::now();
    let graph = load_model(model, shapes)?;
    times.push(("load".into(), started.elapsed()));
    let stages = passes
        .pipeline()?
        .run_stages(&graph)
        .with_context(|| format!("optimizing {}", model.display()))?;
    times.extend(stages.iter().map(|s| (format!("pass {}", s.pass), s.time)));
    let graph = stages.last().map_or(&graph, |s| &s.graph);
    let name = match name {
        Some(name) => name.to_string(),
        None => kiln_codegen::aot::c_identifier(
            &model
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy()),
        ),
    };
    let placement = match weights {
        Weights::Embedded => kiln_codegen::aot::WeightPlacement::Embedded,
        Weights::External => kiln_codegen::aot::WeightPlacement::External,
    };
    let started = std::time::Instant::now();
    let artifacts = kiln_codegen::aot::compile(graph, &name, placement)
        .with_context(|| format!("compiling {}", model.display()))?;
    times.push(("codegen".into(), started.elapsed()));
    let started = std::time::Instant::now();
    let linked = kiln_codegen::aot::link(&artifacts, output)?;
    times.push(("link".into(), started.elapsed()));
    for command in &linked.commands {
        println!("$ {command}");
    }
    for file in &linked.files {
        println!("wrote {}", file.display());
    }
    if timings {
        let total: std::time::Duration = times.iter().map(|(_, t)| *t).sum();
        println!("timings:");
        for (stage, time) in &times {
            println!("  {stage:<24} {:>9.1} ms", time.as_secs_f64() * 1e3);
        }
        println!("  {:<24} {:>9.1} ms", "total", total.as_secs_f64() * 1e3);
    }
    Ok(())
}

fn check(model: &Path) -> Result<()> {
    if model.extension().and_then(|e| e.to_str()) != Some("onnx") {
        let graph = load_model(model, &[])?;
        println!("{}: supported ({} nodes)", model.display(), graph.len());
        return Ok(());
    }
    let coverage = kiln_frontend::onnx::coverage(model)?;
    let min = kiln_frontend::onnx::MIN_OPSET;
    let opset_note = if coverage.opset >= min {
        ""
    } else {
        " (not supported: kiln reads opset 13 and later)"
    };
    println!("{}: opset {}{opset_note}", model.display(), coverage.opset);
    println!("  {:<28} {:>6}  supported", "op type", "nodes");
    for (op, (count, supported)) in &coverage.ops {
        println!(
            "  {op:<28} {count:>6}  {}",
            if *supported { "yes" } else { "NO" }
        );
    }
    let missing: Vec<&str> = coverage
        .ops
        .iter()
        .filter(|(_, (_, s))| !s)
        .map(|(op, _)| op.as_str())
        .collect();
    if missing.is_empty() && coverage.opset >= min {
        println!("all {} op types are supported", coverage.ops.len());
        Ok(())
    } else {
        bail!(
            "{} of {} op types are not supported: {}",
            missing.len(),
            coverage.ops.len(),
            missing.join(", ")
        )
    }
}

fn run(
    model: &Path,
    shapes: &[String],
    inputs: &Path,
    output: &Path,
    backend: Backend,
    threads: Option<usize>,
    passes: &PassArgs,
) -> Result<()> {
    let threads = threads_or_all(threads)?;
    let graph = load_and_optimize(model, shapes, passes)?;
    if let Backend::Aot = backend {
        let dir = tempfile::tempdir()?;
        let artifacts = kiln_codegen::aot::compile(
            &graph,
            "model",
            kiln_codegen::aot::WeightPlacement::External,
        )
        .with_context(|| format!("compiling {}", model.display()))?;
        kiln_codegen::aot::link(&artifacts, dir.path())?;
        let status = std::process::Command::new(dir.path().join("model"))
            .arg("--inputs")
            .arg(inputs)
            .arg("--output")
            .arg(output)
            .args(["--threads", &threads.to_string()])
            .status()
            .context("running the compiled executable")?;
        if !status.success() {
            bail!("the compiled executable failed ({status})");
        }
        return Ok(());
    }
    let inputs: HashMap<String, Tensor> = kiln_ir::load_tensors(inputs)?.into_iter().collect();
    let outputs = match backend {
        Backend::Aot => unreachable!("handled above"),
        Backend::Interp => {
            interp::run(&graph, &inputs).with_context(|| format!("running {}", model.display()))?
        }
        Backend::Jit => kiln_codegen::compile_jit(&graph)
            .and_then(|mut jit| {
                jit.set_threads(threads)?;
                jit.run(&inputs)
            })
            .with_context(|| format!("running {} with the JIT", model.display()))?,
    };
    kiln_ir::save_tensors(output, &outputs)?;
    for (name, tensor) in &outputs {
        println!("{name}: {tensor}");
    }
    println!("wrote {}", output.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect {
            model,
            shapes,
            dims,
            json,
            after_each,
            diff,
            report,
            memory,
            dot,
            passes,
        } => load_model(model, shapes).and_then(|graph| {
            let view = match (after_each, diff, report, memory) {
                (true, _, _, _) => inspect::View::AfterEach,
                (_, Some(pass), _, _) => inspect::View::Diff(pass.clone()),
                (_, _, true, _) => inspect::View::Report,
                (_, _, _, true) => inspect::View::Memory,
                _ => inspect::View::Final,
            };
            inspect::inspect(
                &graph,
                &passes.pipeline()?,
                &inspect::Options {
                    view,
                    json: *json,
                    dims,
                    dot: dot.as_deref(),
                },
            )
        }),
        Command::Check { model } => check(model),
        Command::Compile {
            model,
            shapes,
            output,
            name,
            weights,
            timings,
            passes,
        } => compile(
            model,
            shapes,
            output,
            name.as_deref(),
            *weights,
            *timings,
            passes,
        ),
        Command::Bench {
            model,
            shapes,
            inputs,
            dims,
            iters,
            warmup,
            threads,
            backend,
            passes,
        } => bench(
            model,
            shapes,
            inputs.as_deref(),
            dims,
            *iters,
            *warmup,
            *threads,
            *backend,
            passes,
        ),
        Command::Run {
            model,
            shapes,
            inputs,
            output,
            backend,
            threads,
            passes,
        } => run(model, shapes, inputs, output, *backend, *threads, passes),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
