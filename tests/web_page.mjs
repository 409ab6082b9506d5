// The page as a person uses it, in Chromium driven by playwright-core (web/'s npm packages): open URL, wait for the
// model to load, press Sample, watch the progress bar while it samples, and report what the page showed as JSON;
// with a second argument, a screenshot of the page at the end. BROWSER: the Chromium executable.
import { createRequire } from "node:module";

const require = createRequire(new URL("../web/package.json", import.meta.url));
const { chromium } = require("playwright-core");
const [url, screenshot] = process.argv.slice(2);
const args = process.getuid && process.getuid() === 0 ? ["--no-sandbox"] : [];
const browser = await chromium.launch({ executablePath: process.env.BROWSER, args });
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 820 } });
  await page.goto(url);
  await page.waitForFunction(() => !document.getElementById("sample").disabled || document.getElementById("error").textContent,
    null, { timeout: 120000 });
  const seen = new Set();
  await page.click("#sample");
  const started = Date.now();
  while (Date.now() - started < 300000) {
    const { value, status, error } = await page.evaluate(() => ({ value: document.getElementById("progress").value,
      status: document.getElementById("status").textContent, error: document.getElementById("error").textContent }));
    seen.add(value);
    if (error || status.includes("images/s")) break;
    await page.waitForTimeout(20);
  }
  const shown = await page.evaluate(() => {
    const canvas = document.getElementById("grid"), data = canvas.getContext("2d").getImageData(0, 0, canvas.width,
      canvas.height).data;
    let lit = 0;
    for (let i = 0; i < data.length; i += 4) lit += data[i] > 0;
    return { width: canvas.width, height: canvas.height, lit: lit / (data.length / 4),
      status: document.getElementById("status").textContent, about: document.getElementById("about").textContent,
      error: document.getElementById("error").textContent, progress: document.getElementById("progress").value };
  });
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  process.stdout.write(JSON.stringify({ ...shown, progressSeen: [...seen].sort() }));
} finally {
  await browser.close();
}
