//! HF transformers' golden files (tests/golden/VARIANT.json, made by scripts/golden/make-golden.sh):
//! reading them, refusing one made from another tiny model than the kit writes today, and holding
//! a run to one.

use std::collections::HashSet;
use std::path::PathBuf;

use gemma_testkit::TinyGemma;
use serde_json::Value;

use crate::runs::Run;

const REGENERATE: &str = "regenerate the golden files with scripts/golden/make-golden.sh";

/// One golden file: what transformers computed for one tiny model.
pub struct Golden {
    pub variant: String,
    pub new_tokens: usize,
    pub runs: Vec<GoldenRun>,
}

/// One prompt's greedy continuation and the logits recorded along it.
pub struct GoldenRun {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    /// The smallest lead of the best logit over the second along the continuation.
    pub min_margin: f32,
    steps: Vec<GoldenStep>,
}

/// What is kept of one row of logits: the 20 largest, a few fixed ids, the whole row's
/// log-sum-exp. Step 0 is the prefill; step k picks generated token k.
struct GoldenStep {
    step: usize,
    top: Vec<(u32, f32)>,
    fixed: Vec<(u32, f32)>,
    log_sum_exp: f64,
}

impl Golden {
    /// Reads `tests/golden/{variant}.json` and checks that it was made from the model the kit
    /// writes today; panics with what differs (a stale file must not pass or fail mysteriously).
    pub fn load(variant: &str) -> Golden {
        let path = golden_dir().join(format!("{variant}.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}; {REGENERATE}", path.display()));
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}; {REGENERATE}", path.display()));
        let kit = TinyGemma::variant(variant)
            .unwrap_or_else(|| panic!("the kit has no tiny model called {variant}"));
        if let Err(why) = check_provenance(&json["provenance"], &kit) {
            panic!(
                "{} was made from another tiny model than the kit writes today: {why}; \
                 {REGENERATE}",
                path.display()
            );
        }
        parse(&json).unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()))
    }

    pub fn prompts(&self) -> Vec<Vec<u32>> {
        self.runs.iter().map(|r| r.prompt.clone()).collect()
    }

    pub fn min_margin(&self) -> f32 {
        self.runs
            .iter()
            .map(|r| r.min_margin)
            .fold(f32::INFINITY, f32::min)
    }

    /// Holds `runs` (one per golden prompt, in order) to the file: the same greedy tokens, and
    /// every recorded logit and log-sum-exp within `tol`. Returns the largest difference seen.
    pub fn check(&self, runs: &[Run], tol: f32) -> Result<f32, String> {
        if runs.len() != self.runs.len() {
            return Err(format!(
                "{} runs for {} prompts",
                runs.len(),
                self.runs.len()
            ));
        }
        let mut worst = 0f32;
        for (i, (run, want)) in runs.iter().zip(&self.runs).enumerate() {
            if run.tokens != want.tokens {
                return Err(format!(
                    "prompt {i}: greedy tokens {:?}, HF {:?}",
                    run.tokens, want.tokens
                ));
            }
            for step in &want.steps {
                let row = match step.step {
                    0 => &run.prefill_logits,
                    s if s + 1 == self.new_tokens => &run.last_logits,
                    s => return Err(format!("no run row for recorded step {s}")),
                };
                let d = step
                    .check(row, tol)
                    .map_err(|e| format!("prompt {i}, step {}: {e}", step.step))?;
                worst = worst.max(d);
            }
        }
        Ok(worst)
    }

    /// Holds prefill logits only (one row per golden prompt) to the file.
    pub fn check_prefill(&self, rows: &[Vec<f32>], tol: f32) -> Result<f32, String> {
        let mut worst = 0f32;
        for (i, row) in rows.iter().enumerate() {
            worst = worst.max(self.check_prefill_row(i, row, tol)?);
        }
        Ok(worst)
    }

    /// Holds the prefill logits of prompt `i` to the file.
    pub fn check_prefill_row(&self, i: usize, row: &[f32], tol: f32) -> Result<f32, String> {
        let step = self
            .runs
            .get(i)
            .and_then(|run| run.steps.iter().find(|s| s.step == 0))
            .ok_or_else(|| format!("the file records no prefill of prompt {i}"))?;
        step.check(row, tol).map_err(|e| format!("prompt {i}: {e}"))
    }
}

impl GoldenStep {
    /// Every recorded logit and the row's log-sum-exp within `tol`, and no id outside HF's 20
    /// largest above HF's 20th (so the rest of the row is held too). Returns the largest
    /// difference.
    fn check(&self, row: &[f32], tol: f32) -> Result<f32, String> {
        let mut worst = 0f32;
        for &(id, want) in self.top.iter().chain(&self.fixed) {
            let got = *row
                .get(id as usize)
                .ok_or_else(|| format!("id {id} is outside a row of {}", row.len()))?;
            let d = (got - want).abs();
            if d.is_nan() || d > tol {
                return Err(format!("logit of id {id}: {got}, HF {want} (off by {d})"));
            }
            worst = worst.max(d);
        }
        let lse = log_sum_exp(row);
        let d = (lse - self.log_sum_exp).abs() as f32;
        if d.is_nan() || d > tol {
            return Err(format!(
                "log-sum-exp of the row: {lse}, HF {} (off by {d})",
                self.log_sum_exp
            ));
        }
        worst = worst.max(d);
        let top: HashSet<u32> = self.top.iter().map(|&(id, _)| id).collect();
        let floor = self.top.last().map_or(f32::NEG_INFINITY, |&(_, v)| v);
        if let Some((id, v)) = (0u32..)
            .zip(row)
            .find(|(id, &v)| v > floor + tol && !top.contains(id))
        {
            return Err(format!(
                "id {id} has logit {v}, above HF's 20th largest {floor}, but is not in HF's top 20"
            ));
        }
        Ok(worst)
    }
}

/// Compares the provenance a golden file recorded with what `kit` writes today, naming every
/// field that differs.
pub fn check_provenance(recorded: &Value, kit: &TinyGemma) -> Result<(), String> {
    let today = kit.provenance();
    let mut differences = Vec::new();
    diff("", recorded, &today, &mut differences);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(differences.join("; "))
    }
}

/// Collects `path: file X, kit Y` for every leaf where the two JSON values differ.
fn diff(path: &str, file: &Value, kit: &Value, out: &mut Vec<String>) {
    match (file, kit) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let null = Value::Null;
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                diff(
                    &sub,
                    a.get(key).unwrap_or(&null),
                    b.get(key).unwrap_or(&null),
                    out,
                );
            }
        }
        // Numbers compare by value: 2 and 2.0 are the same setting.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: file {a}, kit {b}")),
    }
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

fn parse(json: &Value) -> Result<Golden, String> {
    let variant = json["variant"].as_str().ok_or("no variant")?.to_string();
    let new_tokens = json["new_tokens"].as_u64().ok_or("no new_tokens")? as usize;
    let runs = json["runs"]
        .as_array()
        .ok_or("no runs")?
        .iter()
        .map(parse_run)
        .collect::<Result<_, _>>()?;
    Ok(Golden {
        variant,
        new_tokens,
        runs,
    })
}

fn parse_run(run: &Value) -> Result<GoldenRun, String> {
    Ok(GoldenRun {
        prompt: ids(&run["prompt"])?,
        tokens: ids(&run["tokens"])?,
        min_margin: run["min_margin"].as_f64().ok_or("no min_margin")? as f32,
        steps: run["steps"]
            .as_array()
            .ok_or("no steps")?
            .iter()
            .map(parse_step)
            .collect::<Result<_, _>>()?,
    })
}

fn parse_step(step: &Value) -> Result<GoldenStep, String> {
    Ok(GoldenStep {
        step: step["step"].as_u64().ok_or("a step without its number")? as usize,
        top: pairs(&step["top"])?,
        fixed: pairs(&step["fixed"])?,
        log_sum_exp: step["log_sum_exp"].as_f64().ok_or("no log_sum_exp")?,
    })
}

fn ids(v: &Value) -> Result<Vec<u32>, String> {
    v.as_array()
        .ok_or("expected a list of ids")?
        .iter()
        .map(|id| {
            id.as_u64()
                .map(|id| id as u32)
                .ok_or("an id that is not one")
        })
        .collect::<Result<_, _>>()
        .map_err(str::to_string)
}

/// `[[id, logit], ...]`; logits are f32 values written exactly.
fn pairs(v: &Value) -> Result<Vec<(u32, f32)>, String> {
    v.as_array()
        .ok_or("expected [[id, logit], ...]")?
        .iter()
        .map(|p| match (p[0].as_u64(), p[1].as_f64()) {
            (Some(id), Some(logit)) => Ok((id as u32, logit as f32)),
            _ => Err(format!("{p} is not [id, logit]")),
        })
        .collect()
}
