//! The 2-D map of a model's item embeddings that the dashboard draws: each
//! item's coordinates on the first two principal components of the
//! embedding rows (PCA), computed once when the model is trained and stored
//! with its snapshot. Plain Rust and deterministic: the covariance of the
//! rows in f64, its top two eigenvectors by power iteration from a fixed
//! start (the second kept orthogonal to the first), each with its sign
//! fixed so that its largest component is positive.

/// Power iterations at most per component; each is a 64x64 product.
const MAX_ITERATIONS: usize = 2_000;
/// The iteration stops once the vector moves less than this.
const TOLERANCE: f64 = 1e-12;

/// The coordinates of each of `rows` rows of `dim` values (row-major) on
/// their first two principal components: `rows x 2` values, row-major.
/// Zeros when the rows do not vary (or there are fewer than two).
pub fn principal_plane(values: &[f32], rows: usize, dim: usize) -> Vec<f32> {
    assert_eq!(values.len(), rows * dim, "rows x dim values");
    if rows == 0 || dim == 0 {
        return Vec::new();
    }
    let mean = column_means(values, rows, dim);
    let covariance = covariance(values, rows, dim, &mean);
    let first = top_eigenvector(&covariance, dim, None);
    let second = first
        .as_ref()
        .and_then(|v| top_eigenvector(&covariance, dim, Some(v.as_slice())));
    let zero = || vec![0.0; dim];
    let (a, b) = (first.unwrap_or_else(zero), second.unwrap_or_else(zero));
    let mut out = Vec::with_capacity(rows * 2);
    let mut centred = vec![0.0f64; dim];
    for row in values.chunks_exact(dim) {
        for ((c, &x), m) in centred.iter_mut().zip(row).zip(&mean) {
            *c = f64::from(x) - m;
        }
        out.push(dot(&centred, &a) as f32);
        out.push(dot(&centred, &b) as f32);
    }
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn column_means(values: &[f32], rows: usize, dim: usize) -> Vec<f64> {
    let mut mean = vec![0.0f64; dim];
    for row in values.chunks_exact(dim) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += f64::from(x);
        }
    }
    for m in &mut mean {
        *m /= rows as f64;
    }
    mean
}

/// The `dim x dim` covariance of the rows (divided by the row count).
fn covariance(values: &[f32], rows: usize, dim: usize, mean: &[f64]) -> Vec<f64> {
    let mut cov = vec![0.0f64; dim * dim];
    let mut centred = vec![0.0f64; dim];
    for row in values.chunks_exact(dim) {
        for ((c, &x), m) in centred.iter_mut().zip(row).zip(mean) {
            *c = f64::from(x) - m;
        }
        // The upper triangle; mirrored below.
        for r in 0..dim {
            let cr = centred[r];
            let line = &mut cov[r * dim..(r + 1) * dim];
            for c in r..dim {
                line[c] += cr * centred[c];
            }
        }
    }
    for r in 0..dim {
        for c in r..dim {
            let v = cov[r * dim + c] / rows as f64;
            cov[r * dim + c] = v;
            cov[c * dim + r] = v;
        }
    }
    cov
}

/// The unit eigenvector of the largest eigenvalue of the symmetric matrix
/// `m` (restricted to the vectors orthogonal to `against` when given: the
/// second component); `None` when no variance is left there.
fn top_eigenvector(m: &[f64], dim: usize, against: Option<&[f64]>) -> Option<Vec<f64>> {
    // A fixed start with no symmetry, so that it is not orthogonal to the
    // eigenvector sought.
    let mut v: Vec<f64> = (0..dim).map(|i| 1.0 + 1.0 / (i as f64 + 2.0)).collect();
    let scale = m.iter().map(|x| x.abs()).fold(0.0, f64::max);
    if scale <= 0.0 || !scale.is_finite() {
        return None;
    }
    let orthogonalise = |v: &mut Vec<f64>| {
        if let Some(a) = against {
            let along = dot(v, a);
            for (x, y) in v.iter_mut().zip(a) {
                *x -= along * y;
            }
        }
    };
    orthogonalise(&mut v);
    normalise(&mut v)?;
    let mut next = vec![0.0f64; dim];
    for _ in 0..MAX_ITERATIONS {
        for (r, n) in next.iter_mut().enumerate() {
            *n = dot(&m[r * dim..(r + 1) * dim], &v);
        }
        orthogonalise(&mut next);
        // Relative to the matrix: what is left is rounding, not variance.
        if next.iter().map(|x| x.abs()).fold(0.0, f64::max) <= scale * 1e-9 {
            return None;
        }
        normalise(&mut next)?;
        let moved = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        std::mem::swap(&mut v, &mut next);
        if moved < TOLERANCE {
            break;
        }
    }
    // The sign is arbitrary: the largest component is made positive.
    let largest = v
        .iter()
        .copied()
        .fold(0.0f64, |best, x| if x.abs() > best.abs() { x } else { best });
    if largest < 0.0 {
        v.iter_mut().for_each(|x| *x = -*x);
    }
    Some(v)
}

fn normalise(v: &mut [f64]) -> Option<()> {
    let norm = dot(v, v).sqrt();
    if norm <= 0.0 || !norm.is_finite() {
        return None;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Some(())
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Points spread widely along one direction, less along a second and
    /// hardly at all otherwise: the map shows the first two directions, in
    /// that order.
    #[test]
    fn the_map_follows_the_directions_of_most_variance() {
        let dim = 8;
        let mut rng = StdRng::seed_from_u64(3);
        // Orthogonal unit directions, not axis-aligned.
        let u: Vec<f64> = (0..dim).map(|i| if i < 4 { 0.5 } else { 0.0 }).collect();
        let w: Vec<f64> = (0..dim).map(|i| if i % 2 == 0 { 0.5 } else { -0.5 }).collect();
        assert!(dot(&u, &w).abs() < 1e-12);
        let rows = 500;
        let mut truth = Vec::new();
        let mut values = Vec::new();
        for _ in 0..rows {
            let (a, b) = (rng.gen_range(-10.0..10.0), rng.gen_range(-3.0..3.0));
            truth.push((a, b));
            for i in 0..dim {
                let noise = rng.gen_range(-0.05..0.05);
                values.push((5.0 + a * u[i] + b * w[i] + noise) as f32);
            }
        }
        let plane = principal_plane(&values, rows, dim);
        assert_eq!(plane.len(), rows * 2);
        let xs: Vec<f64> = plane.iter().step_by(2).map(|&x| f64::from(x)).collect();
        let ys: Vec<f64> = plane.iter().skip(1).step_by(2).map(|&y| f64::from(y)).collect();
        let a: Vec<f64> = truth.iter().map(|t| t.0).collect();
        let b: Vec<f64> = truth.iter().map(|t| t.1).collect();
        assert!(correlation(&xs, &a).abs() > 0.999, "{}", correlation(&xs, &a));
        assert!(correlation(&ys, &b).abs() > 0.99, "{}", correlation(&ys, &b));
        // Centred, and the first axis wider than the second.
        assert!(xs.iter().sum::<f64>().abs() / (rows as f64) < 1e-3);
        let spread = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
        assert!(spread(&xs) > 4.0 * spread(&ys));
        // The same numbers every time.
        assert_eq!(principal_plane(&values, rows, dim), plane);
    }

    #[test]
    fn rows_that_do_not_vary_map_to_the_origin() {
        let values = vec![0.25f32; 3 * 4];
        assert_eq!(principal_plane(&values, 3, 4), vec![0.0; 6]);
        assert_eq!(principal_plane(&[1.0, 2.0], 1, 2), vec![0.0, 0.0]);
        assert!(principal_plane(&[], 0, 4).is_empty());
        // One direction of variance only: the second coordinate is 0.
        let line: Vec<f32> = (0..5).flat_map(|i| [i as f32, 2.0 * i as f32]).collect();
        let plane = principal_plane(&line, 5, 2);
        assert!(plane.iter().skip(1).step_by(2).all(|y| y.abs() < 1e-4), "{plane:?}");
        assert!(plane[0] < plane[8], "{plane:?}");
    }

    fn correlation(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    }
}
