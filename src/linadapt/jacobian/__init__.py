"""The linearized network and its Jacobian products: torch.func, per-layer structured rules, held Jacobians."""
