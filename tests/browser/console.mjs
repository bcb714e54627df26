// Browser end-to-end test of the operator console, driven by tests/it/console_browser.rs.
//
// Headless Debian Chromium through playwright-core (no browser download). Environment:
// DRVAULT_URL, DRVAULT_TOKEN, DRVAULT_VM (a protected VM with a test-network mapping and an
// app-consistent point c1), DRVAULT_ARTIFACTS (screenshots), CHROMIUM (default /usr/bin/chromium).
// Exits 0 when every step passed; otherwise prints the failing step, saves failure.png, exits 1.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const url = process.env.DRVAULT_URL;
const token = process.env.DRVAULT_TOKEN;
const vm = process.env.DRVAULT_VM;
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
    ]) {
      await page.goto(`${url}/${hash}`);
      await page.locator(ready).first().waitFor();
      await noHorizontalOverflow(`${hash} at ${w}x${h}`);
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
