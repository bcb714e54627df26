// Browser end-to-end test of the operator console, driven by tests/it/console_browser.rs.
//
// Headless Debian Chromium through playwright-core (no browser download). Environment:
// DRVAULT_URL, DRVAULT_TOKEN, DRVAULT_VM (a protected VM with a test-network mapping and an
// app-consistent point c1), DRVAULT_HOST (its host), DRVAULT_PROVIDER (a registered provider),
// DRVAULT_PLAN (a plan failing DRVAULT_VM over after a pause), DRVAULT_DAMAGED_VM (a VM a verify
// run found a missing chunk of, at its point c0), DRVAULT_ARTIFACTS (screenshots), CHROMIUM
// (default /usr/bin/chromium). axe-core (node_modules/axe-core) checks every view: any serious or
// critical violation fails the run, listed.
// Exits 0 when every step passed; otherwise prints the failing step, saves failure.png, exits 1.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const url = process.env.DRVAULT_URL;
const token = process.env.DRVAULT_TOKEN;
const vm = process.env.DRVAULT_VM;
const viewerToken = process.env.DRVAULT_VIEWER_TOKEN;
const host = process.env.DRVAULT_HOST ?? 'hv';
const provider = process.env.DRVAULT_PROVIDER ?? 'vmm01';
const plan = process.env.DRVAULT_PLAN ?? 'web-tier';
const damagedVm = process.env.DRVAULT_DAMAGED_VM ?? 'db01';
const artifacts = process.env.DRVAULT_ARTIFACTS ?? 'target/console-artifacts';
if (!url || !token || !vm) {
  console.error('DRVAULT_URL, DRVAULT_TOKEN and DRVAULT_VM are required');
  process.exit(2);
}
fs.mkdirSync(artifacts, { recursive: true });
fs.rmSync(path.join(artifacts, 'failure.png'), { force: true });

let step = 'launch';
const log = (s) => { step = s; console.log(`[console.mjs] ${s}`); };
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'drvault-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  ignoreHTTPSErrors: true,
  viewport: { width: 1280, height: 720 },
});
// axe-core goes in through the DevTools protocol on every document, which the page's CSP does
// not govern (a <script> tag would be refused by it, as it should be).
await context.addInitScript({ path: path.resolve('node_modules/axe-core/axe.min.js') });
const page = context.pages()[0] ?? await context.newPage();
page.setDefaultTimeout(30_000);

// Any script error or CSP violation ("Refused to ...") fails the test. Chromium also logs every
// non-2xx fetch as "Failed to load resource"; the page expects some (the wrong token's 401, the
// 404 of a VM without a failover), so those are not problems.
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => {
  if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(`console error: ${m.text()}`);
});

const shot = (name) => page.screenshot({ path: path.join(artifacts, name), fullPage: true });

/** Runs axe-core on the page as shown; serious and critical violations are collected with the
 *  view's name and fail the run at the end, all of them listed. */
const axeFindings = [];
const axeMinor = new Set();
let axeRuns = 0;
async function axeCheck(where) {
  const violations = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 6).map((n) => n.target.join(' ')) }));
  });
  axeRuns++;
  for (const v of violations) {
    if (v.impact === 'serious' || v.impact === 'critical') axeFindings.push(`${where}: ${v.impact} ${v.id} (${v.help}) at ${v.nodes.join(' | ')}`);
    else axeMinor.add(`${v.impact} ${v.id}`);
  }
}

/** A disabled action button and its reason, in the tooltip and in visible text. */
async function disabledWithReason(scope, action, reasonPart) {
  const btn = scope.locator(`button[data-action="${action}"]`);
  check(await btn.isDisabled(), `${action} button is disabled`);
  const title = await btn.getAttribute('title');
  const why = (await scope.locator(`[data-why="${action}"]`).textContent()).trim();
  check(title && title.includes(reasonPart), `${action} button's title gives the reason "${reasonPart}": ${title}`);
  check(why === title, `${action}'s reason is visible text too (${why})`);
  const described = await btn.getAttribute('aria-describedby');
  check(described && (await page.locator(`#${described}`).textContent()).trim() === why, `${action} button is described by its reason`);
}

async function noHorizontalOverflow(where) {
  const o = await page.evaluate(() => ({
    body: document.body.scrollWidth,
    doc: document.documentElement.scrollWidth,
    view: document.documentElement.clientWidth,
  }));
  check(o.body <= o.view && o.doc <= o.view,
    `${where}: page wider than the viewport (body ${o.body}, document ${o.doc}, viewport ${o.view})`);
}

try {
  log('open the console without a token: the login form');
  const resp = await page.goto(`${url}/`);
  check(resp.status() === 200, `GET / status ${resp.status()}`);
  await page.locator('#login-form').waitFor();
  check(await page.evaluate(() => typeof window.axe?.run === 'function'), 'axe-core injected');
  await axeCheck('login');

  log('a wrong token is refused');
  await page.fill('#token', 'drvo_not-the-right-token');
  await page.click('#login-form button[type=submit]');
  await page.locator('#login-error', { hasText: 'token refused' }).waitFor();
  check(await page.locator('#nav').isHidden(), 'navigation stays hidden after a refused token');

  log('log in with the operator token');
  await page.fill('#token', token);
  await page.click('#login-form button[type=submit]');
  const row = page.locator(`#vms-table tbody tr[data-vm="${vm}"]`);
  await row.waitFor();
  const health = (await row.locator('.badge').first().textContent()).trim();
  check(['Normal', 'Warning', 'Critical'].includes(health), `health shown: ${health}`);
  check(health === 'Normal', `the freshly protected VM is Normal, got ${health}: ${await row.textContent()}`);
  check((await row.textContent()).includes('Protected'), 'state Protected shown');
  check(await page.evaluate(() => sessionStorage.getItem('drvault.operatorToken') !== null), 'token kept in sessionStorage');

  log('filter by health and sort');
  await page.selectOption('#health-filter', 'Critical');
  await row.waitFor({ state: 'detached' });
  await page.selectOption('#health-filter', '');
  await row.waitFor();
  await page.click('#vms-table th[data-sort="rpo"] button');
  check(await page.getAttribute('#vms-table th[data-sort="rpo"]', 'aria-sort') === 'ascending', 'RPO column sorted');
  await page.click('#vms-table th[data-sort="rpo"] button');
  check(await page.getAttribute('#vms-table th[data-sort="rpo"]', 'aria-sort') === 'descending', 'second click reverses');
  await shot('vms-1280.png');

  log('open the VM page');
  await row.locator('a').click();
  await page.locator('#vm-title', { hasText: `VM ${vm}` }).waitFor();
  await page.locator('#vm-body table th[scope=row]', { hasText: 'os' }).first().waitFor();
  await page.locator('#timeline svg circle.point-crash').first().waitFor();
  check(await page.locator('#timeline svg .point-app').count() >= 1, 'app-consistent point drawn differently');
  const nic = await page.locator('#vm-body tr[data-nic="0"]').textContent();
  check(nic.includes('recovery-vnet/app') && nic.includes('drill-vnet/app'), `NIC mapping shown: ${nic}`);
  await shot('vm-1280.png');

  log('before any failover: commit and cleanup are disabled with their reason, the drill is not');
  const vmBody = page.locator('#vm-body');
  await disabledWithReason(vmBody, 'commit', 'only after a planned or unplanned failover; this VM has none');
  await disabledWithReason(vmBody, 'cleanup', 'no test failover to clean up');
  check(await page.locator('button[data-action="test"]').isEnabled(), 'test failover allowed for the admin');
  check(await page.locator('#whoami').textContent() === 'admin (admin)', `whoami shown: ${await page.locator('#whoami').textContent()}`);

  log('keyboard: Tab reaches the test failover button with a visible focus ring');
  await page.locator('#vm-title').click();
  let reached = false;
  for (let i = 0; i < 60 && !reached; i++) {
    await page.keyboard.press('Tab');
    reached = await page.evaluate(() => document.activeElement?.matches('button[data-action="test"]') ?? false);
  }
  check(reached, 'Tab reaches the Test failover button');
  const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
  check(outline !== 'none', `focused button shows an outline (${outline})`);

  log('start a test failover from the page (confirmation names the point)');
  await page.keyboard.press('Enter');
  const dialog = page.locator('#confirm');
  await dialog.waitFor({ state: 'visible' });
  const text = await page.locator('#confirm-text').textContent();
  check(/recovery point c1 \(/.test(text), `the dialog names the latest point c1: ${text}`);
  await shot('confirm-1280.png');
  await axeCheck('confirmation dialog');
  await page.click('#confirm-ok');
  await dialog.waitFor({ state: 'hidden' });
  await page.waitForURL(/#\/jobs\/[0-9a-f-]+$/);
  const jobId = decodeURIComponent(page.url().split('#/jobs/')[1]);

  log(`watch job ${jobId} reach succeeded in the Jobs view`);
  const jobRow = page.locator(`#jobs-table tr[data-job-id="${jobId}"]`);
  await jobRow.waitFor();
  check((await jobRow.textContent()).includes('Test failover'), 'job kind shown');
  await page.locator(`#jobs-table tr[data-job-id="${jobId}"][data-state="succeeded"]`).waitFor({ timeout: 120_000 });
  await page.locator(`#jobs-table tr[data-steps-of="${jobId}"] li`).first().waitFor();
  await shot('jobs-1280.png');

  log('clean the drill up from the VM page');
  await page.goto(`${url}/#/vms/${encodeURIComponent(vm)}`);
  await page.locator('#failover-panel').waitFor();
  await page.click('button[data-action="cleanup"]');
  await dialog.waitFor({ state: 'visible' });
  const ctext = await page.locator('#confirm-text').textContent();
  check(ctext.includes('test failover at point c1'), `cleanup dialog names the drill's point: ${ctext}`);
  await page.click('#confirm-ok');
  await page.locator('#vm-message', { hasText: 'drill successful' }).waitFor();
  await page.locator('#failover-panel', { hasText: 'cleaned up' }).waitFor();

  log(`plans: ${plan} shows its group; run it as a drill, it pauses, Resume continues it`);
  await page.goto(`${url}/#/plans`);
  const planPanel = page.locator(`#plans-body [data-plan="${plan}"]`);
  await planPanel.waitFor();
  const groupText = await planPanel.locator('li[data-group="1"]').textContent();
  check(groupText.includes(vm) && groupText.includes('manual action'), `plan group shown: ${groupText}`);
  await planPanel.locator('select').selectOption('test');
  await planPanel.locator('button[data-action="plan_run"]').click();
  await dialog.waitFor({ state: 'visible' });
  const ptext = await page.locator('#confirm-text').textContent();
  check(ptext.includes(`plan ${plan} as a test failover`) && ptext.includes(vm), `plan dialog names plan, kind and VMs: ${ptext}`);
  await page.click('#confirm-ok');
  await dialog.waitFor({ state: 'hidden' });
  const started = await page.locator('#plans-message', { hasText: `Plan ${plan} started` }).textContent();
  const runId = /job ([0-9a-f-]+)/.exec(started)?.[1];
  check(runId, `plan run's job named: ${started}`);
  const run = page.locator(`#plans-body tr[data-run="${runId}"]`);
  await page.locator(`#plans-body tr[data-run="${runId}"][data-state="waiting_for_input"]`).waitFor({ timeout: 60_000 });
  await shot('plans-1280.png');
  await axeCheck('plans (a run paused)');
  await run.locator('button[data-action="job_resume"]').click();
  await page.locator(`#plans-body tr[data-run="${runId}"][data-state="succeeded"]`).waitFor({ timeout: 120_000 });
  check((await run.textContent()).includes(`fail over ${vm}: succeeded`), `the run's steps shown: ${await run.textContent()}`);

  log('the plan\'s drill is up: a new failover is refused before the dialog; clean it up');
  await page.goto(`${url}/#/vms/${encodeURIComponent(vm)}`);
  await page.locator('#failover-panel', { hasText: 'succeeded' }).waitFor();
  await disabledWithReason(vmBody, 'test', 'the test failover is still up: clean it up first');
  await disabledWithReason(vmBody, 'commit', 'a test failover is cleaned up, not committed');
  await page.click('button[data-action="cleanup"]');
  await dialog.waitFor({ state: 'visible' });
  await page.click('#confirm-ok');
  await page.locator('#failover-panel', { hasText: 'cleaned up' }).waitFor();

  log('hosts and providers');
  await page.goto(`${url}/#/hosts`);
  const hostRow = page.locator(`#hosts-body tr[data-host="${host}"]`);
  await hostRow.waitFor();
  check(await hostRow.locator(`a[href="#/vms/${vm}"]`).count() === 1, 'the host lists its VM as a link');
  check((await hostRow.textContent()).includes('never'), `a host without heartbeats shows no last contact: ${await hostRow.textContent()}`);
  await page.locator(`#hosts-body tr[data-provider="${provider}"]`).waitFor();
  await shot('hosts-1280.png');

  log('verify: the run found the missing chunk and the point that needs it');
  await page.goto(`${url}/#/verify`);
  await page.locator('#verify-report[data-clean="false"]').waitFor();
  await page.locator(`#verify-report tr[data-damaged-point="${damagedVm}/c0"]`).waitFor();
  const affected = await page.locator('#verify-report [data-object] .affects').first().textContent();
  check(affected.includes(`${damagedVm}/os: points c0`), `affected points shown: ${affected}`);
  const register = await page.locator('#verify-body > .table-wrap [data-object]').first().textContent();
  check(register.includes('missing') && register.includes(`${damagedVm}/os`), `damage register shown: ${register}`);
  await shot('verify-1280.png');

  log('failback: nothing to fail back, the commit button says why');
  await page.goto(`${url}/#/failback`);
  const fbRow = page.locator(`#failback-body tr[data-failback-vm="${vm}"]`);
  await fbRow.waitFor();
  check((await fbRow.textContent()).includes('test, cleaned up at c1'), `failover state shown: ${await fbRow.textContent()}`);
  await disabledWithReason(fbRow, 'failback_commit', 'only after a committed planned or unplanned failover');
  await shot('failback-1280.png');

  log('audit log (or the notice that this server keeps none)');
  await page.goto(`${url}/#/audit`);
  await page.locator('#audit-none, #audit-body tr[data-seq]').first().waitFor();
  if (await page.locator('#audit-none').count()) {
    check((await page.locator('#audit-none').textContent()).includes('No audit log on this server'), 'no-audit notice');
  } else {
    check((await page.locator('#audit-body').textContent()).includes('failover'), 'the drills are in the audit log');
  }
  await shot('audit-1280.png');

  log('throughput plots from /metrics');
  await page.goto(`${url}/#/throughput`);
  await page.locator('#throughput-plots svg[data-plot="ingest"]').waitFor();
  await page.locator('#throughput-plots svg[data-plot="requests"] polyline').waitFor({ timeout: 30_000 });
  // The view keeps refreshing while it is shown: its sample count grows (a view that rendered
  // twice and froze once passed the wait above whenever enough samples were already there).
  const sampleCount = async () => Number((await page.locator('#throughput-status').textContent()).match(/^(\d+) samples?/)?.[1] ?? NaN);
  const before = await sampleCount();
  check(Number.isFinite(before), `throughput status shows a sample count (${await page.locator('#throughput-status').textContent()})`);
  await page.waitForFunction((n) => Number(document.querySelector('#throughput-status')?.textContent.match(/^(\d+) samples?/)?.[1]) >= n + 2,
    before, { timeout: 30_000 });
  await shot('throughput-1280.png');

  for (const [w, h] of [[1280, 720], [390, 844]]) {
    log(`no horizontal overflow at ${w}x${h}`);
    await page.setViewportSize({ width: w, height: h });
    for (const [hash, ready] of [
      ['#/vms', `#vms-table tr[data-vm="${vm}"]`],
      [`#/vms/${encodeURIComponent(vm)}`, '#timeline svg'],
      ['#/jobs', '#jobs-table tr[data-job-id]'],
      ['#/throughput', '#throughput-plots svg'],
      ['#/hosts', `#hosts-body tr[data-host="${host}"]`],
      ['#/plans', `#plans-body [data-plan="${plan}"]`],
      ['#/verify', '#verify-report'],
      ['#/failback', `#failback-body tr[data-failback-vm="${vm}"]`],
      ['#/audit', '#audit-none, #audit-body tr[data-seq]'],
    ]) {
      await page.goto(`${url}/${hash}`);
      await page.locator(ready).first().waitFor();
      await noHorizontalOverflow(`${hash} at ${w}x${h}`);
      await axeCheck(`${hash} at ${w}x${h}`);
    }
    if (w === 390) {
      await page.goto(`${url}/#/vms/${encodeURIComponent(vm)}`);
      await page.locator('#timeline svg').waitFor();
      await shot('vm-390.png');
      await page.goto(`${url}/#/vms`);
      await page.locator(`#vms-table tr[data-vm="${vm}"]`).waitFor();
      await shot('vms-390.png');
    }
  }

  log('role rules as the page computes them (the module\'s own functions)');
  const unit = await page.evaluate(async () => {
    const m = await import('/console/app.js');
    const vmP = { state: 'protected', disks: [{ id: 'os' }] };
    const points = [{ id: 'c1' }];
    const committed = { id: 'f1', kind: 'planned', state: 'committed', job: 'j' };
    return {
      viewerDrill: m.actionBlock('test', { role: 'viewer', vm: vmP, points }),
      operatorDrill: m.actionBlock('test', { role: 'operator', vm: vmP, points }),
      viewerVerify: m.roleBlock('verify', 'viewer'),
      operatorVerify: m.roleBlock('verify', 'operator'),
      unknownRole: m.roleBlock('plan_run', 'nobody'),
      adminCommitBefore: m.actionBlock('commit', { role: 'admin', vm: vmP, points }),
      commitAfter: m.actionBlock('commit', { role: 'operator', vm: vmP, points, fo: { ...committed, state: 'succeeded' } }),
      failbackUnsynced: m.failbackBlock({ vm: { ...vmP, state: 'failed_over' }, fo: committed, failback: null }),
      failbackSynced: m.failbackBlock({ vm: { ...vmP, state: 'failed_over' }, fo: committed, failback: { failover: 'f1', synced: { os: { digest: 'd', synced_unix: 1 } } } }),
      viewerFailback: m.roleBlock('failback_commit', 'viewer'),
    };
  });
  check(unit.viewerDrill === 'needs the operator role; this session is viewer', `viewer drill: ${unit.viewerDrill}`);
  check(unit.operatorDrill === null && unit.operatorVerify === null && unit.commitAfter === null, `operator allowed: ${JSON.stringify(unit)}`);
  check(unit.viewerVerify?.includes('operator') && unit.unknownRole?.includes('operator') && unit.viewerFailback?.includes('operator'), `viewer refused: ${JSON.stringify(unit)}`);
  check(unit.adminCommitBefore?.startsWith('only after a planned or unplanned failover'), `commit before failover: ${unit.adminCommitBefore}`);
  check(unit.failbackUnsynced?.startsWith('no disk synchronized yet') && unit.failbackSynced === null, `failback rules: ${JSON.stringify(unit)}`);

  log('a viewer session (account auditor, role viewer): the drill button says why not');
  check(Boolean(viewerToken), 'DRVAULT_VIEWER_TOKEN is required');
  await page.setViewportSize({ width: 1280, height: 720 });
  await page.evaluate(() => sessionStorage.clear());
  await page.goto(`${url}/#/vms/${encodeURIComponent(vm)}`);
  await page.reload();
  await page.locator('#login-form').waitFor();
  await page.fill('#token', viewerToken);
  await page.click('#login-form button[type=submit]');
  await page.locator('#whoami', { hasText: 'auditor (viewer)' }).waitFor();
  await page.goto(`${url}/#/vms/${encodeURIComponent(vm)}`);
  await page.locator('button[data-action="test"]').waitFor();
  await disabledWithReason(vmBody, 'test', 'needs the operator role; this session is viewer');
  await disabledWithReason(vmBody, 'resync', 'needs the operator role');
  await shot('vm-viewer-1280.png');
  await axeCheck('VM page as a viewer');
  await page.goto(`${url}/#/plans`);
  await disabledWithReason(page.locator(`#plans-body [data-plan="${plan}"]`), 'plan_run', 'needs the operator role');

  check(axeRuns >= 22, `axe ran on every view (${axeRuns} runs)`);
  check(axeFindings.length === 0, `axe-core found serious or critical violations:\n${axeFindings.join('\n')}`);
  console.log(`[console.mjs] axe-core: ${axeRuns} runs, no serious or critical violation; lesser ones: ${[...axeMinor].join(', ') || 'none'}`);

  log('log out forgets the token');
  await page.click('#logout');
  await page.locator('#login-form').waitFor();
  check(await page.evaluate(() => sessionStorage.getItem('drvault.operatorToken') === null), 'token forgotten');

  check(problems.length === 0, `no script errors or CSP violations:\n${problems.join('\n')}`);
  console.log(`[console.mjs] all steps passed; screenshots in ${artifacts}`);
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(0);
} catch (e) {
  console.error(`[console.mjs] FAILED at step "${step}": ${e.message}`);
  if (problems.length) console.error(problems.join('\n'));
  const state = await page.evaluate(() => `hash ${location.hash}, ${document.visibilityState}, ` +
    `status: ${document.querySelector('.view:not([hidden]) [role=status]')?.textContent ?? ''}`).catch(() => '');
  console.error(`[console.mjs] page: ${state}`);
  await page.screenshot({ path: path.join(artifacts, 'failure.png'), fullPage: true }).catch(() => {});
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(1);
}
