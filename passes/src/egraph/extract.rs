//! Extraction that counts shared work once. Summing the costs of children, as a tree cost does,
//! counts a value once per path to it; in a deep model with residual streams the paths multiply
//! layer by layer, the totals outgrow f64's precision, and from some depth on the savings of a
//! small fusion round away. Here each candidate's cost is the sum of the own costs of the
//! distinct e-classes it needs (a bit set), so it stays the cost of the program at any depth.
//! The choice is greedy (each class keeps its cheapest candidate given its children's current
//! choices), iterated until no choice changes. A class's set can be stale within a round (a
//! descendant changed its choice after it was taken), so the choices are then made acyclic
//! bottom-up, replacing a choice on a cycle by the cheapest node whose operands are settled.

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
        let settled = settle(egraph, &classes, &index, &own, &chosen);
        let choice = classes
            .iter()
            .zip(settled)
            .filter_map(|(&c, n)| n.map(|n| (c, n)))
            .collect();
        DagExtractor { egraph, choice }
    }

    /// The chosen e-node of a class that has a program: the choices form no cycle.
    pub fn find_best_node(&self, class: Id) -> Option<&'a TensorLang> {
        let class = self.egraph.find(class);
        let index = *self.choice.get(&class)?;
        Some(&self.egraph[class].nodes[index])
    }
}

/// Acyclic choices: a class is settled once its chosen node's operand classes are, in rounds
/// over the classes; when a round settles nothing while classes remain (their choices form a
/// cycle, or depend on one), the first such class that has a node whose operands are all settled
/// takes the cheapest of those, and the rounds go on.
fn settle(
    egraph: &EGraph,
    classes: &[Id],
    index: &HashMap<Id, usize>,
    own: &[Vec<f64>],
    chosen: &[Option<usize>],
) -> Vec<Option<usize>> {
    let mut settled: Vec<Option<usize>> = vec![None; classes.len()];
    let ready = |settled: &[Option<usize>], class: Id, node: usize| {
        egraph[class].nodes[node]
            .children()
            .iter()
            .all(|c| settled[index[&egraph.find(*c)]].is_some())
    };
    loop {
        let mut progress = false;
        for (ci, &class) in classes.iter().enumerate() {
            if let (None, Some(node)) = (settled[ci], chosen[ci]) {
                if ready(&settled, class, node) {
                    settled[ci] = Some(node);
                    progress = true;
                }
            }
        }
        if progress {
            continue;
        }
        let replacement = classes.iter().enumerate().find_map(|(ci, &class)| {
            if settled[ci].is_some() {
                return None;
            }
            (0..egraph[class].nodes.len())
                .filter(|&n| own[ci][n].is_finite() && ready(&settled, class, n))
                .min_by(|&a, &b| own[ci][a].total_cmp(&own[ci][b]))
                .map(|n| (ci, n))
        });
        match replacement {
            Some((ci, node)) => settled[ci] = Some(node),
            None => return settled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egraph::lang::{LeafName, OpLabel, TypeAnalysis};
    use kiln_ir::Op;

    /// Regression (review): stale sets could leave choices on a cycle, and lifting them never
    /// ended. `x = transpose(transpose(x))` puts `x`'s class and its transpose's on a cycle;
    /// settling replaces the cyclic choice by the leaf.
    #[test]
    fn settling_breaks_cyclic_choices() {
        let mut egraph = EGraph::new(TypeAnalysis::default());
        let x = egraph.add(TensorLang::Leaf(LeafName("x".into())));
        let transpose = || OpLabel::new(Op::Transpose { perm: vec![1, 0] });
        let t = egraph.add(TensorLang::Op(transpose(), vec![x]));
        let tt = egraph.add(TensorLang::Op(transpose(), vec![t]));
        egraph.union(x, tt);
        egraph.rebuild();
        let mut classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
        classes.sort();
        let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let own: Vec<Vec<f64>> = classes
            .iter()
            .map(|&c| vec![1.0; egraph[c].nodes.len()])
            .collect();
        let op_node = |c: Id| {
            egraph[c]
                .nodes
                .iter()
                .position(|n| matches!(n, TensorLang::Op(..)))
        };
        let cyclic: Vec<Option<usize>> = classes.iter().map(|&c| op_node(c)).collect();
        let settled = settle(&egraph, &classes, &index, &own, &cyclic);
        let x_class = index[&egraph.find(x)];
        let chosen_x = &egraph[classes[x_class]].nodes[settled[x_class].unwrap()];
        assert!(matches!(chosen_x, TensorLang::Leaf(_)), "{chosen_x:?}");
        let t_class = index[&egraph.find(t)];
        assert!(settled[t_class].is_some());
    }
}
