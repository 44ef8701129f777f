// Model versions: each global adapter version, its parent, the round that made it and its
// lineage (which devices' updates went in, with their weights λ_k = n_k / N).

import { api, saveBlob } from '../api.js';
import { actionButton, bar, fill, fmt, h, when } from '../dom.js';

const MAX_SHOWN = 50;

export default {
  title: 'Models',
  mount(root, ctx) {
    const lineages = new Map(); // version id -> lineage; a version's lineage never changes
    const list = h('div', { id: 'version-list' });
    const count = h('span', { class: 'muted' });

    async function lineageOf(version) {
      if (!version.round_id) return [];
      if (!lineages.has(version.id)) lineages.set(version.id, await api(`/models/${version.id}/lineage`));
      return lineages.get(version.id);
    }

    function lineageView(entries) {
      if (!entries.length) return h('span', { class: 'muted' }, 'initial version (no updates merged)');
      return h('ul', { class: 'lineage' }, entries.map((e) => h('li', { dataset: { deviceId: e.device_id } },
        h('span', { class: 'lineage-device' }, e.device_id),
        bar(e.weight ?? 0, { title: `weight ${fmt.num(e.weight, 3)}` }),
        h('span', { class: 'muted' }, `${fmt.pct(e.weight)} · ${e.n_samples} samples · `, h('code', {}, e.update_id)))));
    }

    function versionCard(v, entries, accuracy) {
      return h('article', { class: 'version', id: `version-${v.id}`, dataset: { versionId: v.id } },
        h('header', {},
          h('h3', {}, `v${v.id}`),
          h('span', { class: 'muted' }, v.parent_id ? `← v${v.parent_id}` : 'root'),
          v.round_id ? h('a', { href: `#/rounds/${v.round_id}` }, `round #${v.round_id}`) : h('span', { class: 'muted' }, 'initial'),
          h('span', {}, v.strategy || ''),
          accuracy === undefined ? null : h('span', { class: 'good', dataset: { accuracy } }, `accuracy ${fmt.pct(accuracy)}`),
          h('span', { class: 'muted' }, fmt.bytes(v.blob_size)),
          h('code', { title: v.blob_sha256 }, fmt.short(v.blob_sha256)),
          when(v.created_at),
          actionButton('Download', async () => {
            saveBlob(await api(`/models/${v.id}/adapter`, { as: 'blob' }), `adapter-v${v.id}.fnc`);
          }, ctx, { class: 'small ghost' })),
        lineageView(entries));
    }

    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Model versions'),
        h('p', { class: 'muted' }, 'Global adapter versions, newest first, with the updates merged into each.')),
      h('section', { class: 'panel' }, h('h2', {}, 'Versions ', count), list));

    return {
      async refresh() {
        const [versions, rounds] = await Promise.all([
          api('/models', { query: { limit: MAX_SHOWN } }),
          api('/stats/rounds', { query: { limit: 200 } }),
        ]);
        const accuracy = Object.fromEntries(rounds.map((r) => [r.id, r.metrics.accuracy]));
        const entries = await Promise.all(versions.items.map(lineageOf));
        count.textContent = versions.total > MAX_SHOWN ? `(newest ${MAX_SHOWN} of ${versions.total})` : `(${versions.total})`;
        fill(list, versions.items.length
          ? versions.items.map((v, i) => versionCard(v, entries[i], v.round_id ? accuracy[v.round_id] : undefined))
          : h('p', { class: 'empty' }, 'No versions yet: the coordinator stores the initial one when it starts.'));
      },
    };
  },
};
