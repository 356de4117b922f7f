"""Posterior inference on the linearized network: training data, solvers, evidence, regression and Laplace
posteriors."""
