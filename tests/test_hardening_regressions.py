"""Bugs found while hardening (issue 7), each with the test that showed it."""
import numpy as np
import pytest

import attnpy


@pytest.mark.parametrize("name,shapes", [
    ("query", [(2, 3, 5)]),
    ("key", [(2, 3, 8), (2, 4, 5), (2, 4, 8)]),
    ("value", [(2, 3, 8), (2, 4, 8), (2, 4, 6)]),
])
def test_multihead_blames_the_input_of_the_wrong_width(name, shapes):
    """A query of the wrong width was reported as "q_proj_weight must have
    shape (8, 5); got (8, 8)": the layer's own parameter, not the argument."""
    layer = attnpy.MultiheadAttention(8, 2, dtype=np.float64)
    with pytest.raises(ValueError, match=rf"^{name} must have 8 features .* got shape"):
        layer(*(np.ones(s) for s in shapes))
