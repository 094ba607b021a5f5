// attnpy head view: queries on the left, keys on the right, one line per
// (query, key, head) whose opacity is the attention weight. Hover a token to
// see only its lines; pick the layer and the heads above the picture.
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
  var ROW = 18, PAD = 24, GAP = data.gap;

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

  var scroller = el("div", { "class": "attnpy-scroll" }, root);
  scroller.style.maxHeight = data.max_height + "px";
  var rows = Math.max(data.tokens.length, data.key_tokens.length);
  var width = 2 * data.label_width + GAP;
  var svg = el("svg", { width: width, height: rows * ROW + PAD, "class": "attnpy-svg" },
               scroller, true);
  var lineGroup = el("g", { "class": "attnpy-lines" }, svg, true);

  function y(i) { return PAD / 2 + i * ROW + ROW / 2; }

  function tokenColumn(tokens, side) {
    var x = side === "query" ? data.label_width - 6 : data.label_width + GAP + 6;
    var anchor = side === "query" ? "end" : "start";
    return tokens.map(function (t, i) {
      var text = el("text", { x: x, y: y(i) + 4, "text-anchor": anchor,
                              "class": "attnpy-token attnpy-" + side,
                              "data-index": String(i) }, svg, true);
      text.textContent = t;
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

  // draw: the lines of the hovered token (or all of them, within a budget)
  function draw() {
    var layer = layers[state.layer], flat = layer.flat, picked, i, count = 0;
    while (lineGroup.firstChild) lineGroup.removeChild(lineGroup.firstChild);
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
      var x1 = data.label_width, x2 = data.label_width + GAP;
      for (var p = 0; p < total; p++) {
        i = picked === null ? p : picked[p];
        var h = flat[4 * i + 2];
        if (!state.on[h]) continue;
        el("line", { x1: x1, y1: y(flat[4 * i]), x2: x2, y2: y(flat[4 * i + 1]),
                     stroke: data.colors[h % data.colors.length],
                     "stroke-opacity": (flat[4 * i + 3] / 1000).toFixed(3),
                     "stroke-width": 2 }, lineGroup, true);
        count++;
      }
    }
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
