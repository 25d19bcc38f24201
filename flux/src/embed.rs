//! Inputs of the transformer that carry no trainable weight: sinusoidal timestep features,
//! position ids and their RoPE tables, and 2x2 latent packing (design.md §3.3, §3.4, §3.6,
//! §4.1).
//!
//! Shape legend: `ids_s3` one (axis0, row, col) triple per token; `cos_sk`/`sin_sk` [S, hd/2].

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Sinusoidal features of `values` (already multiplied by 1000): [cos(v w_j), sin(v w_j)],
/// w_j = exp(-ln(10000) j / (dim/2)), j < dim/2, computed in f32 like diffusers.
pub fn timestep_features(values: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(values.len() * dim);
    for &v in values {
        let freqs = (0..half).map(|j| (-(10_000f32.ln()) * j as f32 / half as f32).exp());
        let args: Vec<f32> = freqs.map(|w| v * w).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    Ok(Tensor::from_vec(out, (values.len(), dim), device)?)
}

/// Position ids of a token grid: (0, row, col) row-major, with `col_offset` added to col.
pub fn grid_ids(rows: usize, cols: usize, col_offset: i64) -> Vec<[f32; 3]> {
    let mut ids = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            ids.push([0.0, r as f32, (c as i64 + col_offset) as f32]);
        }
    }
    ids
}

/// Reference `index` (0-based) keeps its own grid ids with the column shifted by
/// -(cols * (index + 1)), the official rule c - (ref_size (i+1)) // 16 in token units.
pub fn reference_ids(rows: usize, cols: usize, index: usize) -> Vec<[f32; 3]> {
    grid_ids(rows, cols, -((cols * (index + 1)) as i64))
}

/// Text tokens all sit at position (0, 0, 0).
pub fn text_ids(len: usize) -> Vec<[f32; 3]> {
    vec![[0.0; 3]; len]
}

/// cos/sin of the rotation angles of every token: per axis a with dim d_a, frequencies
/// 1/theta^(2k/d_a) for k < d_a/2, angles in f64 like diffusers, stored as f32 [S, hd/2].
pub fn rope_tables(
    ids_s3: &[[f32; 3]],
    axes_dims: [usize; 3],
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half: usize = axes_dims.iter().sum::<usize>() / 2;
    let mut cos = Vec::with_capacity(ids_s3.len() * half);
    let mut sin = Vec::with_capacity(ids_s3.len() * half);
    for id in ids_s3 {
        for (axis, &d) in axes_dims.iter().enumerate() {
            for k in 0..d / 2 {
                let freq = 1.0 / theta.powf((2 * k) as f64 / d as f64);
                let angle = id[axis] as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let s = ids_s3.len();
    Ok((
        Tensor::from_vec(cos, (s, half), device)?,
        Tensor::from_vec(sin, (s, half), device)?,
    ))
}

/// Ids as a tensor [S, 3] (the `img_ids`/`txt_ids` arguments of diffusers' forward).
pub fn ids_tensor(ids_s3: &[[f32; 3]], device: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = ids_s3.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (ids_s3.len(), 3), device)?)
}

/// Ids from a tensor [S, 3] of any float dtype.
pub fn ids_from_tensor(t: &Tensor) -> Result<Vec<[f32; 3]>> {
    let rows: Vec<Vec<f32>> = t.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows.into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

/// [B, C, h, w] -> [B, (h/2)(w/2), 4C]: token n = (y/2)(w/2) + x/2, channel c*4 + dy*2 + dx.
pub fn pack_latents(z_bchw: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = z_bchw.dims4()?;
    Ok(z_bchw
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// Inverse of `pack_latents` for a latent of `h` x `w` pixels.
pub fn unpack_latents(x_bnc: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = x_bnc.dims3()?;
    let c = c4 / 4;
    Ok(x_bnc
        .reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoid_puts_cos_first() {
        let t = timestep_features(&[0.0, 500.0], 8, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
        assert_eq!(&v[0][..4], &[1.0; 4]);
        assert_eq!(&v[0][4..], &[0.0; 4]);
        assert!((v[1][0] - 500f32.cos()).abs() < 1e-5);
        let w1 = (-(10_000f32.ln()) / 4.0).exp();
        assert!((v[1][5] - (500.0 * w1).sin()).abs() < 1e-4);
    }

    #[test]
    fn reference_ids_shift_columns_by_grid_width() {
        let ids = reference_ids(2, 32, 1);
        assert_eq!(ids[0], [0.0, 0.0, -64.0]);
        assert_eq!(ids[33], [0.0, 1.0, -63.0]);
        assert_eq!(reference_ids(32, 32, 0).last().unwrap(), &[0.0, 31.0, -1.0]);
    }

    #[test]
    fn rope_tables_follow_axis_layout() {
        let (cos, sin) =
            rope_tables(&[[0.0, 2.0, 3.0]], [2, 2, 4], 10_000.0, &Device::Cpu).unwrap();
        let c: Vec<f32> = cos.flatten_all().unwrap().to_vec1().unwrap();
        let s: Vec<f32> = sin.flatten_all().unwrap().to_vec1().unwrap();
        // axis 0: pos 0; axis 1: pos 2 freq 1; axis 2: pos 3 freqs 1 and 1/100.
        let e = [0.0f64, 2.0, 3.0, 0.03];
        for i in 0..4 {
            assert!(
                (c[i] as f64 - e[i].cos()).abs() < 1e-6 && (s[i] as f64 - e[i].sin()).abs() < 1e-6
            );
        }
    }

    #[test]
    fn packing_round_trips_and_matches_the_index_rule() {
        let z = Tensor::arange(0f32, 2.0 * 16.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 16, 4, 6))
            .unwrap();
        let p = pack_latents(&z).unwrap();
        assert_eq!(p.dims(), &[2, 6, 64]);
        // token (y/2, x/2) = (1, 2) -> n = 1*3 + 2 = 5; channel 3, dy 1, dx 0 -> k = 3*4 + 2 = 14.
        let v: f32 = p
            .get(1)
            .unwrap()
            .get(5)
            .unwrap()
            .get(14)
            .unwrap()
            .to_scalar()
            .unwrap();
        let e: f32 = z
            .get(1)
            .unwrap()
            .get(3)
            .unwrap()
            .get(3)
            .unwrap()
            .get(4)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(v, e);
        let back = unpack_latents(&p, 4, 6).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            z.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
