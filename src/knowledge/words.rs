//! Deterministic embeddings from a text's words, for the built-in `mock` model and
//! `syncgate mock-upstream`: each word is hashed to one dimension and a sign (feature hashing),
//! so texts that share words point the same way and file search over mock vectors finds what
//! a person would expect, with no model and no network.

/// Words too common to say what a text is about, left out so that "the" shared by two texts
/// does not make them look related.
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "is", "it", "of", "on",
    "or", "that", "the", "this", "to", "was", "were", "with",
];

/// A unit vector of `dimensions` components for `text`: each word (a run of letters or
/// digits, lower-cased, stop words left out) adds ±1 to the component its hash picks. Equal
/// texts embed equally on every platform and in every release; a text with no words gets the
/// same fixed unit vector as every other such text, all components equal.
pub(crate) fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    let mut vector = vec![0.0f32; dimensions];
    if dimensions == 0 {
        return vector;
    }
    for word in words(text) {
        let hash = mix(fnv1a(word.as_bytes()));
        let index = (hash % dimensions as u64) as usize;
        // The top bit picks the sign, so colliding words cancel as often as they add up.
        vector[index] += if hash >> 63 == 0 { 1.0 } else { -1.0 };
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    } else {
        vector.fill(1.0 / (dimensions as f32).sqrt());
    }
    vector
}

/// The text's words: runs of letters and digits in any script, lower-cased, stop words out.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .filter(|word| !STOP_WORDS.contains(&word.as_str()))
}

/// FNV-1a: a fixed hash, unlike std's, so vectors stay the same across builds and versions.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: FNV's low bits vary little between short words, and they pick the
/// dimension, so every bit is stirred first.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &str, b: &str, dimensions: usize) -> f32 {
        let (a, b) = (embed(a, dimensions), embed(b, dimensions));
        a.iter().zip(&b).map(|(x, y)| x * y).sum()
    }

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    #[test]
    fn vectors_are_deterministic_unit_vectors_of_the_size_asked() {
        for dimensions in [1, 3, 16, 1536] {
            let v = embed("Otters hold hands while they sleep", dimensions);
            assert_eq!(v.len(), dimensions);
            assert!((norm(&v) - 1.0).abs() < 1e-6, "{dimensions}");
            assert_eq!(v, embed("Otters hold hands while they sleep", dimensions));
        }
        assert!(embed("anything", 0).is_empty());
    }

    #[test]
    fn vectors_stay_the_same_across_platforms_and_releases() {
        // One word is one component of ±1: pinned, so a change to the hashing shows here.
        let v = embed("otter river", 1536);
        let nonzero: Vec<(usize, f32)> = v
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, x)| x != 0.0)
            .collect();
        let half = std::f32::consts::FRAC_1_SQRT_2;
        assert_eq!(nonzero.len(), 2, "{nonzero:?}");
        assert_eq!((nonzero[0].0, nonzero[1].0), (70, 1208), "{nonzero:?}");
        assert!((nonzero[0].1 - half).abs() < 1e-6, "{nonzero:?}");
        assert!((nonzero[1].1 + half).abs() < 1e-6, "{nonzero:?}");
    }

    #[test]
    fn case_punctuation_and_stop_words_do_not_matter() {
        assert_eq!(embed("Otters, OTTERS!", 64), embed("otters otters", 64));
        assert_eq!(
            embed("the otter is in the river", 64),
            embed("otter river", 64)
        );
        assert_eq!(embed("ÑANDÚ", 64), embed("ñandú", 64));
        assert_ne!(embed("otter river", 64), embed("river otter otter", 64));
    }

    #[test]
    fn a_text_with_no_words_gets_one_fixed_unit_vector() {
        let empty = embed("", 16);
        assert!((norm(&empty) - 1.0).abs() < 1e-6);
        assert!(empty.iter().all(|x| x.is_finite() && *x == empty[0]));
        assert_eq!(embed("!!! ...", 16), empty);
        assert_eq!(embed("the of and", 16), empty);
    }

    #[test]
    fn texts_sharing_words_score_high_and_unrelated_texts_near_zero() {
        let document = "Sea otters hold hands while sleeping so they do not drift apart";
        let unrelated = "Quarterly revenue grew in the European market";
        let query = "why do otters hold hands";
        let related = cosine(query, document, 256);
        let other = cosine(query, unrelated, 256);
        assert!(related > 0.4, "{related}");
        assert!(other.abs() < 0.15, "{other}");
        assert!(
            cosine("東京 の 川", "東京 タワー", 64) > 0.3,
            "words in any script"
        );
    }

    #[test]
    fn the_texts_the_integration_tests_compare_embed_differently() {
        // tests/mock_upstream.rs and the SDK check (tests/sdk) expect these to differ.
        assert_ne!(embed("hello", 8), embed("world", 8));
        assert_ne!(embed("hello", 16), embed("hullo", 16));
        assert_ne!(embed("the quick brown fox", 16), embed("a lazy dog", 16));
    }
}
