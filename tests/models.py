"""Small float64 test networks covering the architectures the linearization must handle."""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int = 4, width: int = 8, d_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d_out)
    ).double()


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class SmallResNet(nn.Module):
    """conv-BN-relu, a residual block with BatchNorm, dropout, global pooling, linear head."""

    def __init__(self, d_out: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = ResBlock(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = self.block(h)
        h = h.mean(dim=(2, 3))
        return self.head(self.drop(h))


def resnet(seed: int = 0, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = SmallResNet(d_out).double()
    # Give BatchNorm non-trivial running statistics and affine weights, then leave it in train mode.
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 6, 6, dtype=torch.float64) * 2 + 0.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


class Shared(nn.Module):
    """The same Linear layer applied twice (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


def shared(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Shared().double()


class Embedder(nn.Module):
    """Integer token inputs (n, L) -> embedding -> mean -> linear: 2 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(tokens).mean(dim=1)))


def embedder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Embedder().double()


class TextEncoder(nn.Module):
    """Token ids (n, T) → token embeddings (padding_idx 0) + position embeddings (a (1, T) id buffer broadcast over
    the batch, as BERT's) → nn.TransformerEncoder (batch first or sequence first; a key padding mask from the ids
    when ``padded``; pre-norm layers when not batch first) → mean over the real tokens → linear head: 3 outputs."""

    def __init__(self, batch_first: bool = True, padded: bool = True, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.batch_first, self.padded = batch_first, padded
        self.tokens = nn.Embedding(vocab, d, padding_idx=0)
        self.positions = nn.Embedding(16, d)
        self.register_buffer("position_ids", torch.arange(16).unsqueeze(0), persistent=False)
        layer = nn.TransformerEncoderLayer(
            d, 2, 2 * d, dropout=0.1, batch_first=batch_first, norm_first=not batch_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(self.position_ids[:, : ids.shape[1]])
        pad = ids == 0 if self.padded else None
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        keep = (ids != 0).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def text_encoder(seed: int = 0, batch_first: bool = True, padded: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return TextEncoder(batch_first, padded).double().eval()


def token_ids(n: int, T: int = 5, vocab: int = 11, seed: int = 1) -> torch.Tensor:
    """Token ids (n, T) in 1..vocab-1 with a few trailing padding ids (0); every sequence keeps ≥ 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    return ids.masked_fill(torch.arange(T) >= lengths.unsqueeze(1), 0)


class CrossAttention(nn.Module):
    """nn.MultiheadAttention in its other configurations: sequence-first cross-attention with separate key/value
    projection weights (kdim = vdim ≠ embed_dim), bias_k / bias_v and a zero attention position, whose averaged
    attention weights also reach the output; then batch-first causal self-attention with a float mask."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = nn.Linear(3, 5)
        self.query = nn.Linear(3, 6)
        self.cross = nn.MultiheadAttention(6, 3, kdim=5, vdim=5, add_bias_kv=True, add_zero_attn=True)
        self.self_attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (n, T, 3)
        mem = torch.tanh(self.memory(x)).transpose(0, 1)  # (T, n, 5)
        q = torch.tanh(self.query(x[:, :2])).transpose(0, 1)  # (2, n, 6)
        o, w = self.cross(q, mem, mem)  # w (n, 2, T + 2), averaged over heads
        o = o.transpose(0, 1)
        causal = nn.Transformer.generate_square_subsequent_mask(2, dtype=x.dtype)
        o, _ = self.self_attn(o, o, o, attn_mask=causal, need_weights=False, is_causal=True)
        return self.head(o.mean(1)) + w[:, :, :2].sum(1)


def cross_attention(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CrossAttention().double().eval()


class SingleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def single_out(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SingleOut().double()


def inputs_for(name: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(n, 4, generator=g, dtype=torch.float64)
    if name == "resnet":
        return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    if name == "shared":
        return torch.randn(n, 3, generator=g, dtype=torch.float64)
    if name == "embedder":
        return torch.randint(0, 7, (n, 5), generator=g)
    if name == "single":
        return torch.randn(n, 2, generator=g, dtype=torch.float64)
    raise KeyError(name)


BUILDERS = {"mlp": mlp, "resnet": resnet, "shared": shared, "embedder": embedder, "single": single_out}


def reference_jacobian(model: nn.Module, X: torch.Tensor, names: list[str]) -> torch.Tensor:
    """J(X) of shape (n, c, p) by plain autograd, one output at a time, in eval mode (independent of torch.func)."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    flags = [p.requires_grad for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    try:
        rows = []
        for i in range(X.shape[0]):
            out = model(X[i : i + 1]).reshape(-1)
            per_out = []
            for a in range(out.shape[0]):
                grads = torch.autograd.grad(out[a], chosen, retain_graph=True, allow_unused=True)
                per_out.append(
                    torch.cat(
                        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, chosen)]
                    )
                )
            rows.append(torch.stack(per_out))
        return torch.stack(rows).detach().to(torch.float64)
    finally:
        for p, f in zip(chosen, flags):
            p.requires_grad_(f)
        for m, t in was:
            m.training = t


def fit_held_and_plain(monkeypatch, model, X, Y, Xs, settings: dict):
    """``LinearizedRegressor(space="function", **settings)`` fitted twice on (X, Y): as the solvers run it
    (products through the held training Jacobian) and with torch.func products only. Returns the first
    regressor, the (mean, std) predictions at Xs of both, and a Counter of what served the first fit's products
    with the training Jacobian (``TrainingData.jvp`` / ``vjp``, which the CG iterations call): keys such as
    ``"FactoredJacobian.jvp"``, ``"GraphJacobian.vjp"`` or ``"Linearization.jvp"`` (torch.func)."""
    import collections

    import linadapt as la
    from linadapt.inference.posterior import TrainingData
    from linadapt.jacobian.graph import GraphJacobian
    from linadapt.jacobian.structured import FactoredJacobian

    served: collections.Counter = collections.Counter()
    depth = [0]  # > 0 inside TrainingData.jvp / vjp

    def wrap(cls, name, outer=False):
        original = getattr(cls, name)

        def counted(self, *args, **kwargs):
            if depth[0] and not outer:
                served[f"{cls.__name__}.{name}"] += 1
            depth[0] += outer
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= outer

        return counted

    with monkeypatch.context() as m:
        for name in ("jvp", "vjp"):
            m.setattr(TrainingData, name, wrap(TrainingData, name, outer=True))
            for cls in (la.Linearization, FactoredJacobian, GraphJacobian):
                m.setattr(cls, name, wrap(cls, name))
        reg = la.LinearizedRegressor(model, space="function", **settings).fit(X, Y)
    with monkeypatch.context() as m:
        m.setattr(TrainingData, "factored", lambda self: None)  # torch.func products only
        plain = la.LinearizedRegressor(model, space="function", **settings).fit(X, Y)
        expected = plain.predict(Xs, return_std=True)
    return reg, reg.predict(Xs, return_std=True), expected, served


def gp_closed_form(model, names, X, Y, Xs, s2: float, sig2: float):
    """Predictive mean and std (y, noise included) of ``LinearizedRegressor(prior_var=s2, noise_var=sig2,
    optimize_hyperparameters=False)`` by the dense function-space GP formulas on :func:`reference_jacobian`;
    also the exact log marginal likelihood. Mean and std have shape (m, c) (Y given as (n, c))."""
    import math

    J, Js = reference_jacobian(model, X, names), reference_jacobian(model, Xs, names)
    n, c, p = J.shape
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            f0, fs = model(X).reshape(n, c).double(), model(Xs).reshape(-1, c).double()
    finally:
        for m, t in was:
            m.training = t
    Jm, Jsm = J.reshape(n * c, p), Js.reshape(-1, p)
    r = (torch.as_tensor(Y, dtype=torch.float64).reshape(n, c) - f0).reshape(-1)
    A = s2 * Jm @ Jm.T + sig2 * torch.eye(n * c, dtype=torch.float64)
    Kxs = s2 * Jsm @ Jm.T
    mean = fs + (Kxs @ torch.linalg.solve(A, r)).reshape(-1, c)
    var = s2 * (Jsm * Jsm).sum(1) - (Kxs * torch.linalg.solve(A, Kxs.T).T).sum(1) + sig2
    lml = -0.5 * r @ torch.linalg.solve(A, r) - 0.5 * torch.logdet(A) - 0.5 * n * c * math.log(2 * math.pi)
    return mean.numpy(), var.sqrt().reshape(-1, c).numpy(), float(lml)
