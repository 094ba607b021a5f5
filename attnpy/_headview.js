// attnpy head view: queries on the left, keys on the right, one line per
// (query, key, head) whose opacity is the attention weight. Hover a token to
// see only its lines, with their weights written beside the tokens at their
// other end (and in each line's tooltip); pick the layer and the heads above
// the picture. A one-line hint under the title says so.
//
// Plain ES5 and SVG, no library, no network: the page (or notebook output)
// holds everything. The Python side puts this script after a <div> with the
// data in a <script type="application/json"> child, and replaces ATTNPY_ROOT_ID
// with that div's id, so several views can share a page.
(function () {
  "use strict";
  var root = document.getElementById("ATTNPY_ROOT_ID");
  if (!root || root.getAttribute("data-ready") === "1") return;
  var data = JSON.parse(root.querySelector("script.attnpy-data").textContent);
  var SVG = "http://www.w3.org/2000/svg";
  var ROW = data.row_height, PAD = 24, GAP = data.gap, WEIGHT_WIDTH = data.weight_width;

  // index the lines of each layer by query and by key, so that a hover draws
  // only that token's lines (linear in the sequence, never quadratic)
  var layers = data.layers.map(function (layer) {
    var flat = layer.lines, byQuery = [], byKey = [], i, n = flat.length / 4;
    for (i = 0; i < data.tokens.length; i++) byQuery.push([]);
    for (i = 0; i < data.key_tokens.length; i++) byKey.push([]);
    for (i = 0; i < n; i++) {
      byQuery[flat[4 * i]].push(i);
      byKey[flat[4 * i + 1]].push(i);
    }
    return { name: layer.name, heads: layer.heads, flat: flat, n: n,
             byQuery: byQuery, byKey: byKey };
  });
  var state = { layer: 0, on: [], hover: null };

  function el(name, attrs, parent, ns) {
    var node = ns ? document.createElementNS(SVG, name) : document.createElement(name);
    for (var a in attrs) node.setAttribute(a, attrs[a]);
    if (parent) parent.appendChild(node);
    return node;
  }

  // controls: layer choice, one coloured toggle per head
  var controls = el("div", { "class": "attnpy-controls" }, root);
  var select = el("select", { "class": "attnpy-layer", "aria-label": "layer" }, controls);
  layers.forEach(function (layer, i) {
    var option = el("option", { value: String(i) }, select);
    option.textContent = layer.name;
  });
  if (layers.length < 2) select.style.display = "none";
  var headBox = el("span", { "class": "attnpy-heads" }, controls);
  var note = el("span", { "class": "attnpy-note" }, controls);
  var hint = el("div", { "class": "attnpy-hint" }, root);
  hint.textContent = "Hover a token: its lines, and their weights beside the other " +
                     "column. Click a head to hide it; double-click to show it alone.";

  var scroller = el("div", { "class": "attnpy-scroll" }, root);
  scroller.style.maxHeight = data.max_height + "px";
  var rows = Math.max(data.tokens.length, data.key_tokens.length);
  // each column of tokens has room for its label and, outside it, a weight
  var width = 2 * (data.label_width + WEIGHT_WIDTH) + GAP;
  var svg = el("svg", { width: width, height: rows * ROW + PAD, "class": "attnpy-svg" },
               scroller, true);
  var lineGroup = el("g", { "class": "attnpy-lines" }, svg, true);
  var weightGroup = el("g", { "class": "attnpy-weights" }, svg, true);
  var LEFT = WEIGHT_WIDTH + data.label_width, RIGHT = LEFT + GAP;  // the lines' ends

  function y(i) { return PAD / 2 + i * ROW + ROW / 2; }

  function tokenColumn(tokens, side) {
    var x = side === "query" ? LEFT - 6 : RIGHT + 6;
    var anchor = side === "query" ? "end" : "start";
    return tokens.map(function (t, i) {
      var text = el("text", { x: x, y: y(i) + 4, "text-anchor": anchor,
                              "class": "attnpy-token attnpy-" + side,
                              "data-index": String(i) }, svg, true);
      text.textContent = t;
      text.style.fontSize = data.font_size + "px";
      text.addEventListener("mouseenter", function () {
        state.hover = { side: side, index: i };
        draw();
      });
      text.addEventListener("mouseleave", function () {
        state.hover = null;
        draw();
      });
      return text;
    });
  }
  var queryText = tokenColumn(data.tokens, "query");
  var keyText = tokenColumn(data.key_tokens, "key");

  function buildHeadToggles() {
    headBox.textContent = "";
    var heads = layers[state.layer].heads;
    state.on = [];
    for (var h = 0; h < heads; h++) {
      state.on.push(true);
      (function (h) {
        var b = el("button", { type: "button", "class": "attnpy-head", title: "head " + h +
                               " (click: on/off, double-click: only this head)" }, headBox);
        b.textContent = String(h);
        b.style.background = data.colors[h % data.colors.length];
        b.addEventListener("click", function () {
          state.on[h] = !state.on[h];
          draw();
        });
        b.addEventListener("dblclick", function () {
          for (var i = 0; i < state.on.length; i++) state.on[i] = i === h;
          draw();
        });
      })(h);
    }
  }

  // the weight of a hovered token's line, written beside the token at its
  // other end: the largest over the heads shown, in that head's colour
  function writeWeights(picked, layer) {
    var best = {}, other = state.hover.side === "query" ? 1 : 0, p, i, j;
    for (p = 0; p < picked.length; p++) {
      i = picked[p];
      if (!state.on[layer.flat[4 * i + 2]]) continue;
      j = layer.flat[4 * i + other];
      if (!(j in best) || layer.flat[4 * i + 3] > layer.flat[4 * best[j] + 3]) best[j] = i;
    }
    for (j in best) {
      i = best[j];
      var h = layer.flat[4 * i + 2], atKey = other === 1;
      var text = el("text", { x: atKey ? width - 2 : 2, y: y(+j) + 4,
                              "text-anchor": atKey ? "end" : "start",
                              "class": "attnpy-weight", "data-index": String(j),
                              "data-head": String(h),
                              fill: data.colors[h % data.colors.length] }, weightGroup, true);
      text.textContent = (layer.flat[4 * i + 3] / 1000).toFixed(3);
      text.style.fontSize = data.font_size + "px";
    }
  }

  // draw: the lines of the hovered token (or all of them, within a budget)
  function draw() {
    var layer = layers[state.layer], flat = layer.flat, picked, i, count = 0;
    while (lineGroup.firstChild) lineGroup.removeChild(lineGroup.firstChild);
    while (weightGroup.firstChild) weightGroup.removeChild(weightGroup.firstChild);
    if (state.hover === null) {
      picked = null;
    } else if (state.hover.side === "query") {
      picked = layer.byQuery[state.hover.index];
    } else {
      picked = layer.byKey[state.hover.index];
    }
    var total = picked === null ? layer.n : picked.length;
    var tooMany = picked === null && layer.n > data.max_lines;
    if (!tooMany) {
      for (var p = 0; p < total; p++) {
        i = picked === null ? p : picked[p];
        var h = flat[4 * i + 2];
        if (!state.on[h]) continue;
        var line = el("line", { x1: LEFT, y1: y(flat[4 * i]), x2: RIGHT, y2: y(flat[4 * i + 1]),
                                stroke: data.colors[h % data.colors.length],
                                "stroke-opacity": (flat[4 * i + 3] / 1000).toFixed(3),
                                "stroke-width": 2 }, lineGroup, true);
        // the tooltip of a line hovered itself (drawn lines only: no cost when idle)
        if (picked !== null)
          el("title", {}, line, true).textContent = data.tokens[flat[4 * i]] + " \u2192 " +
            data.key_tokens[flat[4 * i + 1]] + ", head " + h + ": " +
            (flat[4 * i + 3] / 1000).toFixed(3);
        count++;
      }
    }
    if (picked !== null) writeWeights(picked, layer);
    note.textContent = tooMany ? "hover a token to see its lines (" + layer.n +
                                 " lines in this layer)" : "";
    var buttons = headBox.querySelectorAll("button");
    for (i = 0; i < buttons.length; i++) buttons[i].style.opacity = state.on[i] ? "1" : "0.3";
    function mark(texts, side) {
      for (var j = 0; j < texts.length; j++) {
        var active = state.hover !== null && state.hover.side === side &&
                     state.hover.index === j;
        texts[j].setAttribute("font-weight", active ? "bold" : "normal");
      }
    }
    mark(queryText, "query");
    mark(keyText, "key");
    // read by the browser test and handy when debugging in the console
    root.setAttribute("data-lines", String(count));
    root.setAttribute("data-hover", state.hover === null ? "" :
                      state.hover.side + ":" + state.hover.index);
  }

  select.addEventListener("change", function () {
    state.layer = parseInt(select.value, 10);
    buildHeadToggles();
    draw();
  });
  buildHeadToggles();
  draw();
  root.setAttribute("data-ready", "1");
})();
