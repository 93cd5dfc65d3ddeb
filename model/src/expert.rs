//! The SwiGLU expert feed-forward: `down(silu(gate(x)) * up(x))`.

use candle_core::Tensor;

use crate::ModelError;
use crate::kernels::{SiluMul, SmallBatchGateUp, SmallBatchMatmul};

/// Arrangement of the matrix products. All compute the same function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulLayout {
    /// [`MatmulLayout::WeightsLeft`] below [`INPUT_LEFT_MIN_TOKENS`] tokens and
    /// [`MatmulLayout::InputLeft`] from there, the faster of the two at each size in
    /// `expertnet-sim bench node` on a 2-core AMD EPYC with candle 0.11's gemm.
    #[default]
    Auto,
    /// `W · xᵀ`, transposed back at the end. It was 1.5-2x faster than
    /// [`MatmulLayout::InputLeft`] at 16 tokens and about as fast from 128 to 384.
    WeightsLeft,
    /// `x · Wᵀ`, as `candle_nn::Linear` computes it. It was 10-30% faster than
    /// [`MatmulLayout::WeightsLeft`] at 512 and 1024 tokens.
    InputLeft,
}

/// From this many tokens [`MatmulLayout::Auto`] computes `x · Wᵀ`.
// NOTE: measured on one machine kind (2-core AMD EPYC, f32, hidden 512 and 1024). The
// crossover may lie elsewhere on other CPUs.
pub const INPUT_LEFT_MIN_TOKENS: usize = 512;

/// One expert's weights in the compute dtype.
#[derive(Debug, Clone)]
pub struct Expert {
    /// `[ffn, hidden]`
    gate: Tensor,
    /// `[ffn, hidden]`
    up: Tensor,
    /// `[hidden, ffn]`
    down: Tensor,
    layout: MatmulLayout,
    /// Batches of at most this many tokens use [`SmallBatchMatmul`] (f32 only).
    small_batch_max: usize,
}

/// Default for [`Expert::with_small_batch_max`].
pub const SMALL_BATCH_MAX: usize = 4;

impl Expert {
    /// Builds an expert from its three weights.
    ///
    /// # Errors
    /// [`ModelError::Shape`] unless `gate` and `up` are `[ffn, hidden]` and `down` is
    /// `[hidden, ffn]` with the same dtype.
    pub fn new(gate: Tensor, up: Tensor, down: Tensor) -> Result<Self, ModelError> {
        let (ffn, hidden) = gate.dims2()?;
        let expect = |name: &str, tensor: &Tensor, shape: [usize; 2]| {
            if tensor.dims() != shape || tensor.dtype() != gate.dtype() {
                return Err(ModelError::Shape {
                    name: name.to_owned(),
                    expected: shape.to_vec(),
                    actual: tensor.dims().to_vec(),
                });
            }
            Ok(())
        };
        expect("up", &up, [ffn, hidden])?;
        expect("down", &down, [hidden, ffn])?;

        Ok(Self {
            gate: gate.contiguous()?,
            up: up.contiguous()?,
            down: down.contiguous()?,
            layout: MatmulLayout::default(),
            small_batch_max: SMALL_BATCH_MAX,
        })
    }

    /// Selects the matrix product arrangement.
    pub fn with_layout(mut self, layout: MatmulLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets the largest batch computed with the small-batch kernel; 0 turns it off.
    pub fn with_small_batch_max(mut self, tokens: usize) -> Self {
        self.small_batch_max = tokens;
        self
    }

    pub fn hidden_size(&self) -> usize {
        self.down.dims()[0]
    }

    pub fn ffn_size(&self) -> usize {
        self.gate.dims()[0]
    }

    pub fn dtype(&self) -> candle_core::DType {
        self.gate.dtype()
    }

    /// Applies the expert to `x` of shape `[tokens, hidden]` in the compute dtype and
    /// returns `[tokens, hidden]`.
    ///
    /// # Errors
    /// A candle error when `x` has another width or dtype.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let tokens = x.dims().first().copied().unwrap_or(0);
        if tokens == 0 {
            // The kernels split work into per-token chunks, which cannot be empty.
            let (_, width) = x.dims2()?;
            if width != self.hidden_size() {
                return Err(candle_core::Error::Msg(format!(
                    "expert input has width {width}, but the expert's hidden size is {}",
                    self.hidden_size()
                )));
            }
            return Tensor::zeros((0, width), self.dtype(), x.device());
        }
        if tokens <= self.small_batch_max && self.gate.dtype() == candle_core::DType::F32 {
            let x = x.contiguous()?;
            let activated = x.apply_op3_no_bwd(&self.gate, &self.up, &SmallBatchGateUp)?;
            return activated.apply_op2_no_bwd(&self.down, &SmallBatchMatmul);
        }

        let layout = match self.layout {
            MatmulLayout::Auto if tokens >= INPUT_LEFT_MIN_TOKENS => MatmulLayout::InputLeft,
            MatmulLayout::Auto => MatmulLayout::WeightsLeft,
            chosen => chosen,
        };
        match layout {
            MatmulLayout::Auto | MatmulLayout::WeightsLeft => {
                let xt = x.t()?.contiguous()?;
                let gate = self.gate.matmul(&xt)?;
                let up = self.up.matmul(&xt)?;
                let activated = gate.apply_op2_no_bwd(&up, &SiluMul)?;
                self.down.matmul(&activated)?.t()?.contiguous()
            }
            MatmulLayout::InputLeft => {
                let gate = x.matmul(&self.gate.t()?)?;
                let up = x.matmul(&self.up.t()?)?;
                let activated = gate.apply_op2_no_bwd(&up, &SiluMul)?;
                activated.matmul(&self.down.t()?)
            }
        }
    }
}

/// Per-row relative error: for each row, `max |a - b| / max |b|`, and the maximum over rows.
/// A row of `b` that is all zeros compares by absolute error. Any NaN or infinity in either
/// tensor makes the result NaN, so a comparison such as `error < bound` fails.
///
/// # Errors
/// A candle error when the shapes differ.
pub fn max_row_relative_error(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    if a.dims() != b.dims() {
        return Err(candle_core::Error::Msg(format!(
            "cannot compare tensors of shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let columns = a.dims().last().copied().unwrap_or(1).max(1);
    let a = a
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = b
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;

    let mut worst = 0.0f32;
    for (row_a, row_b) in a.chunks(columns).zip(b.chunks(columns)) {
        let mut difference = 0.0f32;
        let mut scale = 0.0f32;
        for (&x, &y) in row_a.iter().zip(row_b) {
            if !x.is_finite() || !y.is_finite() {
                return Ok(f32::NAN);
            }
            difference = difference.max((x - y).abs());
            scale = scale.max(y.abs());
        }
        let error = if scale > 0.0 {
            difference / scale
        } else {
            difference
        };
        worst = worst.max(error);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn matrix(rows: usize, columns: usize, seed: f32) -> Tensor {
        let values: Vec<f32> = (0..rows * columns)
            .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.5)
            .collect();
        Tensor::from_vec(values, (rows, columns), &Device::Cpu).unwrap()
    }

    fn naive_swiglu(
        x: &[f32],
        gate: &[f32],
        up: &[f32],
        down: &[f32],
        h: usize,
        f: usize,
    ) -> Vec<f32> {
        let mut hidden = vec![0.0f32; f];
        for j in 0..f {
            let g: f32 = (0..h).map(|k| gate[j * h + k] * x[k]).sum();
            let u: f32 = (0..h).map(|k| up[j * h + k] * x[k]).sum();
            hidden[j] = g / (1.0 + (-g).exp()) * u;
        }
        (0..h)
            .map(|i| (0..f).map(|j| down[i * f + j] * hidden[j]).sum())
            .collect()
    }

    #[test]
    fn forward_matches_naive_loop_for_both_layouts() {
        let (h, f, tokens) = (8, 12, 5);
        let gate = matrix(f, h, 0.1);
        let up = matrix(f, h, 0.7);
        let down = matrix(h, f, 1.3);
        let x = matrix(tokens, h, 2.1);

        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xs = flat(&x);
        let expected: Vec<f32> = (0..tokens)
            .flat_map(|t| {
                naive_swiglu(
                    &xs[t * h..(t + 1) * h],
                    &flat(&gate),
                    &flat(&up),
                    &flat(&down),
                    h,
                    f,
                )
            })
            .collect();
        let expected = Tensor::from_vec(expected, (tokens, h), &Device::Cpu).unwrap();

        let variants = [
            (MatmulLayout::Auto, 0),
            (MatmulLayout::WeightsLeft, 0),
            (MatmulLayout::InputLeft, 0),
            (MatmulLayout::WeightsLeft, tokens),
        ];
        for (layout, small_batch_max) in variants {
            let expert = Expert::new(gate.clone(), up.clone(), down.clone())
                .unwrap()
                .with_layout(layout)
                .with_small_batch_max(small_batch_max);
            let y = expert.forward(&x).unwrap();
            assert_eq!(y.dims(), &[tokens, h]);
            let error = max_row_relative_error(&y, &expected).unwrap();
            assert!(
                error < 1e-5,
                "{layout:?} {small_batch_max}: relative error {error}"
            );
        }
    }

    #[test]
    fn auto_layout_matches_both_layouts_at_large_batches() {
        let (h, f) = (8, 12);
        let expert = Expert::new(matrix(f, h, 0.1), matrix(f, h, 0.7), matrix(h, f, 1.3)).unwrap();
        for tokens in [INPUT_LEFT_MIN_TOKENS - 1, INPUT_LEFT_MIN_TOKENS] {
            let x = matrix(tokens, h, 2.1);
            let auto = expert.forward(&x).unwrap();
            for layout in [MatmulLayout::WeightsLeft, MatmulLayout::InputLeft] {
                let fixed = expert.clone().with_layout(layout).forward(&x).unwrap();
                let error = max_row_relative_error(&auto, &fixed).unwrap();
                assert!(error < 1e-5, "{tokens} tokens, {layout:?}: {error}");
            }
        }
    }

    #[test]
    fn forward_of_no_tokens_is_empty() {
        let (h, f) = (8, 12);
        let expert = Expert::new(matrix(f, h, 0.1), matrix(f, h, 0.7), matrix(h, f, 1.3)).unwrap();
        let empty = Tensor::zeros((0, h), candle_core::DType::F32, &Device::Cpu).unwrap();
        for layout in [
            MatmulLayout::Auto,
            MatmulLayout::WeightsLeft,
            MatmulLayout::InputLeft,
        ] {
            for small_batch_max in [0, SMALL_BATCH_MAX] {
                let expert = expert
                    .clone()
                    .with_layout(layout)
                    .with_small_batch_max(small_batch_max);
                let y = expert.forward(&empty).unwrap();
                assert_eq!(y.dims(), &[0, h], "{layout:?} {small_batch_max}");
            }
        }
        let wrong_width = Tensor::zeros((0, h + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(expert.forward(&wrong_width).is_err());
    }

    #[test]
    fn non_finite_values_make_the_error_nan() {
        let good = matrix(2, 3, 0.5);
        let mut values = good.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[4] = f32::NAN;
        let bad = Tensor::from_vec(values, (2, 3), &Device::Cpu).unwrap();
        assert!(max_row_relative_error(&bad, &good).unwrap().is_nan());
        assert!(max_row_relative_error(&good, &bad).unwrap().is_nan());
        assert_eq!(max_row_relative_error(&good, &good).unwrap(), 0.0);
    }

    #[test]
    fn mismatched_shapes_are_rejected() {
        let result = Expert::new(matrix(12, 8, 0.0), matrix(12, 8, 0.0), matrix(12, 8, 0.0));
        assert!(matches!(result, Err(ModelError::Shape { .. })));
    }
}
