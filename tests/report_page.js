// Open an Allure 2 report in headless Chromium (Debian's, through playwright-core), expand
// every group of its Suites tree, read the Overview's widgets (the sign-off's verdict, rule,
// coverage and build live there), print what the page shows as JSON, save a screenshot.
//   node report_page.js URL SCREENSHOT.png CHROMIUM USER_DATA_DIR
const { chromium } = require("playwright-core");

async function main() {
  const [url, screenshot, executablePath, userDataDir] = process.argv.slice(2);
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  try {
    const page = context.pages()[0] || await context.newPage();
    const errors = [];
    page.on("pageerror", (error) => errors.push(String(error)));
    await page.goto(`${url}#suites`);
    await page.waitForSelector('.node[data-node-kind="group"]', { timeout: 30000 });
    // Each click re-renders the tree: click one closed group at a time, from the page.
    for (let clicks = 0; clicks < 500; clicks++) {
      const clicked = await page.evaluate(() => {
        for (const group of document.querySelectorAll('.node[data-node-kind="group"]')) {
          if (!group.querySelector(":scope > .node__children")) {
            group.querySelector(":scope > .node__title").click();
            return true;
          }
        }
        return false;
      });
      if (!clicked) break;
    }
    const listed = await page.evaluate(() => ({
      title: document.title,
      groups: [...document.querySelectorAll('.node[data-node-kind="group"] > .node__title .node__name')]
        .map((node) => node.textContent.trim()),
      tests: [...document.querySelectorAll(".node__leaf .node__name")]
        .map((node) => node.textContent.trim()),
    }));
    await page.screenshot({ path: screenshot });
    // The Overview: each widget's text by its id (summary, environment, executors...).
    await page.goto(`${url}#`);
    await page.waitForSelector('.widget[data-id="environment"] .table__row', { timeout: 30000 });
    await page.waitForSelector('.widget[data-id="executors"] .table__row', { timeout: 30000 });
    // The Environment widget shows five rows until its "Show all" is clicked.
    await page.evaluate(() => {
      const more = [...document.querySelectorAll('.widget[data-id="environment"] *')]
        .find((node) => node.children.length === 0 && node.textContent.trim() === "Show all");
      if (more) more.click();
    });
    await page.waitForFunction(() => !document.querySelector('.widget[data-id="environment"]')
      .innerText.includes("Show all"), null, { timeout: 10000 }).catch(() => {});
    const widgets = await page.evaluate(() => Object.fromEntries(
      [...document.querySelectorAll(".widget[data-id]")]
        .map((widget) => [widget.getAttribute("data-id"), widget.innerText])));
    console.log(JSON.stringify({ ...listed, widgets, errors }));
  } finally {
    await context.close();
  }
}

main().catch((error) => { console.error(String(error.stack || error)); process.exit(1); });
