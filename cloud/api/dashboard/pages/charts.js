// Charts of the per-round metrics the aggregation service records: accuracy, loss, bytes,
// participants and rejections. uPlot (vendored) draws them; a table shows the same numbers.

import { api } from '../api.js';
import { fill, fmt, h, table } from '../dom.js';

const COLORS = ['#2563eb', '#dc2626', '#059669', '#d97706'];

const CHARTS = [
  {
    id: 'accuracy', title: 'Held-out accuracy of each new global version',
    series: [{ key: 'accuracy', label: 'accuracy' }],
    axis: (v) => `${(100 * v).toFixed(0)}%`, value: fmt.pct, range: [0, 1],
  },
  {
    id: 'loss', title: 'Loss per round',
    series: [{ key: 'loss', label: 'training loss (devices, n-weighted)' },
      { key: 'eval_loss', label: 'eval loss' }],
    axis: (v) => v.toFixed(2), value: (v) => fmt.num(v),
  },
  {
    id: 'bytes', title: 'Bytes per round',
    series: [{ key: 'bytes_up', label: 'up: updates received' },
      { key: 'bytes_down', label: 'down: tasks sent' }],
    axis: fmt.bytes, value: fmt.bytes, fromZero: true,
  },
  {
    id: 'participants', title: 'Participants and rejected updates per round',
    series: [{ key: 'participants', label: 'participants (accepted updates)' },
      { key: 'updates_rejected', label: 'rejected updates' }],
    axis: (v) => (Number.isInteger(v) ? String(v) : ''), value: (v) => fmt.num(v), fromZero: true,
  },
];

function yRange(spec) {
  if (spec.range) return spec.range;
  return (u, min, max) => {
    const low = spec.fromZero ? 0 : min - 0.1 * Math.abs(max - min || max || 1);
    const high = max + 0.1 * Math.abs(max - low || max || 1);
    return [low, high];
  };
}

function options(spec, width) {
  return {
    width, height: 240,
    scales: { x: { time: false }, y: { range: yRange(spec) } },
    axes: [
      { label: 'round', values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? `#${v}` : '')) },
      { values: (u, splits) => splits.map((v) => (v === null ? '' : spec.axis(v))), size: 84 },
    ],
    series: [
      { label: 'round', value: (u, v) => (v === null ? '–' : `#${v}`) },
      ...spec.series.map((s, i) => ({
        label: s.label, stroke: COLORS[i], width: 2, spanGaps: true,
        points: { show: true, size: 7 },
        value: (u, v) => (v === null || v === undefined ? '–' : spec.value(v)),
      })),
    ],
    legend: { live: true },
  };
}

/** uPlot's data: [[round ids], [series 1 values], ...] (null where a round has no value). */
function dataOf(spec, rounds) {
  return [rounds.map((r) => r.id),
    ...spec.series.map((s) => rounds.map((r) => r.metrics[s.key] ?? null))];
}

export default {
  title: 'Charts',
  mount(root) {
    const boxes = Object.fromEntries(CHARTS.map((c) => [c.id, h('div', { class: 'chart', id: `chart-${c.id}` })]));
    const numbers = h('div', { id: 'metrics-numbers' });
    const plots = {};
    const widthOf = (box) => Math.max(320, box.clientWidth || 600);
    const resize = () => {
      for (const [id, plot] of Object.entries(plots)) plot.setSize({ width: widthOf(boxes[id]), height: 240 });
    };
    window.addEventListener('resize', resize);

    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Charts'),
        h('p', { class: 'muted' }, 'Per-round metrics recorded when each round closes.')),
      h('div', { class: 'chart-grid' }, CHARTS.map((c) => h('section', { class: 'panel' },
        h('h2', {}, c.title), boxes[c.id]))),
      h('section', { class: 'panel' }, h('h2', {}, 'The numbers'), numbers));

    function draw(rounds) {
      for (const spec of CHARTS) {
        const data = dataOf(spec, rounds);
        if (!rounds.length) {
          plots[spec.id]?.destroy();
          delete plots[spec.id];
          delete window.fednano.charts[spec.id];
          fill(boxes[spec.id], h('p', { class: 'empty' }, 'No closed rounds yet.'));
        } else if (plots[spec.id]) {
          plots[spec.id].setData(data);
        } else {
          fill(boxes[spec.id]);
          plots[spec.id] = new window.uPlot(options(spec, widthOf(boxes[spec.id])), data, boxes[spec.id]);
          window.fednano.charts[spec.id] = plots[spec.id];
        }
      }
    }

    const columns = [
      { title: 'Round', key: 'round', cell: (r) => h('a', { href: `#/rounds/${r.id}` }, `#${r.id}`) },
      { title: 'Version', key: 'version', cell: (r) => (r.version_id ? `v${r.version_id}` : '–') },
      ...CHARTS.flatMap((c) => c.series.map((s) => ({
        title: s.key, key: s.key, class: 'num', cell: (r) => (r.metrics[s.key] === undefined ? '–' : c.value(r.metrics[s.key])),
      }))),
    ];

    return {
      async refresh() {
        const rounds = (await api('/stats/rounds', { query: { limit: 200 } }))
          .filter((r) => Object.keys(r.metrics).length > 0);
        draw(rounds);
        fill(numbers, table(columns, rounds, {
          id: 'metrics-table', empty: 'No metrics yet.',
          rowAttrs: (r) => ({ dataset: { roundId: r.id } }),
        }));
      },
      unmount() {
        window.removeEventListener('resize', resize);
        for (const plot of Object.values(plots)) plot.destroy();
        window.fednano.charts = {};
      },
    };
  },
};
