//! Answer accuracy as the official SQuAD evaluation scripts compute it.
//!
//! Normalization (`normalize_answer` of SQuAD v1.1 and v2.0): lowercase, delete ASCII
//! punctuation (Python's `string.punctuation`), replace the articles `a`, `an`, `the` (whole
//! words, `\b(a|an|the)\b`) by a space, collapse whitespace. Exact match compares the
//! normalized strings; token F1 compares the bags of normalized tokens. Both take the best
//! score over the gold answers.
//!
//! No-answer questions (SQuAD 2.0): gold answers that normalize to nothing are dropped; a
//! question left without any is unanswerable and its gold is the empty string, so only an
//! empty prediction scores (v2.0's `compute_f1`: with an empty side, F1 = whether both are).

use std::collections::HashMap;

const ASCII_PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// Python's `\w` for str patterns: alphanumeric or underscore.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// SQuAD's `normalize_answer`.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !ASCII_PUNCTUATION.contains(*c)).collect();
    // `\b(a|an|the)\b` → " ": a maximal run of word characters that is exactly an article.
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut no_articles);
            no_articles.push(c);
        }
    }
    flush(&mut word, &mut no_articles);
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn tokens(s: &str) -> Vec<String> {
    normalize_answer(s).split_whitespace().map(str::to_string).collect()
}

pub fn exact_match(prediction: &str, gold: &str) -> f64 {
    f64::from(u8::from(normalize_answer(prediction) == normalize_answer(gold)))
}

pub fn f1(prediction: &str, gold: &str) -> f64 {
    let p = tokens(prediction);
    let g = tokens(gold);
    if p.is_empty() || g.is_empty() {
        return f64::from(u8::from(p == g));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &g {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let mut same = 0;
    for t in &p {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The gold answers as SQuAD 2.0 scores them: those that normalize to something, else `[""]`
/// (the question is unanswerable).
pub fn scored_golds(golds: &[String]) -> Vec<String> {
    let kept: Vec<String> = golds.iter().filter(|g| !normalize_answer(g).is_empty()).cloned().collect();
    if kept.is_empty() {
        vec![String::new()]
    } else {
        kept
    }
}

/// Best exact match and F1 over the gold answers.
pub fn score(prediction: &str, golds: &[String]) -> (f64, f64) {
    let golds = scored_golds(golds);
    let em = golds.iter().map(|g| exact_match(prediction, g)).fold(0.0, f64::max);
    let f = golds.iter().map(|g| f1(prediction, g)).fold(0.0, f64::max);
    (em, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_matches_the_squad_script() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("an apple, a day"), "apple day");
        // Articles only as whole words; punctuation goes first, so "the-end" → "theend".
        assert_eq!(normalize_answer("theatre the-end"), "theatre theend");
        assert_eq!(normalize_answer("A"), "");
        // Non-ASCII punctuation stays (it is not in string.punctuation) and bounds words.
        assert_eq!(normalize_answer("the–end"), "–end");
        assert_eq!(normalize_answer("Über\tDAS\nHaus"), "über das haus");
    }

    #[test]
    fn exact_match_and_f1_by_hand() {
        assert_eq!(exact_match("the Delhi", "Delhi."), 1.0);
        assert_eq!(exact_match("New Delhi", "Delhi"), 0.0);
        // pred tokens {new, delhi}, gold {delhi}: P = 1/2, R = 1 → F1 = 2/3.
        assert!((f1("New Delhi", "Delhi") - 2.0 / 3.0).abs() < 1e-12);
        // Repeated tokens count up to their multiplicity in the gold.
        // pred [a1 a1 b] vs gold [a1 b b]: same = 2, P = R = 2/3.
        assert!((f1("x x y", "x y y") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1("cat", "dog"), 0.0);
        let golds = vec!["Delhi".to_string(), "New Delhi, India".to_string()];
        let (em, f) = score("new delhi india", &golds);
        assert_eq!(em, 1.0);
        assert_eq!(f, 1.0);
        let (em, f) = score("in Delhi", &golds);
        assert_eq!(em, 0.0);
        assert!((f - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn unanswerable_questions_score_only_empty_predictions() {
        let golds: Vec<String> = vec![];
        assert_eq!(score("", &golds), (1.0, 1.0));
        assert_eq!(score("Paris", &golds), (0.0, 0.0));
        // A gold of only articles/punctuation is no answer at all.
        assert_eq!(score("", &["The.".to_string()]), (1.0, 1.0));
        // An empty prediction to an answerable question scores 0.
        assert_eq!(score("", &["Paris".to_string()]), (0.0, 0.0));
    }
}
