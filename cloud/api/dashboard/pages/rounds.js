// Rounds: status, participants, quorum and deadline of every round; start and stop rounds;
// the automatic schedule; one round's participants, updates (with rejection reasons) and metrics.

import { api } from '../api.js';
import { actionButton, badge, bar, fill, fmt, h, table, TERMINAL, when } from '../dom.js';

const STRATEGIES = ['fednano', 'fedavg', 'fedprox', 'fedmedian'];

function participants(r) {
  const p = r.participation;
  const selected = Object.values(p).reduce((a, b) => a + b, 0);
  const submitted = p.submitted || 0;
  return h('span', { title: Object.entries(p).map(([k, v]) => `${k}: ${v}`).join(', ') || 'none' },
    `${submitted} / ${selected}`,
    p.rejected ? h('span', { class: 'bad' }, ` · ${p.rejected} rejected`) : null,
    p.dropped ? h('span', { class: 'muted' }, ` · ${p.dropped} dropped`) : null);
}

function deadline(r) {
  if (!r.deadline_at) return h('span', { class: 'muted' }, r.state === 'open' ? 'set when tasks go out' : '–');
  if (TERMINAL.has(r.state)) return when(r.deadline_at, false);
  return h('time', { datetime: r.deadline_at, title: fmt.time(r.deadline_at) }, fmt.until(r.deadline_at));
}

function outcome(r) {
  if (r.state === 'failed') return h('span', { class: 'bad' }, r.failure_reason);
  if (r.version_id) return h('span', {}, `v${r.base_version_id ?? '?'} → v${r.version_id}`);
  return h('span', { class: 'muted' }, r.base_version_id ? `on v${r.base_version_id}` : '–');
}

export default {
  title: 'Rounds',
  mount(root, ctx, args) {
    const state = { selected: args[0] ? Number(args[0]) : null, rounds: [] };
    const activeBox = h('div', { id: 'active-round' });
    const list = h('div', { id: 'round-list' });
    const detail = h('section', { class: 'panel', id: 'round-detail', hidden: true });
    const scheduleBox = h('div', { id: 'schedule', class: 'schedule' });
    // Created once and moved into each re-render, so a poll never resets what the operator typed.
    const scheduleRounds = h('input', { type: 'number', min: '1', value: '3', id: 'schedule-rounds' });

    const strategy = h('select', { id: 'round-strategy' },
      h('option', { value: '' }, 'default'), STRATEGIES.map((s) => h('option', { value: s }, s)));
    const deadlineInput = h('input', {
      id: 'round-deadline', type: 'number', min: '1', step: '1', placeholder: 'default',
    });
    const startButton = h('button', { type: 'submit', id: 'start-round' }, 'Start a round now');
    const startForm = h('form', { class: 'inline-form', id: 'start-round-form' },
      h('label', {}, 'Strategy', strategy), h('label', {}, 'Deadline (s)', deadlineInput),
      startButton);
    startForm.addEventListener('submit', async (event) => {
      event.preventDefault();
      const overrides = {};
      if (strategy.value) overrides.strategy = strategy.value;
      if (deadlineInput.value) overrides.deadline_s = Number(deadlineInput.value);
      startButton.disabled = true;
      try {
        const round = await api('/rounds', { method: 'POST', body: { overrides } });
        ctx.toast(`Round ${round.id} started.`);
        ctx.go(`#/rounds/${round.id}`);
      } catch (err) { ctx.error(err); } finally { startButton.disabled = false; }
    });

    async function stop(round) {
      const stopped = await api(`/rounds/${round.id}/stop`, {
        method: 'POST', body: { reason: 'stopped from the dashboard' },
      });
      ctx.toast(`Round ${stopped.id} stopped (${stopped.state}).`);
      await ctx.refresh();
    }

    const columns = [
      { title: 'Round', key: 'id', cell: (r) => h('a', { href: `#/rounds/${r.id}` }, `#${r.id}`) },
      { title: 'State', key: 'state', cell: (r) => badge(r.state) },
      { title: 'Strategy', key: 'strategy', cell: (r) => r.strategy },
      { title: 'Submitted / selected', key: 'participants', cell: participants },
      { title: 'Quorum', key: 'quorum', cell: (r) => `${r.quorum} (min ${r.min_updates})` },
      { title: 'Deadline', key: 'deadline', cell: deadline },
      { title: 'Version', key: 'version', cell: outcome },
      { title: 'Accuracy', key: 'accuracy', class: 'num', cell: (r) => fmt.pct(r.metrics.accuracy) },
      { title: 'Started', key: 'created', cell: (r) => when(r.created_at) },
      {
        title: '', key: 'actions', class: 'actions',
        cell: (r) => (TERMINAL.has(r.state) || !['open', 'collecting'].includes(r.state) ? null
          : actionButton('Stop', () => stop(r), ctx, { class: 'small danger', dataset: { stop: r.id } })),
      },
    ];

    function renderActive() {
      const live = state.rounds.filter((r) => !TERMINAL.has(r.state));
      fill(activeBox, live.map((r) => {
        const p = r.participation;
        const selected = Object.values(p).reduce((a, b) => a + b, 0);
        return h('div', { class: 'active-round', dataset: { roundId: r.id } },
          h('div', {}, h('strong', {}, `Round #${r.id} `), badge(r.state)),
          bar((p.submitted || 0) / r.quorum, { title: `${p.submitted || 0} of quorum ${r.quorum}` }),
          h('div', { class: 'muted' }, `${p.submitted || 0} submitted of ${selected} selected · quorum ${r.quorum} · deadline `,
            deadline(r)));
      }));
    }

    function renderSchedule(s) {
      const targets = [s.target_rounds ? `${s.target_rounds} rounds` : null,
        s.target_accuracy ? `accuracy ${fmt.pct(s.target_accuracy)}` : null].filter(Boolean).join(' or ');
      fill(scheduleBox,
        h('span', {}, 'Automatic rounds: ', s.enabled ? badge('on', 'collecting') : badge('off', 'closed'),
          s.enabled && targets ? ` until ${targets}` : '',
          !s.enabled && s.stopped_reason ? h('span', { class: 'muted' }, ` (${s.stopped_reason})`) : ''),
        s.enabled
          ? actionButton('Stop automatic rounds', async () => {
            await api('/rounds/schedule', { method: 'PUT', body: { enabled: false } });
            await ctx.refresh();
          }, ctx, { class: 'small ghost', id: 'schedule-off' })
          : h('span', { class: 'inline-form' }, scheduleRounds, actionButton('Run rounds automatically', async () => {
            await api('/rounds/schedule', { method: 'PUT', body: { enabled: true, target_rounds: Number(scheduleRounds.value) } });
            await ctx.refresh();
          }, ctx, { class: 'small', id: 'schedule-on' })));
    }

    /** The selected round and its metrics, or null (none selected, or no such round). */
    async function fetchDetail() {
      if (!state.selected) return null;
      try {
        return await Promise.all([api(`/rounds/${state.selected}`),
          api(`/rounds/${state.selected}/metrics`)]);
      } catch (err) {
        if (err.status === 404) return { missing: state.selected };
        throw err;
      }
    }

    function renderDetail(found) {
      detail.hidden = !found;
      if (!found) return;
      if (found.missing) {
        fill(detail, h('p', { class: 'empty' }, `There is no round ${found.missing}.`));
        return;
      }
      const [round, metrics] = found;
      detail.dataset.roundId = round.id;
      const summary = Object.entries(metrics.summary);
      fill(detail,
        h('div', { class: 'panel-head' }, h('h2', {}, `Round #${round.id} `, badge(round.state)),
          h('a', { href: '#/rounds', class: 'small' }, 'close')),
        h('dl', { class: 'facts' },
          h('dt', {}, 'Strategy'), h('dd', {}, round.strategy),
          h('dt', {}, 'Quorum'), h('dd', {}, `${round.quorum} updates (at the deadline: at least ${round.min_updates})`),
          h('dt', {}, 'Deadline'), h('dd', {}, round.deadline_at ? [fmt.time(round.deadline_at), ' (', fmt.until(round.deadline_at), ')'] : '–'),
          h('dt', {}, 'Base version'), h('dd', {}, round.base_version_id ? `v${round.base_version_id}` : '–'),
          h('dt', {}, 'Opened'), h('dd', {}, fmt.time(round.created_at)),
          h('dt', {}, 'Closed'), h('dd', {}, fmt.time(round.closed_at)),
          round.failure_reason ? [h('dt', {}, 'Failure'), h('dd', { class: 'bad' }, round.failure_reason)] : null),
        h('h3', {}, 'Participants'),
        table([
          { title: 'Device', key: 'device', cell: (p) => p.device_id },
          { title: 'Status', key: 'status', cell: (p) => badge(p.status) },
          { title: 'Selected', key: 'selected', cell: (p) => when(p.selected_at) },
          { title: 'Task sent', key: 'notified', cell: (p) => when(p.notified_at) },
          { title: 'Finished', key: 'finished', cell: (p) => when(p.finished_at) },
        ], round.participations, { id: 'participants-table', rowAttrs: (p) => ({ dataset: { deviceId: p.device_id } }) }),
        h('h3', {}, 'Updates'),
        table([
          { title: 'Update', key: 'update', cell: (u) => h('code', {}, u.update_id) },
          { title: 'Device', key: 'device', cell: (u) => u.device_id },
          { title: 'Status', key: 'status', cell: (u) => badge(u.status) },
          { title: 'Samples', key: 'n', class: 'num', cell: (u) => u.n_samples },
          { title: 'Size', key: 'size', class: 'num', cell: (u) => fmt.bytes(u.blob_size) },
          { title: 'Reason', key: 'reason', cell: (u) => (u.rejection_code ? [badge(u.rejection_code, 'code'), ' ', u.rejection_reason] : '') },
          { title: 'Received', key: 'received', cell: (u) => when(u.received_at) },
        ], round.updates, { id: 'updates-table', empty: 'No updates received.' }),
        h('h3', {}, 'Metrics'),
        summary.length ? h('dl', { class: 'facts', id: 'round-metrics' }, summary.map(([k, v]) => [
          h('dt', {}, k), h('dd', { dataset: { metric: k } }, k.startsWith('bytes') ? fmt.bytes(v) : fmt.num(v))]))
          : h('p', { class: 'empty' }, 'Recorded when the round closes.'),
        h('details', {}, h('summary', {}, 'Configuration'), h('pre', {}, JSON.stringify(round.config, null, 2))));
    }

    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Rounds'),
        h('p', { class: 'muted' }, 'Open → collecting → aggregating → evaluating → closed (or failed).')),
      h('section', { class: 'panel' }, h('h2', {}, 'Actions'), startForm, scheduleBox),
      activeBox, detail,
      h('section', { class: 'panel' }, h('h2', {}, 'All rounds'), list));

    return {
      navigate(newArgs) { state.selected = newArgs[0] ? Number(newArgs[0]) : null; },
      async refresh() {
        const [rounds, schedule, found] = await Promise.all([
          api('/stats/rounds', { query: { limit: 100 } }), api('/rounds/schedule'), fetchDetail()]);
        state.rounds = rounds;
        fill(list, table(columns, [...rounds].reverse(), {
          id: 'rounds-table', empty: 'No rounds yet: start one above.',
          rowAttrs: (r) => ({ dataset: { roundId: r.id, state: r.state }, class: r.id === state.selected ? 'selected' : null }),
        }));
        renderActive();
        renderSchedule(schedule);
        renderDetail(found);
      },
    };
  },
};
