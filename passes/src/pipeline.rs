//! The pass manager: one ordered list of named, pure `Graph -> Graph` passes, a selection of
//! them, and the verifier after each.

use crate::{cleanup, egraph, fold};
use kiln_ir::Graph;
use std::time::{Duration, Instant};

/// Whether a pass keeps the graph's outputs (up to floating-point rounding) or changes them on
/// purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exactness {
    /// Outputs equal the input graph's within tolerance; tests check it against the interpreter.
    Exact,
    /// Outputs change by design (pruning, imposed sparsity); the pass reports its measured
    /// quality instead.
    Lossy,
}

/// What a pass produced: the new graph and the facts worth reporting about the rewrite
/// (counts, e-graph statistics), one line each, byte-stable across runs.
#[derive(Clone, Debug)]
pub struct PassOutput {
    /// The rewritten graph.
    pub graph: Graph,
    /// Human-readable facts, one per line.
    pub notes: Vec<String>,
}

impl PassOutput {
    /// A graph with nothing to report.
    pub fn plain(graph: Graph) -> PassOutput {
        PassOutput {
            graph,
            notes: Vec::new(),
        }
    }
}

/// An error from a pass or from the verifier after it, naming the pass.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    /// The pass could not rewrite the graph.
    #[error("pass `{pass}`: {message}")]
    Failed {
        /// The pass's name.
        pass: String,
        /// What went wrong, naming the node and op where there is one.
        message: String,
    },
    /// The pass produced a graph the verifier rejects: a bug in the pass.
    #[error("pass `{pass}` produced an invalid graph: {error}")]
    Invalid {
        /// The pass's name.
        pass: String,
        /// The verifier's findings.
        error: kiln_ir::VerifyError,
    },
    /// A pass name given on the command line that the pipeline does not have.
    #[error("unknown pass `{name}`; the passes are: {known}")]
    Unknown {
        /// The name given.
        name: String,
        /// The pipeline's pass names, comma-separated.
        known: String,
    },
}

/// Options shared by the passes.
#[derive(Clone, Debug, Default)]
pub struct PassOptions {
    /// Bounds on equality saturation.
    pub saturation: egraph::Limits,
}

type PassFn = fn(&Graph, &PassOptions) -> Result<PassOutput, String>;

/// A named graph rewrite.
#[derive(Clone, Copy)]
pub struct Pass {
    /// The name `--passes`, `--disable-pass` and `--diff` use.
    pub name: &'static str,
    /// One line on what the pass does.
    pub summary: &'static str,
    /// Whether the outputs are kept.
    pub exactness: Exactness,
    run: PassFn,
}

impl Pass {
    /// Runs the pass alone, without the verifier.
    pub fn run(&self, graph: &Graph, options: &PassOptions) -> Result<PassOutput, PassError> {
        (self.run)(graph, options).map_err(|message| PassError::Failed {
            pass: self.name.to_string(),
            message,
        })
    }
}

/// Every pass, in pipeline order.
pub const PASSES: [Pass; 5] = [
    Pass {
        name: "dce",
        summary: "removes nodes no output reads",
        exactness: Exactness::Exact,
        run: cleanup::dead_code,
    },
    Pass {
        name: "canonicalize",
        summary: "e-graph rewrites that make exporter variants meet: division by a constant as multiplication, transpose and reshape chains composed, scales of query and key hoisted out of their product, a scale of a projection's output folded into its weight, key transposes split into head split and key transpose",
        exactness: Exactness::Exact,
        run: egraph::canonicalize,
    },
    Pass {
        name: "fuse",
        summary: "e-graph fusion of attention (on shared key/value heads for grouped-query attention), layer and RMS norms, GELU and SiLU, RoPE, SwiGLU, and matrix product epilogues (bias, activation, residual add), extracted by a FLOPs-and-bytes cost model that counts each value once",
        exactness: Exactness::Exact,
        run: egraph::fuse,
    },
    Pass {
        name: "fold-constants",
        summary: "computes elementwise ops of weights alone (such as a scale moved onto a weight) into weights",
        exactness: Exactness::Exact,
        run: fold::fold_constants,
    },
    Pass {
        name: "cse",
        summary: "merges nodes that compute the same op on the same operands",
        exactness: Exactness::Exact,
        run: cleanup::common_subexpressions,
    },
];

/// The passes to run, in order.
#[derive(Clone, Debug)]
pub struct Pipeline {
    passes: Vec<&'static str>,
    options: PassOptions,
}

/// One pass as it ran: its output graph, notes and time.
#[derive(Clone, Debug)]
pub struct Stage {
    /// The pass's name.
    pub pass: &'static str,
    /// The graph after it.
    pub graph: Graph,
    /// What it reported.
    pub notes: Vec<String>,
    /// Wall time of the pass and the verifier after it.
    pub time: Duration,
}

impl Default for Pipeline {
    fn default() -> Pipeline {
        Pipeline {
            passes: PASSES.iter().map(|p| p.name).collect(),
            options: PassOptions::default(),
        }
    }
}

impl Pipeline {
    /// No passes at all: the graph as the frontend built it.
    pub fn empty() -> Pipeline {
        Pipeline {
            passes: Vec::new(),
            options: PassOptions::default(),
        }
    }

    /// Exactly these passes, in this order (`--passes a,b,c`).
    pub fn only(names: &[String]) -> Result<Pipeline, PassError> {
        let passes = names
            .iter()
            .map(|name| find(name).map(|p| p.name))
            .collect::<Result<_, _>>()?;
        Ok(Pipeline {
            passes,
            options: PassOptions::default(),
        })
    }

    /// The same pipeline without the named pass (`--disable-pass NAME`).
    pub fn without(mut self, name: &str) -> Result<Pipeline, PassError> {
        let pass = find(name)?;
        self.passes.retain(|&p| p != pass.name);
        Ok(self)
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: PassOptions) -> Pipeline {
        self.options = options;
        self
    }

    /// The passes that will run, in order.
    pub fn passes(&self) -> &[&'static str] {
        &self.passes
    }

    /// Runs every pass in order, verifying after each, and returns each stage.
    pub fn run_stages(&self, graph: &Graph) -> Result<Vec<Stage>, PassError> {
        let mut stages: Vec<Stage> = Vec::with_capacity(self.passes.len());
        for name in &self.passes {
            let pass = find(name)?;
            let input = stages.last().map_or(graph, |s| &s.graph);
            let started = Instant::now();
            let output = pass.run(input, &self.options)?;
            kiln_ir::verify(&output.graph).map_err(|error| PassError::Invalid {
                pass: pass.name.to_string(),
                error,
            })?;
            stages.push(Stage {
                pass: pass.name,
                graph: output.graph,
                notes: output.notes,
                time: started.elapsed(),
            });
        }
        Ok(stages)
    }

    /// Runs every pass and returns the final graph.
    pub fn run(&self, graph: &Graph) -> Result<Graph, PassError> {
        Ok(self
            .run_stages(graph)?
            .pop()
            .map_or_else(|| graph.clone(), |stage| stage.graph))
    }
}

/// The pass called `name`.
pub fn find(name: &str) -> Result<&'static Pass, PassError> {
    PASSES
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| PassError::Unknown {
            name: name.to_string(),
            known: PASSES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
        })
}
