"""MCMC building blocks shared by the samplers: diagnostics (ESS, split R-hat, MCSE),
importance resampling, and energies of common targets."""
