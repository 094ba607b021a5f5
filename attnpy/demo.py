"""The demo: attention on a short sentence, every head's map printed and drawn.

Four hand-built heads over one sentence, each made to show one idea:
  0 "same word"      Q = K = the word's embedding: a token finds its repeats
  1 "previous token" Q from position i, K from position j + 1: i looks at i - 1
  2 "causal average" Q = 0 under the causal mask: uniform over the past
  3 "random"         random projections of the embeddings
No internet and no model download: the embeddings are made here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._sdpa import scaled_dot_product_attention

SENTENCE = "the cat sat on the mat because the mat was warm"
HEAD_NAMES = ["same word", "previous token", "causal average", "random"]


def build_inputs(tokens, d=16, seed=0):
    """query, key, value of shape (4 heads, L, d) and a causal float mask per head."""
    rng = np.random.default_rng(seed)
    L = len(tokens)
    vocab = sorted(set(tokens))
    word = {w: rng.standard_normal(d) for w in vocab}
    x = np.stack([word[t] for t in tokens])               # (L, d) word embeddings
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pos = np.eye(L, d)                                    # one-hot positions (L <= d)
    nxt = np.eye(L, d, k=1)                               # key j carries position j + 1

    q = np.zeros((4, L, d))
    k = np.zeros((4, L, d))
    q[0], k[0] = 4 * x, 4 * x                             # same word: large when x_i == x_j
    q[1], k[1] = 8 * pos, 8 * nxt                         # previous token: q_i . k_j = 64 [j + 1 == i]
    q[2], k[2] = 0 * x, x                                 # zero scores: uniform over what is allowed
    w_q, w_k = rng.standard_normal((2, d, d)) / np.sqrt(d)
    q[3], k[3] = x @ w_q, x @ w_k
    v = np.broadcast_to(x, (4, L, d))                     # every head reads the embeddings

    mask = np.zeros((4, 1, L, L))
    mask[2, 0][np.triu_indices(L, 1)] = -np.inf           # head 2 is causal
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), mask.astype(np.float32)


def run(outdir="attnpy-demo"):
    tokens = SENTENCE.split()
    q, k, v, mask = build_inputs(tokens)
    # mask (4, 1, L, L) broadcasts over nothing here; drop the unit axis for clarity
    res = scaled_dot_product_attention(q, k, v, attn_mask=mask[:, 0], scale=1.0)
    out, weights = res
    print(f"attnpy demo: {len(tokens)} tokens, {len(HEAD_NAMES)} heads")
    print(f"sentence: {SENTENCE!r}")
    print(f"output {out.shape} {out.dtype}, weights {weights.shape} (per head, rows sum to 1)\n")

    width = max(len(t) for t in tokens)
    for h, name in enumerate(HEAD_NAMES):
        print(f"head {h} ({name}): each token -> the token it attends to most")
        for i, t in enumerate(tokens):
            j = int(np.argmax(weights[h, i]))
            print(f"  {t:>{width}} -> {tokens[j]:<{width}} ({weights[h, i, j]:.2f})")
        print()

    check = _check_against_torch(q, k, v, mask[:, 0], out)
    if check is not None:
        print(f"checked against torch.nn.functional.scaled_dot_product_attention: "
              f"max |difference| = {check:.2e}")

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    np.save(outdir / "weights.npy", weights)
    written = [outdir / "weights.npy"] + _save_pictures(weights, tokens, mask[:, 0], outdir)
    print(f"wrote into {outdir}/:")
    for path in written:
        print(f"  {path.name}")
    return res


def _check_against_torch(q, k, v, mask, out):
    try:
        import torch
    except ImportError:
        return None
    t = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(np.ascontiguousarray(v)),
        attn_mask=torch.from_numpy(mask), scale=1.0)
    return float(np.abs(t.numpy() - out).max())


def _save_pictures(weights, tokens, mask, outdir):
    """heads.png (all heads, one colour scale), head_<h>.png (one map each,
    masked cells hatched) and head_view.html (interactive, self-contained)."""
    from . import viz
    view = viz.head_view(weights, tokens, title="attnpy demo: " + SENTENCE)
    written = [view.save_html(outdir / "head_view.html")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG pictures; pip install matplotlib)")
        return written
    titles = [f"head {h}: {name}" for h, name in enumerate(HEAD_NAMES)]
    fig = viz.heads(weights, tokens, cols=len(HEAD_NAMES), titles=titles)
    fig.savefig(outdir / "heads.png", dpi=110)
    plt.close(fig)
    written.append(outdir / "heads.png")
    for h, title in enumerate(titles):
        ax = viz.heatmap(weights[h], tokens, tokens, masked=np.isneginf(mask[h]), title=title)
        ax.figure.savefig(outdir / f"head_{h}.png", dpi=110)
        plt.close(ax.figure)
        written.append(outdir / f"head_{h}.png")
    return written


if __name__ == "__main__":
    run(os.environ.get("ATTNPY_DEMO_DIR", "attnpy-demo"))
