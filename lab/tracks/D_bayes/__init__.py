"""Track D_bayes."""
