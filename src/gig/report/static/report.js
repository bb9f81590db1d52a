/* gig report: graph viewer (cytoscape.js), concept cards, atlas search, localisation toggle.
 *
 * Every piece of run data (class names, file names, labels) comes from the JSON block
 * #gig-data and is written into the page with textContent or setAttribute only; no HTML is
 * ever built from data. The graph drawn is exactly the nodes and edges of the chosen graph JSON.
 */
(function () {
  'use strict';

  var DATA = JSON.parse(document.getElementById('gig-data').textContent);
  // What the graphs' tops are: the model's classes, or a probe head's named outputs.
  var NOUN = (DATA.run && DATA.run.output_noun) || 'class';
  var GRAPHS = {};
  DATA.graphs.forEach(function (g) { GRAPHS[g.key] = g; });
  // Graphs in files of their own (classes/class_C.js), loaded when first chosen: a script tag
  // carrying this script's nonce, since a file:// page may not fetch JSON.
  var NONCE = document.currentScript ? document.currentScript.nonce : '';
  var ON_DEMAND = {};
  (DATA.onDemand || []).forEach(function (m) { ON_DEMAND[m.key] = m; });
  var SAFE_SCRIPT = /^classes\/class_[0-9]+\.js$/;

  // ------------------------------------------------------------------ small DOM helpers
  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  var SAFE_URL = /^(data:image\/(png|jpeg|svg\+xml|gif|webp);base64,|(img|figures|eval)\/[A-Za-z0-9._\/-]+$)/;
  function img(url, title, className) {
    var node = el('img', className);
    if (url && SAFE_URL.test(url)) node.setAttribute('src', url);
    node.setAttribute('alt', title || '');
    if (title) node.setAttribute('title', title);
    return node;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return '–';
    if (typeof v !== 'number') return String(v);
    var d = digits === undefined ? 3 : digits;
    if (v !== 0 && Math.abs(v) < Math.pow(10, -d)) return v.toExponential(1);
    return v.toFixed(d);
  }
  function className(c) {
    if (c === null || c === undefined) return 'target logit';
    var name = DATA.classNames[String(c)];
    return name === undefined ? NOUN + ' ' + c : name;
  }
  function nodeName(id) {
    if (id.indexOf('class:') === 0) return className(parseInt(id.slice(6), 10));
    if (id === 'logit') return 'target logit';
    return id;
  }

  // ------------------------------------------------------------------ colours
  var BLUES = [[198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  var REDS = [[252, 187, 161], [251, 106, 74], [203, 24, 29], [103, 0, 13]];
  function ramp(stops, t) {
    t = Math.max(0, Math.min(1, t));
    var x = t * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    var c = stops[i].map(function (a, k) { return Math.round(a + (stops[i + 1][k] - a) * f); });
    return 'rgb(' + c.join(',') + ')';
  }

  // ------------------------------------------------------------------ layout (preset, by layer)
  // Rows by level (classifier on top), each row in the order of its nodes' `position`, the slot
  // that gig.graph.node_rows gave them (the static figures use the same slots).
  var COL = 96, CLASS_COL = 150, ROW = 132;
  function layout(graph) {
    var rows = {}, maxLevel = 0;
    graph.nodes.forEach(function (n) {
      (rows[n.level] = rows[n.level] || []).push(n);
      maxLevel = Math.max(maxLevel, n.level);
    });
    var pos = {};
    for (var level = maxLevel; level >= 0; level--) {
      var nodes = (rows[level] || []).slice();
      nodes.sort(function (a, b) { return (a.position || 0) - (b.position || 0); });
      var gap = nodes.length && nodes[0].layer === 'classifier' ? CLASS_COL : COL;
      nodes.forEach(function (n, i) {
        pos[n.id] = { x: (i - (nodes.length - 1) / 2) * gap, y: (maxLevel - level) * ROW };
      });
    }
    rowLevels = [];
    for (var l = 0; l <= maxLevel; l++) {
      if (rows[l]) rowLevels.push({ y: (maxLevel - l) * ROW, name: l < graph.layers.length ? graph.layers[l] : 'classifier' });
    }
    return pos;
  }

  // layer names at the left edge of the viewer, following pan and zoom
  var rowLevels = [];
  var ruler = document.getElementById('layer-ruler');
  function drawRuler() {
    ruler.textContent = '';
    var zoom = cy.zoom(), pan = cy.pan();
    rowLevels.forEach(function (r) {
      var label = el('span', null, r.name);
      label.style.top = (r.y * zoom + pan.y) + 'px';
      ruler.appendChild(label);
    });
  }

  // ------------------------------------------------------------------ cytoscape
  var container = document.getElementById('cy');
  var cy = cytoscape({
    container: container,
    elements: [],
    layout: { name: 'preset' },
    minZoom: 0.15,
    maxZoom: 4,
    boxSelectionEnabled: false,
    autoungrabify: true,
    style: [
      { selector: 'node', style: {
        'shape': 'rectangle', 'width': 58, 'height': 58, 'background-color': '#eeeeee',
        'border-width': 1, 'border-color': '#333333', 'label': 'data(label)', 'font-size': 11,
        'text-valign': 'bottom', 'text-halign': 'center', 'text-margin-y': 3, 'color': '#222222' } },
      { selector: 'node.thumb', style: {
        'background-image': 'data(img)', 'background-fit': 'cover', 'background-image-crossorigin': 'null',
        'background-image-opacity': 1 } },
      { selector: 'node.classifier', style: {
        'shape': 'round-rectangle', 'width': 132, 'height': 46, 'background-color': '#fff4d6',
        'border-color': '#7a5c00', 'border-width': 2, 'text-valign': 'center', 'text-margin-y': 0,
        'text-wrap': 'ellipsis', 'text-max-width': 124, 'font-weight': 'bold', 'font-size': 12 } },
      { selector: 'node.shared', style: { 'border-color': '#ff8c00', 'border-width': 5 } },
      { selector: 'edge', style: {
        'width': 'data(width)', 'line-color': 'data(color)', 'curve-style': 'straight', 'opacity': 0.9,
        'z-index': 'data(z)' } },
      { selector: 'edge.neg', style: { 'line-style': 'dashed' } },
      // an edge whose 95 % interval over the graph's images contains 0 (docs/graph-schema.md)
      { selector: 'edge.uncertain', style: { 'line-style': 'dotted', 'opacity': 0.7 } },
      { selector: 'node.pinned', style: { 'border-color': '#d62728', 'border-width': 5 } },
      { selector: '.faded', style: { 'opacity': 0.22 } },
      { selector: 'edge.in, edge.out', style: {
        'opacity': 1, 'label': 'data(wlabel)', 'font-size': 10, 'text-background-color': '#ffffff',
        'text-background-opacity': 0.85, 'text-background-padding': 1, 'z-index': 1000 } },
      { selector: 'edge.in', style: { 'target-arrow-shape': 'triangle', 'target-arrow-color': 'data(color)' } },
      { selector: 'edge.out', style: { 'target-arrow-shape': 'triangle', 'target-arrow-color': 'data(color)' } },
      { selector: '.hidden', style: { 'display': 'none' } }
    ]
  });

  var state = { key: null, pinned: null, mode: 'class', wanted: null };
  cy.on('viewport', drawRuler);
  window.addEventListener('load', function () { cy.resize(); });

  function topUrl(nodeId) {
    var c = DATA.concepts[nodeId];
    return c && c.exemplars.length && c.exemplars[0].url && SAFE_URL.test(c.exemplars[0].url) ? c.exemplars[0].url : null;
  }

  function load(key) {
    var m = ON_DEMAND[key];
    if (!m || m.loading || !SAFE_SCRIPT.test(m.file)) return false;
    m.loading = true;
    var s = document.createElement('script');
    s.nonce = NONCE;
    s.src = m.file;
    s.onerror = function () { m.loading = false; console.error('gig: cannot load ' + m.file); };
    document.body.appendChild(s);
    return true;
  }
  // Called by a loaded classes/class_C.js: its graph, its concepts' cards and class names.
  window.gigOnDemand = function (d) {
    GRAPHS[d.entry.key] = d.entry;
    Object.keys(d.concepts).forEach(function (id) { if (!DATA.concepts[id]) DATA.concepts[id] = d.concepts[id]; });
    Object.keys(d.classNames).forEach(function (c) { DATA.classNames[c] = d.classNames[c]; });
    if (state.wanted === d.entry.key) draw(d.entry.key);
  };

  function draw(key) {
    var entry = GRAPHS[key];
    state.wanted = key;
    if (!entry && ON_DEMAND[key]) { state.wanted = key; return load(key) || ON_DEMAND[key].loading; }
    if (!entry) return false;
    var graph = entry.graph;
    var pos = layout(graph);
    var ids = {};
    graph.nodes.forEach(function (n) { ids[n.id] = true; });
    var maxW = graph.edges.reduce(function (m, e) { return Math.max(m, Math.abs(e.weight || 0)); }, 0) || 1;
    // rank of each edge among the edges into its target, strongest first (for the top-k slider)
    var byTarget = {};
    graph.edges.forEach(function (e, i) { (byTarget[e.target] = byTarget[e.target] || []).push(i); });
    var rank = {};
    Object.keys(byTarget).forEach(function (t) {
      byTarget[t].sort(function (a, b) { return Math.abs(graph.edges[b].weight || 0) - Math.abs(graph.edges[a].weight || 0); });
      byTarget[t].forEach(function (i, r) { rank[i] = r; });
    });
    var elements = [];
    graph.nodes.forEach(function (n) {
      var isClass = n.layer === 'classifier';
      var url = isClass ? null : topUrl(n.id);
      var classes = [isClass ? 'classifier' : 'concept'];
      if (url) classes.push('thumb');
      if (n.shared) classes.push('shared');
      var data = { id: n.id, label: isClass ? (n.name === null || n.name === undefined ? 'target logit' : String(n.name)) : '#' + n.concept };
      if (url) data.img = url;
      elements.push({ group: 'nodes', data: data, position: pos[n.id], classes: classes.join(' ') });
    });
    var bad = 0;
    graph.edges.forEach(function (e, i) {
      if (!ids[e.source] || !ids[e.target]) { bad++; return; }
      var w = e.weight || 0, t = Math.abs(w) / maxW;
      var edgeClasses = [];
      if (w < 0) edgeClasses.push('neg');
      if (containsZero(e.ci) || e.beats_random === false) edgeClasses.push('uncertain');
      elements.push({ group: 'edges', classes: edgeClasses.join(' '), data: {
        id: 'e' + i, source: e.source, target: e.target, weight: w, rel: t, rank: rank[i],
        width: 0.8 + 8 * t, z: Math.round(t * 100), wlabel: fmt(w, 3) + intervalText(e.ci) + testText(e),
        color: ramp(w < 0 ? REDS : BLUES, 0.15 + 0.85 * t) } });
    });
    cy.batch(function () {
      cy.elements().remove();
      cy.add(elements);
    });
    state.key = key;
    state.pinned = null;
    state.mode = entry.mode;
    // the top-k slider runs up to the most edges into one node: at its maximum (the default,
    // and after every switch) every edge of the JSON is shown
    var most = Object.keys(byTarget).reduce(function (m, t) { return Math.max(m, byTarget[t].length); }, 1);
    topk.max = String(most);
    topk.value = String(most);
    applyFilter();
    fitGraph();
    info(entry, bad);
    showHint();
    container.setAttribute('data-graph', key);
    container.setAttribute('data-nodes', String(cy.nodes().length));
    container.setAttribute('data-edges', String(cy.edges().length));
    document.body.setAttribute('data-graph-ready', key);
    syncControls(entry);
    cy.resize();  // the controls and text above may have changed height: re-read the container's place
    return true;
  }

  // A node's or an edge's 95 % interval (graphs since gig 0.4; null on one image).
  function hasInterval(ci) { return Array.isArray(ci) && ci.length === 2 && typeof ci[0] === 'number' && typeof ci[1] === 'number'; }
  function containsZero(ci) { return hasInterval(ci) && ci[0] <= 0 && ci[1] >= 0; }
  function intervalText(ci) { return hasInterval(ci) ? ' [' + fmt(ci[0], 3) + ', ' + fmt(ci[1], 3) + ']' : ''; }
  // An edge's test against random directions (graphs since gig 0.6; absent or null where untested).
  function testText(e) {
    if (typeof e.p_adjusted !== 'number') return '';
    var verdict = e.beats_random ? '' : (e.significant ? ' (weaker than random)' : ' (n.s.)');
    return ' q=' + (e.p_adjusted < 0.001 ? '<0.001' : fmt(e.p_adjusted, 3)) + verdict;
  }

  function info(entry, bad) {
    var g = entry.graph, box = document.getElementById('graph-info');
    box.textContent = '';
    var kinds = { 'class': NOUN + ' graph', shared: 'shared graph', global: 'global graph', image: 'single-image graph' };
    box.appendChild(el('b', null, kinds[entry.mode] || entry.mode));
    box.appendChild(document.createTextNode(': ' + entry.label + ' · ' + g.n_images + ' image(s) · ' +
      g.nodes.length + ' nodes, ' + g.edges.length + ' edges (top-' + g.top_k + ' concepts per layer, ' +
      g.edges_per_node + ' edges per node)'));
    if (entry.file) box.appendChild(document.createTextNode(' · from graph/' + entry.file));
    if (entry.recurrence) {
      // gig stability --graphs: how much of this graph comes back with refitted concepts
      var r = entry.recurrence, rec = el('span', 'recurrence', ' · with refitted concepts (' + r.refits + ' refits): ' +
        Math.round(100 * r.nodes) + ' % of its concept nodes and ' + Math.round(100 * r.edges) + ' % of its edges come back' +
        (r.control ? ' (the run\'s own concepts rerun: ' + Math.round(100 * r.control.nodes) + ' % / ' +
          Math.round(100 * r.control.edges) + ' %)' : ''));
      rec.id = 'graph-recurrence';
      box.appendChild(rec);
    }
    if (g.edge_rule_agreement) {
      // How much the shown edges depend on the definition of an edge weight (docs/graph-schema.md).
      var parts = [];
      for (var rule in g.edge_rule_agreement) parts.push(rule + ' ' + Math.round(100 * g.edge_rule_agreement[rule]) + ' %');
      var agree = el('span', 'rule-agreement', ' · edges: flow of the ' + (NOUN === 'class' ? 'class-logit' : 'output') +
        ' change; shown edges also shown under ' + parts.join(', '));
      agree.id = 'edge-rule-agreement';
      box.appendChild(agree);
    }
    var uncertain = g.edges.filter(function (e) { return containsZero(e.ci); }).length;
    if (g.intervals) {
      var text = ' · dotted: ' + uncertain + ' edge(s) whose 95 % interval over the images contains 0';
      if (g.significance) {
        var weak = g.edges.filter(function (e) { return e.beats_random === false; }).length;
        text += '; ' + weak + ' not significantly stronger than ' + g.significance.random_directions +
          ' random directions (Benjamini-Hochberg, FDR ' + Math.round(100 * g.significance.fdr) + ' %)';
      }
      var iv = el('span', 'intervals', text);
      iv.id = 'edges-uncertain';
      box.appendChild(iv);
    }
    var shown = el('span', 'shown');
    shown.id = 'edges-shown';
    box.appendChild(shown);
    if (bad) box.appendChild(el('span', 'warn', ' · ' + bad + ' edge(s) point to a missing node and are not drawn'));
    updateShown();
    box.setAttribute('title', box.textContent);
  }

  // ------------------------------------------------------------------ edge filters
  var topk = document.getElementById('topk'), threshold = document.getElementById('threshold');
  function applyFilter() {
    var k = parseInt(topk.value, 10), thr = parseInt(threshold.value, 10) / 100;
    document.getElementById('topk-out').textContent = String(k);
    document.getElementById('threshold-out').textContent = Math.round(thr * 100) + ' % of max';
    cy.batch(function () {
      cy.edges().forEach(function (e) {
        var keep = e.data('rank') < k && e.data('rel') >= thr;
        if (keep) e.removeClass('hidden'); else e.addClass('hidden');
      });
    });
    updateShown();
  }
  function updateShown() {
    var span = document.getElementById('edges-shown');
    if (!span) return;
    var visible = cy.edges().filter(function (e) { return !e.hasClass('hidden'); }).length;
    span.textContent = ' · showing ' + visible + ' of ' + cy.edges().length + ' edges';
    container.setAttribute('data-edges-visible', String(visible));
  }
  topk.addEventListener('input', applyFilter);
  threshold.addEventListener('input', applyFilter);
  document.getElementById('fit').addEventListener('click', fitGraph);
  // fit the graph into the viewer, leaving room on the left for the layer names
  function fitGraph() {
    var W = container.clientWidth, H = container.clientHeight, left = 110, pad = 24;
    var bb = cy.elements().boundingBox();
    if (!cy.elements().length) return;
    var zoom = Math.min((W - left - pad) / Math.max(bb.w, 1), (H - 2 * pad) / Math.max(bb.h, 1));
    zoom = Math.max(cy.minZoom(), Math.min(zoom, 1.6));
    cy.zoom(zoom);
    cy.pan({ x: left + (W - left - pad - bb.w * zoom) / 2 - bb.x1 * zoom,
             y: pad + (H - 2 * pad - bb.h * zoom) / 2 - bb.y1 * zoom });
    drawRuler();
  }

  // ------------------------------------------------------------------ concept cards
  var panel = document.getElementById('card');
  function showHint() {
    panel.textContent = '';
    panel.appendChild(el('p', 'hint', 'Hover a node to see its concept card; click it to pin.'));
    panel.removeAttribute('data-node');
  }

  function edgeList(title, edges, otherEnd) {
    var box = el('div', 'edges');
    box.appendChild(el('h4', null, title));
    if (!edges.length) { box.appendChild(el('p', 'muted', 'none')); return box; }
    var list = el('ol');
    edges.forEach(function (e) {
      var li = el('li');
      var other = otherEnd(e);
      var btn = el('button', 'link', nodeName(other));
      btn.type = 'button';
      btn.setAttribute('data-node', other);
      btn.addEventListener('click', function () { pin(other); });
      li.appendChild(btn);
      li.appendChild(el('span', 'w', ' ' + fmt(e.weight, 3) + intervalText(e.ci) + testText(e) + (containsZero(e.ci) ? ' (interval contains 0)' : '')));
      list.appendChild(li);
    });
    box.appendChild(list);
    return box;
  }

  function tagList(title, pairs, label) {
    var box = el('div', 'tags');
    box.appendChild(el('h4', null, title));
    if (!pairs || !pairs.length) { box.appendChild(el('span', 'muted', '–')); return box; }
    pairs.forEach(function (p) {
      var tag = el('span', 'tag', label(p[0]) + ' ');
      tag.appendChild(el('small', null, typeof p[1] === 'number' && p[1] % 1 !== 0 ? fmt(p[1], 3) : String(p[1])));
      box.appendChild(tag);
    });
    return box;
  }

  function renderCard(id, pinned) {
    var entry = GRAPHS[state.key];
    var node = entry.graph.nodes.filter(function (n) { return n.id === id; })[0];
    if (!node) return;
    panel.textContent = '';
    panel.setAttribute('data-node', id);
    var head = el('header');
    var incoming = entry.graph.edges.filter(function (e) { return e.target === id; })
      .sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); });
    var outgoing = entry.graph.edges.filter(function (e) { return e.source === id; })
      .sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); });
    if (node.layer === 'classifier') {
      head.appendChild(el('h3', 'card-title', node.name === null || node.name === undefined ? 'target logit' : String(node.name)));
      head.appendChild(el('p', 'muted', (NOUN === 'class' ? 'classifier' : 'probe head') + (node['class'] !== null && node['class'] !== undefined ? ' · ' + NOUN + ' ' + node['class'] : '') +
        (node.n_images !== undefined ? ' · ' + node.n_images + ' image(s)' : '')));
      panel.appendChild(head);
      panel.appendChild(edgeList('strongest concepts (' + entry.graph.layers[entry.graph.layers.length - 1] + ')', incoming, function (e) { return e.source; }));
      if (pinned) panel.appendChild(el('p', 'pin-note', 'pinned · click the background to let go'));
      return;
    }
    var c = DATA.concepts[id] || null;
    head.appendChild(el('h3', 'card-title', 'concept #' + node.concept + (c && c.name ? ' · ' + c.name : '')));
    if (c && c.note) head.appendChild(el('p', 'card-note', String(c.note)));
    head.appendChild(el('p', 'muted', node.layer + ' · share in this graph ' + fmt(node.importance, 3) + intervalText(node.ci) +
      (typeof node.selection_frequency === 'number' ? ' · in the top-' + entry.graph.top_k + ' of ' +
        Math.round(100 * node.selection_frequency) + ' % of bootstrap resamples' : '') +
      (c && c.rank ? ' · dataset rank ' + c.rank + ' of ' + DATA.run.K[node.layer] : '')));
    panel.appendChild(head);
    if (node.shared || (node.in_top_of && node.in_top_of.length > 1)) {
      var sh = el('p', 'shared-note', 'shared: in the top-' + entry.graph.top_k + ' of ' +
        node.in_top_of.map(className).join(', '));
      panel.appendChild(sh);
    }
    if (c && c.exemplars.length) {
      var ex = el('div', 'card-exemplars');
      var first = c.exemplars[0];
      var fig = el('figure', 'top1');
      fig.appendChild(img(first.url, 'top-1: image #' + first.image + ' (' + className(first.cls) + '), cos ' + fmt(first.sim, 3)));
      fig.appendChild(el('figcaption', null, 'top-1'));
      ex.appendChild(fig);
      var grid = el('div', 'top10');
      c.exemplars.forEach(function (e, i) {
        grid.appendChild(img(e.url, '#' + (i + 1) + ': image #' + e.image + ' (' + className(e.cls) + '), cos ' + fmt(e.sim, 3)));
      });
      ex.appendChild(grid);
      panel.appendChild(ex);
    }
    if (entry.mode === 'image' && DATA.localised[String(entry.image_id)]) {
      var loc = DATA.localised[String(entry.image_id)][id];
      if (loc) {
        var lf = el('figure', 'card-loc');
        lf.appendChild(img(loc.gig, 'where concept #' + node.concept + ' sits in image #' + entry.image_id + ' (GIG map)'));
        lf.appendChild(img(loc.coef, 'coefficient of concept #' + node.concept + ' in image #' + entry.image_id));
        if (loc.erf) lf.appendChild(img(loc.erf, "the image's own ERF crop of concept #" + node.concept));
        lf.appendChild(el('figcaption', null, 'localisation in image #' + entry.image_id + ': GIG map · coefficient' +
          (loc.erf ? ' · own ERF crop' : '')));
        panel.appendChild(lf);
      }
    }
    var facts = el('p', 'facts', (c ? c.count : node.count) + ' sampled PFVs in the cluster' +
      (c && typeof c.stability === 'number' ? ' · found again by refits with other seeds and images at cosine ' +
        fmt(c.stability, 2) + ' (gig stability)' : ''));
    panel.appendChild(facts);
    panel.appendChild(tagList('member classes', node.top_classes, className));
    panel.appendChild(edgeList('in this graph: from (lower layer)', incoming, function (e) { return e.source; }));
    panel.appendChild(edgeList('in this graph: into (upper layer)', outgoing, function (e) { return e.target; }));
    if (c) {
      panel.appendChild(tagList('dataset-wide parents', c.parents, nodeName));
      panel.appendChild(tagList('dataset-wide children', c.children, nodeName));
    }
    var atlasCard = document.querySelector('.concept-card[data-id="' + cssEscape(id) + '"]');
    if (atlasCard) {
      var a = el('a', 'atlas-link', 'open in the concept atlas');
      a.setAttribute('href', '#' + atlasCard.id);
      panel.appendChild(a);
    }
    if (pinned) panel.appendChild(el('p', 'pin-note', 'pinned · click the background to let go'));
  }

  function cssEscape(s) { return window.CSS && CSS.escape ? CSS.escape(s) : String(s).replace(/["\\]/g, '\\$&'); }

  function pin(id) {
    var n = cy.getElementById(id);
    if (!n || !n.length) return;
    state.pinned = id;
    cy.batch(function () {
      cy.elements().removeClass('pinned in out faded');
      var inc = n.incomers('edge'), out = n.outgoers('edge');
      cy.elements().not(n).not(inc).not(out).not(inc.sources()).not(out.targets()).addClass('faded');
      n.addClass('pinned');
      inc.addClass('in');
      out.addClass('out');
    });
    renderCard(id, true);
  }
  function unpin() {
    state.pinned = null;
    cy.elements().removeClass('pinned in out faded');
    showHint();
  }
  cy.on('mouseover', 'node', function (evt) { if (!state.pinned) renderCard(evt.target.id(), false); });
  cy.on('tap', 'node', function (evt) {
    if (state.pinned === evt.target.id()) unpin(); else pin(evt.target.id());
  });
  cy.on('tap', function (evt) { if (evt.target === cy) unpin(); });

  // ------------------------------------------------------------------ choosing the graph
  var classSelect = document.getElementById('class-select');
  var imageSelect = document.getElementById('image-select');
  var sharedBoxes = document.getElementById('shared-boxes');
  function option(select, value, label) {
    var o = el('option', null, label);
    o.value = value;
    select.appendChild(o);
  }
  DATA.graphs.forEach(function (g) {
    if (g.mode === 'class') option(classSelect, g.key, g.label);
    if (g.mode === 'image') option(imageSelect, g.key, g.label);
  });
  if ((DATA.onDemand || []).length) {
    var more = el('optgroup');
    more.setAttribute('label', 'more classes (loaded when chosen)');
    DATA.onDemand.forEach(function (m) { option(more, m.key, m.label); });
    classSelect.appendChild(more);
  }
  var hasShared = DATA.graphs.some(function (g) { return g.mode === 'shared'; });
  if (hasShared) {
    DATA.sharedPool.forEach(function (c) {
      var label = el('label', 'box');
      var box = el('input');
      box.type = 'checkbox';
      box.value = String(c);
      box.checked = true;
      box.addEventListener('change', drawShared);
      label.appendChild(box);
      label.appendChild(document.createTextNode(' ' + className(c)));
      sharedBoxes.appendChild(label);
    });
  }
  var sharedNote = el('span', 'muted');
  sharedBoxes.appendChild(sharedNote);
  function drawShared() {
    var chosen = Array.prototype.filter.call(sharedBoxes.querySelectorAll('input'), function (b) { return b.checked; })
      .map(function (b) { return parseInt(b.value, 10); }).sort(function (a, b) { return a - b; });
    if (chosen.length < 2) { sharedNote.textContent = ' tick two or more classes'; return; }
    var key = 'shared:' + chosen.join(',');
    sharedNote.textContent = GRAPHS[key] ? '' : ' no graph for this set';
    draw(key);
  }
  classSelect.addEventListener('change', function () { draw(classSelect.value); });
  imageSelect.addEventListener('change', function () { draw(imageSelect.value); });

  var modeButtons = document.querySelectorAll('button.mode');
  function available(mode) { return DATA.graphs.some(function (g) { return g.mode === mode; }); }
  function setMode(mode) {
    if (mode === 'class') draw(classSelect.value);
    else if (mode === 'shared') drawShared();
    else if (mode === 'global') draw('global');
    else if (mode === 'image') draw(imageSelect.value);
  }
  Array.prototype.forEach.call(modeButtons, function (b) {
    if (!available(b.getAttribute('data-mode'))) b.disabled = true;
    b.addEventListener('click', function () { setMode(b.getAttribute('data-mode')); });
  });
  function syncControls(entry) {
    Array.prototype.forEach.call(modeButtons, function (b) {
      var on = b.getAttribute('data-mode') === entry.mode;
      b.classList.toggle('active', on);
      b.setAttribute('aria-selected', on ? 'true' : 'false');
    });
    Array.prototype.forEach.call(document.querySelectorAll('.pick'), function (p) {
      p.style.display = p.getAttribute('data-for') === entry.mode ? '' : 'none';
    });
    if (entry.mode === 'class') classSelect.value = entry.key;
    if (entry.mode === 'image') imageSelect.value = entry.key;
    if (entry.mode === 'shared') {
      Array.prototype.forEach.call(sharedBoxes.querySelectorAll('input'), function (b) {
        b.checked = entry.classes.indexOf(parseInt(b.value, 10)) >= 0;
      });
    }
  }

  // ------------------------------------------------------------------ the rest of the page
  // (the script runs right after the graph section; the atlas and localisation come later)
  function bindPage() {
    var search = document.getElementById('atlas-search');
    var atlasCount = document.getElementById('atlas-count');
    function filterAtlas() {
      var q = search.value.trim();
      var cards = document.querySelectorAll('.concept-card');
      var shown = 0;
      Array.prototype.forEach.call(cards, function (card) {
        var id = card.getAttribute('data-id'), concept = card.getAttribute('data-concept');
        var hit = !q || concept === q.replace(/^#/, '') || id === q;
        card.style.display = hit ? '' : 'none';
        if (hit) shown++;
      });
      Array.prototype.forEach.call(document.querySelectorAll('.atlas-grid'), function (grid) {
        var any = Array.prototype.some.call(grid.children, function (c) { return c.style.display !== 'none'; });
        grid.previousElementSibling.style.display = any ? '' : 'none';
      });
      atlasCount.textContent = q ? shown + ' card(s) match' + (shown ? '' : ' (the atlas shows the most important concepts only)') : '';
    }
    search.addEventListener('input', filterAtlas);

    // ------------------------------------------------------------------ localisation
    Array.prototype.forEach.call(document.querySelectorAll('input[name=locmode]'), function (r) {
      r.addEventListener('change', function () {
        var list = document.getElementById('loc-list');
        list.classList.toggle('mode-gig', r.value === 'gig' && r.checked);
        list.classList.toggle('mode-coef', r.value === 'coef' && r.checked);
      });
    });
    Array.prototype.forEach.call(document.querySelectorAll('button.open-graph'), function (b) {
      b.addEventListener('click', function () {
        if (draw('image:' + b.getAttribute('data-image'))) document.getElementById('graph').scrollIntoView();
      });
    });
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', bindPage); else bindPage();

  // ------------------------------------------------------------------ start
  var first = DATA.graphs.filter(function (g) { return g.mode === 'class'; })[0] || DATA.graphs[0];
  applyFilter();
  if (first) draw(first.key);
  if (window.performance && performance.mark) performance.mark('gig-graph-drawn');
  window.gigReport = {
    cy: cy, data: DATA, draw: draw, pin: pin, unpin: unpin,
    current: function () { return state.key; },
    counts: function () {
      return { nodes: cy.nodes().length, edges: cy.edges().length,
               visibleEdges: cy.edges().filter(function (e) { return !e.hasClass('hidden'); }).length };
    }
  };
})();
