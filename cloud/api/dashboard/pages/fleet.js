// Fleet: every device (online/offline, last seen, profile, contributions), add a device and
// download its config, revoke a device.

import { api, saveBlob } from '../api.js';
import { actionButton, badge, card, fill, fmt, h, table, TERMINAL, when } from '../dom.js';

// Suggestions (firmware_configs/ holds the real list: the API refuses a profile not in it).
const PROFILES = ['sim-cpu', 'jetson-orin-nano-8gb', 'jetson-orin-nx-16gb',
  'jetson-agx-orin-64gb', 'jetson-xavier-nx'];

function presence(device) {
  if (device.status === 'revoked') return badge('revoked');
  return device.online ? badge('online') : badge('offline');
}

function contributionCells(c) {
  const updates = c ? c.updates : {};
  return {
    accepted: updates.accepted || 0,
    rejected: updates.rejected || 0,
    samples: c ? c.samples : 0,
    rounds: c ? c.rounds : 0,
  };
}

export default {
  title: 'Fleet',
  mount(root, ctx) {
    const state = { devices: [], contributions: {}, filter: '', revoking: null };
    const cards = h('div', { class: 'cards', id: 'fleet-cards' });
    const list = h('div', { id: 'device-list' });
    const count = h('span', { class: 'muted', id: 'device-count' });
    const provisioned = h('div', { id: 'provisioned', class: 'provisioned', hidden: true });
    const revokePanel = h('div', { id: 'revoke-panel', class: 'panel warn', hidden: true });
    const filter = h('input', {
      type: 'search', placeholder: 'Filter by id or profile', id: 'device-filter',
      oninput: (e) => { state.filter = e.target.value.trim().toLowerCase(); render(); },
    });

    const idInput = h('input', {
      id: 'new-device-id', name: 'id', required: true, placeholder: 'orin-0042',
      pattern: '[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}', spellcheck: 'false',
    });
    const profileInput = h('input', {
      id: 'new-device-profile', name: 'profile', required: true, list: 'profiles',
      value: 'sim-cpu', spellcheck: 'false',
    });
    const credentialInput = h('select', { id: 'new-device-credential', name: 'credential' },
      h('option', { value: 'password' }, 'password'),
      h('option', { value: 'x509' }, 'X.509 certificate'));
    const addButton = h('button', { type: 'submit', id: 'add-device' }, 'Add device');
    const form = h('form', { class: 'inline-form', id: 'add-device-form' },
      h('label', {}, 'Device id', idInput),
      h('label', {}, 'Profile', profileInput),
      h('label', {}, 'Credential', credentialInput),
      h('datalist', { id: 'profiles' }, PROFILES.map((p) => h('option', { value: p }))),
      addButton);
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      addButton.disabled = true;
      try {
        const created = await api('/devices', {
          method: 'POST',
          body: {
            id: idInput.value.trim(), profile: profileInput.value.trim(),
            credential: credentialInput.value,
          },
        });
        showProvisioned(created);
        idInput.value = '';
        ctx.toast(`Device ${created.device_id} added.`);
        await ctx.refresh();
      } catch (err) { ctx.error(err); } finally { addButton.disabled = false; }
    });

    function fileButton(id, label, text, name) {
      return h('button', {
        type: 'button', id,
        onclick: () => saveBlob(new Blob([text], { type: 'text/plain' }), name),
      }, label);
    }

    function showProvisioned(created) {
      const id = created.device_id;
      const x509 = created.credential === 'x509';
      provisioned.hidden = false;
      provisioned.dataset.deviceId = id;
      const kit = x509
        ? [fileButton('download-key', 'Download device.key', created.private_key_pem,
          `${id}.key`),
        fileButton('download-certificate', 'Download device.crt', created.certificate_pem,
          `${id}.crt`)]
        : [fileButton('download-password', 'Download password file', `${created.secret}\n`,
          `${id}.password`)];
      if (created.ca_certificate_pem) {
        kit.push(fileButton('download-ca', 'Download ca.crt', created.ca_certificate_pem,
          `${id}-ca.crt`));
      }
      fill(provisioned,
        h('h3', {}, `Device ${id} is registered`),
        x509
          ? h('p', {}, 'Its private key and certificate (signed by the device CA, common name ',
            h('code', {}, id), ') are shown this once; the cloud keeps only the certificate\'s ',
            'fingerprint. Put them beside the config on the device as device.key (mode 0600) ',
            'and device.crt; the broker already accepts it.')
          : h('p', {}, 'Its MQTT secret is shown this once; the cloud keeps only a hash. ',
            'Put the config and the password file (mode 0600) on the device; the broker ',
            'already accepts it.'),
        x509
          ? h('div', { class: 'secret' }, h('span', { class: 'muted' }, 'certificate sha256'),
            h('code', { id: 'new-device-certificate' }, created.certificate_sha256))
          : h('div', { class: 'secret' }, h('span', { class: 'muted' }, 'secret'),
            h('code', { id: 'new-device-secret' }, created.secret)),
        h('div', { class: 'buttons' },
          actionButton('Download device.yaml', async () => {
            saveBlob(await api(`/devices/${encodeURIComponent(id)}/config`, { as: 'blob' }),
              `${id}.yaml`);
          }, ctx, { id: 'download-config' }),
          ...kit,
          h('button', {
            type: 'button', class: 'ghost',
            onclick: () => { provisioned.hidden = true; fill(provisioned); },
          }, x509 ? 'Done (forget the key)' : 'Done (forget the secret)')));
    }

    function askRevoke(device) {
      state.revoking = device.id;
      const reason = h('input', { id: 'revoke-reason', placeholder: 'reason (kept in the audit log)' });
      revokePanel.hidden = false;
      fill(revokePanel,
        h('p', {}, h('strong', {}, `Revoke ${device.id}?`),
          ' It keeps its history; the broker closes its connection and refuses it at once.'),
        h('div', { class: 'inline-form' }, reason,
          actionButton(`Revoke ${device.id}`, async () => {
            await api(`/devices/${encodeURIComponent(device.id)}/revoke`, {
              method: 'POST', body: { reason: reason.value.trim() || null },
            });
            closeRevoke();
            ctx.toast(`Device ${device.id} revoked.`);
            await ctx.refresh();
          }, ctx, { class: 'danger', id: 'confirm-revoke' }),
          h('button', { type: 'button', class: 'ghost', onclick: closeRevoke }, 'Cancel')));
      reason.focus();
    }

    function closeRevoke() {
      state.revoking = null;
      revokePanel.hidden = true;
      fill(revokePanel);
    }

    const columns = [
      { title: '', key: 'presence', cell: presence },
      { title: 'Device', key: 'id', cell: (d) => h('strong', {}, d.id) },
      { title: 'Profile', key: 'profile', cell: (d) => d.profile },
      { title: 'Last seen', key: 'last_seen', cell: (d) => when(d.last_seen_at) },
      { title: 'Accepted', key: 'accepted', class: 'num', cell: (d) => contributionCells(state.contributions[d.id]).accepted },
      { title: 'Rejected', key: 'rejected', class: 'num', cell: (d) => contributionCells(state.contributions[d.id]).rejected },
      { title: 'Samples', key: 'samples', class: 'num', cell: (d) => contributionCells(state.contributions[d.id]).samples },
      { title: 'Rounds', key: 'rounds', class: 'num', cell: (d) => contributionCells(state.contributions[d.id]).rounds },
      { title: 'Added', key: 'created', cell: (d) => when(d.created_at) },
      {
        title: '', key: 'actions', class: 'actions',
        cell: (d) => [
          actionButton('Config', async () => {
            saveBlob(await api(`/devices/${encodeURIComponent(d.id)}/config`, { as: 'blob' }),
              `${d.id}.yaml`);
          }, ctx, { class: 'small ghost', title: 'download device.yaml (no secret in it)' }),
          d.status === 'revoked' ? null : h('button', {
            type: 'button', class: 'small danger-ghost', dataset: { revoke: d.id },
            onclick: () => askRevoke(d),
          }, 'Revoke'),
        ],
      },
    ];

    function render() {
      const shown = state.devices.filter((d) => !state.filter
        || d.id.toLowerCase().includes(state.filter) || d.profile.includes(state.filter));
      count.textContent = `${shown.length} of ${state.total ?? state.devices.length}`;
      fill(list, table(columns, shown, {
        id: 'devices-table', empty: 'No devices yet: add one above.',
        rowAttrs: (d) => ({ dataset: { deviceId: d.id, status: d.status, online: String(d.online) } }),
      }));
    }

    function renderCards(rounds, versions) {
      const active = state.devices.filter((d) => d.status === 'active');
      const online = active.filter((d) => d.online);
      const latest = rounds.at(-1);
      const live = latest && !TERMINAL.has(latest.state) ? latest : null;
      const evaluated = rounds.filter((r) => r.metrics.accuracy !== undefined).at(-1);
      const version = versions.items[0];
      fill(cards,
        card('Devices', `${active.length}`, { id: 'card-devices', hint: `${state.devices.length - active.length} revoked` }),
        card('Online', `${online.length}`, { id: 'card-online', hint: `of ${active.length} active` }),
        card('Round', live ? `#${live.id} ${live.state}` : 'idle', {
          id: 'card-round',
          hint: live ? `${live.participation.submitted || 0} of ${Object.values(live.participation).reduce((a, b) => a + b, 0)} submitted, quorum ${live.quorum}`
            : latest ? `last: #${latest.id} ${latest.state}` : 'no rounds yet',
        }),
        card('Global version', version ? `v${version.id}` : '–', {
          id: 'card-version', hint: version ? `${versions.total} versions` : 'none yet',
        }),
        card('Accuracy', evaluated ? fmt.pct(evaluated.metrics.accuracy) : '–', {
          id: 'card-accuracy', hint: evaluated ? `round #${evaluated.id}` : 'not evaluated yet',
        }));
    }

    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Fleet'),
        h('p', { class: 'muted' }, 'Edge devices, their presence and what they contributed.')),
      cards,
      h('section', { class: 'panel' }, h('h2', {}, 'Add a device'), form, provisioned),
      revokePanel,
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h2', {}, 'Devices ', count), filter), list));

    return {
      async refresh() {
        const [devices, contributions, rounds, versions] = await Promise.all([
          api('/devices', { query: { limit: 1000 } }),
          api('/stats/devices'),
          api('/stats/rounds', { query: { limit: 20 } }),
          api('/models', { query: { limit: 1 } }),
        ]);
        state.devices = devices.items;
        state.total = devices.total;
        state.contributions = Object.fromEntries(contributions.map((c) => [c.device_id, c]));
        renderCards(rounds, versions);
        render();
      },
    };
  },
};
