//! The harness's multiple-choice metrics on per-choice log-likelihoods.

/// Index of the largest value, the first on ties (numpy's `argmax`; a NaN wins, as there).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if xs[best].is_nan() {
            break;
        }
        if x.is_nan() || x > xs[best] {
            best = i;
        }
    }
    best
}

/// Characters of a choice (Python's `len(str)`: code points, not bytes or tokens).
pub fn char_len(choice: &str) -> usize {
    choice.chars().count()
}

/// `acc`: 1 when the most likely choice is the gold one.
pub fn acc(lls: &[f64], gold: usize) -> f64 {
    f64::from(argmax(lls) == gold)
}

/// The choice `acc_norm` picks: log-likelihood divided by the choice's character length (without
/// the delimiter), which removes the bias towards short endings. An empty choice counts as one
/// character (the harness would divide by zero).
pub fn pred_norm(lls: &[f64], choices: &[String]) -> usize {
    let normed: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(ll, c)| ll / char_len(c).max(1) as f64)
        .collect();
    argmax(&normed)
}

/// `acc_norm`: 1 when the length-normalised most likely choice is the gold one.
pub fn acc_norm(lls: &[f64], choices: &[String], gold: usize) -> f64 {
    f64::from(pred_norm(lls, choices) == gold)
}

/// TruthfulQA MC2: the probability mass of the true answers, normalised over all answers,
/// sum_true exp(ll) / sum_all exp(ll). Shifted by the largest log-likelihood first: the ratio is
/// unchanged and long answers (log-likelihoods of -1000) do not underflow to 0/0.
///
/// The harness splits the answers at the first false label, which is the same thing when the true
/// answers come first, as in the published data; the labels are used here so that any order works.
pub fn mc2(lls: &[f64], labels: &[bool]) -> f64 {
    assert_eq!(lls.len(), labels.len(), "one label per answer");
    let max = lls.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = lls.iter().map(|ll| (ll - max).exp()).collect();
    let total: f64 = p.iter().sum();
    let true_mass: f64 = p
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(p, _)| p)
        .sum();
    true_mass / total
}

/// Mean and its standard error, as the harness reports them: sample standard deviation
/// (n - 1) over sqrt(n); the error is NaN for fewer than two values.
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}
