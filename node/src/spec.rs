//! The `--experts` selector: which layers and experts a node hosts.
//!
//! Grammar: comma-separated items `LAYERS:EXPERTS`, where each side is `*` (all), a number,
//! or an inclusive range `N-M`. Examples: `0:0-3,1:*` hosts experts 0 to 3 of layer 0 and
//! every expert of layer 1; `*:0-1` hosts experts 0 and 1 of every MoE layer; `*` alone
//! hosts everything.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use expertnet_model::ModelConfig;

/// A parsed `--experts` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSpec {
    items: Vec<(Selector, Selector)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selector {
    All,
    /// Inclusive bounds.
    Range(u32, u32),
}

/// Why an `--experts` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --experts value {spec:?}: {reason}")]
pub struct SpecError {
    spec: String,
    reason: String,
}

const EXAMPLES: &str = "write LAYERS:EXPERTS items separated by commas, such as 0:0-3,1:* or *:0-1";

impl FromStr for ExpertSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason: String| SpecError {
            spec: text.to_owned(),
            reason,
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(error(format!("it is empty; {EXAMPLES}")));
        }
        if trimmed == "*" {
            return Ok(Self {
                items: vec![(Selector::All, Selector::All)],
            });
        }

        let mut items = Vec::new();
        for item in trimmed.split(',') {
            let item = item.trim();
            let (layers, experts) = item
                .split_once(':')
                .ok_or_else(|| error(format!("item {item:?} has no ':'; {EXAMPLES}")))?;
            let layers =
                parse_selector(layers).map_err(|reason| error(format!("layers {reason}")))?;
            let experts =
                parse_selector(experts).map_err(|reason| error(format!("experts {reason}")))?;
            items.push((layers, experts));
        }
        Ok(Self { items })
    }
}

fn parse_selector(text: &str) -> Result<Selector, String> {
    let text = text.trim();
    if text == "*" {
        return Ok(Selector::All);
    }

    let number = |part: &str| {
        part.trim()
            .parse::<u32>()
            .map_err(|_| format!("{text:?}: {part:?} is not a number, '*' or a range N-M"))
    };
    match text.split_once('-') {
        Some((first, last)) => {
            let (first, last) = (number(first)?, number(last)?);
            if first > last {
                return Err(format!("{text:?}: the range is empty ({first} > {last})"));
            }
            Ok(Selector::Range(first, last))
        }
        None => {
            let value = number(text)?;
            Ok(Selector::Range(value, value))
        }
    }
}

impl ExpertSpec {
    /// Every expert of every MoE layer.
    pub fn all() -> Self {
        Self {
            items: vec![(Selector::All, Selector::All)],
        }
    }

    /// Lists the `(layer, expert)` pairs the spec selects in a model, sorted.
    ///
    /// # Errors
    /// A [`SpecError`] when the spec names a layer or expert the model does not have, or a
    /// layer without experts.
    pub fn resolve(&self, config: &ModelConfig) -> Result<Vec<(u32, u32)>, SpecError> {
        let error = |reason: String| SpecError {
            spec: self.to_string(),
            reason,
        };
        let moe_layers = config.moe_layers();
        let layer_count = config.num_hidden_layers as u32;
        let expert_count = config.num_experts();

        let mut selected = BTreeSet::new();
        for &(layers, experts) in &self.items {
            let layer_list: Vec<u32> = match layers {
                Selector::All => moe_layers.clone(),
                Selector::Range(first, last) => {
                    if last >= layer_count {
                        return Err(error(format!(
                            "layer {last} is out of range; the model has layers 0-{}",
                            layer_count.saturating_sub(1)
                        )));
                    }
                    if let Some(dense) = (first..=last).find(|l| !moe_layers.contains(l)) {
                        return Err(error(format!(
                            "layer {dense} has a dense MLP, not experts; MoE layers are {moe_layers:?}"
                        )));
                    }
                    (first..=last).collect()
                }
            };
            let (first_expert, last_expert) = match experts {
                Selector::All => (0, expert_count.saturating_sub(1)),
                Selector::Range(first, last) => {
                    if last >= expert_count {
                        return Err(error(format!(
                            "expert {last} is out of range; each MoE layer has experts 0-{}",
                            expert_count.saturating_sub(1)
                        )));
                    }
                    (first, last)
                }
            };
            for &layer in &layer_list {
                for expert in first_expert..=last_expert {
                    selected.insert((layer, expert));
                }
            }
        }
        Ok(selected.into_iter().collect())
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Selector::All => f.write_str("*"),
            Selector::Range(first, last) if first == last => write!(f, "{first}"),
            Selector::Range(first, last) => write!(f, "{first}-{last}"),
        }
    }
}

impl fmt::Display for ExpertSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (layers, experts)) in self.items.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{layers}:{experts}")?;
        }
        Ok(())
    }
}

impl<'de> serde::Deserialize<'de> for ExpertSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize, experts: usize) -> ModelConfig {
        let json = format!(
            r#"{{"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": {layers}, "num_local_experts": {experts},
                "num_experts_per_tok": 2, "vocab_size": 10, "num_attention_heads": 2}}"#
        );
        ModelConfig::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn specs_resolve_to_pairs() {
        let config = config(3, 4);
        let cases: [(&str, Vec<(u32, u32)>); 4] = [
            ("0:0-1,2:3", vec![(0, 0), (0, 1), (2, 3)]),
            ("*:1", vec![(0, 1), (1, 1), (2, 1)]),
            ("1:*", vec![(1, 0), (1, 1), (1, 2), (1, 3)]),
            ("0-1:2, 1:2", vec![(0, 2), (1, 2)]),
        ];
        for (text, expected) in cases {
            let spec: ExpertSpec = text.parse().unwrap();
            assert_eq!(spec.resolve(&config).unwrap(), expected, "{text}");
        }
        let everything: ExpertSpec = "*".parse().unwrap();
        assert_eq!(everything.resolve(&config).unwrap().len(), 12);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("0", "no ':'"),
            ("0:a", "not a number"),
            ("0:3-1", "range is empty"),
            ("x:0", "not a number"),
        ];
        for (text, fragment) in cases {
            let error = text.parse::<ExpertSpec>().unwrap_err().to_string();
            assert!(error.contains(fragment), "{text}: {error}");
        }

        let config = config(2, 4);
        let out_of_range = [
            ("5:0", "layer 5 is out of range"),
            ("0:4", "expert 4 is out of range"),
        ];
        for (text, fragment) in out_of_range {
            let spec: ExpertSpec = text.parse().unwrap();
            let error = spec.resolve(&config).unwrap_err().to_string();
            assert!(error.contains(fragment), "{text}: {error}");
        }
    }

    #[test]
    fn display_roundtrips() {
        for text in ["0:0-3,1:*", "*:0-1", "*:*"] {
            let spec: ExpertSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
    }
}
