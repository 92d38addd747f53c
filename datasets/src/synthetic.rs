//! A built-in reasoning task: multi-step arithmetic word problems with step-by-step
//! solutions ending in `#### <answer>`, generated from a seed.
//!
//! Three solution styles: `Concise` states each step once; `Verbose` adds an opening, repeats
//! and re-checks steps a random number of times (0 to 3 re-checks per step) and restates
//! the answer; `Direct` gives the answer alone (the control for "the steps do work"). The
//! spread of lengths within the verbose style is what lets on-policy SFT find short correct
//! answers among a verbose model's samples.
//!
//! Two tasks: `Arithmetic` (one-digit start, two steps: a small model can answer without
//! writing the steps, so a verbose solution is all redundancy) and `ArithmeticChain` (a
//! two-digit start and five steps with operands up to 99: the answer needs the intermediate
//! results, so the equations of a verbose solution are needed and only its checks and
//! restatement are redundant).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    Concise,
    Verbose,
    Direct,
}

/// Which problems: see the module comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Arithmetic,
    ArithmeticChain,
}

impl Task {
    /// The task named `arithmetic` or `arithmetic-chain`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "arithmetic" => Some(Self::Arithmetic),
            "arithmetic-chain" => Some(Self::ArithmeticChain),
            _ => None,
        }
    }

    /// Starting values, number of steps, and the largest operand.
    fn shape(self) -> (std::ops::RangeInclusive<i64>, usize, i64) {
        match self {
            Self::Arithmetic => (2..=9, 2, 9),
            Self::ArithmeticChain => (10..=99, 5, 99),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub question: String,
    pub solution: String,
    pub answer: i64,
}

const NAMES: &[&str] = &["Tom", "Ana", "Li", "Sam", "Mia", "Ben", "Eva", "Raj"];
const ITEMS: &[&str] = &[
    "apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps",
];

enum Operation {
    Add(i64),
    Subtract(i64),
}

impl Operation {
    fn apply(&self, value: i64) -> i64 {
        match self {
            Self::Add(n) => value + n,
            Self::Subtract(n) => value - n,
        }
    }

    fn sentence(&self, name: &str) -> String {
        match self {
            Self::Add(n) => format!("{name} gets {n} more."),
            Self::Subtract(n) => format!("{name} gives away {n}."),
        }
    }

    fn equation(&self, before: i64) -> String {
        match self {
            Self::Add(n) => format!("{before} + {n} = {}", before + n),
            Self::Subtract(n) => format!("{before} - {n} = {}", before - n),
        }
    }

    /// The inverse check of a step, e.g. `15 - 6 = 9`.
    fn check(&self, before: i64) -> String {
        let after = self.apply(before);
        match self {
            Self::Add(n) => format!("{after} - {n} = {before}"),
            Self::Subtract(n) => format!("{after} + {n} = {before}"),
        }
    }
}

/// Problem `index` of the [`Task::Arithmetic`] stream seeded by `seed`, written in `style`.
/// Numbers are small (one-digit operands, two steps of adding or giving away) so that a
/// small model trained for minutes on a CPU solves many of them.
pub fn arithmetic_problem(seed: u64, index: u64, style: Style) -> Problem {
    task_problem(Task::Arithmetic, seed, index, style)
}

/// Problem `index` of `task`'s stream seeded by `seed`, written in `style`. The same
/// `(seed, index)` gives the same question in every style.
pub fn task_problem(task: Task, seed: u64, index: u64, style: Style) -> Problem {
    let (starts, steps, largest) = task.shape();
    let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0xD134_2543_DE82_EF95));
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let item = ITEMS[rng.random_range(0..ITEMS.len())];
    let start: i64 = rng.random_range(starts);
    let mut value = start;
    let mut operations = Vec::new();
    for _ in 0..steps {
        let operation = if value > 1 && rng.random_bool(0.5) {
            Operation::Subtract(rng.random_range(1..value.min(largest + 1)))
        } else {
            Operation::Add(rng.random_range(1..=largest))
        };
        value = operation.apply(value);
        operations.push(operation);
    }
    let sentences: Vec<String> = operations.iter().map(|o| o.sentence(name)).collect();
    let question = format!(
        "{name} has {start} {item}. {} How many {item} does {name} have now?",
        sentences.join(" ")
    );

    // The verbose style's random choices come from their own generator, so the question
    // stream is the same for both styles.
    let mut style_rng =
        StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
    let mut parts = Vec::new();
    if style == Style::Direct {
        return Problem {
            question,
            solution: format!("#### {value}"),
            answer: value,
        };
    }
    if style == Style::Verbose {
        parts.push("Let's think step by step.".to_string());
    }
    let mut before = start;
    for operation in &operations {
        parts.push(format!("{}.", operation.equation(before)));
        if style == Style::Verbose {
            for _ in 0..style_rng.random_range(0..=3) {
                parts.push(format!("Check: {}.", operation.check(before)));
            }
        }
        before = operation.apply(before);
    }
    if style == Style::Verbose && style_rng.random_bool(0.5) {
        parts.push(format!("So {name} has {value} {item}."));
    }
    parts.push(format!("#### {value}"));
    Problem {
        question,
        solution: parts.join(" "),
        answer: value,
    }
}

/// The prompt of a problem in the plain template: the question, then `Answer:`.
pub fn plain_prompt(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

/// `count` problems as (prompt, response) pairs for the plain template.
pub fn arithmetic_pairs(seed: u64, first: u64, count: u64, style: Style) -> Vec<(String, String)> {
    task_pairs(Task::Arithmetic, seed, first, count, style)
}

/// `count` problems of `task` as (prompt, response) pairs for the plain template.
pub fn task_pairs(
    task: Task,
    seed: u64,
    first: u64,
    count: u64,
    style: Style,
) -> Vec<(String, String)> {
    (first..first + count)
        .map(|i| {
            let problem = task_problem(task, seed, i, style);
            (
                plain_prompt(&problem.question),
                format!(" {}", problem.solution),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solutions_are_correct_and_styles_share_questions() {
        for index in 0..200 {
            let concise = arithmetic_problem(1, index, Style::Concise);
            let verbose = arithmetic_problem(1, index, Style::Verbose);
            assert_eq!(concise.question, verbose.question);
            assert_eq!(concise.answer, verbose.answer);
            assert!(concise
                .solution
                .ends_with(&format!("#### {}", concise.answer)));
            assert!(verbose
                .solution
                .ends_with(&format!("#### {}", verbose.answer)));
            assert!(concise.answer >= 0);
            // Every equation in a solution is true.
            for equation in verbose
                .solution
                .split(['.', ','])
                .filter(|s| s.contains(" = "))
            {
                let equation = equation.trim().trim_start_matches("Check: ");
                let (lhs, rhs) = equation.split_once(" = ").unwrap();
                let tokens: Vec<&str> = lhs.split(' ').collect();
                let (a, b): (i64, i64) = (tokens[0].parse().unwrap(), tokens[2].parse().unwrap());
                let expected = match tokens[1] {
                    "+" => a + b,
                    "-" => a - b,
                    _ => panic!("unexpected operator in {equation}"),
                };
                assert_eq!(expected, rhs.trim().parse::<i64>().unwrap(), "{equation}");
            }
        }
        assert_eq!(
            arithmetic_problem(1, 5, Style::Verbose),
            arithmetic_problem(1, 5, Style::Verbose)
        );
        assert_ne!(
            arithmetic_problem(1, 5, Style::Verbose),
            arithmetic_problem(2, 5, Style::Verbose)
        );
    }

    #[test]
    fn verbose_solutions_are_longer_and_vary() {
        let lengths: Vec<usize> = (0..300)
            .map(|i| arithmetic_problem(3, i, Style::Verbose).solution.len())
            .collect();
        let concise: usize = (0..300)
            .map(|i| arithmetic_problem(3, i, Style::Concise).solution.len())
            .sum();
        let verbose: usize = lengths.iter().sum();
        assert!(verbose > 3 * concise, "{verbose} vs {concise}");
        assert!(lengths.iter().max().unwrap() > &(2 * lengths.iter().min().unwrap()));
    }

    #[test]
    fn chain_problems_need_their_steps_and_share_questions_across_styles() {
        for index in 0..200 {
            let [concise, verbose, direct] = [Style::Concise, Style::Verbose, Style::Direct]
                .map(|style| task_problem(Task::ArithmeticChain, 4, index, style));
            assert_eq!(concise.question, verbose.question);
            assert_eq!(concise.question, direct.question);
            assert_eq!(direct.solution, format!("#### {}", direct.answer));
            // Five steps, each an equation in the concise solution, chained: each starts
            // where the last ended, and the last ends at the answer.
            let equations: Vec<(i64, i64)> = concise
                .solution
                .split(". ")
                .filter_map(|step| {
                    let (lhs, rhs) = step.trim_end_matches('.').split_once(" = ")?;
                    let first: i64 = lhs.split(' ').next()?.parse().ok()?;
                    Some((first, rhs.trim().parse().ok()?))
                })
                .collect();
            assert_eq!(equations.len(), 5, "{}", concise.solution);
            for pair in equations.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "{}", concise.solution);
            }
            assert_eq!(equations[4].1, concise.answer);
            assert!((10..=99).contains(&equations[0].0));
            assert!(concise.answer >= 0);
        }
        // The simple task's stream is unchanged by the shared generator: the shipped data
        // (`recipes/data/arithmetic-verbose.jsonl`, seed 7) still starts with this problem.
        let first = arithmetic_problem(7, 0, Style::Verbose);
        assert_eq!(
            first.question,
            "Sam has 4 apples. Sam gives away 2. Sam gives away 1. How many apples does Sam have now?"
        );
    }
}
