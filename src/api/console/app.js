// drvault operator console: one ES2020 module, no dependencies, no build step.
//
// The page is a thin client of the `/v1/` API (docs/api.md): every figure and every rule (health,
// RPO, resync threshold, which failover is allowed) comes from the server; this file formats,
// sorts and plots. Text always goes into the DOM as text nodes (never as HTML), and charts are
// SVG elements built with DOM calls, so the strict Content-Security-Policy holds.

const TOKEN_KEY = 'drvault.operatorToken';
const SVG_NS = 'http://www.w3.org/2000/svg';
const ACTIVE_JOB = new Set(['queued', 'running', 'waiting_for_input']);
const HEALTH_RANK = { Normal: 0, Warning: 1, Critical: 2 };

const $ = (sel) => document.querySelector(sel);

// ---------- DOM helpers ----------

/** Element with attributes (`class`, `on<event>`, others as attributes) and children. */
function el(tag, attrs = {}, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

function sv(tag, attrs = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

function fill(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'class') node.setAttribute('class', v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** Replaces a container's children, keeping keyboard focus on the same logical control. */
function replace(container, ...children) {
  const key = document.activeElement?.dataset?.focus;
  container.replaceChildren(...children.flat(Infinity).filter((c) => c));
  if (key) container.querySelector(`[data-focus="${CSS.escape(key)}"]`)?.focus();
}

// ---------- formatting ----------

function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

function fmtDuration(s) {
  if (s === null || s === undefined) return '–';
  s = Math.max(0, Math.round(s));
  // Two units at most, the smaller left out when zero: "5 min", "1 h 30 min", "1 d".
  const two = (big, bigUnit, small, smallUnit) => (small ? `${big} ${bigUnit} ${small} ${smallUnit}` : `${big} ${bigUnit}`);
  if (s < 60) return `${s} s`;
  if (s < 3600) return two(Math.floor(s / 60), 'min', s % 60, 's');
  if (s < 86400) return two(Math.floor(s / 3600), 'h', Math.floor((s % 3600) / 60), 'min');
  return two(Math.floor(s / 86400), 'd', Math.floor((s % 86400) / 3600), 'h');
}

const pad = (n) => String(n).padStart(2, '0');

/** Local time as YYYY-MM-DD HH:MM:SS (locale-independent, sortable). */
function fmtTime(t) {
  if (t === null || t === undefined) return '–';
  const d = typeof t === 'number' ? new Date(t * 1000) : new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function ago(iso) {
  if (!iso) return 'never';
  return `${fmtDuration((Date.now() - Date.parse(iso)) / 1000)} ago`;
}

const pct = (x) => `${(x * 100).toFixed(x < 0.1 ? 1 : 0)}%`;
const stateText = (s) => s.replace(/_/g, ' ');

// ---------- API ----------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let token = sessionStorage.getItem(TOKEN_KEY);

/** Calls the API with the token. A 401 on a logged-in session (token revoked meanwhile) logs
 *  out; `login` asks for the 401 itself to say why. */
async function api(path, { method = 'GET', body, logoutOn401 = true } = {}) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  if (!resp.ok) {
    let code = 'http_' + resp.status;
    let message = resp.statusText;
    try {
      const e = await resp.json();
      code = e.code ?? code;
      message = e.message ?? message;
    } catch { /* not a JSON error body */ }
    if (resp.status === 401 && logoutOn401) logout('token refused: ' + message);
    throw new ApiError(resp.status, code, message);
  }
  return resp.status === 204 ? null : resp.json();
}

// ---------- roles and what each action needs ----------

const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };

/** The role each console action needs (the server's role matrix: operators run failovers of
 *  every kind, commit, cleanup, resync, failback, plans, resume and verify). The server still
 *  decides; this only says so before the dialog instead of after it. */
export const ACTION_ROLE = {
  test: 'operator', cleanup: 'operator', planned: 'operator', unplanned: 'operator',
  commit: 'operator', resync: 'operator', failback_commit: 'operator', plan_run: 'operator',
  job_resume: 'operator', verify: 'operator',
};

/** Who this session is (`GET /v1/whoami`). A server without that route predates accounts:
 *  its one operator token can do everything, as the admin account can. */
let whoami = { account: 'admin', role: 'admin', expires_at: null };

async function loadWhoami() {
  try {
    whoami = await api('/v1/whoami', { logoutOn401: false });
  } catch (e) {
    if (e.status !== 404) throw e;
    whoami = { account: 'admin', role: 'admin', expires_at: null };
  }
  $('#whoami').textContent = `${whoami.account} (${whoami.role})` +
    (whoami.expires_at ? `, token expires ${fmtTime(whoami.expires_at)}` : '');
}

/** Why `role` may not run `action`, or null when it may. */
export function roleBlock(action, role) {
  const need = ACTION_ROLE[action] ?? 'admin';
  if ((ROLE_RANK[role] ?? -1) >= ROLE_RANK[need]) return null;
  return `needs the ${need} role; this session is ${role}`;
}

/** Why a VM action cannot run in the VM's current state, or null. `vm` is `GET /v1/vms/{vm}`,
 *  `fo` the failover record (`GET /v1/vms/{vm}/failover`'s record, or null), `points` the
 *  complete recovery points. Mirrors the server's refusals (failover_running,
 *  drill_not_cleaned_up, failover_not_committed, not_a_drill, failover_not_succeeded, …). */
export function stateBlock(kind, { vm, fo = null, points = [] }) {
  if (vm.state === 'disabled') return 'protection of this VM is disabled';
  const isFailover = kind === 'test' || kind === 'planned' || kind === 'unplanned';
  if (isFailover || kind === 'resync') {
    if (vm.state === 'failed_over') {
      return kind === 'resync' ? 'the VM is failed over: fail it back instead of resynchronizing' : 'the VM is failed over: fail it back first';
    }
    if (vm.state === 'initial_replication') return 'initial replication is not finished';
  }
  if (isFailover) {
    if (kind !== 'planned' && !points.length) return 'no recovery point yet';
    if (fo?.state === 'running') return `a ${fo.kind} failover is running (job ${fo.job})`;
    if (fo?.state === 'succeeded' && fo.kind === 'test') return 'the test failover is still up: clean it up first';
    if (fo?.state === 'succeeded') return `the ${fo.kind} failover waits for commit`;
  }
  if (kind === 'cleanup') {
    if (!fo) return 'no test failover to clean up';
    if (fo.kind !== 'test') return `only a test failover is cleaned up; commit the ${fo.kind} failover`;
    if (fo.state === 'running') return 'the test failover is still running';
    if (fo.state === 'cleaned_up') return 'the test failover is already cleaned up';
  }
  if (kind === 'commit') {
    if (!fo) return 'only after a planned or unplanned failover; this VM has none';
    if (fo.kind === 'test') return 'only after a planned or unplanned failover; a test failover is cleaned up, not committed';
    if (fo.state === 'committed') return 'the failover is already committed';
    if (fo.state !== 'succeeded') return `the ${fo.kind} failover is ${stateText(fo.state)}, not succeeded`;
  }
  return null;
}

/** Why failback cannot be committed, or null: only after a committed planned or unplanned
 *  failover, and once the agent synchronized every disk back (`drvault agent failback`). */
export function failbackBlock({ vm, fo = null, failback = null }) {
  if (failback?.committed_unix && vm.state !== 'failed_over') return `failed back ${fmtTime(failback.committed_unix)}`;
  if (vm.state !== 'failed_over' || !fo || fo.kind === 'test') return 'only after a committed planned or unplanned failover';
  const synced = failback && failback.failover === fo.id ? failback.synced : {};
  const missing = vm.disks.map((d) => d.id).filter((d) => !synced[d]);
  if (missing.length === vm.disks.length) return 'no disk synchronized yet: run drvault agent failback on the host';
  if (missing.length) return `disk ${missing.join(', ')} not synchronized yet: run drvault agent failback for it`;
  return null;
}

/** Role first (it holds whatever the state), then the state. */
export function actionBlock(kind, ctx) {
  return roleBlock(kind, ctx.role ?? whoami.role) ?? stateBlock(kind, ctx);
}

/** A button that, when the action is not allowed, is disabled and says why both in its
 *  tooltip and in visible text next to it (a disabled button gets no keyboard focus, so a
 *  tooltip alone would hide the reason from keyboard and screen-reader users). */
function actionButton(label, reason, attrs) {
  const whyId = reason ? `why-${attrs['data-action']}${attrs['data-key'] ? `-${attrs['data-key']}` : ''}` : null;
  return el('span', { class: 'action' },
    el('button', { type: 'button', ...attrs, disabled: !!reason, title: reason, 'aria-describedby': whyId }, label),
    reason ? el('span', { class: 'why', id: whyId, 'data-why': attrs['data-action'] }, reason) : null);
}

// ---------- a generic confirmation ----------

/** Asks before an action with the shared dialog (no point to choose); `run` performs it and
 *  may throw an ApiError, which the dialog shows. */
function ask({ title, text, okLabel, run }) {
  $('#confirm-title').textContent = title;
  $('#confirm-text').textContent = text;
  $('#confirm-error').textContent = '';
  $('#confirm-point-row').hidden = true;
  const ok = $('#confirm-ok');
  ok.textContent = okLabel;
  ok.disabled = false;
  ok.onclick = async () => {
    ok.disabled = true;
    try {
      await run();
      dialog.close();
    } catch (e) {
      ok.disabled = false;
      $('#confirm-error').textContent = `Refused: ${e.message} [${e.code}]`;
    }
  };
  $('#confirm-cancel').onclick = () => dialog.close();
  dialog.showModal();
  $('#confirm-cancel').focus();
}

// ---------- login ----------

async function login(candidate) {
  token = candidate;
  try {
    const info = await api('/v1/server', { logoutOn401: false });
    await loadWhoami();
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $('#server-info').textContent = `server ${info.version}`;
    return null;
  } catch (e) {
    token = null;
    if (e.status === 401) return 'token refused (401): ' + e.message;
    if (e.status === 403) return 'token refused (403): a host or provider token; sign in with an account token';
    return 'cannot reach the server: ' + e.message;
  }
}

function logout(reason = '') {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $('#login-error').textContent = reason;
  $('#server-info').textContent = '';
  $('#whoami').textContent = '';
  if (location.hash !== '#/login') location.hash = '#/login';
  else route();
}

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const input = $('#token');
  const err = await login(input.value.trim());
  $('#login-error').textContent = err ?? '';
  if (!err) {
    input.value = '';
    // A deep link opened before logging in is honoured.
    if (!location.hash || location.hash === '#/login') location.hash = '#/vms';
    else route();
  }
});
$('#logout').addEventListener('click', () => logout());

// ---------- routing and polling ----------

let timer = null;
let pollGeneration = 0;

/** Runs `fn` now and again after each `delay()` ms until the view changes. */
function poll(fn, delay) {
  clearTimeout(timer);
  // A generation number, not the timer id, tells a tick whether its view is still the one shown:
  // the id changes with every reschedule, and a tick still awaiting fn() must not revive a view
  // the operator has left.
  const mine = ++pollGeneration;
  const tick = async () => {
    try { await fn(); } catch (e) { if (!(e instanceof ApiError && e.status === 401)) console.error(e); }
    if (pollGeneration === mine) timer = setTimeout(tick, delay());
  };
  tick();
}

function show(view) {
  for (const s of document.querySelectorAll('.view')) s.hidden = s.id !== `${view}-view`;
  const loggedIn = !!token;
  $('#nav').hidden = !loggedIn;
  $('#logout').hidden = !loggedIn;
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.view === view || (view === 'vm' && a.dataset.view === 'vms')) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function route() {
  clearTimeout(timer);
  timer = null;
  pollGeneration++;
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (!token) {
    show('login');
    $('#token').focus();
    return;
  }
  switch (parts[0]) {
    case 'vms':
      if (parts[1]) return vmPage(parts[1]);
      break;
    case 'jobs':
      return jobsView(parts[1] ?? null);
    case 'throughput':
      return throughputView();
    case 'hosts':
      return hostsView();
    case 'plans':
      return plansView();
    case 'verify':
      return verifyView(parts[1] ?? null);
    case 'failback':
      return failbackView();
    case 'audit':
      return auditView();
    case 'login':
      if (token) { location.hash = '#/vms'; return; }
      break;
  }
  return vmsView();
}

window.addEventListener('hashchange', route);

// ---------- VMs view ----------

const vmsState = { sort: 'name', dir: 1, filter: '' };

/** Bytes of a disk's change logs the host's agent holds and has not sent (0 without heartbeats). */
function backlogOf(vm, disk) {
  return vm.agent?.disks?.find((x) => x.disk === disk.id)?.backlog_bytes ?? 0;
}

/** The per-VM figures the table shows and sorts by (worst disk for backlog, newest log). */
function vmFigures(vm) {
  let pending = null;
  let lastLog = null;
  for (const d of vm.disks) {
    const backlog = backlogOf(vm, d);
    const ratio = d.resync_threshold_bytes ? backlog / d.resync_threshold_bytes : 0;
    if (!pending || ratio > pending.ratio) pending = { ratio, disk: d, backlog };
    if (d.last_log && (!lastLog || d.last_log > lastLog)) lastLog = d.last_log;
  }
  const resync = vm.disks.filter((d) => d.resync_required);
  return { pending, lastLog, resync };
}

function vmStateCell(vm, resync) {
  const parts = [];
  if (vm.state === 'initial_replication') {
    parts.push(`Initial replication ${pct(vm.progress)} `,
      el('progress', { max: 1, value: vm.progress, 'aria-label': `initial replication of ${vm.name}` }));
  } else if (vm.state === 'failed_over') {
    parts.push('Failed over');
  } else {
    parts.push('Protected');
  }
  if (vm.resync) {
    const r = vm.resync;
    const what = r.state === 'scheduled'
      ? `Resync scheduled${r.not_before ? ` for ${r.not_before}` : ''}`
      : `Resync running (${r.disks_done.length} of ${r.disks.length} disks done)`;
    parts.push(el('div', { class: 'health-Warning' }, what));
  } else if (resync.length) {
    parts.push(el('div', { class: 'health-Critical' },
      `Resync required (${resync.map((d) => d.id).join(', ')})`));
  }
  return parts;
}

const sorters = {
  name: (v) => v.name,
  health: (v) => HEALTH_RANK[v.health] ?? 3,
  state: (v) => v.state,
  rpo: (v) => v.rpo_seconds ?? Infinity,
  pending: (v) => vmFigures(v).pending?.ratio ?? 0,
  contact: (v) => v.agent ? v.agent.last_contact_age_s : Infinity,
  last_log: (v) => vmFigures(v).lastLog ?? '',
};

function vmsView() {
  show('vms');
  const table = $('#vms-table');
  const filter = $('#health-filter');
  filter.value = vmsState.filter;
  let vms = [];
  const render = () => {
    for (const th of table.querySelectorAll('th[data-sort]')) {
      if (th.dataset.sort === vmsState.sort) th.setAttribute('aria-sort', vmsState.dir > 0 ? 'ascending' : 'descending');
      else th.removeAttribute('aria-sort');
    }
    const key = sorters[vmsState.sort];
    const rows = vms
      .filter((v) => !vmsState.filter || v.health === vmsState.filter)
      .sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * vmsState.dir || a.name.localeCompare(b.name));
    $('#vms-status').textContent = `${rows.length} of ${vms.length} VMs` +
      (vmsState.filter ? ` (health ${vmsState.filter})` : '') + ` · updated ${fmtTime(Date.now() / 1000)}`;
    replace(table.tBodies[0], rows.map((vm) => {
      const f = vmFigures(vm);
      const p = f.pending?.disk;
      return el('tr', { 'data-vm': vm.name },
        el('th', { scope: 'row' }, el('a', { href: `#/vms/${encodeURIComponent(vm.name)}`, 'data-focus': `vm:${vm.name}` }, vm.name)),
        el('td', {},
          el('span', { class: `badge health-${vm.health}` }, vm.health),
          vm.health_reasons.length ? el('ul', { class: 'reasons' }, vm.health_reasons.map((r) => el('li', {}, r))) : null),
        el('td', {}, vmStateCell(vm, f.resync)),
        el('td', { class: 'num' }, `${fmtDuration(vm.rpo_seconds)} / ${fmtDuration(vm.policy.interval_s)}`),
        el('td', { class: 'num' }, p && vm.agent
          ? [`${fmtBytes(f.pending.backlog)} / ${fmtBytes(p.resync_threshold_bytes)} `,
            el('meter', { min: 0, max: p.resync_threshold_bytes || 1, value: f.pending.backlog, 'aria-label': `host backlog of disk ${p.id} against its resync threshold` }),
            ` ${pct(f.pending.ratio)}`]
          : '–'),
        el('td', { class: 'num', title: f.lastLog ? fmtTime(f.lastLog) : '' }, f.lastLog ? ago(f.lastLog) : 'never'),
        el('td', { class: 'num', title: vm.agent ? fmtTime(vm.agent.last_contact) : 'no heartbeat from this host (driven by hand)' },
          vm.agent ? `${fmtDuration(vm.agent.last_contact_age_s)} ago` : '–'));
    }));
  };
  table.tHead.onclick = (ev) => {
    const th = ev.target.closest('th[data-sort]');
    if (!th) return;
    vmsState.dir = vmsState.sort === th.dataset.sort ? -vmsState.dir : 1;
    vmsState.sort = th.dataset.sort;
    render();
  };
  filter.onchange = () => { vmsState.filter = filter.value; render(); };
  poll(async () => { vms = await api('/v1/vms'); render(); }, () => 5000);
}

// ---------- VM page ----------

function factList(pairs) {
  return el('dl', { class: 'facts' }, pairs.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
}

function table(headers, rows, caption) {
  // A table wider than a phone scrolls inside its box; the box takes keyboard focus so that
  // it can be scrolled without a mouse even when no cell holds a link or button.
  return el('div', { class: 'table-wrap', role: 'region', tabindex: 0, 'aria-label': caption ?? headers.join(', ') }, el('table', {},
    caption ? el('caption', { class: 'sr-only' }, caption) : null,
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, rows)));
}

/** Recovery points over the retention window: crash-consistent circles on one lane,
 *  app-consistent diamonds on another, the retention window shaded. */
function timeline(vm, points, width) {
  const w = Math.max(300, Math.floor(width));
  const h = 130;
  const left = 90;
  const right = w - 16;
  const now = Math.max(Date.now() / 1000, ...points.map((p) => p.time_unix));
  const windowStart = now - vm.policy.retention_s;
  const start = Math.min(windowStart, ...points.map((p) => p.time_unix));
  const span = Math.max(1, now - start);
  const x = (t) => left + ((t - start) / span) * (right - left);
  const lanes = { crash_consistent: 40, app_consistent: 80 };
  const apps = points.filter((p) => p.kind === 'app_consistent').length;
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => start + f * span);
  const label = span > 86400 ? (t) => fmtTime(t).slice(5, 16) : (t) => fmtTime(t).slice(11, 16);
  return sv('svg', { width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: 'img', 'aria-labelledby': 'tl-title tl-desc', class: 'timeline-svg' },
    sv('title', { id: 'tl-title' }, `Recovery points of ${vm.name}`),
    sv('desc', { id: 'tl-desc' }, points.length
      ? `${points.length} points from ${fmtTime(points[0].time_unix)} to ${fmtTime(points[points.length - 1].time_unix)}; ${apps} app-consistent. Retention window ${fmtDuration(vm.policy.retention_s)}.`
      : 'No recovery points yet.'),
    sv('rect', { class: 'window', x: x(windowStart), y: 18, width: Math.max(0, right - x(windowStart)), height: 84 }),
    ticks.map((t) => [
      sv('line', { class: 'grid', x1: x(t), x2: x(t), y1: 18, y2: 102 }),
      sv('text', { class: 'tick-label', x: x(t), y: 120, 'text-anchor': t === start ? 'start' : t === now ? 'end' : 'middle' }, label(t)),
    ]),
    sv('line', { class: 'axis', x1: left, x2: right, y1: 102, y2: 102 }),
    sv('text', { class: 'lane-label', x: 4, y: lanes.crash_consistent + 4 }, 'crash-consistent'),
    sv('text', { class: 'lane-label', x: 4, y: lanes.app_consistent + 4 }, 'app-consistent'),
    points.map((p) => {
      const cx = x(p.time_unix);
      const cy = lanes[p.kind] ?? lanes.crash_consistent;
      const tip = sv('title', {}, `${p.id} · ${fmtTime(p.time_unix)} · ${stateText(p.kind)}${p.final_point ? ' · final' : ''}`);
      return p.kind === 'app_consistent'
        ? sv('path', { class: 'point-app', 'data-point': p.id, d: `M${cx} ${cy - 7}L${cx + 7} ${cy}L${cx} ${cy + 7}L${cx - 7} ${cy}Z` }, tip)
        : sv('circle', { class: 'point-crash', 'data-point': p.id, cx, cy, r: 5.5 }, tip);
    }));
}

const pointLabel = (p) => `${p.id} (${fmtTime(p.time_unix)}, ${stateText(p.kind)})`;

async function vmPage(name) {
  show('vm');
  $('#vm-title').textContent = `VM ${name}`;
  const body = $('#vm-body');
  let message = '';
  const load = async () => {
    const [vm, points, nics, failover] = await Promise.all([
      api(`/v1/vms/${encodeURIComponent(name)}`),
      // Incomplete cycles (waiting_for set) are not recovery points yet.
      api(`/v1/vms/${encodeURIComponent(name)}/points`).then((ps) => ps.filter((p) => !p.waiting_for)).catch(() => []),
      api(`/v1/vms/${encodeURIComponent(name)}/nics`).catch(() => []),
      api(`/v1/vms/${encodeURIComponent(name)}/failover`).catch((e) => {
        if (e.code === 'failover_not_found') return null;
        throw e;
      }),
    ]);
    const latest = points[points.length - 1];
    const fo = failover?.record ?? null;
    const pointsOpen = body.querySelector('details')?.open ?? false;
    const say = (m) => { message = m; $('#vm-message').textContent = m; };
    const actions = [
      ['test', 'Test failover'], ['cleanup', 'Clean up test failover'], ['planned', 'Planned failover'],
      ['unplanned', 'Unplanned failover'], ['commit', 'Commit failover'], ['resync', 'Resync'],
    ];
    replace(body,
      factList([
        ['Health', [el('span', { class: `badge health-${vm.health}` }, vm.health),
          vm.health_reasons.length ? el('ul', { class: 'reasons' }, vm.health_reasons.map((r) => el('li', {}, r))) : null]],
        ['State', vmStateCell(vm, vm.disks.filter((d) => d.resync_required))],
        ['RPO', `${fmtDuration(vm.rpo_seconds)} (replication interval ${fmtDuration(vm.policy.interval_s)})`],
        ['Latest point', latest ? pointLabel(latest) : 'none'],
        ['Policy', `retention ${fmtDuration(vm.policy.retention_s)}, app-consistent every ${fmtDuration(vm.policy.app_consistent_every_s)}`],
        ['Host', vm.owner],
        ['Agent', vm.agent
          ? `${vm.agent.agent_version}, last contact ${fmtDuration(vm.agent.last_contact_age_s)} ago (reports every ${fmtDuration(vm.agent.interval_s)}), ` +
            `${vm.agent.replicating ? 'replicating' : 'not replicating'}, backlog ${fmtBytes(vm.agent.backlog_bytes)} in ${vm.agent.pending_logs} log(s)`
          : 'no heartbeat (driven by hand)'],
        vm.agent?.last_error ? ['Last agent error', `${vm.agent.last_error.code} (${vm.agent.last_error.recoverable ? 'recoverable, retried' : 'not recoverable'}): ${vm.agent.last_error.message}`] : null,
        ['Hardware', `generation ${vm.generation}, ${vm.cpus} CPU, ${vm.memory_mib} MiB`],
        ['Protected since', fmtTime(vm.protected)],
      ].filter(Boolean)),
      el('h3', {}, 'Actions'),
      el('div', { class: 'actions' }, actions.map(([kind, label]) => actionButton(label, actionBlock(kind, { vm, fo, points }), {
        'data-action': kind, 'data-focus': `action:${kind}`,
        onclick: () => confirmAction(kind, vm, points, fo, say, load),
      }))),
      el('p', { id: 'vm-message', role: 'status' }, message),
      el('h3', {}, 'Current failover'),
      fo ? el('div', { class: 'panel', id: 'failover-panel' }, factList([
        ['Kind', fo.kind], ['State', el('span', { class: 'badge' }, stateText(fo.state))],
        ['Point', fo.point ?? '–'],
        ['Job', el('a', { href: `#/jobs/${fo.job}` }, fo.job)],
        ['Output', el('code', {}, fo.output_dir)],
        ['Started', fmtTime(fo.created_unix)], ['Ended', fmtTime(fo.ended_unix)],
        fo.drill_successful !== null && fo.drill_successful !== undefined ? ['Drill successful', fo.drill_successful ? 'yes' : 'no'] : null,
        fo.error ? ['Error', fo.error] : null,
      ].filter(Boolean))) : el('p', { class: 'muted' }, 'No failover yet.'),
      el('h3', {}, 'Disks'),
      table(['Disk', 'Size', 'State', 'Blocks received', 'Data', 'Stored (sealed)', 'Deduplicated', 'Logs kept', 'Host backlog / threshold', 'Logs', 'Last log', 'Resync'],
        vm.disks.map((d) => el('tr', {},
          el('th', { scope: 'row' }, d.id),
          el('td', { class: 'num' }, fmtBytes(d.size)),
          el('td', {}, stateText(d.state)),
          el('td', { class: 'num' }, `${d.blocks_received} / ${d.blocks}`),
          el('td', { class: 'num' }, fmtBytes(d.data_bytes)),
          el('td', { class: 'num' }, fmtBytes(d.stored_bytes)),
          el('td', { class: 'num' }, fmtBytes(d.deduplicated_bytes)),
          el('td', { class: 'num' }, fmtBytes(d.pending_log_bytes)),
          el('td', { class: 'num' }, vm.agent ? `${fmtBytes(backlogOf(vm, d))} / ${fmtBytes(d.resync_threshold_bytes)}` : '–'),
          el('td', { class: 'num' }, d.journal_length),
          el('td', { class: 'num', title: fmtTime(d.last_log) }, d.last_log ? ago(d.last_log) : 'never'),
          el('td', { class: d.resync_required ? 'health-Critical' : '' }, d.resync_required ?? 'no'))),
        'Disks of the VM'),
      el('h3', {}, `Recovery points (${points.length})`),
      el('div', { class: 'legend', 'aria-hidden': 'true' },
        el('span', {}, '○ crash-consistent'), el('span', {}, '◆ app-consistent'), el('span', {}, 'shaded: retention window')),
      el('div', { class: 'timeline', id: 'timeline' }, timeline(vm, points, body.clientWidth || 800)),
      el('details', { open: pointsOpen }, el('summary', {}, 'Points as a table'),
        table(['Point', 'Time', 'Kind', 'Final', 'Disks'], points.slice().reverse().map((p) => el('tr', {},
          el('th', { scope: 'row' }, p.id), el('td', {}, fmtTime(p.time_unix)), el('td', {}, stateText(p.kind)),
          el('td', {}, p.final_point ? 'yes' : ''), el('td', {}, p.disks.join(', ')))))),
      el('h3', {}, 'Network adapters'),
      table(['NIC', 'Source network', 'MAC', 'Source IP', 'Failover target', 'Test failover target', 'Options'],
        nics.map((n) => el('tr', { 'data-nic': n.index },
          el('th', { scope: 'row' }, n.index),
          el('td', {}, n.network), el('td', {}, el('code', {}, n.mac)), el('td', {}, n.ip ?? '–'),
          el('td', {}, n.skip ? 'not created' : n.failover_target ? `${n.failover_target}${n.failover_target_from === 'override' ? ' (override)' : ''}` : 'unmapped'),
          el('td', {}, n.skip ? 'not created' : n.test_target ?? 'unmapped'),
          el('td', {}, [n.static_ip ? `static ${n.static_ip}` : null, n.public_ip ? 'public address' : null].filter(Boolean).join(', ') || '–'))),
        'Network adapters and where each lands on failover'));
  };
  poll(load, () => 5000);
}

// ---------- confirmation dialog ----------

const dialog = $('#confirm');

/** Asks before an action, naming the point it will use; runs it and reports the outcome. */
function confirmAction(kind, vm, points, fo, say, reload) {
  const latest = points[points.length - 1];
  const select = $('#confirm-point');
  const withPoint = kind === 'test' || kind === 'unplanned';
  select.replaceChildren(...points.slice().reverse().map((p) => el('option', { value: p.id }, pointLabel(p))));
  $('#confirm-point-row').hidden = !withPoint;
  const chosen = () => points.find((p) => p.id === select.value) ?? latest;
  const foText = fo ? `the ${fo.kind} failover at point ${fo.point ?? '?'} (started ${fmtTime(fo.created_unix)}, ${stateText(fo.state)})` : 'no failover (the server will refuse)';
  const text = {
    test: () => `Start a test failover of ${vm.name} at recovery point ${chosen() ? pointLabel(chosen()) : 'none'} on the isolated test network. The VM keeps replicating; clean the drill up afterwards.`,
    unplanned: () => `Fail ${vm.name} over to recovery point ${chosen() ? pointLabel(chosen()) : 'none'}. Changes after that point are lost unless the source comes back.`,
    planned: () => `Planned failover of ${vm.name}: waits for every disk's final log and fails over to that final point (no data loss). Latest point now: ${latest ? pointLabel(latest) : 'none'}.`,
    cleanup: () => `Clean up ${foText}: removes its disks and releases its addresses.`,
    commit: () => `Commit ${foText}. The source's later logs will be refused.`,
    resync: () => `Resynchronize ${vm.name}: compare per-block checksums with the source and resend only differing blocks. The latest point stays ${latest ? pointLabel(latest) : 'none'} until it finishes.`,
  }[kind];
  const titles = { test: 'Test failover', unplanned: 'Unplanned failover', planned: 'Planned failover', cleanup: 'Clean up test failover', commit: 'Commit failover', resync: 'Resynchronize' };
  $('#confirm-title').textContent = `${titles[kind]}: ${vm.name}`;
  $('#confirm-text').textContent = text();
  $('#confirm-error').textContent = '';
  const ok = $('#confirm-ok');
  ok.textContent = titles[kind];
  ok.disabled = false;
  select.onchange = () => { $('#confirm-text').textContent = text(); };
  const base = `/v1/vms/${encodeURIComponent(vm.name)}`;
  ok.onclick = async () => {
    ok.disabled = true;
    try {
      let jobId = null;
      if (kind === 'test' || kind === 'unplanned' || kind === 'planned') {
        const req = { kind };
        if (withPoint && chosen()) req.point = chosen().id;
        jobId = (await api(`${base}/failover`, { method: 'POST', body: req })).job;
      } else if (kind === 'cleanup' || kind === 'commit') {
        const r = await api(`${base}/failover/${kind}`, { method: 'POST' });
        say(`${titles[kind]} done: failover ${stateText(r.state)}${r.drill_successful === true ? ', drill successful' : ''}.`);
      } else {
        const r = await api(`${base}/resync`, { method: 'POST', body: {} });
        jobId = r?.job ?? null;
      }
      dialog.close();
      if (jobId) location.hash = `#/jobs/${jobId}`;
      else reload().catch(() => {});
    } catch (e) {
      ok.disabled = false;
      $('#confirm-error').textContent = e.code === 'no_such_route'
        ? 'This server has no resync route yet.'
        : `Refused: ${e.message} [${e.code}]`;
    }
  };
  $('#confirm-cancel').onclick = () => dialog.close();
  dialog.showModal();
  (withPoint ? select : $('#confirm-cancel')).focus();
}

// ---------- Jobs view ----------

const jobsState = { open: new Set() };

function jobsView(openId) {
  show('jobs');
  if (openId) jobsState.open.add(openId);
  const tbody = $('#jobs-table').tBodies[0];
  let anyActive = false;
  const toggle = (id) => {
    if (jobsState.open.has(id)) jobsState.open.delete(id); else jobsState.open.add(id);
  };
  const load = async () => {
    const jobs = (await api('/v1/jobs')).sort((a, b) => b.created_unix - a.created_unix || a.id.localeCompare(b.id));
    anyActive = jobs.some((j) => ACTIVE_JOB.has(j.state));
    const now = Date.now() / 1000;
    $('#jobs-status').textContent = `${jobs.length} jobs · ` +
      (anyActive ? 'refreshing every 2 s while jobs run' : 'refreshing every 10 s') + ` · updated ${fmtTime(now)}`;
    const render = () => replace(tbody, jobs.map((j) => {
      const started = j.started_unix ?? j.created_unix;
      const open = jobsState.open.has(j.id);
      const row = el('tr', { class: 'job-row', 'data-job-id': j.id, 'data-state': j.state, onclick: (ev) => {
        if (ev.target.closest('button, a')) return;
        toggle(j.id); render();
      } },
        el('th', { scope: 'row' }, el('button', {
          type: 'button', 'aria-expanded': open ? 'true' : 'false', 'data-focus': `job:${j.id}`,
          title: j.id, onclick: () => { toggle(j.id); render(); },
        }, j.title), el('div', { class: 'muted' }, stateText(j.kind))),
        el('td', {}, j.vm ? el('a', { href: `#/vms/${encodeURIComponent(j.vm)}` }, j.vm) : '–'),
        el('td', {}, el('span', { class: `badge state-${j.state}` }, stateText(j.state))),
        el('td', { class: 'num' }, el('progress', { max: 1, value: j.progress, 'aria-label': `progress of job ${j.title}` }), ` ${pct(j.progress)}`,
          (j.disks ?? []).map((d) => el('div', { class: 'muted disk-progress', 'data-disk': d.disk }, diskProgressText(d)))),
        el('td', { class: 'num' }, fmtTime(started)),
        el('td', { class: 'num' }, fmtDuration((j.ended_unix ?? now) - started)),
        el('td', { class: j.error ? 'health-Critical' : '' }, j.error ? `${j.error.message} [${j.error.code}]${j.error.recoverable ? ' (recoverable)' : ''}` : ''));
      if (!open) return row;
      return [row, el('tr', { class: 'steps', 'data-steps-of': j.id }, el('td', { colspan: 7 },
        el('ol', {}, j.steps.map((s) => el('li', {}, `${s.name} `, el('span', { class: `badge state-${s.state}` }, stateText(s.state))))),
        el('div', { class: 'muted' }, `job ${j.id}, created ${fmtTime(j.created_unix)}`)))];
    }));
    render();
  };
  poll(load, () => (anyActive ? 2000 : 10000));
}

/** One disk of a job: bytes written of the total, rate, done. */
function diskProgressText(d) {
  const share = d.bytes_total > 0 ? d.bytes_written / d.bytes_total : 1;
  return `${d.disk}: ${fmtBytes(d.bytes_written)} / ${fmtBytes(d.bytes_total)} (${pct(share)}), ${d.mb_s.toFixed(1)} MB/s${d.done ? ', done' : ''}`;
}

// ---------- Throughput ----------

/** Sums every sample of each metric name in Prometheus text format (labels are skipped with
 *  their quoting respected: endpoint labels contain braces). */
function parseMetrics(text) {
  const sums = new Map();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const name = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line)?.[0];
    if (!name) continue;
    let i = name.length;
    if (line[i] === '{') {
      let quoted = false;
      for (i++; i < line.length; i++) {
        const c = line[i];
        if (quoted && c === '\\') i++;
        else if (c === '"') quoted = !quoted;
        else if (c === '}' && !quoted) break;
      }
      i++;
    }
    const value = Number(line.slice(i).trim().split(/\s+/)[0]);
    if (Number.isFinite(value)) sums.set(name, (sums.get(name) ?? 0) + value);
  }
  return sums;
}

const samples = [];
const MAX_SAMPLES = 150;
let metricsNote = '';
let scraping = false;

async function scrape() {
  // One scrape at a time, each given up after 5 s, so a stalled request cannot stop the plot.
  if (!token || scraping || document.visibilityState !== 'visible') return;
  scraping = true;
  const abort = new AbortController();
  const timeout = setTimeout(() => abort.abort(), 5000);
  try {
    const resp = await fetch('/metrics', { cache: 'no-store', signal: abort.signal });
    if (!resp.ok) { metricsNote = `/metrics answered ${resp.status}`; return; }
    const m = parseMetrics(await resp.text());
    samples.push({
      t: performance.now() / 1000,
      ingest: (m.get('drvault_bytes_received_total') ?? 0) + (m.get('drvault_log_bytes_accepted_total') ?? 0),
      requests: m.get('drvault_http_requests_total') ?? 0,
    });
    if (samples.length > MAX_SAMPLES) samples.shift();
    metricsNote = '';
  } catch (e) {
    metricsNote = `cannot scrape /metrics: ${e.name === 'AbortError' ? 'no answer within 5 s' : e.message}`;
  } finally {
    clearTimeout(timeout);
    scraping = false;
  }
}

/** Rates between successive samples; a counter going down (server restart) leaves a gap. */
function rates(field, scale) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i].t - samples[i - 1].t;
    const dv = samples[i][field] - samples[i - 1][field];
    if (dt > 0 && dv >= 0) out.push({ t: samples[i].t, v: dv / dt / scale });
  }
  return out;
}

function plot(title, unit, series, cls) {
  const w = 420;
  const h = 150;
  const [l, r, top, bottom] = [44, w - 10, 24, h - 22];
  // At least 1 unit tall, so an idle server draws a flat line at the bottom, not noise.
  const max = Math.max(1, ...series.map((p) => p.v));
  const t0 = series.length ? series[0].t : 0;
  const t1 = series.length ? series[series.length - 1].t : 1;
  const x = (t) => l + ((t - t0) / Math.max(1, t1 - t0)) * (r - l);
  const y = (v) => bottom - (v / max) * (bottom - top);
  const last = series.length ? series[series.length - 1].v : null;
  return sv('svg', { width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: 'img', 'aria-label': `${title}: ${last === null ? 'no data yet' : `${last.toFixed(2)} ${unit} now`}`, 'data-plot': cls },
    sv('text', { class: 'plot-title', x: l, y: 14 }, `${title}: ${last === null ? '–' : `${last.toFixed(2)} ${unit}`}`),
    sv('line', { class: 'axis', x1: l, x2: r, y1: bottom, y2: bottom }),
    sv('line', { class: 'axis', x1: l, x2: l, y1: top, y2: bottom }),
    sv('text', { class: 'tick-label', x: l - 4, y: top + 4, 'text-anchor': 'end' }, max < 10 ? max.toFixed(1) : Math.round(max)),
    sv('text', { class: 'tick-label', x: l - 4, y: bottom, 'text-anchor': 'end' }, '0'),
    sv('text', { class: 'tick-label', x: r, y: h - 6, 'text-anchor': 'end' }, series.length ? `last ${fmtDuration(t1 - t0)}` : ''),
    series.length > 1 ? sv('polyline', { class: `series ${cls}`, points: series.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(' ') }) : null);
}

function throughputView() {
  show('throughput');
  poll(async () => {
    const last = samples[samples.length - 1];
    $('#throughput-status').textContent = metricsNote ||
      `${samples.length} sample${samples.length === 1 ? '' : 's'}` + (last ? `, the last ${Math.round(performance.now() / 1000 - last.t)} s ago` : '');
    replace($('#throughput-plots'),
      plot('Ingest', 'MB/s', rates('ingest', 1e6), 'ingest'),
      plot('Requests', 'req/s', rates('requests', 1), 'requests'));
  }, () => 2000);
}

setInterval(scrape, 2000);

// ---------- Hosts and providers ----------

function hostsView() {
  show('hosts');
  poll(async () => {
    const [hosts, providers] = await Promise.all([api('/v1/hosts'), api('/v1/providers')]);
    $('#hosts-status').textContent = `${hosts.length} host${hosts.length === 1 ? '' : 's'}, ` +
      `${providers.length} provider${providers.length === 1 ? '' : 's'} · updated ${fmtTime(Date.now() / 1000)}`;
    replace($('#hosts-body'),
      el('h3', {}, 'Hosts'),
      hosts.length ? table(['Host', 'Cloud / cluster', 'VMs', 'Last contact', 'Agent', 'Backlog', 'Throttle', 'Last error'],
        hosts.map((h) => el('tr', { 'data-host': h.name },
          el('th', { scope: 'row' }, h.name),
          el('td', {}, [h.cloud ? `cloud ${h.cloud}` : null, h.cluster ? `cluster ${h.cluster}` : null].filter(Boolean).join(', ') || '–'),
          el('td', {}, h.vms.length
            ? h.vms.map((v, i) => [i ? ', ' : '', el('a', { href: `#/vms/${encodeURIComponent(v)}` }, v)])
            : 'none'),
          el('td', { class: 'num', title: h.last_contact ? fmtTime(h.last_contact) : 'this host never sent a heartbeat (driven by hand)' },
            h.last_contact_age_s !== null && h.last_contact_age_s !== undefined ? `${fmtDuration(h.last_contact_age_s)} ago` : 'never'),
          el('td', {}, h.agent_version ?? '–'),
          el('td', { class: 'num' }, fmtBytes(h.backlog_bytes)),
          el('td', { class: 'num' }, h.throttle_mb_s ? `${h.throttle_mb_s} MB/s` : 'none'),
          el('td', { class: h.last_error ? 'health-Critical' : '' }, h.last_error ?? ''))),
        'Registered Hyper-V hosts, their VMs and last contact')
        : el('p', { class: 'muted' }, 'No host registered (drvault host add).'),
      el('h3', {}, 'Providers'),
      providers.length ? table(['Provider', 'Cloud', 'Registered'],
        providers.map((p) => el('tr', { 'data-provider': p.name },
          el('th', { scope: 'row' }, p.name), el('td', {}, p.cloud), el('td', {}, fmtTime(p.created)))),
        'Providers (VMM servers) acting for the hosts of a cloud')
        : el('p', { class: 'muted' }, 'No provider registered (drvault provider add).'));
  }, () => 10000);
}

// ---------- Recovery plans ----------

const PLAN_KINDS = [['test', 'Test failover'], ['planned', 'Planned failover'], ['unplanned', 'Unplanned failover']];

function plansView() {
  show('plans');
  const body = $('#plans-body');
  const say = (m) => { $('#plans-message').textContent = m; };
  let anyActive = false;
  const load = async () => {
    const [plans, jobs] = await Promise.all([api('/v1/plans'), api('/v1/jobs')]);
    const runs = jobs.filter((j) => j.kind === 'recovery_plan').sort((a, b) => b.created_unix - a.created_unix || a.id.localeCompare(b.id));
    anyActive = runs.some((j) => ACTIVE_JOB.has(j.state));
    $('#plans-status').textContent = `${plans.length} plan${plans.length === 1 ? '' : 's'}, ${runs.length} run${runs.length === 1 ? '' : 's'} · updated ${fmtTime(Date.now() / 1000)}`;
    const runBlock = roleBlock('plan_run', whoami.role);
    const kindOf = (name) => body.querySelector(`select[data-plan-kind="${CSS.escape(name)}"]`)?.value ?? 'test';
    replace(body,
      plans.length ? plans.map((p) => {
        const kindId = `plan-kind-${p.name}`;
        const kept = kindOf(p.name);
        return el('div', { class: 'panel plan', 'data-plan': p.name },
          el('h3', {}, `Plan ${p.name}`),
          el('ol', { class: 'groups' }, p.groups.map((g, i) => el('li', { 'data-group': i + 1 },
            `Group ${i + 1}: ${g.vms.join(', ')}`,
            g.pause_before ? el('div', { class: 'health-Warning' }, 'pauses first for a manual action (resume below)') : null,
            g.pre ? el('div', { class: 'muted' }, 'before: ', el('code', {}, g.pre)) : null,
            g.post ? el('div', { class: 'muted' }, 'after: ', el('code', {}, g.post)) : null))),
          el('div', { class: 'actions' },
            el('label', { for: kindId }, 'Kind'),
            el('select', { id: kindId, 'data-plan-kind': p.name, 'data-focus': `plan-kind:${p.name}` },
              PLAN_KINDS.map(([k, label]) => el('option', { value: k, selected: k === kept }, label))),
            actionButton('Run plan', runBlock, {
              'data-action': 'plan_run', 'data-key': p.name, 'data-focus': `plan-run:${p.name}`,
              onclick: () => {
                const kind = kindOf(p.name);
                const label = PLAN_KINDS.find(([k]) => k === kind)[1].toLowerCase();
                ask({
                  title: `Run plan ${p.name}`,
                  text: `Run plan ${p.name} as a ${label} of each VM at its latest recovery point, ` +
                    `group by group: ${p.groups.map((g, i) => `${i + 1}. ${g.vms.join(', ')}${g.pause_before ? ' (after a manual resume)' : ''}`).join('; ')}.`,
                  okLabel: 'Run plan',
                  run: async () => {
                    const r = await api(`/v1/plans/${encodeURIComponent(p.name)}/failover`, { method: 'POST', body: { kind } });
                    say(`Plan ${p.name} started (${label}): job ${r.job}.`);
                    await load();
                  },
                });
              },
            })));
      }) : el('p', { class: 'muted' }, 'No recovery plan (drvault plan create).'),
      el('h3', {}, 'Plan runs'),
      runs.length ? table(['Run', 'State', 'Steps', 'Started', 'Error', 'Action'], runs.map((j) => {
        const waiting = j.state === 'waiting_for_input';
        const resumeBlock = roleBlock('job_resume', whoami.role) ?? (waiting ? null : `the run is ${stateText(j.state)}, not paused`);
        return el('tr', { 'data-run': j.id, 'data-state': j.state },
          el('th', { scope: 'row' }, el('a', { href: `#/jobs/${j.id}` }, j.id.slice(0, 8)), el('div', { class: 'muted' }, j.title)),
          el('td', {}, el('span', { class: `badge state-${j.state}` }, stateText(j.state)), j.waiting_for ? el('div', { class: 'muted' }, j.waiting_for) : null),
          el('td', {}, el('ol', { class: 'steps-list' }, j.steps.map((s) => el('li', {}, `${s.name}: ${stateText(s.state)}`)))),
          el('td', { class: 'num' }, fmtTime(j.started_unix ?? j.created_unix)),
          el('td', { class: j.error ? 'health-Critical' : '' }, j.error ? `${j.error.message} [${j.error.code}]` : ''),
          el('td', {}, ACTIVE_JOB.has(j.state) ? actionButton('Resume', resumeBlock, {
            'data-action': 'job_resume', 'data-key': j.id, 'data-focus': `resume:${j.id}`,
            onclick: async () => {
              try {
                await api(`/v1/jobs/${encodeURIComponent(j.id)}/resume`, { method: 'POST' });
                say(`Run ${j.id} resumed.`);
              } catch (e) { say(`Resume refused: ${e.message} [${e.code}]`); }
              await load();
            },
          }) : ''));
      }), 'Recovery plan runs, newest first; a paused run waits for Resume') : el('p', { class: 'muted' }, 'No plan has run yet.'));
  };
  poll(load, () => (anyActive ? 2000 : 10000));
}

// ---------- Verify and damage ----------

const affectsText = (a) => `${a.vm}/${a.disk}: ${a.points.length ? `points ${a.points.join(', ')}` : 'no point'}${a.session ? ` (session ${a.session})` : ''}`;

function damagedObjectsTable(objects, caption) {
  return table(['Object', 'Family', 'Problem', 'Action', 'Found', 'Affected points'], objects.map((o) => el('tr', { 'data-object': o.key },
    el('th', { scope: 'row' }, el('code', {}, o.key)),
    el('td', {}, o.family), el('td', {}, o.reason && o.reason !== o.problem ? `${o.problem}: ${o.reason}` : o.problem), el('td', {}, o.action || '–'),
    el('td', { class: 'num' }, fmtTime(o.found_unix)),
    el('td', {}, o.affects.length ? el('ul', { class: 'affects' }, o.affects.map((a) => el('li', {}, affectsText(a)))) : 'nothing'))), caption);
}

function verifyView(openId) {
  show('verify');
  const body = $('#verify-body');
  let anyActive = false;
  const load = async () => {
    const [jobs, damage] = await Promise.all([api('/v1/jobs'), api('/v1/damage')]);
    const runs = jobs.filter((j) => j.kind === 'verify').sort((a, b) => b.created_unix - a.created_unix || a.id.localeCompare(b.id));
    anyActive = runs.some((j) => ACTIVE_JOB.has(j.state));
    const shown = runs.find((j) => j.id === openId) ?? runs.find((j) => !ACTIVE_JOB.has(j.state)) ?? null;
    const report = shown && !ACTIVE_JOB.has(shown.state)
      ? await api(`/v1/verify/${encodeURIComponent(shown.id)}`).catch((e) => ({ error: e }))
      : null;
    const registered = Object.values(damage.objects ?? {});
    $('#verify-status').textContent = `${runs.length} verify run${runs.length === 1 ? '' : 's'}, ${registered.length} damaged object${registered.length === 1 ? '' : 's'} registered · updated ${fmtTime(Date.now() / 1000)}`;
    const verifyBlock = roleBlock('verify', whoami.role) ?? (anyActive ? 'a verify is running' : null);
    replace(body,
      el('div', { class: 'actions' }, actionButton('Run verify (every VM)', verifyBlock, {
        'data-action': 'verify', 'data-focus': 'verify-run',
        onclick: () => ask({
          title: 'Run verify',
          text: 'Re-read every chunk, map, log and record of every VM and check it; damaged objects are quarantined and the points that need them marked damaged.',
          okLabel: 'Run verify',
          run: async () => {
            const r = await api('/v1/verify', { method: 'POST', body: {} });
            location.hash = `#/verify/${r.job}`;
          },
        }),
      })),
      el('h3', {}, 'Damage register'),
      el('p', { class: 'muted' }, damage.last_verify_unix ? `Last full verify started ${fmtTime(damage.last_verify_unix)}.` : 'No full verify yet.'),
      registered.length ? damagedObjectsTable(registered, 'Damaged objects the server knows of and the points that need them')
        : el('p', { id: 'damage-clean' }, 'No damaged object registered.'),
      el('h3', {}, shown ? `Verify run ${shown.id.slice(0, 8)} (${stateText(shown.state)})` : 'Verify runs'),
      !shown ? el('p', { class: 'muted' }, 'No verify has run yet.')
        : ACTIVE_JOB.has(shown.state) ? el('p', {}, `Running: ${pct(shown.progress)}`)
          : report?.error ? el('p', { class: 'error' }, `No report: ${report.error.message} [${report.error.code}]`)
            : el('div', { id: 'verify-report', 'data-job': shown.id, 'data-clean': report.clean ? 'true' : 'false' },
              factList([
                ['Result', el('span', { class: `badge ${report.clean ? 'health-Normal' : 'health-Critical'}` }, report.clean ? 'clean' : 'damage found')],
                ['Scope', `${report.vm ? `VM ${report.vm}` : 'every VM'}, ${report.sample_percent}% sampled${report.since_unix ? `, written since ${fmtTime(report.since_unix)}` : ''}`],
                ['Started', fmtTime(report.started_unix)],
                ['Took', `${fmtDuration(report.seconds)} (${report.mb_per_s.toFixed(1)} MB/s)`],
                ['Healed', report.healed.length ? report.healed.join(', ') : 'none'],
              ]),
              table(['Family', 'Objects', 'Bytes'], Object.entries(report.checked).map(([f, c]) => el('tr', {},
                el('th', { scope: 'row' }, f), el('td', { class: 'num' }, c.objects), el('td', { class: 'num' }, fmtBytes(c.bytes)))), 'Objects read and checked, by family'),
              el('h4', {}, 'Damaged objects'),
              report.damaged.length ? damagedObjectsTable(report.damaged, 'Objects this run found damaged or missing') : el('p', {}, 'None.'),
              el('h4', {}, 'Damaged points'),
              report.damaged_points.length ? table(['VM', 'Point', 'Objects'], report.damaged_points.map((d) => el('tr', { 'data-damaged-point': `${d.vm}/${d.point}` },
                el('th', { scope: 'row' }, d.vm), el('td', {}, d.point), el('td', {}, d.objects.length))), 'Recovery points that need a damaged object') : el('p', {}, 'None.')),
      runs.length > 1 ? el('details', {}, el('summary', {}, 'Earlier runs'), el('ul', {}, runs.map((j) => el('li', {},
        el('a', { href: `#/verify/${j.id}` }, `${fmtTime(j.created_unix)} ${stateText(j.state)}`))))) : null);
  };
  poll(load, () => (anyActive ? 2000 : 10000));
}

// ---------- Failback ----------

function failbackView() {
  show('failback');
  const say = (m) => { $('#failback-message').textContent = m; };
  const load = async () => {
    const vms = await api('/v1/vms');
    const rows = await Promise.all(vms.map(async (vm) => {
      const base = `/v1/vms/${encodeURIComponent(vm.name)}`;
      const [fo, failback] = await Promise.all([
        api(`${base}/failover`).then((v) => v.record).catch((e) => { if (e.code === 'failover_not_found') return null; throw e; }),
        api(`${base}/failback`).catch((e) => { if (e.code === 'no_failback') return null; throw e; }),
      ]);
      return { vm, fo, failback };
    }));
    $('#failback-status').textContent = `${rows.filter((r) => r.vm.state === 'failed_over').length} of ${vms.length} VMs failed over · updated ${fmtTime(Date.now() / 1000)}`;
    replace($('#failback-body'), rows.length ? table(['VM', 'State', 'Failover', 'Disks synchronized back', 'Failback', 'Action'], rows.map(({ vm, fo, failback }) => {
      const mine = failback && fo && failback.failover === fo.id ? failback : null;
      const block = roleBlock('failback_commit', whoami.role) ?? failbackBlock({ vm, fo, failback });
      return el('tr', { 'data-failback-vm': vm.name },
        el('th', { scope: 'row' }, el('a', { href: `#/vms/${encodeURIComponent(vm.name)}` }, vm.name)),
        el('td', {}, stateText(vm.state)),
        el('td', {}, fo ? `${fo.kind}, ${stateText(fo.state)}${fo.point ? ` at ${fo.point}` : ''}` : 'none'),
        el('td', {}, vm.state !== 'failed_over' && !mine ? '–' : vm.disks.map((d) => el('div', {}, `${d.id}: ${mine?.synced?.[d.id] ? `synchronized ${fmtTime(mine.synced[d.id].synced_unix)}` : 'not yet'}`))),
        el('td', {}, failback?.committed_unix ? `committed ${fmtTime(failback.committed_unix)}${failback.cycle ? `, as point c${failback.cycle}` : ''}` : failback ? 'in progress' : 'not started'),
        el('td', {}, actionButton('Commit failback', block, {
          'data-action': 'failback_commit', 'data-key': vm.name, 'data-focus': `failback:${vm.name}`,
          onclick: () => ask({
            title: `Commit failback: ${vm.name}`,
            text: `The target disks of ${vm.name} become its newest point and the VM is protected again from the on-premises side.`,
            okLabel: 'Commit failback',
            run: async () => {
              await api(`/v1/vms/${encodeURIComponent(vm.name)}/failback/commit`, { method: 'POST', body: {} });
              say(`Failback of ${vm.name} committed.`);
              await load();
            },
          }),
        })));
    }), 'Failback state per VM: a committed failover is failed back once every disk is synchronized') : el('p', { class: 'muted' }, 'No VM.'));
  };
  poll(load, () => 10000);
}

// ---------- Audit log ----------

function auditView() {
  show('audit');
  poll(async () => {
    let list;
    try {
      list = await api('/v1/audit?limit=200');
    } catch (e) {
      if (e.status !== 404) throw e;
      $('#audit-status').textContent = '';
      replace($('#audit-body'), el('p', { id: 'audit-none' }, 'No audit log on this server.'));
      return;
    }
    const entries = (list.entries ?? []).slice().sort((a, b) => b.seq - a.seq);
    $('#audit-status').textContent = `${entries.length} entr${entries.length === 1 ? 'y' : 'ies'}, newest first · updated ${fmtTime(Date.now() / 1000)}`;
    replace($('#audit-body'), entries.length ? table(['#', 'When', 'Who', 'Action', 'Target', 'From', 'Result', 'Job'], entries.map((a) => el('tr', { 'data-seq': a.seq },
      el('th', { scope: 'row', class: 'num' }, a.seq),
      el('td', { class: 'num' }, fmtTime(a.at)),
      el('td', {}, a.actor), el('td', {}, a.action), el('td', {}, a.target ?? '–'), el('td', {}, a.from ?? '–'),
      el('td', { class: a.result === 'ok' ? 'health-Normal' : 'health-Critical' }, `${a.result} ${a.status}${a.code ? ` [${a.code}]` : ''}`),
      el('td', {}, a.job ? el('a', { href: `#/jobs/${a.job}` }, a.job.slice(0, 8)) : '–'))), 'Operator actions, newest first')
      : el('p', { class: 'muted' }, 'No entry yet.'));
  }, () => 10000);
}

// ---------- start ----------

if (token) {
  // A kept token is checked once; a revoked one lands on the login form with the reason.
  login(token).then((err) => { if (err) logout(err); else { scrape(); route(); } });
} else {
  route();
}
