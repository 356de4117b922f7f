"""Dense NTK by per-layer structure instead of per-example Jacobians of all p parameters.

For a layer z = W a + b applied once per example (``nn.Linear`` on (n, d_in) inputs), the Jacobian of
output a of example i with respect to W is the outer product g_{ia} a_iᵀ, with a_i the layer's input and
g_{ia} = ∂f_a(x_i)/∂z_i the gradient flowing back into the layer's output. So that layer's share of the
NTK is

    Θ_W[i a, j b] = (a_i · a_j) (g_{ia} · g_{jb}),      Θ_b[i a, j b] = g_{ia} · g_{jb},

an (n × n) Gram of inputs times an (n c × n c) Gram of output gradients: O(n² (d_in + c² d_out)) work
against O(n² c² d_in d_out) for contracting the layer's Jacobian, and no per-example gradient is stored.

For layers whose weights are reused over positions (convolutions; ``nn.Linear`` on (n, T, d) inputs) the
per-example, per-output gradient of the layer alone is formed from the layer's inputs (unfolded patches)
and output gradients — g_{ia} (d_out × P) times patches (P × d_in k) — and contracted: one layer at a time,
chunk by chunk, never for all p parameters at once. When the layer has few positions P and many weights
(a 1 × 1 convolution on a 2 × 2 map late in an image network) the position Gram is cheaper:

    Θ_W[i a, j b] = Σ_{s,t} (a_{is} · a_{jt}) (g_{ias} · g_{jbt})      (a_{is}: patch s of example i),

O(P² (d_in k + c² d_out)) per pair of examples against O(c² d_out d_in k); the cheaper form is chosen per layer.
Parameters outside a supported layer (normalisation scales, embeddings, layers used twice, grouped
convolutions, ...) fall back to the Jacobian contraction restricted to them. The layers' inputs and output
gradients come from one forward pass with hooks and one backward pass batched over the c outputs per chunk of
examples.

The same factors, kept for fixed training inputs (:class:`FactoredJacobian`), give J v and Jᵀ u without a
pass through the network; the iterative solvers use them (see :class:`~linadapt.inference.posterior.TrainingData`).

The rules assume what every per-example Jacobian in this package assumes: the network treats the
examples of a batch independently (it runs in eval mode). Before the first use on a model the structured
kernel of two examples is checked against the plain Jacobian contraction; if they differ, the plain
contraction is used instead, with a warning.
"""

from linadapt.jacobian.structured.engine import StructuredNTK
from linadapt.jacobian.structured.factored import FactoredJacobian, factored_jacobian, factored_jvp

__all__ = ["FactoredJacobian", "StructuredNTK", "factored_jacobian", "factored_jvp"]
