//! Embedding vectors at rest and the scan that ranks them: a vector store's chunks are held as
//! one row-major matrix of unit vectors, and a query is scored against every row (exact search,
//! no index), fanned out on rayon because it is pure CPU work. Also the fusion of several
//! rankings into one, for hybrid (vector + keyword) search.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;

use rayon::prelude::*;

/// Independent sums in [`dot`]: enough for the compiler to fill wide vector registers.
const LANES: usize = 16;
/// Rows one rayon task scans; a matrix of at most this many rows is scanned on the caller's
/// thread, since handing it to the pool would cost more than the scan.
const ROWS_PER_TASK: usize = 4096;

/// Why vectors could not be read or compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VectorError {
    /// A stored vector's bytes are not a whole number of f32s: the row is damaged.
    BadLength(usize),
    /// A vector has a different number of dimensions from the matrix's: the query or chunk
    /// was embedded by another model than the store's vectors.
    Dimensions { expected: usize, got: usize },
}

impl fmt::Display for VectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VectorError::BadLength(n) => {
                write!(f, "a stored vector has {n} bytes, not a multiple of 4")
            }
            VectorError::Dimensions { expected, got } => write!(
                f,
                "the vector has {got} dimensions where the vector store's have {expected}"
            ),
        }
    }
}

impl std::error::Error for VectorError {}

/// The vector as stored (a BLOB or bytea): little-endian f32s, 4 bytes each.
pub(crate) fn to_bytes(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A stored vector read back: the inverse of [`to_bytes`].
pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Vec<f32>, VectorError> {
    let floats = bytes.chunks_exact(4);
    if !floats.remainder().is_empty() {
        return Err(VectorError::BadLength(bytes.len()));
    }
    Ok(floats
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Scales the vector to unit length, so that a dot product is a cosine. A zero vector (or one
/// with a NaN or infinity) is left as it is.
pub(crate) fn normalize(vector: &mut [f32]) {
    let norm = dot(vector, vector).sqrt();
    if norm > 0.0 && norm.is_finite() {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The dot product over the length of the shorter vector.
///
/// Written as [`LANES`] independent sums over whole blocks plus the remainder, so the
/// compiler vectorises it: one running sum makes every addition wait for the one before (a
/// plain iterator sum measured about five times slower on 100k × 1536).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES));
    let tail: f32 = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut sums = [0.0f32; LANES];
    for (x, y) in a.zip(b) {
        // Whole blocks by chunks_exact; as arrays the compiler knows their length.
        let x: &[f32; LANES] = x.try_into().expect("a whole block");
        let y: &[f32; LANES] = y.try_into().expect("a whole block");
        for ((sum, x), y) in sums.iter_mut().zip(x).zip(y) {
            *sum += x * y;
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// One row that scored: where it is, which chunk it is, and its cosine similarity to the
/// query, clamped to 0..=1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Hit {
    /// The row's index in the matrix (what `search_where`'s `keep` is asked about).
    pub(crate) index: usize,
    /// The chunk's id, as pushed.
    pub(crate) id: i64,
    pub(crate) score: f32,
}

/// Every chunk vector of one vector store, scanned whole for each query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Matrix {
    dims: usize,
    /// Row-major, `dims` floats a row, each row a unit vector (or zero).
    rows: Vec<f32>,
    /// The chunk id of each row.
    ids: Vec<i64>,
    /// Each row's group (its file), an index into `group_names`; empty when rows were pushed
    /// without one.
    groups: Vec<u32>,
    /// The groups' names (file ids), so a filter decided per file applies to its rows.
    group_names: Vec<String>,
}

impl Matrix {
    /// An empty matrix for vectors of `dims` dimensions.
    #[cfg(test)]
    pub(crate) fn new(dims: usize) -> Matrix {
        Matrix::with_capacity(dims, 0)
    }

    /// An empty matrix with room for `rows` vectors, for a load that knows its count.
    pub(crate) fn with_capacity(dims: usize, rows: usize) -> Matrix {
        Matrix {
            dims,
            rows: Vec::with_capacity(dims * rows),
            ids: Vec::with_capacity(rows),
            groups: Vec::new(),
            group_names: Vec::new(),
        }
    }

    /// Adds chunk `id`'s vector as a new row of the group (file) named `group`, scaled to unit
    /// length. Rows of one matrix are pushed all with a group or all without.
    pub(crate) fn push_in(
        &mut self,
        id: i64,
        group: &str,
        vector: &[f32],
    ) -> Result<(), VectorError> {
        self.push(id, vector)?;
        let index = match self.group_names.iter().rposition(|g| g == group) {
            Some(i) => i,
            None => {
                self.group_names.push(group.to_string());
                self.group_names.len() - 1
            }
        };
        self.groups.push(index as u32);
        Ok(())
    }

    /// The group names (file ids), in the order first pushed.
    pub(crate) fn group_names(&self) -> &[String] {
        &self.group_names
    }

    /// The group of row `index`, an index into [`Matrix::group_names`].
    pub(crate) fn group(&self, index: usize) -> usize {
        self.groups[index] as usize
    }

    /// Adds chunk `id`'s vector as a new row, scaled to unit length.
    pub(crate) fn push(&mut self, id: i64, vector: &[f32]) -> Result<(), VectorError> {
        self.check(vector)?;
        let start = self.rows.len();
        self.rows.extend_from_slice(vector);
        normalize(&mut self.rows[start..]);
        self.ids.push(id);
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The chunk id of row `index`.
    pub(crate) fn id(&self, index: usize) -> i64 {
        self.ids[index]
    }

    /// Memory the matrix holds, what a cache of matrices counts against its bound.
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of::<Matrix>()
            + self.rows.capacity() * std::mem::size_of::<f32>()
            + self.ids.capacity() * std::mem::size_of::<i64>()
            + self.groups.capacity() * std::mem::size_of::<u32>()
            + self
                .group_names
                .iter()
                .map(|g| g.capacity() + std::mem::size_of::<String>())
                .sum::<usize>()
    }

    #[cfg(test)]
    /// The at most `k` rows most similar to `query` with a score of at least `threshold`, best
    /// first, equal scores by chunk id. An empty matrix has no hits, whatever the query.
    pub(crate) fn search(
        &self,
        query: &[f32],
        k: usize,
        threshold: f32,
    ) -> Result<Vec<Hit>, VectorError> {
        self.search_where(query, k, threshold, |_| true)
    }

    /// [`Matrix::search`] over only the rows whose index `keep` accepts (chunks of files
    /// that pass an attribute filter). `keep` is called from rayon's threads.
    pub(crate) fn search_where(
        &self,
        query: &[f32],
        k: usize,
        threshold: f32,
        keep: impl Fn(usize) -> bool + Sync,
    ) -> Result<Vec<Hit>, VectorError> {
        if self.is_empty() || self.dims == 0 || k == 0 {
            return Ok(Vec::new());
        }
        self.check(query)?;
        let mut query = query.to_vec();
        normalize(&mut query);
        let scan = |block: usize, rows: &[f32]| {
            let mut top = TopK::new(k);
            for (i, row) in rows.chunks_exact(self.dims).enumerate() {
                let index = block * ROWS_PER_TASK + i;
                if !keep(index) {
                    continue;
                }
                // Unit vectors: the dot product is the cosine, a hair over 1 by rounding.
                let score = dot(&query, row).clamp(0.0, 1.0);
                if score >= threshold {
                    top.offer(Hit {
                        index,
                        id: self.ids[index],
                        score,
                    });
                }
            }
            top
        };
        let top = if self.len() <= ROWS_PER_TASK {
            scan(0, &self.rows)
        } else {
            self.rows
                .par_chunks(self.dims * ROWS_PER_TASK)
                .enumerate()
                .map(|(block, rows)| scan(block, rows))
                .reduce(|| TopK::new(k), TopK::merge)
        };
        Ok(top.into_sorted())
    }

    fn check(&self, vector: &[f32]) -> Result<(), VectorError> {
        if vector.len() == self.dims {
            Ok(())
        } else {
            Err(VectorError::Dimensions {
                expected: self.dims,
                got: vector.len(),
            })
        }
    }
}

/// The best `k` hits seen so far: a heap whose top is the worst of them, to be pushed out
/// by anything better.
struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

/// A hit ordered so that the worse of two is the greater: a lower score, or on equal scores
/// the higher chunk id.
struct Worst(Hit);

impl Ord for Worst {
    fn cmp(&self, other: &Worst) -> Ordering {
        other
            .0
            .score
            .total_cmp(&self.0.score)
            .then(self.0.id.cmp(&other.0.id))
            .then(self.0.index.cmp(&other.0.index))
    }
}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Worst) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Worst {
    fn eq(&self, other: &Worst) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Worst {}

impl TopK {
    fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.min(1024) + 1),
        }
    }

    fn offer(&mut self, hit: Hit) {
        let hit = Worst(hit);
        if self.heap.len() < self.k {
            self.heap.push(hit);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if hit < *worst {
                *worst = hit;
            }
        }
    }

    /// Both tasks' best, as one.
    fn merge(mut self, other: TopK) -> TopK {
        if self.heap.len() < other.heap.len() {
            return other.merge(self);
        }
        for Worst(hit) in other.heap {
            self.offer(hit);
        }
        self
    }

    fn into_sorted(self) -> Vec<Hit> {
        // Ascending by `Worst` is best first.
        let mut hits = self.heap.into_vec();
        hits.sort();
        hits.into_iter().map(|Worst(hit)| hit).collect()
    }
}

/// Reciprocal rank fusion of several rankings of chunk ids (best first): each id scores
/// Σ 1/(k + rank), rank counted from 1, over the rankings it appears in (once each: a repeat
/// within one ranking is ignored). Scores are divided by the best possible, an id first in
/// every ranking given (empty ones included), so they fall in 0..=1. Best first, equal scores
/// by id. `k` is usually 60: larger flattens the difference between top and lower ranks.
pub(crate) fn fuse(rankings: &[Vec<i64>], k: f32) -> Vec<(i64, f32)> {
    let k = k.max(0.0);
    let best = rankings.len() as f32 / (k + 1.0);
    let mut scores: HashMap<i64, f32> = HashMap::new();
    for ranking in rankings {
        let mut seen = HashSet::with_capacity(ranking.len());
        let firsts = ranking.iter().filter(|&&id| seen.insert(id));
        for (rank, &id) in firsts.enumerate() {
            *scores.entry(id).or_default() += 1.0 / (k + rank as f32 + 1.0);
        }
    }
    let mut fused: Vec<(i64, f32)> = scores
        .into_iter()
        .map(|(id, score)| (id, (score / best).min(1.0)))
        .collect();
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    fused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_unit(rng: &mut fastrand::Rng, dims: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dims).map(|_| rng.f32() * 2.0 - 1.0).collect();
        normalize(&mut v);
        v
    }

    fn random_matrix(seed: u64, rows: usize, dims: usize) -> Matrix {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut matrix = Matrix::with_capacity(dims, rows);
        for id in 0..rows {
            // Ids not in row order, to tell ids from indexes.
            matrix
                .push(
                    1000 + (id as i64 * 7919) % 100_003,
                    &random_unit(&mut rng, dims),
                )
                .unwrap();
        }
        matrix
    }

    /// Every row scored the slow, obvious way, in f64, best first.
    fn brute_force(matrix: &Matrix, query: &[f32], k: usize, threshold: f32) -> Vec<(i64, f64)> {
        let norm = query
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        let mut all: Vec<(i64, f64)> = (0..matrix.len())
            .map(|i| {
                let row = &matrix.rows[i * matrix.dims..(i + 1) * matrix.dims];
                let dot: f64 = row
                    .iter()
                    .zip(query)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                (matrix.id(i), (dot / norm).clamp(0.0, 1.0))
            })
            .filter(|&(_, score)| score >= f64::from(threshold))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    fn assert_same(hits: &[Hit], expected: &[(i64, f64)]) {
        let got: Vec<i64> = hits.iter().map(|h| h.id).collect();
        let want: Vec<i64> = expected.iter().map(|e| e.0).collect();
        assert_eq!(got, want);
        for (hit, (_, score)) in hits.iter().zip(expected) {
            assert!(
                (f64::from(hit.score) - score).abs() < 1e-5,
                "{hit:?} vs {score}"
            );
        }
    }

    #[test]
    fn vectors_are_stored_as_little_endian_f32s() {
        assert_eq!(to_bytes(&[1.0, -2.5]), [0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0]);
        let v = vec![0.1, -7.25, f32::MIN_POSITIVE, 3.0e38];
        assert_eq!(from_bytes(&to_bytes(&v)).unwrap(), v);
        assert_eq!(from_bytes(&[]).unwrap(), Vec::<f32>::new());
        assert_eq!(from_bytes(&[0; 7]), Err(VectorError::BadLength(7)));
        assert_eq!(
            VectorError::BadLength(7).to_string(),
            "a stored vector has 7 bytes, not a multiple of 4"
        );
    }

    #[test]
    fn dot_agrees_with_the_plain_sum_at_every_length() {
        let mut rng = fastrand::Rng::with_seed(1);
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|_| rng.f32() - 0.5).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.f32() - 0.5).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-5, "length {n}");
        }
        assert_eq!(dot(&[1.0, 2.0, 3.0], &[4.0, 5.0]), 14.0);
    }

    #[test]
    fn normalize_makes_unit_vectors_and_leaves_zero_alone() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut zero = vec![0.0; 5];
        normalize(&mut zero);
        assert_eq!(zero, [0.0; 5]);
    }

    #[test]
    fn search_finds_exactly_the_brute_force_top_k() {
        // More rows than one task scans, so the parallel path and its merge run too.
        for rows in [100, 3 * ROWS_PER_TASK + 17] {
            let matrix = random_matrix(7, rows, 24);
            let mut rng = fastrand::Rng::with_seed(99);
            for _ in 0..5 {
                let query = random_unit(&mut rng, 24);
                for k in [1, 10, 50] {
                    let hits = matrix.search(&query, k, 0.0).unwrap();
                    assert_same(&hits, &brute_force(&matrix, &query, k, 0.0));
                }
            }
        }
    }

    #[test]
    fn search_keeps_only_scores_at_or_above_the_threshold() {
        let matrix = random_matrix(3, 2000, 8);
        let query = random_unit(&mut fastrand::Rng::with_seed(4), 8);
        let hits = matrix.search(&query, 2000, 0.6).unwrap();
        assert!(!hits.is_empty() && hits.len() < 2000);
        assert!(hits.iter().all(|h| h.score >= 0.6));
        assert_same(&hits, &brute_force(&matrix, &query, 2000, 0.6));
        assert!(matrix.search(&query, 10, 1.01).unwrap().is_empty());
    }

    #[test]
    fn a_k_larger_than_the_matrix_returns_every_row() {
        let matrix = random_matrix(5, 30, 4);
        let query = [1.0, 0.0, 0.0, 0.0];
        let hits = matrix.search(&query, 1000, 0.0).unwrap();
        assert_eq!(
            hits.len(),
            30,
            "scores below zero count as zero, not dropped"
        );
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(matrix.search(&query, 0, 0.0).unwrap().is_empty());
    }

    #[test]
    fn scores_are_cosines_clamped_to_zero_and_one_and_ties_go_by_id() {
        let mut matrix = Matrix::new(3);
        matrix.push(9, &[2.0, 0.0, 0.0]).unwrap();
        matrix.push(3, &[1.0, 0.0, 0.0]).unwrap();
        matrix.push(5, &[-1.0, 0.0, 0.0]).unwrap();
        matrix.push(4, &[1.0, 1.0, 0.0]).unwrap();
        let hits = matrix.search(&[0.5, 0.0, 0.0], 10, 0.0).unwrap();
        let got: Vec<(i64, f32)> = hits.iter().map(|h| (h.id, h.score)).collect();
        assert_eq!(got[..2], [(3, 1.0), (9, 1.0)]);
        assert_eq!(got[2].0, 4);
        assert!((got[2].1 - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(got[3], (5, 0.0));
        assert_eq!(hits[0].index, 1);
    }

    #[test]
    fn an_empty_matrix_has_no_hits() {
        let matrix = Matrix::new(1536);
        assert!(matrix.is_empty());
        assert_eq!(matrix.search(&[1.0; 1536], 5, 0.0), Ok(Vec::new()));
        assert_eq!(matrix.search(&[1.0; 3], 5, 0.0), Ok(Vec::new()));
    }

    #[test]
    fn a_vector_of_other_dimensions_is_an_error() {
        let mut matrix = Matrix::new(4);
        let wrong = VectorError::Dimensions {
            expected: 4,
            got: 3,
        };
        assert_eq!(matrix.push(1, &[1.0, 0.0, 0.0]), Err(wrong.clone()));
        matrix.push(1, &[1.0, 0.0, 0.0, 0.0]).unwrap();
        assert_eq!(matrix.search(&[1.0, 0.0, 0.0], 1, 0.0), Err(wrong.clone()));
        assert_eq!(
            wrong.to_string(),
            "the vector has 3 dimensions where the vector store's have 4"
        );
    }

    #[test]
    fn search_where_scans_only_the_rows_kept() {
        let matrix = random_matrix(11, 2 * ROWS_PER_TASK + 5, 6);
        let query = random_unit(&mut fastrand::Rng::with_seed(12), 6);
        let hits = matrix
            .search_where(&query, 40, 0.0, |i| i % 3 == 0)
            .unwrap();
        assert_eq!(hits.len(), 40);
        assert!(hits
            .iter()
            .all(|h| h.index % 3 == 0 && matrix.id(h.index) == h.id));
        let all = matrix.search(&query, matrix.len(), 0.0).unwrap();
        let expected: Vec<i64> = all
            .iter()
            .filter(|h| h.index % 3 == 0)
            .take(40)
            .map(|h| h.id)
            .collect();
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), expected);
    }

    #[test]
    fn bytes_counts_the_rows_and_ids() {
        let matrix = Matrix::with_capacity(10, 100);
        assert!(matrix.bytes() >= 100 * 10 * 4 + 100 * 8);
    }

    #[test]
    fn fusion_rewards_ids_ranked_high_by_several_rankings() {
        let fused = fuse(&[vec![1, 2, 3], vec![3, 1, 4]], 60.0);
        let ids: Vec<i64> = fused.iter().map(|f| f.0).collect();
        assert_eq!(ids, [1, 3, 2, 4]);
        // 1 is first and second: (1/61 + 1/62) / (2/61).
        assert!((fused[0].1 - (1.0 / 61.0 + 1.0 / 62.0) / (2.0 / 61.0)).abs() < 1e-6);
        assert!(fused.iter().all(|f| (0.0..=1.0).contains(&f.1)));
    }

    #[test]
    fn fusion_scores_one_for_first_everywhere_and_ignores_repeats() {
        let fused = fuse(&[vec![7, 8], vec![7, 7, 8]], 60.0);
        assert_eq!(fused[0], (7, 1.0));
        assert_eq!(fused[1], (8, 1.0 / 62.0 / (1.0 / 61.0)));
        assert_eq!(fuse(&[vec![5]], 60.0), [(5, 1.0)]);
        // A ranking that found nothing still counts towards the best possible score.
        assert_eq!(fuse(&[vec![5], vec![]], 60.0), [(5, 0.5)]);
        assert!(fuse(&[], 60.0).is_empty());
        // Equal scores go by id.
        assert_eq!(fuse(&[vec![2], vec![1]], 60.0), [(1, 0.5), (2, 0.5)]);
    }

    /// The scan's speed at OpenAI's common size: 100k chunks of 1536 dimensions (614 MB).
    /// `cargo test --release --bin syncgate vector -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing_of_a_scan_of_100k_vectors_of_1536_dimensions() {
        let dims = 1536;
        let matrix = random_matrix(42, 100_000, dims);
        let mut rng = fastrand::Rng::with_seed(43);
        let mut times: Vec<std::time::Duration> = (0..9)
            .map(|_| {
                let query = random_unit(&mut rng, dims);
                let started = std::time::Instant::now();
                let hits = matrix.search(&query, 20, 0.0).unwrap();
                assert_eq!(hits.len(), 20);
                started.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "search of 100k x {dims} on {} threads: p50 {:?} (min {:?}, max {:?})",
            rayon::current_num_threads(),
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
}
