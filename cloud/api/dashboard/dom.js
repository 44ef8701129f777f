// Small DOM helpers. Text always goes through text nodes, never innerHTML: device ids,
// rejection reasons and answers are data from the network.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace ``el``'s children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/**
 * A table: ``columns`` are ``{title, cell: (row) => node | text, class?}``;
 * ``rowAttrs(row)`` gives each ``<tr>`` its attributes (``data-*`` for tests and links).
 */
export function table(columns, rows, { rowAttrs = () => ({}), empty = 'Nothing yet.', id } = {}) {
  if (!rows.length) return h('p', { class: 'empty', id }, empty);
  return h('table', { class: 'grid', id },
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { class: c.class }, c.title)))),
    h('tbody', {}, rows.map((row) => h('tr', rowAttrs(row),
      columns.map((c) => h('td', { class: c.class, dataset: { col: c.key || '' } }, c.cell(row)))))));
}

export function badge(text, kind = text) {
  return h('span', { class: `badge badge-${kind}` }, text);
}

export function card(label, value, { id, hint } = {}) {
  return h('div', { class: 'card', id },
    h('div', { class: 'card-label' }, label),
    h('div', { class: 'card-value' }, value),
    hint ? h('div', { class: 'card-hint' }, hint) : null);
}

const UNITS = ['B', 'KB', 'MB', 'GB', 'TB'];

export const fmt = {
  bytes(n) {
    if (n === null || n === undefined) return '–';
    let value = Number(n);
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) { value /= 1024; unit += 1; }
    return `${value.toFixed(unit === 0 ? 0 : 1)} ${UNITS[unit]}`;
  },
  pct(x) { return x === null || x === undefined ? '–' : `${(100 * x).toFixed(1)}%`; },
  num(x, digits = 4) {
    if (x === null || x === undefined) return '–';
    return Number.isInteger(x) ? String(x) : Number(x).toFixed(digits);
  },
  time(iso) { return iso ? new Date(iso).toLocaleString() : '–'; },
  ago(iso) {
    if (!iso) return 'never';
    const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
    if (s < 0) return `in ${fmt.span(-s)}`;
    return s < 5 ? 'just now' : `${fmt.span(s)} ago`;
  },
  span(seconds) {
    const s = Math.abs(Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d`;
  },
  until(iso) {
    if (!iso) return '–';
    const s = (new Date(iso).getTime() - Date.now()) / 1000;
    return s >= 0 ? `in ${fmt.span(s)}` : `passed ${fmt.span(-s)} ago`;
  },
  short(hex) { return hex ? hex.slice(0, 12) : '–'; },
};

/** A <time> element showing "3 min ago" with the exact time on hover. */
export function when(iso, relative = true) {
  if (!iso) return h('span', { class: 'muted' }, relative ? 'never' : '–');
  return h('time', { datetime: iso, title: fmt.time(iso) }, relative ? fmt.ago(iso) : fmt.time(iso));
}

/** A button that disables itself while ``action`` runs and reports errors through ``ctx``. */
export function actionButton(label, action, ctx, attrs = {}) {
  const button = h('button', { type: 'button', ...attrs }, label);
  button.addEventListener('click', async () => {
    button.disabled = true;
    try { await action(); } catch (err) { ctx.error(err); } finally { button.disabled = false; }
  });
  return button;
}

/** A horizontal bar filled to ``fraction`` (CSSOM, which the CSP allows; style="" it does not). */
export function bar(fraction, attrs = {}) {
  const fillEl = h('div', { class: 'bar' });
  fillEl.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return h('div', { class: 'progress', ...attrs }, fillEl);
}

export const TERMINAL = new Set(['closed', 'failed']);
