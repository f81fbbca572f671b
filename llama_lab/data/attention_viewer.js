(function () {
  const root = document.currentScript?.parentElement || document.getElementById("__ROOT__");
  const data = __DATA__;
  const NS = "http://www.w3.org/2000/svg";
  const [layerSel, headSel, modeSel] = ["layer", "head", "mode"].map(
    r => root.querySelector(`[data-role=${r}]`));
  const svg = root.querySelector("svg");
  root.querySelector("[data-role=nojs]").remove();
  root.querySelector("[data-role=controls]").style.display = "";
  data.layers.forEach((l, i) => layerSel.add(new Option("layer " + l, i)));
  data.heads.forEach((h, i) => headSel.add(new Option("head " + h, i)));
  headSel.add(new Option("mean of these heads", -1));
  const n = data.tokens.length, ROW = 20, PAD = 8;

  function el(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  }
  function currentMap() {
    const heads = data.weights[+layerSel.value], h = +headSel.value;
    if (h >= 0) return heads[h];
    return heads[0].map((row, q) => row.map((_, k) => heads.reduce((s, m) => s + m[q][k], 0) / heads.length));
  }
  function textWidth() {
    const probe = el("text", {}, data.tokens.reduce((a, b) => (a.length > b.length ? a : b), ""));
    const w = probe.getComputedTextLength ? probe.getComputedTextLength() : 0;
    probe.remove();
    return Math.max(w, 7 * Math.max(...data.tokens.map(t => t.length))) + PAD;
  }
  function drawLines(w) {
    const tw = textWidth(), left = tw, right = tw + 160;
    svg.setAttribute("width", right + tw + 60);
    svg.setAttribute("height", (n + 1) * ROW);
    const y = i => (i + 1) * ROW;
    const lines = w.map((row, q) => row.map((v, k) => el("line", {
      x1: left + 4, y1: y(q) - 4, x2: right - 4, y2: y(k) - 4, stroke: "steelblue",
      "stroke-width": 2, "stroke-opacity": v })));
    const labels = data.tokens.map((t, k) => el("text", {x: right + tw + 4, y: y(k)}, ""));
    data.tokens.forEach((t, k) => el("text", {x: right, y: y(k)}, t));
    data.tokens.forEach((t, q) => {
      const label = el("text", {x: left - 4, y: y(q), "text-anchor": "end", class: "token"}, t);
      label.addEventListener("mouseenter", () => {
        lines.forEach((row, r) => row.forEach(line => line.style.display = r === q ? "" : "none"));
        labels.forEach((l, k) => l.textContent = k <= q ? w[q][k].toFixed(2) : "");
      });
      label.addEventListener("mouseleave", () => {
        lines.forEach(row => row.forEach(line => line.style.display = ""));
        labels.forEach(l => l.textContent = "");
      });
    });
  }
  function drawMatrix(w) {
    const tw = textWidth(), size = 18;
    svg.setAttribute("width", tw + n * size + 10);
    svg.setAttribute("height", tw + n * size + 10);
    data.tokens.forEach((t, i) => {
      el("text", {x: tw - 4, y: tw + i * size + 13, "text-anchor": "end"}, t);
      el("text", {transform: `translate(${tw + i * size + 13},${tw - 4}) rotate(-90)`}, t);
    });
    w.forEach((row, q) => data.tokens.forEach((_, k) => {
      const v = row[k] || 0;  // rows stop at the diagonal: the future gets no weight
      const cell = el("rect", {x: tw + k * size, y: tw + q * size, width: size - 1, height: size - 1,
                               fill: "steelblue", "fill-opacity": v, stroke: "#eee"});
      const tip = document.createElementNS(NS, "title");
      tip.textContent = `${data.tokens[q]} -> ${data.tokens[k]}: ${v.toFixed(3)}`;
      cell.appendChild(tip);
    }));
  }
  function draw() {
    svg.replaceChildren();
    (modeSel.value === "lines" ? drawLines : drawMatrix)(currentMap());
  }
  [layerSel, headSel, modeSel].forEach(s => s.addEventListener("change", draw));
  draw();
})();
