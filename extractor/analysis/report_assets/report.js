// imzarr report page: the per-class table (sort, filter), one class's detail on demand, the class-means picture.
// Data comes from data/run.js (window.IMZARR_RUN) and classes/cNNNN.js, loaded as scripts: browsers refuse
// fetch() of file:// URLs but load scripts, so the page works from disk and from any static server alike.
(function () {
  "use strict";
  var RUN = window.IMZARR_RUN;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var columns = RUN.columns;
  var values = RUN.values;
  var nRows = columns.length ? values[columns[0].key].length : 0;
  var labels = values["label"] || [];
  var rowOf = {}; // label -> row index
  var tbody = null;
  var order = [];
  var sortKey = null;
  var sortDescending = true;
  var loaded = {}; // label -> class detail
  var wanted = null; // the label whose detail is awaited

  function fmt(v) {
    // Python's format(v, ".4g") (the overall numbers are written by report.py's format_number): 4 significant
    // digits, exponent form below 1e-4 and from 1e4, trailing zeros dropped; integers with separators.
    if (v === null || v === undefined) return "\u2014";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e15) return v.toLocaleString("en-US");
    if (v === 0) return "0";
    var exp = Math.floor(Math.log10(Math.abs(Number(v.toPrecision(4)))));
    if (exp < -4 || exp >= 4) {
      var parts = v.toExponential(3).split("e");
      var e = Number(parts[1]);
      return parts[0].replace(/\.?0+$/, "") + "e" + (e < 0 ? "-" : "+") + String(Math.abs(e)).padStart(2, "0");
    }
    var fixed = v.toFixed(Math.max(0, 3 - exp));
    return fixed.indexOf(".") >= 0 ? fixed.replace(/0+$/, "").replace(/\.$/, "") : fixed;
  }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  // ------------------------------------------------------------------ the table
  // Virtual rows: the table holds only the rows in view (plus a margin) between two spacer rows, so sorting,
  // filtering and scrolling cost the same at 10 or 10,000 classes. Every row's HTML is built once, up front.

  var ROW_H = 24; // px: the CSS fixes every row's height (one line, no wrapping); measured once drawn
  var MARGIN = 12; // rows drawn above and below the visible ones
  var rowHtml = [];
  var view = []; // row indices shown, in display order (sorted, then filtered)
  var query = "";
  var wrap = null;
  var selected = null;
  var drawn = [-1, -1, -1];

  function columnWidth(c) {
    if (c.key === "label") return 52;
    if (c.key === "synset") return 90;
    if (c.key === "class_name") return 150;
    return c.kind === "number" ? 72 : 160;
  }

  function buildTable() {
    var table = document.getElementById("class-table");
    wrap = table.parentNode;
    tbody = table.tBodies[0];
    var cols = "", head = "<tr>", width = 0;
    columns.forEach(function (c) {
      var tip = c.long_name + (c.description ? ": " + c.description : "");
      cols += '<col style="width:' + columnWidth(c) + 'px">';
      width += columnWidth(c);
      head += '<th data-key="' + esc(c.key) + '" class="' + c.kind + '" title="' + esc(tip) + '" tabindex="0">' + esc(c.title) + "</th>";
    });
    table.insertAdjacentHTML("afterbegin", "<colgroup>" + cols + "</colgroup>");
    table.style.width = width + "px";
    table.tHead.innerHTML = head + "</tr>";
    table.setAttribute("aria-rowcount", String(nRows));
    for (var i = 0; i < nRows; i++) {
      var cells = "";
      for (var j = 0; j < columns.length; j++) {
        var c = columns[j];
        var v = values[c.key][i];
        cells += c.kind === "number" ? '<td class="number" data-value="' + (v === null ? "NaN" : v) + '">' + fmt(v) + "</td>" : '<td title="' + esc(v) + '">' + esc(v) + "</td>";
      }
      rowHtml.push('<tr data-label="' + labels[i] + '">' + cells + "</tr>");
      rowOf[labels[i]] = i;
      order.push(i);
    }
    view = order.slice();
    table.tHead.addEventListener("click", function (ev) {
      var th = ev.target.closest("th");
      if (th) sortBy(th.getAttribute("data-key"));
    });
    table.tHead.addEventListener("keydown", function (ev) {
      var th = ev.target.closest("th");
      if (th && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); sortBy(th.getAttribute("data-key")); }
    });
    tbody.addEventListener("click", function (ev) {
      var tr = ev.target.closest("tr[data-label]");
      if (tr) openClass(Number(tr.getAttribute("data-label")));
    });
    var scheduled = 0;
    wrap.addEventListener("scroll", function () {
      if (!scheduled) scheduled = requestAnimationFrame(function () { scheduled = 0; draw(false); });
    });
    draw(true);
    var one = tbody.querySelector("tr[data-label]");
    var h = one ? one.getBoundingClientRect().height : 0;
    if (h > 0 && Math.abs(h - ROW_H) > 0.01) { ROW_H = h; draw(true); } // the rendered height, borders included
  }

  function draw(force) {
    var first = Math.max(0, Math.floor(wrap.scrollTop / ROW_H) - MARGIN);
    var last = Math.min(view.length, Math.ceil((wrap.scrollTop + (wrap.clientHeight || 800)) / ROW_H) + MARGIN);
    if (!force && drawn[0] === first && drawn[1] === last && drawn[2] === view.length) return;
    drawn = [first, last, view.length];
    var html = spacer(first * ROW_H);
    for (var k = first; k < last; k++) html += rowHtml[view[k]];
    html += spacer((view.length - last) * ROW_H);
    tbody.innerHTML = html;
    markSelected();
    updateShown(view.length);
  }

  function spacer(px) {
    return '<tr class="spacer"><td colspan="' + columns.length + '" style="height:' + px + 'px"></td></tr>';
  }

  function markSelected() {
    if (selected === null) return;
    var tr = tbody.querySelector('tr[data-label="' + selected + '"]');
    if (tr) tr.classList.add("selected");
  }

  function refilter() {
    if (query === "") { view = order.slice(); return; }
    if (!haystack) {
      haystack = [];
      var syn = values.synset || [], names = values.class_name || [];
      for (var i = 0; i < nRows; i++) haystack.push((String(syn[i] || "") + " " + String(names[i] || "") + " " + labels[i]).toLowerCase());
    }
    view = order.filter(function (r) { return haystack[r].indexOf(query) >= 0; });
  }

  function sortBy(key) {
    var col = columns.filter(function (c) { return c.key === key; })[0];
    if (!col) return;
    // Numbers sort largest first on the first click (the worst FD on top), text A to Z; a second click reverses.
    if (sortKey === key) sortDescending = !sortDescending;
    else sortDescending = col.kind === "number";
    sortKey = key;
    var v = values[key];
    var sign = sortDescending ? -1 : 1;
    order.sort(function (a, b) {
      var x = v[a], y = v[b];
      var xn = x === null, yn = y === null;
      if (xn || yn) return xn === yn ? a - b : xn ? 1 : -1; // undefined values last either way
      if (x < y) return -sign;
      if (x > y) return sign;
      return a - b;
    });
    refilter();
    var ths = document.querySelectorAll("#class-table th");
    for (var t = 0; t < ths.length; t++) {
      var th = ths[t];
      th.removeAttribute("aria-sort");
      if (th.getAttribute("data-key") === key) th.setAttribute("aria-sort", sortDescending ? "descending" : "ascending");
    }
    wrap.scrollTop = 0;
    draw(true);
  }

  var haystack = null;
  function applyFilter(text) {
    query = text.trim().toLowerCase();
    refilter();
    wrap.scrollTop = 0;
    draw(true);
  }

  function updateShown(n) {
    document.getElementById("shown").textContent = n + " of " + nRows + " classes";
  }

  function revealRow(label) {
    var k = view.indexOf(rowOf[label]);
    if (k < 0) return;
    var top = k * ROW_H, headH = wrap.querySelector("thead").offsetHeight;
    if (top < wrap.scrollTop || top + ROW_H > wrap.scrollTop + wrap.clientHeight - headH) wrap.scrollTop = Math.max(0, top - 3 * ROW_H);
    draw(false);
  }

  // ------------------------------------------------------------------ one class

  window.imzarrClassLoaded = function (label, detail) {
    loaded[label] = detail;
    if (wanted === label) renderClass(detail);
  };

  function openClass(label) {
    wanted = label;
    var prev = tbody.querySelector("tr.selected");
    if (prev) prev.classList.remove("selected");
    selected = label;
    markSelected();
    markMeans();
    if (location.hash !== "#class=" + label) history.replaceState(null, "", "#class=" + label);
    if (loaded[label]) { renderClass(loaded[label]); return; }
    document.getElementById("detail").innerHTML = '<p class="hint">Loading class ' + label + "\u2026</p>";
    var s = document.createElement("script");
    s.src = "classes/c" + String(label).padStart(4, "0") + ".js";
    s.onerror = function () {
      document.getElementById("detail").innerHTML = '<p class="error">Could not load ' + esc(s.src) + "</p>";
    };
    document.body.appendChild(s);
  }

  function metricList(label) {
    var i = rowOf[label];
    if (i === undefined) return "";
    var out = "";
    columns.forEach(function (c) {
      if (c.kind !== "number" || c.key === "label") return;
      out += '<span class="pill" title="' + esc(c.long_name) + '">' + esc(c.title) + " <b>" + fmt(values[c.key][i]) + "</b></span>";
    });
    return out;
  }

  function grid(src, n, title, cls) {
    if (!src) return '<figure class="grid ' + cls + '"><figcaption>' + esc(title) + '</figcaption><p class="hint">none</p></figure>';
    return '<figure class="grid ' + cls + '"><figcaption>' + esc(title) + '</figcaption><img src="' + esc(src) + '" alt="' + esc(title) + '" loading="eager"></figure>';
  }

  function crop(src, i, d) {
    var x = (i % d.columns) * d.tile, y = Math.floor(i / d.columns) * d.tile;
    return '<img class="crop" src="' + esc(src) + '" width="' + d.tile + '" height="' + d.tile + '" style="object-position:-' + x + "px -" + y + 'px" alt="">';
  }

  function renderClass(d) {
    var el = document.getElementById("detail");
    var nReal = d.real.sample.length, nFake = d.fake.sample.length;
    var h = '<h2>' + esc(d.name || "class " + d.label) + ' <small>' + esc(d.synset) + " \u00b7 label " + d.label + "</small></h2>";
    h += '<div class="pills">' + metricList(d.label) + "</div>";
    h += '<div class="grids">' + grid(d.grids.real, nReal, "real: " + nReal + " of " + d.n_real, "real") + grid(d.grids.fake, nFake, "generated: " + nFake + " of " + d.n_fake, "fake") + "</div>";
    h += "<h3>Nearest real sample of each generated one</h3>";
    var typical = d.typical_real_distance;
    h += '<p class="hint">Euclidean distance in the feature space to the nearest of the class\'s ' + d.n_real + " real samples" +
      (typical ? "; for scale, a real sample's nearest other real sample lies at " + fmt(typical) + " (median). Ratios far below 1 suggest copies." : ".") +
      " Closest pairs first.</p>";
    var idx = d.near.distance.map(function (_, i) { return i; });
    idx.sort(function (a, b) { return d.near.distance[a] - d.near.distance[b]; });
    h += '<div class="pairs">';
    idx.forEach(function (i) {
      var ratio = d.near.ratio[i];
      h += '<div class="pair' + (ratio !== null && ratio < 0.5 ? " close" : "") + '">' + crop(d.grids.fake, i, d) + crop(d.grids.near, i, d) +
        '<span class="dist" data-value="' + d.near.distance[i] + '">d ' + fmt(d.near.distance[i]) + (ratio === null ? "" : " \u00b7 " + fmt(ratio) + "\u00d7") + "</span></div>";
    });
    h += "</div>";
    if (d.projection) {
      h += "<h3>Features of this class (PCA)</h3>";
      h += '<div class="class-plot"></div>';
    }
    el.innerHTML = h;
    if (d.projection) {
      var p = d.projection;
      el.querySelector(".class-plot").appendChild(scatter(p.real, p.fake, p.axes, null,
        "real " + p.real.length + (p.of_real > p.real.length ? " of " + p.of_real : "") + ", generated " + p.fake.length + (p.of_fake > p.fake.length ? " of " + p.of_fake : "")));
    }
  }

  // ------------------------------------------------------------------ plots (inline SVG)

  function bounds(sets) {
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    sets.forEach(function (pts) {
      for (var i = 0; i < pts.length; i++) {
        var p = pts[i];
        if (p[0] < x0) x0 = p[0]; if (p[0] > x1) x1 = p[0];
        if (p[1] < y0) y0 = p[1]; if (p[1] > y1) y1 = p[1];
      }
    });
    if (!(x1 > x0)) { x0 -= 1; x1 += 1; }
    if (!(y1 > y0)) { y0 -= 1; y1 += 1; }
    return [x0, x1, y0, y1];
  }

  // Real points as circles, generated as squares; `pairs` (the class means) joins real i to generated i.
  function scatter(real, fake, axes, pairLabels, caption) {
    var W = 560, H = 400, M = 34;
    var b = bounds([real, fake]);
    function sx(v) { return (M + (v - b[0]) / (b[1] - b[0]) * (W - 2 * M)).toFixed(1); }
    function sy(v) { return (H - M - (v - b[2]) / (b[3] - b[2]) * (H - 2 * M)).toFixed(1); }
    var s = '<svg xmlns="' + SVG_NS + '" viewBox="0 0 ' + W + " " + H + '" class="plot" role="img">';
    s += '<rect class="frame" x="' + M + '" y="' + M + '" width="' + (W - 2 * M) + '" height="' + (H - 2 * M) + '"/>';
    s += '<text class="axis" x="' + W / 2 + '" y="' + (H - 8) + '" text-anchor="middle">' + esc(axes[0]) + "</text>";
    s += '<text class="axis" x="12" y="' + H / 2 + '" text-anchor="middle" transform="rotate(-90 12 ' + H / 2 + ')">' + esc(axes[1]) + "</text>";
    var i;
    if (pairLabels) {
      var lines = "";
      for (i = 0; i < real.length; i++) lines += "M" + sx(real[i][0]) + " " + sy(real[i][1]) + "L" + sx(fake[i][0]) + " " + sy(fake[i][1]);
      s += '<path class="pair" d="' + lines + '"/>';
    }
    var r = pairLabels ? 3 : 2.5;
    for (i = 0; i < real.length; i++) {
      s += '<circle class="real" cx="' + sx(real[i][0]) + '" cy="' + sy(real[i][1]) + '" r="' + r + '"' + (pairLabels ? ' data-label="' + pairLabels[i] + '"' : "") + "/>";
    }
    for (i = 0; i < fake.length; i++) {
      s += '<rect class="fake" x="' + (sx(fake[i][0]) - r) + '" y="' + (sy(fake[i][1]) - r) + '" width="' + 2 * r + '" height="' + 2 * r + '"' + (pairLabels ? ' data-label="' + pairLabels[i] + '"' : "") + "/>";
    }
    s += '<g class="legend"><circle class="real" cx="' + (W - 150) + '" cy="14" r="4"/><text x="' + (W - 142) + '" y="18">real</text>' +
      '<rect class="fake" x="' + (W - 94) + '" y="10" width="8" height="8"/><text x="' + (W - 82) + '" y="18">generated</text></g>';
    s += '<text class="caption" x="' + M + '" y="20">' + esc(caption) + "</text></svg>";
    var holder = document.createElement("div");
    holder.innerHTML = s; // one parse for thousands of marks
    return holder.firstChild;
  }

  function markMeans() {
    var host = document.getElementById("means-plot");
    var old = host.querySelectorAll(".sel");
    for (var i = 0; i < old.length; i++) old[i].classList.remove("sel");
    if (selected === null) return;
    var now = host.querySelectorAll('[data-label="' + selected + '"]');
    for (var j = 0; j < now.length; j++) { now[j].classList.add("sel"); now[j].parentNode.appendChild(now[j]); } // on top
  }

  function buildMeansPlot() {
    var m = RUN.means;
    var host = document.getElementById("means-plot");
    if (!m) { host.innerHTML = '<p class="hint">Fewer than two classes: nothing to project.</p>'; return; }
    var svg = scatter(m.real, m.fake, m.axes, m.label, m.label.length + " classes");
    var names = values.class_name || [];
    svg.addEventListener("click", function (ev) {
      var l = ev.target.getAttribute && ev.target.getAttribute("data-label");
      if (l !== null && l !== undefined) { openClass(Number(l)); revealRow(Number(l)); document.getElementById("detail").scrollIntoView({ block: "nearest" }); }
    });
    svg.addEventListener("mouseover", function (ev) {
      var l = ev.target.getAttribute && ev.target.getAttribute("data-label");
      if (l === null || l === undefined || ev.target.querySelector("title")) return;
      var t = document.createElementNS(SVG_NS, "title");
      var i = rowOf[Number(l)];
      t.textContent = (i === undefined ? "" : names[i] + " ") + "(label " + l + ")";
      ev.target.appendChild(t); // titles made on first hover: none of the thousands built up front
    });
    host.appendChild(svg);
    markMeans();
  }

  // ------------------------------------------------------------------ start

  buildTable();
  var pending = 0;
  document.getElementById("filter").addEventListener("input", function (ev) {
    var text = ev.target.value;
    if (pending) cancelAnimationFrame(pending);
    pending = requestAnimationFrame(function () { pending = 0; applyFilter(text); });
  });
  function openFromHash() {
    var m = /^#class=(-?\d+)$/.exec(location.hash);
    if (m && Number(m[1]) !== selected) { openClass(Number(m[1])); revealRow(Number(m[1])); }
  }
  openFromHash();
  // An edited address or a link to another class opens it too, not only the first load.
  window.addEventListener("hashchange", openFromHash);
  document.documentElement.setAttribute("data-ready", "1");
  window.imzarrReady = performance.now(); // interactive: the table answers clicks, sorting and filtering
  // The whole-run picture sits below the fold: drawn in the next task, after the first view.
  setTimeout(buildMeansPlot, 0);
})();
