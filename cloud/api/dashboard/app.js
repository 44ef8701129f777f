// The dashboard's shell: login, hash routing (#/fleet, #/rounds/3, ...) and live polling.
//
// Live updates poll the API every few seconds while the tab is visible (``?poll=MS`` changes
// the period). Polling rather than server-sent events: EventSource cannot send the
// Authorization header, and the API stays plain REST.

import { api, auth } from './api.js';
import { fill, h } from './dom.js';
import ask from './pages/ask.js';
import charts from './pages/charts.js';
import fleet from './pages/fleet.js';
import models from './pages/models.js';
import rejections from './pages/rejections.js';
import rounds from './pages/rounds.js';

const PAGES = { fleet, rounds, charts, models, rejections, ask };
const POLL_MS = Math.max(250, Number(new URLSearchParams(location.search).get('poll')) || 3000);

const $ = (id) => document.getElementById(id);
const shell = {
  page: null, name: null, timer: null, refreshing: false, refreshes: 0, operator: null,
};

// Exposed for tests and the screenshot script: the live chart objects and the refresh count.
window.fednano = { charts: {}, pollMs: POLL_MS };

const ctx = {
  toast(message, kind = 'ok') {
    const el = h('div', { class: `toast toast-${kind}`, role: 'status' }, message);
    $('toasts').append(el);
    setTimeout(() => el.remove(), 6000);
  },
  error(err) {
    if (err && err.status === 401) return; // handled by the sign-out listener
    ctx.toast(err && err.message ? err.message : String(err), 'error');
  },
  refresh: () => tick(),
  go(hash) { if (location.hash === hash) route(); else location.hash = hash; },
};

function showLogin(message = '') {
  stopPolling();
  shell.page?.unmount?.();
  shell.page = null;
  shell.name = null;
  fill($('view'));
  $('app').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('token-input').value = '';
  document.body.dataset.state = 'login';
  $('token-input').focus();
}

function signOut(message = '') {
  auth.clear();
  showLogin(message);
}

async function enter() {
  const me = await api('/me');
  shell.operator = me.name;
  $('operator').textContent = me.name;
  $('login').hidden = true;
  $('app').hidden = false;
  document.body.dataset.state = 'app';
  route();
  startPolling();
}

async function onLogin(event) {
  event.preventDefault();
  const token = $('token-input').value.trim();
  if (!token) return;
  auth.set(token);
  $('login-button').disabled = true;
  try {
    await enter();
    $('token-input').value = '';
  } catch (err) {
    signOut(err.status === 401 ? 'That token was refused (unknown or revoked).' : err.message);
  } finally {
    $('login-button').disabled = false;
  }
}

function parseHash() {
  const [name, ...rest] = location.hash.replace(/^#\/?/, '').split('/');
  return { name: PAGES[name] ? name : 'fleet', args: rest.filter(Boolean) };
}

function route() {
  if (!auth.token) return;
  const { name, args } = parseHash();
  if (shell.page && shell.name === name && shell.page.navigate) {
    shell.page.navigate(args); // same page, new argument (e.g. another round): keep its state
  } else {
    shell.page?.unmount?.();
    const view = fill($('view'));
    shell.name = name;
    shell.page = PAGES[name].mount(view, ctx, args);
    document.title = `${PAGES[name].title} · FedNano`;
  }
  for (const link of document.querySelectorAll('#nav a')) {
    link.classList.toggle('active', link.dataset.page === name);
  }
  document.body.dataset.page = name;
  tick();
}

async function tick() {
  const page = shell.page;
  if (!page || !auth.token) return;
  if (shell.refreshing) { shell.again = true; return; }
  shell.refreshing = true;
  const name = shell.name;
  try {
    await page.refresh();
    if (page !== shell.page) return; // the operator moved on meanwhile: not this page's data
    shell.refreshes += 1;
    document.body.dataset.refreshes = String(shell.refreshes); // for tests: which page, how often
    document.body.dataset.refreshed = name;
    $('live').classList.remove('stale');
    $('live-text').textContent = `live · ${new Date().toLocaleTimeString()}`;
    $('banner').hidden = true;
  } catch (err) {
    if (err.status !== 401) {
      $('live').classList.add('stale');
      $('live-text').textContent = 'offline';
      $('banner').textContent = `Could not refresh: ${err.message}`;
      $('banner').hidden = false;
    }
  } finally {
    shell.refreshing = false;
    if (shell.again) { shell.again = false; tick(); }
  }
}

function startPolling() {
  stopPolling();
  shell.timer = setInterval(() => { if (!document.hidden) tick(); }, POLL_MS);
}

function stopPolling() {
  if (shell.timer) clearInterval(shell.timer);
  shell.timer = null;
}

window.addEventListener('fednano:unauthorized', (event) => {
  signOut(`Signed out: ${event.detail || 'the token was refused'}.`);
});
window.addEventListener('hashchange', route);
document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });
$('login-form').addEventListener('submit', onLogin);
$('sign-out').addEventListener('click', () => signOut());

if (auth.token) {
  enter().catch((err) => { if (err.status !== 401) signOut(err.message); });
} else {
  showLogin();
}
