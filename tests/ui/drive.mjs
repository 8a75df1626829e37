// Drives the operator page of a real node in headless Chromium (Debian's,
// /usr/bin/chromium) through playwright-core: connects with a token, waits
// until transfer $TRANSFER shows progress that grows, saves a screenshot,
// cancels the transfer from the page, and waits until the page shows it
// cancelled. Prints one JSON line of what it saw; exits non-zero on failure.
// Env: URL (node base URL), TOKEN, TRANSFER, SCREENSHOT (PNG path).
import { chromium } from 'playwright-core';

const { URL, TOKEN, TRANSFER, SCREENSHOT } = process.env;
const within = 60_000;
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`${URL}/ui`);
  await page.fill('#token', TOKEN);
  await page.click('#token-form button');
  const row = page.locator(`tr[data-transfer="${TRANSFER}"]`);
  await row.waitFor({ timeout: within });
  const bytes = async () => Number(await row.getAttribute('data-bytes-done'));
  // Progress, live: the row's bytes grow while the page refreshes itself.
  const deadline = Date.now() + within;
  let first = 0;
  while ((first = await bytes()) === 0) {
    if (Date.now() > deadline) throw new Error('no progress shown');
    await page.waitForTimeout(100);
  }
  let later = first;
  while ((later = await bytes()) <= first) {
    if (Date.now() > deadline) throw new Error(`progress stuck at ${first}`);
    await page.waitForTimeout(100);
  }
  const members = await page.locator('#members tr').count();
  const leader = await page.locator('#members td', { hasText: 'leader' }).count();
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  await row.locator('button[data-cancel]').click();
  await page.locator(`tr[data-transfer="${TRANSFER}"][data-state="cancelled"]`).waitFor({ timeout: within });
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
  console.log(JSON.stringify({ first, later, members, leader }));
} finally {
  await browser.close();
}
