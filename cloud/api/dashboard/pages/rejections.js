// Rejected updates of every round with the validation gate's code and reason.

import { api } from '../api.js';
import { badge, fill, h, table, when } from '../dom.js';

const LIMIT = 200;

export default {
  title: 'Rejections',
  mount(root) {
    const summary = h('div', { class: 'chips', id: 'rejection-codes' });
    const list = h('div', { id: 'rejection-list' });
    const count = h('span', { class: 'muted' });
    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Rejected updates'),
        h('p', { class: 'muted' }, 'Every update the validation gate refused, newest first, with its reason.')),
      summary,
      h('section', { class: 'panel' }, h('h2', {}, 'Updates ', count), list));

    const columns = [
      { title: 'Round', key: 'round', cell: (u) => h('a', { href: `#/rounds/${u.round_id}` }, `#${u.round_id}`) },
      { title: 'Device', key: 'device', cell: (u) => u.device_id },
      { title: 'Code', key: 'code', cell: (u) => badge(u.rejection_code || 'rejected', 'code') },
      { title: 'Reason', key: 'reason', class: 'reason', cell: (u) => u.rejection_reason },
      { title: 'Claimed base', key: 'base', class: 'num', cell: (u) => `v${u.base_version}` },
      { title: 'Update id', key: 'update', cell: (u) => h('code', {}, u.update_id) },
      { title: 'Received', key: 'received', cell: (u) => when(u.received_at) },
    ];

    return {
      async refresh() {
        const page = await api('/updates', { query: { status: 'rejected', limit: LIMIT } });
        count.textContent = page.total > LIMIT ? `(newest ${LIMIT} of ${page.total})` : `(${page.total})`;
        const codes = {};
        for (const u of page.items) codes[u.rejection_code || 'other'] = (codes[u.rejection_code || 'other'] || 0) + 1;
        fill(summary, Object.entries(codes).sort((a, b) => b[1] - a[1])
          .map(([code, n]) => h('span', { class: 'chip', dataset: { code } }, badge(code, 'code'), ` × ${n}`)));
        fill(list, table(columns, page.items, {
          id: 'rejections-table', empty: 'No update has been rejected.',
          rowAttrs: (u) => ({ dataset: { updateId: u.update_id, code: u.rejection_code || '' } }),
        }));
      },
    };
  },
};
