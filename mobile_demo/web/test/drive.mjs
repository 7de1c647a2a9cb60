// Drives the built web demo in headless Chromium and prints a JSON report.
//
//   node test/drive.mjs CONFIG.json
//
// CONFIG holds: baseUrl (the served build, ending in "/"), images (pixel
// arrays), photo (a PNG file to pick), notImage (a non-image file to pick),
// badModels (file names in the build folder), screenshot (a PNG path or
// null). tests/test_web_demo.py writes the config and checks the report.
// The browser is Debian's /usr/bin/chromium: playwright-core never
// downloads one.

import fs from "node:fs";

import { chromium } from "playwright-core";

const CHROMIUM = process.env.KC_CHROMIUM ?? "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  // A fake camera, so that getUserMedia fails on the missing permission
  // rather than on a missing device.
  "--use-fake-device-for-media-stream",
];
const TIMEOUT_MS = 30000;

async function openDemo(context, url) {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  await page.goto(url);
  await page.waitForFunction(() => window.kcDemo !== undefined);
  const loadError = await page.evaluate(() =>
    window.kcDemo.ready.then(
      () => null,
      (error) => error.message,
    ),
  );
  return { page, loadError };
}

async function classifyImages(page, images) {
  return page.evaluate(async (all) => {
    const results = [];
    for (const pixels of all) {
      const result = await window.kcDemo.classifyPixels(pixels);
      results.push({ top5: result.top5.map((entry) => entry.index), top5Labels: result.top5.map((entry) => entry.label), raw: result.raw });
    }
    return results;
  }, images);
}

async function pickFile(page, selector, file) {
  // Clear earlier results, so the wait below sees this file's outcome.
  await page.evaluate(() => document.querySelector("#results tbody").replaceChildren());
  await page.setInputFiles(selector, file);
  // The change handler runs asynchronously; wait until it updates the page.
  await page.waitForFunction(
    () => window.kcDemo.error !== null || document.querySelector("#results tbody").rows.length > 0,
  );
}

async function main() {
  const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const report = { requests: [], blocked: [] };
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  try {
    // A new context is a fresh profile: no cache or service worker from an
    // earlier run.
    const context = await browser.newContext({ viewport: { width: 520, height: 720 }, deviceScaleFactor: 2 });
    context.on("request", (request) => report.requests.push(request.url()));
    const base = new URL(config.baseUrl);
    await context.route("**/*", (route) => {
      const url = new URL(route.request().url());
      if (url.protocol === "data:" || url.protocol === "blob:" || url.host === base.host) {
        return route.continue();
      }
      report.blocked.push(url.href);
      return route.abort();
    });

    const { page, loadError } = await openDemo(context, `${config.baseUrl}index.html`);
    report.loadError = loadError;
    report.metadata = await page.evaluate(() => window.kcDemo.metadata);
    report.results = await classifyImages(page, config.images);
    report.invalidPixelsError = await page.evaluate((pixels) =>
      window.kcDemo.classifyPixels(pixels.map((value, i) => (i === 3 ? 256 : value))).then(
        () => null,
        (error) => error.message,
      ),
    config.images[0]);

    await page.click("#benchmark");
    await page.waitForFunction(() => /median/.test(document.getElementById("benchmark-result").textContent));
    report.benchmarkText = await page.textContent("#benchmark-result");

    await pickFile(page, "#photo", config.photo);
    report.photoError = await page.evaluate(() => window.kcDemo.error);
    report.photoTop5 = await page.$$eval("#results tbody tr", (rows) => rows.map((row) => row.cells[1].textContent));
    if (config.screenshot) await page.screenshot({ path: config.screenshot, fullPage: true });

    await pickFile(page, "#photo", config.notImage);
    report.notImageError = await page.evaluate(() => window.kcDemo.error);

    // The context has no camera permission, so Chromium denies
    // getUserMedia and the page must show a message.
    await page.evaluate(() => window.kcDemo.startCamera());
    report.cameraError = await page.evaluate(() => window.kcDemo.error);

    // Offline: once the service worker controls the page, a reload with
    // the network cut must still load and run the model.
    await page.evaluate(() => navigator.serviceWorker.ready);
    await page.reload();
    await page.waitForFunction(() => navigator.serviceWorker.controller !== null);
    await context.setOffline(true);
    const offline = await openDemo(context, `${config.baseUrl}index.html`);
    report.offlineLoadError = offline.loadError;
    report.offlineResults = offline.loadError ? [] : await classifyImages(offline.page, config.images.slice(0, 1));
    await context.setOffline(false);

    report.badModels = {};
    for (const name of config.badModels) {
      const bad = await openDemo(context, `${config.baseUrl}index.html?model=${encodeURIComponent(name)}`);
      report.badModels[name] = {
        loadError: bad.loadError,
        shownError: await bad.page.evaluate(() => window.kcDemo.error),
      };
      if (config.badScreenshot && name === config.badModels[0]) {
        await bad.page.screenshot({ path: config.badScreenshot, fullPage: true });
      }
      await bad.page.close();
    }
    await context.close();
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(report));
}

await main();
