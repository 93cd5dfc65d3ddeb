//! Fault injection: misbehaviours a node can be configured to show, so that tests, the
//! in-process simulator and containers exercise the router's defences with one definition.
//! Every fault is off by default.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use expertnet_proto::WireTensor;

/// The faults a node shows. Each applies to every `Forward` request while set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultConfig {
    /// Wait this long before computing each request.
    pub delay: Duration,
    /// Add a further delay drawn uniformly from zero to this, per request.
    pub jitter: Duration,
    /// Return outputs changed after computation, under a valid signature: what a
    /// dishonest or broken node would send.
    pub wrong_output: bool,
    /// Return NaN outputs, under a valid signature.
    pub nan_output: bool,
    /// Return an output that has one row more or fewer than the input, under a valid
    /// signature.
    pub wrong_shape: bool,
    /// Return receipts whose signature does not verify.
    pub bad_signature: bool,
    /// Accept requests and never respond to them.
    pub stop_answering: bool,
    /// Publish this load, in token rows, in node records instead of the real one.
    pub advertised_load: Option<u32>,
}

impl FaultConfig {
    /// Returns whether any fault is set.
    pub fn is_active(&self) -> bool {
        *self != Self::default()
    }

    /// Applies one `--fault` value, such as `delay=200ms` or `wrong-output`.
    ///
    /// # Errors
    /// A message naming the value and the accepted faults.
    pub fn apply(&mut self, text: &str) -> Result<(), String> {
        let (name, value) = match text.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (text.trim(), None),
        };
        let flag = |set: &mut bool| match value {
            None => {
                *set = true;
                Ok(())
            }
            Some(_) => Err(format!("fault {name:?} takes no value, got {text:?}")),
        };
        match name {
            "delay" => {
                let value = value
                    .ok_or_else(|| "fault delay needs a value, such as delay=200ms".to_owned())?;
                self.delay = parse_duration(value)?;
                Ok(())
            }
            "jitter" => {
                let value = value
                    .ok_or_else(|| "fault jitter needs a value, such as jitter=5ms".to_owned())?;
                self.jitter = parse_duration(value)?;
                Ok(())
            }
            "wrong-output" => flag(&mut self.wrong_output),
            "nan-output" => flag(&mut self.nan_output),
            "wrong-shape" => flag(&mut self.wrong_shape),
            "bad-signature" => flag(&mut self.bad_signature),
            "stop-answering" => flag(&mut self.stop_answering),
            "advertise-load" => {
                let value = value.ok_or_else(|| {
                    "fault advertise-load needs a value, such as advertise-load=0".to_owned()
                })?;
                let load = value.parse().map_err(|_| {
                    format!("advertise-load={value}: expected a whole number of token rows")
                })?;
                self.advertised_load = Some(load);
                Ok(())
            }
            _ => Err(format!(
                "unknown fault {text:?}; known faults: delay=DURATION, jitter=DURATION, wrong-output, nan-output, wrong-shape, bad-signature, stop-answering, advertise-load=TOKENS"
            )),
        }
    }

    /// Returns this request's delay: `delay` plus a uniform share of `jitter`, with
    /// `unit` in [0, 1).
    pub(crate) fn request_delay(&self, unit: f64) -> Duration {
        self.delay + self.jitter.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Changes an output as the output faults ask, before it is signed.
    pub(crate) fn corrupt_output(&self, output: WireTensor) -> WireTensor {
        let mut output = output;
        if self.wrong_output {
            output = map_elements(&output, |value| value * 1.25 + 0.5);
        }
        if self.nan_output {
            output = map_elements(&output, |_| f32::NAN);
        }
        if self.wrong_shape {
            output = change_rows(&output);
        }
        output
    }
}

/// Writes the faults as `--fault` takes them, such as `delay=200ms,wrong-output`.
impl std::fmt::Display for FaultConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.delay.is_zero() {
            parts.push(format!("delay={}ms", self.delay.as_millis()));
        }
        if !self.jitter.is_zero() {
            parts.push(format!("jitter={}ms", self.jitter.as_millis()));
        }
        let flags = [
            (self.wrong_output, "wrong-output"),
            (self.nan_output, "nan-output"),
            (self.wrong_shape, "wrong-shape"),
            (self.bad_signature, "bad-signature"),
            (self.stop_answering, "stop-answering"),
        ];
        parts.extend(
            flags
                .iter()
                .filter(|(set, _)| *set)
                .map(|(_, name)| (*name).to_owned()),
        );
        if let Some(load) = self.advertised_load {
            parts.push(format!("advertise-load={load}"));
        }
        if parts.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&parts.join(","))
    }
}

impl FromStr for FaultConfig {
    type Err = String;

    /// Parses comma-separated faults, such as `delay=200ms,wrong-output`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut faults = Self::default();
        for part in text.split(',').filter(|part| !part.trim().is_empty()) {
            faults.apply(part)?;
        }
        Ok(faults)
    }
}

/// Parses `200ms`, `1.5s` or a bare number of milliseconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?}; write it as 200ms or 1.5s");
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        (text, 1e-3)
    };
    let value: f64 = number.trim().parse().map_err(|_| invalid())?;
    if !(value.is_finite() && value >= 0.0 && value * scale <= 3600.0) {
        return Err(invalid());
    }
    Ok(Duration::from_secs_f64(value * scale))
}

fn map_elements(tensor: &WireTensor, change: impl Fn(f32) -> f32) -> WireTensor {
    let values: Vec<f32> = expertnet_model::codec::wire_to_f32(tensor)
        .into_iter()
        .map(change)
        .collect();
    expertnet_model::codec::wire_from_f32(&values, tensor.shape(), tensor.dtype())
        .unwrap_or_else(|_| tensor.clone())
}

/// Drops the last row, or repeats the only one.
fn change_rows(tensor: &WireTensor) -> WireTensor {
    let shape = tensor.shape();
    let (Some(&rows), Some(&columns)) = (shape.first(), shape.get(1)) else {
        return tensor.clone();
    };
    let row_bytes = columns * tensor.dtype().size_in_bytes();
    let data = tensor.data();
    let (new_rows, bytes) = if rows > 1 {
        (rows - 1, data.slice(..(rows - 1) * row_bytes))
    } else {
        let mut doubled = data.to_vec();
        doubled.extend_from_slice(data);
        (2, Bytes::from(doubled))
    };
    WireTensor::new(vec![new_rows, columns], tensor.dtype(), bytes)
        .unwrap_or_else(|_| tensor.clone())
}

/// Flips one bit of a signature, so it no longer verifies.
pub(crate) fn corrupt_signature(signature: &mut ed25519_dalek::Signature) {
    let mut bytes = signature.to_bytes();
    bytes[0] ^= 0x01;
    *signature = ed25519_dalek::Signature::from_bytes(&bytes);
}

#[cfg(test)]
mod tests {
    use expertnet_proto::DType;

    use super::*;

    #[test]
    fn faults_parse() {
        let faults: FaultConfig = "delay=200ms, wrong-output,stop-answering".parse().unwrap();
        assert_eq!(faults.delay, Duration::from_millis(200));
        assert!(faults.wrong_output);
        assert!(faults.stop_answering);
        assert!(!faults.nan_output);

        let faults: FaultConfig = "delay=1.5s,advertise-load=0".parse().unwrap();
        assert_eq!(faults.delay, Duration::from_millis(1500));
        assert_eq!(faults.advertised_load, Some(0));
        assert!(!FaultConfig::default().is_active());
    }

    #[test]
    fn bad_faults_are_explained() {
        for (text, fragment) in [
            ("explode", "unknown fault"),
            ("delay", "needs a value"),
            ("delay=soon", "invalid duration"),
            ("wrong-output=1", "takes no value"),
            ("advertise-load=-1", "whole number"),
        ] {
            let error = text.parse::<FaultConfig>().unwrap_err();
            assert!(error.contains(fragment), "{text}: {error}");
        }
    }

    #[test]
    fn output_faults_change_the_tensor() {
        let tensor =
            expertnet_model::codec::wire_from_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2], DType::F32)
                .unwrap();
        let wrong = FaultConfig {
            wrong_output: true,
            ..FaultConfig::default()
        }
        .corrupt_output(tensor.clone());
        assert_eq!(wrong.shape(), tensor.shape());
        assert_ne!(wrong.digest(), tensor.digest());

        let nan = FaultConfig {
            nan_output: true,
            ..FaultConfig::default()
        }
        .corrupt_output(tensor.clone());
        assert_eq!(nan.first_non_finite(), Some(0));

        let short = FaultConfig {
            wrong_shape: true,
            ..FaultConfig::default()
        }
        .corrupt_output(tensor);
        assert_eq!(short.shape(), &[1, 2]);
    }

    #[test]
    fn display_round_trips() {
        let faults: FaultConfig = "delay=250ms,wrong-output,advertise-load=7".parse().unwrap();
        assert_eq!(
            faults.to_string(),
            "delay=250ms,wrong-output,advertise-load=7"
        );
        assert_eq!(faults.to_string().parse::<FaultConfig>().unwrap(), faults);
        assert_eq!(FaultConfig::default().to_string(), "none");
    }

    #[test]
    fn jitter_adds_a_bounded_random_delay() {
        let faults: FaultConfig = "delay=10ms,jitter=4ms".parse().unwrap();
        assert_eq!(faults.request_delay(0.0), Duration::from_millis(10));
        assert_eq!(faults.request_delay(0.5), Duration::from_millis(12));
        assert_eq!(faults.request_delay(2.0), Duration::from_millis(14));
        assert_eq!(faults.to_string(), "delay=10ms,jitter=4ms");
    }
}
