//! Extraction that counts shared work once. Summing the costs of children, as a tree cost does,
//! counts a value once per path to it; in a deep model with residual streams the paths multiply
//! layer by layer, the totals outgrow f64's precision, and from some depth on the savings of a
//! small fusion round away. Here each candidate's cost is the sum of the own costs of the
//! distinct e-classes it needs (a bit set), so it stays the cost of the program at any depth.
//! The choice is greedy (each class keeps its cheapest candidate given its children's current
//! choices), iterated until no choice changes.

use super::cost::CostModel;
use super::lang::{EGraph, TensorLang};
use egg::{Id, Language};
use std::collections::HashMap;

/// The rounds after which the choices are kept even if one still changes.
const MAX_ROUNDS: usize = 64;

/// The chosen e-node of every e-class that has an acyclic, well-typed program.
pub struct DagExtractor<'a> {
    egraph: &'a EGraph,
    choice: HashMap<Id, usize>,
}

impl<'a> DagExtractor<'a> {
    /// Chooses an e-node for every class of `egraph` under `model`.
    pub fn new(egraph: &'a EGraph, model: &CostModel) -> DagExtractor<'a> {
        let mut classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
        classes.sort();
        let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let own: Vec<Vec<f64>> = classes
            .iter()
            .map(|&c| {
                egraph[c]
                    .nodes
                    .iter()
                    .map(|node| match node {
                        TensorLang::Leaf(_) | TensorLang::Scalar(_) => 0.0,
                        TensorLang::Op(label, children) => model.own_cost(label.op(), children),
                    })
                    .collect()
            })
            .collect();
        let words = classes.len().div_ceil(64);
        let mut sets: Vec<Option<Vec<u64>>> = vec![None; classes.len()];
        let mut chosen: Vec<Option<usize>> = vec![None; classes.len()];
        let mut chosen_cost = vec![0.0f64; classes.len()];
        for _ in 0..MAX_ROUNDS {
            let mut changed = false;
            for (ci, &class) in classes.iter().enumerate() {
                let mut best: Option<(f64, usize, Vec<u64>)> = None;
                for (ni, node) in egraph[class].nodes.iter().enumerate() {
                    if !own[ci][ni].is_finite() {
                        continue;
                    }
                    let mut set = vec![0u64; words];
                    let mut ready = true;
                    for child in node.children() {
                        match &sets[index[&egraph.find(*child)]] {
                            Some(child_set) => {
                                set.iter_mut().zip(child_set).for_each(|(s, c)| *s |= c)
                            }
                            None => ready = false,
                        }
                    }
                    if !ready || set[ci / 64] & (1 << (ci % 64)) != 0 {
                        continue;
                    }
                    let needed: f64 = set
                        .iter()
                        .enumerate()
                        .flat_map(|(w, &bits)| {
                            (0..64)
                                .filter(move |b| bits & (1 << b) != 0)
                                .map(move |b| w * 64 + b)
                        })
                        .map(|c| chosen_cost[c])
                        .sum();
                    let total = own[ci][ni] + needed;
                    if best.as_ref().is_none_or(|(t, _, _)| total < *t) {
                        set[ci / 64] |= 1 << (ci % 64);
                        best = Some((total, ni, set));
                    }
                }
                if let Some((_, ni, set)) = best {
                    if chosen[ci] != Some(ni) {
                        changed = true;
                    }
                    chosen[ci] = Some(ni);
                    chosen_cost[ci] = own[ci][ni];
                    sets[ci] = Some(set);
                }
            }
            if !changed {
                break;
            }
        }
        let choice = classes
            .iter()
            .zip(&chosen)
            .filter_map(|(&c, n)| n.map(|n| (c, n)))
            .collect();
        DagExtractor { egraph, choice }
    }

    /// The chosen e-node of a class that has a program.
    pub fn find_best_node(&self, class: Id) -> Option<&'a TensorLang> {
        let class = self.egraph.find(class);
        let index = *self.choice.get(&class)?;
        Some(&self.egraph[class].nodes[index])
    }
}
