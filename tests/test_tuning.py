"""The tuner: the planner's kernel per cell, chosen by measurement.

What is checked here is what the tuner promises, not how fast anything is
(bench/bench.py measures that, beside torch): every cell reports its
candidates and their times, runs the candidate the margin rule picks from
those times, and keeps to a cap and to pins; the calls themselves run the
kernel their cell says; ATTNPY_TUNE sets the same at import, and refuses
what it cannot mean with a message that names it.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import attnpy
from attnpy import _core

TILED = [k for k in attnpy.supported_kernels() if k != "reference"]
pytestmark = pytest.mark.skipif(len(TILED) < 2, reason="fewer than two tiled kernels here")
MARGIN = _core.TUNE_MARGIN  # 0.05: ATTN_TUNE_MARGIN in csrc/attn_core.h


# builds with fault injection start with tuning off (csrc/attn_core.h), so
# that the allocations their tests count are the calls' own
DEFAULT_MODE = "off" if hasattr(_core, "_fail_alloc") else "measure"


@pytest.fixture(autouse=True)
def tuning_as_it_was_after():
    yield
    attnpy.set_kernel("auto")
    attnpy.set_tuning(DEFAULT_MODE)


def widest_first(kernels):
    order = ["avx512", "avx2", "neon", "baseline"]
    return sorted(kernels, key=order.index)


def run_sdpa(E, dtype=np.float32, L=130):
    x = np.random.default_rng(0).standard_normal((2, L, E)).astype(dtype)
    return attnpy.scaled_dot_product_attention(x, x, x, need_weights=False)


# ------------------------------------------------------------------ measured

def test_every_cell_is_measured_and_runs_the_margin_rules_pick():
    attnpy.set_tuning("measure")
    table = attnpy.tuning()
    assert list(table) == list(_core.TUNE_CELLS)
    assert len(set(table)) == 14
    for cell, row in table.items():
        candidates = list(row["seconds"])
        assert candidates == widest_first(TILED)[:2], cell
        assert row["source"] in ("measured", "default"), cell  # default: the budget ran out
        if row["source"] == "default":
            assert row["kernel"] == candidates[0]
            continue
        wide, narrow = (row["seconds"][k] for k in candidates)
        assert wide > 0 and narrow > 0, cell
        want = candidates[1] if narrow < wide * (1 - MARGIN) else candidates[0]
        assert row["kernel"] == want, (cell, row)


@pytest.mark.parametrize("E, cell", [(16, "sdpa_f32_e32"), (64, "sdpa_f32_e64"),
                                     (80, "sdpa_f32_e128")])
def test_a_call_runs_its_cells_kernel(E, cell):
    narrow = widest_first(TILED)[1]
    attnpy.set_tuning("measure", pin={cell: narrow})
    assert run_sdpa(E).kernel == narrow
    others = {c: r["kernel"] for c, r in attnpy.tuning().items() if c != cell}
    other_E = 128 if E <= 64 else 32
    other_cell = f"sdpa_f32_e{128 if other_E > 64 else 32}"
    assert run_sdpa(other_E).kernel == others[other_cell]


def test_float64_and_the_backward_have_cells_of_their_own():
    narrow, wide = widest_first(TILED)[1], widest_first(TILED)[0]
    attnpy.set_tuning("off", pin={"sdpa_f64_e64": narrow})
    assert run_sdpa(64, np.float64).kernel == narrow
    assert run_sdpa(64, np.float32).kernel == wide
    attnpy.set_tuning("off", pin={"backward_f32_e64": narrow})
    x = np.random.default_rng(1).standard_normal((2, 40, 64)).astype(np.float32)
    grads = attnpy.scaled_dot_product_attention_backward(np.ones_like(x), x, x, x)
    assert run_sdpa(64).kernel == wide  # the forward's cell is not the backward's
    # the backward pinned to the narrower kernel agrees with the widest's
    attnpy.set_tuning("off")
    again = attnpy.scaled_dot_product_attention_backward(np.ones_like(x), x, x, x)
    for g, h in zip(grads[:3], again[:3]):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_a_selected_kernel_overrides_the_tuner():
    attnpy.set_tuning("measure", pin={"sdpa_f32_e64": widest_first(TILED)[1]})
    with attnpy.use_kernel("reference"):
        assert run_sdpa(64).kernel == "reference"
    with attnpy.use_kernel(widest_first(TILED)[0]):
        assert run_sdpa(64).kernel == widest_first(TILED)[0]


# ------------------------------------------------------------- cap, off, pins

@pytest.mark.skipif("avx2" not in TILED, reason="no AVX2 here")
def test_a_cap_chooses_as_an_avx2_only_cpu_would():
    attnpy.set_tuning("measure", cap="avx2")
    for cell, row in attnpy.tuning().items():
        assert list(row["seconds"]) == ["avx2", "baseline"], cell
        assert row["kernel"] in ("avx2", "baseline"), cell
    assert run_sdpa(64).kernel == attnpy.tuning()["sdpa_f32_e64"]["kernel"]


def test_off_runs_the_widest_and_times_nothing():
    attnpy.set_tuning("off")
    for cell, row in attnpy.tuning().items():
        assert row == {"kernel": widest_first(TILED)[0], "source": "default",
                       "seconds": dict.fromkeys(widest_first(TILED)[:2], 0.0)}, cell


def test_pins_are_not_timed():
    attnpy.set_tuning("measure", pin={"linear_f32": TILED[0], "backward_f64_e128": TILED[1]})
    table = attnpy.tuning()
    assert table["linear_f32"]["kernel"] == TILED[0]
    assert table["backward_f64_e128"]["kernel"] == TILED[1]
    for cell in ("linear_f32", "backward_f64_e128"):
        assert table[cell]["source"] == "pinned"
        assert set(table[cell]["seconds"].values()) == {0.0}


@pytest.mark.parametrize("kwargs, names", [
    ({"mode": "fast"}, "mode must be 'measure' or 'off'; got 'fast'"),
    ({"cap": "avx3"}, "cap must be one of"),
    ({"cap": "reference"}, "cap must be one of"),
    ({"pin": {"sdpa_f32_e48": "avx2"}}, "pin's cells must be among sdpa_f32_e32"),
    ({"pin": {"linear_f32": "reference"}}, "pin['linear_f32'] must be one of"),
])
def test_bad_settings_name_the_argument(kwargs, names):
    with pytest.raises(ValueError, match=names.replace("[", r"\[").replace("(", r"\(")):
        attnpy.set_tuning(**kwargs)


def test_pin_must_be_a_dict():
    with pytest.raises(TypeError, match="pin must be a dict of cell names to kernels; got list"):
        attnpy.set_tuning(pin=[("linear_f32", "avx2")])


# --------------------------------------------------------------- ATTNPY_TUNE

def python_with(env_value, code):
    env = dict(os.environ, ATTNPY_TUNE=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_spec_pins_another_runs_choices():
    narrow = widest_first(TILED)[1]
    attnpy.set_tuning("off", pin={"sdpa_f32_e32": narrow})
    spec = attnpy.tuning_spec()
    assert f"sdpa_f32_e32={narrow}" in spec and spec.count("=") == 14
    done = python_with(spec, "import attnpy, json; print(json.dumps(attnpy.tuning()))")
    assert done.returncode == 0, done.stderr
    import json
    there = json.loads(done.stdout)
    assert {c: r["kernel"] for c, r in there.items()} == \
        {c: r["kernel"] for c, r in attnpy.tuning().items()}
    assert {r["source"] for r in there.values()} == {"pinned"}


def test_the_environment_sets_a_cap_and_off():
    done = python_with(f"off, cap={TILED[0]}",
                       "import attnpy; t = attnpy.tuning(); "
                       "print(sorted({(r['kernel'], r['source']) for r in t.values()}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([(TILED[0], "default")])


@pytest.mark.parametrize("value, names", [
    ("fast", "each item must be 'measure', 'off', 'cap=<kernel>' or '<cell>=<kernel>'"),
    ("cap=avx3", "cap must be one of"),
    ("sdpa_f32_e64=turbo", "sdpa_f32_e64 must be one of"),
])
def test_a_bad_environment_value_fails_the_import_and_says_why(value, names):
    done = python_with(value, "import attnpy")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ValueError: ATTNPY_TUNE={value!r}: ") and names in last, last
