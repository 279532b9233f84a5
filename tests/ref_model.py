"""A plain-NumPy reference GPT, forward and hand-written backward, for the model tests.

It is written for clarity, not speed, and runs in whatever float dtype its parameters have
(float64 for finite differences). It shares no code with randygpt.model: the layout, init and
kernels there are checked against this. Dropout takes explicit masks (N, C) keyed by
(layer, site), with site 0 = attention branch and 1 = MLP branch, each holding 0 or 1/(1-p).

Shapes: idx, targets (B, T); N = B*T; C channels, NH heads, HS = C/NH, H = 4C, V vocab.
"""
import numpy as np


def param_shapes(config):
    """(name, shape) in SPEC order, written out independently of randygpt.model.ParamTable."""
    C, V, H = config.n_embd, config.vocab_size, 4 * config.n_embd
    shapes = [("wte", (V, C)), ("wpe", (config.block_size, C))]
    for i in range(config.n_layer):
        shapes += [(f"h.{i}.wq", (C, C)), (f"h.{i}.wk", (C, C)), (f"h.{i}.wv", (C, C)),
                   (f"h.{i}.wo", (C, C)), (f"h.{i}.fc1", (H, C)), (f"h.{i}.fc2", (C, H))]
        if config.norm == "layernorm":
            shapes += [(f"h.{i}.ln1.weight", (C,)), (f"h.{i}.ln1.bias", (C,)),
                       (f"h.{i}.ln2.weight", (C,)), (f"h.{i}.ln2.bias", (C,))]
    shapes.append(("lm_head", (V, C)))
    return shapes


def random_params(config, rng, std=0.3, dtype=np.float64):
    """Parameters large enough that every gradient is far above round-off (unlike the 0.02
    init, where attention is nearly uniform and q/k gradients are tiny)."""
    params = {}
    for name, shape in param_shapes(config):
        if name.endswith("ln1.weight") or name.endswith("ln2.weight"):
            params[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(dtype)
        else:
            params[name] = (std * rng.standard_normal(shape)).astype(dtype)
    return params


def _norm_forward(x, config, p, i, which):
    if config.norm == "rmsnorm":
        rstd = 1.0 / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + config.norm_eps)
        out = x * rstd
        return out, (x, rstd, out)
    w, b = p[f"h.{i}.{which}.weight"], p[f"h.{i}.{which}.bias"]
    mean = np.mean(x, axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(np.mean((x - mean) ** 2, axis=1, keepdims=True) + config.norm_eps)
    xhat = (x - mean) * rstd
    return xhat * w + b, (x, rstd, xhat)


def _norm_backward(dout, cache, config, p, g, i, which):
    if config.norm == "rmsnorm":
        # out = x * rstd, rstd = (mean(x^2) + eps)^-1/2
        _, rstd, out = cache
        return rstd * (dout - out * np.mean(dout * out, axis=1, keepdims=True))
    # out = xhat * w + b, xhat = (x - mean) * rstd
    _, rstd, xhat = cache
    w = p[f"h.{i}.{which}.weight"]
    g[f"h.{i}.{which}.weight"] += np.sum(dout * xhat, axis=0)
    g[f"h.{i}.{which}.bias"] += np.sum(dout, axis=0)
    dxhat = dout * w
    return rstd * (dxhat - np.mean(dxhat, axis=1, keepdims=True)
                   - xhat * np.mean(dxhat * xhat, axis=1, keepdims=True))


def _split_heads(a, B, T, NH):
    """(N, C) -> (B, NH, T, HS)."""
    return a.reshape(B, T, NH, -1).transpose(0, 2, 1, 3)


def _merge_heads(a):
    """(B, NH, T, HS) -> (N, C)."""
    B, NH, T, HS = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B * T, NH * HS)


def forward(params, idx, targets, config, masks=None):
    """Mean cross-entropy of the GPT on (idx, targets); returns (loss, cache for backward).

    masks: None (no dropout) or {(layer, site): (N, C) array of 0 or 1/(1-p)}.
    """
    p = params
    B, T = idx.shape
    N, C, NH = B * T, config.n_embd, config.n_head
    HS = C // NH
    x = (p["wte"][idx] + p["wpe"][:T]).reshape(N, C)
    causal = np.tril(np.ones((T, T), dtype=bool))
    layers = []
    for i in range(config.n_layer):
        c = {"x_in": x}
        ln1, c["ln1"] = _norm_forward(x, config, p, i, "ln1")
        q, k, v = ln1 @ p[f"h.{i}.wq"].T, ln1 @ p[f"h.{i}.wk"].T, ln1 @ p[f"h.{i}.wv"].T
        qh, kh, vh = (_split_heads(a, B, T, NH) for a in (q, k, v))
        s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(HS)
        s = np.where(causal, s, -np.inf)
        # Subtracting the row max keeps exp() in range; masked entries become exactly 0.
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        att = e / e.sum(axis=-1, keepdims=True)
        y = _merge_heads(att @ vh)
        proj = y @ p[f"h.{i}.wo"].T
        m0 = None if masks is None else masks[(i, 0)]
        x = x + (proj if m0 is None else proj * m0)
        c.update(ln1_out=ln1, qh=qh, kh=kh, vh=vh, att=att, y=y, m0=m0, x_mid=x)
        ln2, c["ln2"] = _norm_forward(x, config, p, i, "ln2")
        pre = ln2 @ p[f"h.{i}.fc1"].T
        h = np.maximum(pre, 0) ** 2
        out = h @ p[f"h.{i}.fc2"].T
        m1 = None if masks is None else masks[(i, 1)]
        x = x + (out if m1 is None else out * m1)
        c.update(ln2_out=ln2, pre=pre, h=h, m1=m1)
        layers.append(c)
    logits = x @ p["lm_head"].T
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    t = targets.reshape(N)
    loss = -np.mean(logp[np.arange(N), t])
    cache = dict(idx=idx, t=t, x_final=x, logp=logp, layers=layers, B=B, T=T)
    return loss, cache


def backward(params, cache, config):
    """Exact gradient of forward's mean loss; returns {name: array} like params."""
    p = params
    g = {name: np.zeros_like(a) for name, a in p.items()}
    B, T = cache["B"], cache["T"]
    N, C, NH = B * T, config.n_embd, config.n_head
    HS = C // NH
    # loss = -mean(logp[t]) -> dlogits = (softmax - onehot) / N
    dlogits = np.exp(cache["logp"])
    dlogits[np.arange(N), cache["t"]] -= 1
    dlogits /= N
    g["lm_head"] += dlogits.T @ cache["x_final"]
    dx = dlogits @ p["lm_head"]
    for i in reversed(range(config.n_layer)):
        c = cache["layers"][i]
        # x = x_mid + dropout(relu(ln2 fc1^T)^2 fc2^T)
        dout = dx if c["m1"] is None else dx * c["m1"]
        g[f"h.{i}.fc2"] += dout.T @ c["h"]
        dh = dout @ p[f"h.{i}.fc2"]
        dpre = dh * 2 * np.maximum(c["pre"], 0)
        g[f"h.{i}.fc1"] += dpre.T @ c["ln2_out"]
        dln2 = dpre @ p[f"h.{i}.fc1"]
        dx = dx + _norm_backward(dln2, c["ln2"], config, p, g, i, "ln2")
        # x_mid = x_in + dropout(attn(ln1) wo^T)
        dproj = dx if c["m0"] is None else dx * c["m0"]
        g[f"h.{i}.wo"] += dproj.T @ c["y"]
        dyh = _split_heads(dproj @ p[f"h.{i}.wo"], B, T, NH)
        att, qh, kh, vh = c["att"], c["qh"], c["kh"], c["vh"]
        # y = att v
        datt = dyh @ vh.transpose(0, 1, 3, 2)
        dvh = att.transpose(0, 1, 3, 2) @ dyh
        # att = softmax(s): ds = att * (datt - sum(datt * att))
        ds = att * (datt - np.sum(datt * att, axis=-1, keepdims=True))
        # s = q k^T / sqrt(HS)
        dqh = ds @ kh / np.sqrt(HS)
        dkh = ds.transpose(0, 1, 3, 2) @ qh / np.sqrt(HS)
        dq, dk, dv = _merge_heads(dqh), _merge_heads(dkh), _merge_heads(dvh)
        ln1 = c["ln1_out"]
        g[f"h.{i}.wq"] += dq.T @ ln1
        g[f"h.{i}.wk"] += dk.T @ ln1
        g[f"h.{i}.wv"] += dv.T @ ln1
        dln1 = dq @ p[f"h.{i}.wq"] + dk @ p[f"h.{i}.wk"] + dv @ p[f"h.{i}.wv"]
        dx = dx + _norm_backward(dln1, c["ln1"], config, p, g, i, "ln1")
    # x = wte[idx] + wpe[:T]
    np.add.at(g["wte"], cache["idx"].reshape(N), dx)
    g["wpe"][:T] += dx.reshape(B, T, C).sum(axis=0)
    return g


def loss_and_grads(params, idx, targets, config, masks=None):
    loss, cache = forward(params, idx, targets, config, masks)
    return loss, backward(params, cache, config)
