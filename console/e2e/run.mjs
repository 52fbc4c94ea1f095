// End-to-end test of the console: a real `maas` node (the debug binary) with the console
// embedded, driven in Debian's chromium by playwright-core (which never downloads a
// browser). It walks what a new user does: sign up, verify with the code from the outbox
// (read by an administrator in the console), sign in, create an API key, chat with
// tiny-llama in the playground with streaming; then the administrator sees the node and
// its GPUs; the user makes a knowledge base on a tiny BERT embedding model (deployed with
// the CLI), uploads a document, tests retrieval and gets a cited answer; the administrator
// uploads a tiny model's folder on the models page and sees the new version in the
// repository. Screenshots at desktop and phone widths go to console/test-results/screenshots
// (or $MAAS_SCREENSHOTS).
//
//   node e2e/run.mjs      (MAAS_BIN overrides the binary; CHROMIUM the browser)
import { spawn, execFile } from 'node:child_process'
import { promisify } from 'node:util'
import { mkdtempSync, mkdirSync, rmSync, existsSync } from 'node:fs'
import { tmpdir, homedir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createInterface } from 'node:readline'
import { chromium } from 'playwright-core'

const here = dirname(fileURLToPath(import.meta.url))
const targetDir = process.env.CARGO_TARGET_DIR ?? join(homedir(), '.cache/maas/target')
const maasBin = process.env.MAAS_BIN ?? join(targetDir, 'debug/maas')
const chromiumPath = process.env.CHROMIUM ?? '/usr/bin/chromium'
const shots = process.env.MAAS_SCREENSHOTS ?? join(here, '../test-results/screenshots')
const ADMIN = { email: 'admin@e2e.test', password: 'violet kettle orbit 1994 granite' }
const USER = { email: 'new.user@e2e.test', password: 'amber tunnel 2718 quiet lantern', name: 'New User' }
// The cluster cookie of a node started with `maas up` and no configuration.
const COOKIE = process.env.MAAS_CLUSTER__COOKIE ?? 'maas-dev-cookie'
// The document the knowledge-base walk uploads: self-written, with words no other text has.
const DOC_NAME = 'lighthouse-handbook.md'
const DOC_TEXT = `# Lighthouse handbook

## Lamp maintenance

The keeper of the Quillfeather lighthouse polishes the brass lens every Tuesday at dawn.
A cracked prism is replaced from the spare crate in the cellar, and the log book records it.

## Storm procedure

When the barometer falls quickly the keeper lights the amber storm lantern and rings the fog bell
every thirty seconds until the wind drops.
`
const started = Date.now()
const failures = []
const openPages = []
let step = ''

function log(message) {
  console.log(`e2e [${((Date.now() - started) / 1000).toFixed(1)}s] ${message}`)
}

async function check(name, body) {
  step = name
  const at = Date.now()
  await body()
  log(`ok   ${name} (${Date.now() - at} ms)`)
}

// ---- the node ---------------------------------------------------------------------------

function startNode(dataDir) {
  if (!existsSync(maasBin)) throw new Error(`no maas binary at ${maasBin}: run cargo build --workspace --bin maas`)
  const child = spawn(maasBin, ['up', '--listen', '127.0.0.1:0', '--data', dataDir], {
    env: {
      ...process.env,
      NO_COLOR: '1',
      MAAS_LISTEN__CLUSTER: '127.0.0.1:0',
      // Two simulated GPUs, so the cluster page has GPUs to show on a machine without any.
      MAAS_NODE__SIMULATED_GPUS: '[{model = "H100", memory_mib = 81920, count = 2}]',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  // The last lines, and apart from them the last lines that are not request logs: a
  // failure after a minute of polling must still show what the node said while it happened.
  const tail = []
  const events = []
  const keep = (line) => {
    tail.push(line)
    if (tail.length > 60) tail.shift()
    if (!line.includes('maas_gateway::middleware: request')) {
      events.push(line)
      if (events.length > 80) events.shift()
    }
  }
  // Drain both pipes for the node's whole life, so it never blocks on a full pipe.
  createInterface({ input: child.stderr }).on('line', keep)
  const base = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`maas printed no api address in 60 s:\n${tail.join('\n')}`)), 60_000)
    createInterface({ input: child.stdout }).on('line', (line) => {
      keep(line)
      const match = /^\s*api\s+(http:\/\/\S+)/.exec(line)
      if (match) {
        clearTimeout(timer)
        resolve(match[1].replace(/\/$/, ''))
      }
    })
    child.on('exit', (code) => reject(new Error(`maas exited (${code}) before serving:\n${tail.join('\n')}`)))
  })
  return { child, base, tail, events }
}

async function waitFor(what, limitMs, probe) {
  const deadline = Date.now() + limitMs
  for (;;) {
    try {
      const value = await probe()
      if (value) return value
    } catch {
      // Not yet.
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 250))
  }
}

async function http(base, method, path, body, token) {
  const response = await fetch(base + path, {
    method,
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  const text = await response.text()
  let json = null
  try {
    json = JSON.parse(text)
  } catch {
    // Not JSON.
  }
  return { status: response.status, headers: response.headers, text, json }
}

const execFileAsync = promisify(execFile)

/** Runs the maas CLI against the node as its administrator (the cluster cookie). */
async function maasCli(base, args) {
  try {
    const { stdout } = await execFileAsync(maasBin, [...args, '--server', base, '--cookie', COOKIE], {
      env: { ...process.env, NO_COLOR: '1' },
      maxBuffer: 16 * 1024 * 1024,
    })
    return stdout
  } catch (error) {
    throw new Error(`maas ${args.join(' ')} failed: ${error.stderr ?? error.message}`)
  }
}

function assert(condition, message) {
  if (!condition) throw new Error(message)
}

// ---- the walk ---------------------------------------------------------------------------

/** The English words on `page` in what a person reads as the console's own (titles,
 *  headings, labels, buttons, tabs, menus, tags, placeholders, accessible names), less `data`
 *  (words of the data the page shows), and whether the document title is Chinese. */
async function englishOn(page, data) {
  return page.evaluate((data) => {
    // Names, units and key names Chinese text writes in Latin letters too.
    const same = /^(maas|GPU|GPUs|CPU|API|URL|JSON|SSE|OpenAI|GitHub|Google|OIDC|MiniLM|Top|MB|GB|KiB|MiB|GiB|ms|px|id|ID|v\d+|latest|ECharts|CSV|HTTPS|TLS|VRAM|token|tokens|Ctrl|Enter|BM)$/i
    const chrome = 'h1, h2, h3, h4, label, th, button, [role="tab"], [role="menuitem"], .el-form-item__label, .el-empty__description, .el-table__empty-text, .el-tag, .el-statistic__head'
    const texts = [...document.querySelectorAll(chrome)].filter((e) => e.offsetParent !== null).map((e) => e.innerText)
    for (const e of document.querySelectorAll('[placeholder], [aria-label], [title]')) {
      texts.push(e.getAttribute('placeholder') ?? '', e.getAttribute('aria-label') ?? '', e.getAttribute('title') ?? '')
    }
    texts.push(document.title)
    const words = texts.flatMap((text) => text.match(/[A-Za-z][A-Za-z'-]+/g) ?? []).filter((w) => !same.test(w) && !data.includes(w))
    return { words: [...new Set(words)], cjk: /[\u4e00-\u9fff]/.test(document.title) }
  }, data)
}

/** The visible controls on `page` that a screen reader could not name (no label, no
 *  aria-label or aria-labelledby, no title, no text): each as tag#id.class. */
async function unnamedControls(page) {
  return page.evaluate(() => {
    const controls = 'input:not([type="hidden"]), select, textarea, button, a[href], [role="button"], [role="combobox"], [role="checkbox"], [role="radio"], [role="switch"], [role="slider"], [role="tab"], [role="menuitem"]'
    const text = (e) => (e?.innerText ?? e?.textContent ?? '').trim()
    const nameOf = (e) => {
      const labelledBy = e.getAttribute('aria-labelledby')
      if (labelledBy) {
        const named = labelledBy.split(/\s+/).map((id) => text(document.getElementById(id))).join(' ').trim()
        if (named) return named
      }
      const direct = e.getAttribute('aria-label') || e.getAttribute('title') || e.getAttribute('alt')
      if (direct?.trim()) return direct.trim()
      if (e.id) {
        const label = document.querySelector(`label[for="${CSS.escape(e.id)}"]`)
        if (label && text(label)) return text(label)
      }
      if (e.closest('label') && text(e.closest('label'))) return text(e.closest('label'))
      if (['BUTTON', 'A'].includes(e.tagName) || e.getAttribute('role')) {
        if (text(e)) return text(e)
        const inner = e.querySelector('[aria-label], img[alt], svg title')
        if (inner) return inner.getAttribute('aria-label') || inner.getAttribute('alt') || inner.textContent
      }
      return e.getAttribute('placeholder')?.trim() ?? ''
    }
    const visible = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden' && !e.closest('[aria-hidden="true"]')
    return [...document.querySelectorAll(controls)]
      .filter((e) => visible(e) && !e.disabled && e.getAttribute('tabindex') !== '-1' && !nameOf(e))
      .map((e) => `${e.tagName.toLowerCase()}${e.id ? `#${e.id}` : ''}${[...e.classList].slice(0, 2).map((c) => `.${c}`).join('')}`)
  })
}

async function main() {
  rmSync(shots, { recursive: true, force: true })
  mkdirSync(shots, { recursive: true })
  const dataDir = mkdtempSync(join(tmpdir(), 'maas-e2e-'))
  const node = startNode(join(dataDir, 'data'))
  let browser
  try {
    const base = await node.base
    log(`node at ${base}`)
    await waitFor('/readyz', 60_000, async () => (await fetch(`${base}/readyz`)).ok)

    let adminToken = ''
    await check('the first account (the administrator) signs up through the API', async () => {
      const signup = await http(base, 'POST', '/v1/auth/signup', { email: ADMIN.email, password: ADMIN.password })
      assert(signup.status === 201, `sign-up: ${signup.status} ${signup.text}`)
      const login = await http(base, 'POST', '/v1/auth/login', { login: ADMIN.email, password: ADMIN.password })
      assert(login.status === 200, `login: ${login.text}`)
      adminToken = login.json.token
    })

    await check('the server keeps API paths JSON and serves the console elsewhere', async () => {
      const missing = await http(base, 'GET', '/v1/nothing-here')
      assert(missing.status === 404 && missing.json?.error?.code === 'unknown_route', `GET /v1/nothing-here: ${missing.status} ${missing.text}`)
      const deep = await fetch(`${base}/keys`, { headers: { accept: 'text/html' } })
      assert(deep.ok && (await deep.text()).includes('<div id="app">'), 'a console route serves index.html')
      assert(deep.headers.get('cache-control') === 'no-cache', `index.html cache-control: ${deep.headers.get('cache-control')}`)
      const page = await (await fetch(`${base}/`)).text()
      const asset = /\/assets\/[^"]+\.js/.exec(page)?.[0]
      assert(asset, 'the start page loads a hashed script')
      const script = await fetch(base + asset)
      assert(script.ok && script.headers.get('cache-control')?.includes('immutable'), `asset cache-control: ${script.headers.get('cache-control')}`)
      assert(script.headers.get('content-encoding') === 'gzip', `the script is sent gzipped: ${script.headers.get('content-encoding')}`)
      assert((await fetch(`${base}/assets/missing.js`)).status === 404, 'a missing asset is a 404')
    })

    await check('tiny-llama is deployed and ready', async () => {
      let last = ''
      await waitFor('a ready tiny-llama replica', 120_000, async () => {
        const list = await http(base, 'GET', '/v1/deployments', undefined, adminToken)
        last = list.text
        return list.json?.deployments?.some((d) => d.id === 'tiny-llama' && d.replicas_ready >= 1)
      }).catch(async (error) => {
        // What the replica's node says about it, and the cluster's view of the nodes.
        const logs = await http(base, 'GET', '/v1/deployments/tiny-llama/logs', undefined, adminToken).catch((e) => ({ text: String(e) }))
        const nodes = await http(base, 'GET', '/v1/nodes', undefined, adminToken).catch((e) => ({ text: String(e) }))
        throw new Error(
          `${error.message}; the deployments: ${last.slice(0, 1500)}\nits log: ${logs.text.slice(0, 3000)}\nthe nodes: ${nodes.text.slice(0, 1500)}`,
        )
      })
    })

    await check('an embedding model (a tiny random BERT) is imported and deployed with the CLI', async () => {
      const modelDir = join(dataDir, 'bert')
      await execFileAsync(maasBin, ['dev', 'tiny-model', '--arch', 'bert', modelDir])
      await maasCli(base, ['model', 'import', modelDir, '--name', 'bert', '--quiet'])
      await maasCli(base, ['deploy', 'bert', '--name', 'embed', '--gpus', '0', '--cpu-fallback'])
    })

    step = 'launching chromium'
    // playwright-core gives the browser a fresh temporary profile of its own
    // (--user-data-dir under the temp folder, removed on close); it refuses the flag itself.
    browser = await chromium.launch({
      executablePath: chromiumPath,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    })
    const desktop = { viewport: { width: 1280, height: 860 }, locale: 'en-US' }
    const userContext = await browser.newContext(desktop)
    const adminContext = await browser.newContext(desktop)
    const user = await userContext.newPage()
    const admin = await adminContext.newPage()
    openPages.push(user, admin)
    for (const page of [user, admin]) {
      page.on('pageerror', (error) => failures.push(`page error: ${error.message}`))
      page.on('console', (message) => {
        if (message.type() === 'error' && !/401|Unauthorized|the server responded with a status of/.test(message.text())) {
          failures.push(`console error: ${message.text()}`)
        }
      })
    }

    await check('a new user signs up in the console and is asked for the code', async () => {
      await user.goto(`${base}/`)
      await user.waitForURL(/\/signin/)
      await user.screenshot({ path: join(shots, 'signin-desktop.png'), fullPage: true })
      await user.getByRole('link', { name: 'Sign up' }).click()
      await user.getByLabel('Email', { exact: true }).fill(USER.email)
      await user.getByLabel('Display name (optional)').fill(USER.name)
      await user.getByLabel('Password', { exact: true }).fill(USER.password)
      await user.click('[data-test="signup-submit"]')
      await user.waitForURL(/\/verify\?login=/)
      await user.getByText(`Enter the six-digit code sent to ${USER.email}`).waitFor()
    })

    let code = ''
    await check('the administrator signs in and reads the code in the outbox', async () => {
      await admin.goto(`${base}/signin`)
      await admin.getByLabel('Email or phone').fill(ADMIN.email)
      await admin.getByLabel('Password', { exact: true }).fill(ADMIN.password)
      await admin.click('[data-test="signin-submit"]')
      await admin.waitForURL(`${base}/`)
      await admin.goto(`${base}/admin/outbox`)
      const row = admin.locator('[data-test="outbox-table"] tr', { hasText: USER.email }).first()
      await row.waitFor()
      code = /\b(\d{6})\b/.exec(await row.innerText())?.[1] ?? ''
      assert(code, `no six-digit code in the outbox row: ${await row.innerText()}`)
      await admin.screenshot({ path: join(shots, 'outbox-desktop.png'), fullPage: true })
    })

    await check('the user verifies with the code and signs in', async () => {
      await user.getByLabel('Code').fill(code)
      await user.click('[data-test="verify-submit"]')
      await user.waitForURL(/\/signin/)
      await user.getByText('Your account is active').waitFor()
      await user.getByLabel('Password', { exact: true }).fill(USER.password)
      await user.click('[data-test="signin-submit"]')
      await user.waitForURL(`${base}/`)
      await user.getByText(`Welcome, ${USER.name}`).waitFor()
      await user.locator('[data-test="first-run"]').getByText('tiny-llama').first().waitFor()
      await user.screenshot({ path: join(shots, 'home-desktop.png'), fullPage: true })
    })

    await check('the user creates an API key, shown once, and it works', async () => {
      await user.goto(`${base}/keys`)
      await user.click('[data-test="new-key"]')
      await user.getByLabel('Name', { exact: true }).fill('e2e')
      await user.click('[data-test="create-key"]')
      const secret = (await user.locator('[data-test="secret-text"]').innerText()).trim()
      assert(secret.startsWith('sk-maas-'), `the secret is shown: ${secret}`)
      await user.locator('[data-test="keys-table"]').getByText('e2e').waitFor()
      assert(!(await user.locator('[data-test="keys-table"]').innerText()).includes(secret), 'the table never shows the secret')
      await user.screenshot({ path: join(shots, 'keys-desktop.png'), fullPage: true })
      const models = await http(base, 'GET', '/v1/models', undefined, secret)
      assert(models.status === 200 && models.json.data.some((m) => m.id === 'tiny-llama'), `the key lists models: ${models.text}`)
      await user.reload()
      await user.locator('[data-test="keys-table"]').getByText('e2e').waitFor()
      assert((await user.locator('[data-test="secret-text"]').count()) === 0, 'the secret is gone after a reload')
    })

    await check('the user chats with tiny-llama in the playground and tokens stream in', async () => {
      await user.goto(`${base}/playground?model=tiny-llama`)
      // The send button is enabled once a model is chosen (tiny-llama, from the query).
      await user.waitForSelector('[data-test="chat-send"]:not([disabled])')
      await user.getByText('tiny-llama').first().waitFor()
      await user.getByLabel('Max tokens').fill('24')
      await user.getByLabel('Message').fill('hello there')
      // Record, in the page, every length the answer has as it renders.
      await user.evaluate(() => {
        const sizes = new Set()
        window.__answerSizes = sizes
        new MutationObserver(() => {
          const answers = document.querySelectorAll('[data-test="message-assistant"] .text')
          const last = answers[answers.length - 1]
          if (last) sizes.add(last.textContent.replace('▍', '').length)
        }).observe(document.querySelector('[data-test="chat-log"]'), { subtree: true, childList: true, characterData: true })
      })
      const streamed = user.waitForResponse((r) => r.url().endsWith('/v1/chat/completions'))
      await user.click('[data-test="chat-send"]')
      const response = await streamed
      assert(response.status() === 200, `chat: ${response.status()}`)
      assert(response.headers()['content-type']?.startsWith('text/event-stream'), `chat content-type: ${response.headers()['content-type']}`)
      await user.locator('[data-test="chat-usage"]').waitFor({ timeout: 60_000 })
      const body = await response.text()
      const deltas = body.split('\n').filter((line) => line.startsWith('data:') && line.includes('"delta"') && line.includes('"content"')).length
      assert(deltas >= 2, `the answer came as several events (${deltas}): ${body.slice(0, 600)}`)
      assert(/data:\s?\[DONE\]$/.test(body.trimEnd()), 'the stream ends with [DONE]')
      const usage = await user.locator('[data-test="chat-usage"]').innerText()
      assert(/\d+ prompt \+ \d+ completion tokens/.test(usage), `usage shown: ${usage}`)
      const answer = user.locator('[data-test="message-assistant"] .text').last()
      const text = (await answer.innerText()).replace('▍', '')
      assert(text.trim().length > 0, 'the answer has text')
      const sizes = await user.evaluate(() => [...window.__answerSizes])
      log(`     ${deltas} content events; the answer rendered at ${sizes.length} lengths; ${usage}; ${JSON.stringify(text.slice(0, 50))}`)
      await user.screenshot({ path: join(shots, 'playground-desktop.png'), fullPage: true })
    })

    let kbPath = ''
    await check('the user creates a knowledge base on the embedding model', async () => {
      await waitFor('embed listed by /v1/models', 180_000, async () => {
        const models = await http(base, 'GET', '/v1/models', undefined, adminToken)
        return models.json?.data?.some((m) => m.id === 'embed')
      })
      await user.goto(`${base}/knowledge`)
      await user.getByText('No knowledge bases yet').waitFor()
      await user.click('[data-test="new-kb"]')
      await user.getByLabel('Name', { exact: true }).fill('handbook')
      await user.getByLabel('Description').fill('How the lighthouse is kept')
      await user.getByRole('combobox', { name: 'Embedding model' }).click()
      await user.getByRole('option', { name: 'embed', exact: true }).click()
      await user.click('[data-test="create-kb"]')
      await user.waitForURL(/\/knowledge\/[^/]+$/)
      kbPath = new URL(user.url()).pathname
      await user.getByRole('heading', { name: 'handbook' }).waitFor()
    })

    await check('the user uploads a document and it is indexed', async () => {
      await user.locator('[data-test="upload-file"]').setInputFiles({ name: DOC_NAME, mimeType: 'text/markdown', buffer: Buffer.from(DOC_TEXT) })
      await user.getByLabel('Tags').fill('manual, e2e')
      await user.click('[data-test="upload-submit"]')
      const table = user.locator('[data-test="documents-table"]')
      await table.getByText(DOC_NAME).waitFor()
      const done = table.locator('[data-test="doc-state-indexed"], [data-test="doc-state-failed"]').first()
      await done.waitFor({ timeout: 180_000 })
      const state = await done.innerText()
      assert(state.trim() === 'indexed', `the document is ${state}: ${await table.innerText()}`)
      assert((await table.innerText()).includes('v1'), 'the version is shown')
      await user.locator('[data-test="kb-stats"]').getByText(/^[1-9]\d*$/).first().waitFor()
      await user.screenshot({ path: join(shots, 'knowledge-documents-desktop.png'), fullPage: true })
      await table.getByRole('button', { name: 'Chunks' }).first().click()
      await user.locator('[data-test="chunks"] .chunk').getByText(/Quillfeather/).first().waitFor()
      await user.screenshot({ path: join(shots, 'knowledge-chunks-desktop.png'), fullPage: true })
    })

    await check("a retrieval test shows the document's chunk with its scores", async () => {
      await user.getByRole('tab', { name: 'Retrieval test' }).click()
      await user.getByLabel('Query').fill('who polishes the brass lens of the Quillfeather lighthouse')
      await user.click('[data-test="retrieve-submit"]')
      const hit = user.locator('[data-test="retrieve-hit"]').first()
      await hit.waitFor()
      const text = await hit.innerText()
      assert(text.includes(DOC_NAME) && text.includes('Quillfeather'), `the first hit is the document's chunk: ${text}`)
      assert(/score \d\.\d{3}/.test(text), `the hit shows its score: ${text}`)
      await user.screenshot({ path: join(shots, 'knowledge-retrieve-desktop.png'), fullPage: true })
      await user.getByRole('tab', { name: 'Graph' }).click()
      await user.locator('[data-test="graph-chart"], :text("The graph is empty")').first().waitFor()
      if (await user.locator('[data-test="graph-chart"]').count()) {
        // An entity's relations and the chunks that mention it (the select does what a click on the chart does).
        await user.getByRole('combobox', { name: 'Entity' }).click()
        await user.getByRole('option', { name: /^Quillfeather/ }).click()
        await user.locator('[data-test="entity-detail"] .chunk').getByText(/Quillfeather/).first().waitFor()
      }
      await user.screenshot({ path: join(shots, 'knowledge-graph-desktop.png'), fullPage: true })
      await user.goto(`${base}/knowledge`)
      await user.locator('[data-test="kb-table"]').getByText('handbook').waitFor()
      await user.screenshot({ path: join(shots, 'knowledge-desktop.png'), fullPage: true })
    })

    await check('the playground answers from the knowledge base and cites the uploaded file', async () => {
      await user.goto(`${base}/playground?model=tiny-llama`)
      await user.waitForSelector('[data-test="chat-send"]:not([disabled])')
      await user.click('[data-test="kb-toggle"]')
      await user.getByRole('combobox', { name: 'Knowledge bases' }).click({ force: true })
      await user.getByRole('option', { name: 'handbook' }).click()
      await user.keyboard.press('Escape')
      // tiny-llama's context is 512 tokens: of the 5 sources retrieved, those that fit with
      // the question and 16 tokens for the answer go in (the last one cut), the rest are
      // counted as omitted.
      await user.getByLabel('Max tokens').fill('16')
      await user.getByLabel('Message').fill('When is the brass lens of the Quillfeather lighthouse polished?')
      const answered = user.waitForResponse((r) => r.url().endsWith('/v1/chat/completions'))
      await user.click('[data-test="chat-send"]')
      const response = await answered
      assert(response.status() === 200, `chat: ${response.status()} ${await response.text()}`)
      const citation = user.locator('[data-test="citation"]').first()
      await citation.waitFor({ timeout: 60_000 })
      const cited = await citation.innerText()
      assert(cited.includes(`${DOC_NAME} v1`), `the citation names the file: ${cited}`)
      await user.locator('[data-test="chat-usage"]').waitFor({ timeout: 60_000 })
      await citation.locator('summary').click()
      await citation.getByText('Quillfeather').first().waitFor()
      await user.screenshot({ path: join(shots, 'playground-rag-desktop.png'), fullPage: true })
    })

    await check('usage shows the chat', async () => {
      await user.goto(`${base}/usage`)
      await user.getByRole('heading', { name: 'By day' }).waitFor()
      await user.locator('canvas').first().waitFor()
      await user.screenshot({ path: join(shots, 'usage-desktop.png'), fullPage: true })
    })

    await check('the administrator sees the node, the leader and its GPUs with memory bars', async () => {
      await admin.goto(`${base}/admin/cluster`)
      const nodes = admin.locator('[data-test="nodes-table"]')
      await nodes.getByText('alive').waitFor()
      await nodes.getByText('Leader').waitFor()
      const gpus = admin.locator('[data-test="gpus-table"] .el-table__row')
      await gpus.first().waitFor()
      assert((await gpus.count()) === 2, `two GPUs listed, got ${await gpus.count()}`)
      assert((await admin.locator('[data-test="gpus-table"]').innerText()).includes('H100'), 'the GPU model is shown')
      assert((await admin.locator('[data-test="gpus-table"] [role="progressbar"]').count()) === 2, 'each GPU has a memory bar')
      await admin.screenshot({ path: join(shots, 'cluster-desktop.png'), fullPage: true })
      await admin.goto(`${base}/admin/users`)
      await admin.locator('[data-test="users-table"]').getByText(USER.email).waitFor()
    })

    await check('the administrator estimates a deployment in the wizard and deploys it', async () => {
      await admin.goto(`${base}/deployments`)
      await admin.getByRole('button', { name: 'New deployment' }).click()
      await admin.getByRole('combobox', { name: 'Model' }).click()
      await admin.getByRole('option', { name: 'tiny-llama' }).click()
      await admin.getByRole('button', { name: 'Estimate' }).click()
      await admin.getByText(/Each replica needs \d+ MiB on each of 1 GPU/).waitFor()
      await admin.getByText('The scheduler would place it on node 1, GPU(s) 0').waitFor()
      await admin.screenshot({ path: join(shots, 'deploy-wizard-desktop.png') })
      await admin.getByLabel('Name', { exact: true }).fill('tiny-on-gpu')
      await admin.getByRole('button', { name: 'Deploy', exact: true }).click()
      await admin.locator('.el-table__row', { hasText: 'tiny-on-gpu' }).first().waitFor()
    })

    await check("a deployment's monitoring counts the playground's chats", async () => {
      await admin.goto(`${base}/deployments`)
      const row = admin.locator('.el-table__row', { hasText: 'tiny-llama' }).first()
      await row.locator('.el-table__expand-icon').click()
      const metrics = admin.locator('[data-test="metrics-tiny-llama"]')
      await metrics.waitFor()
      await metrics.locator('canvas').first().waitFor()
      const requests = metrics.locator('[data-test="metrics-requests"] .el-statistic__content')
      await admin.waitForFunction(
        (el) => Number((el?.textContent ?? '0').replace(/[^0-9]/g, '')) >= 2,
        await requests.elementHandle(),
        { timeout: 20_000 },
      )
      // The deployment's log: the replica started on node 1 and loaded the tiny model.
      const logs = admin.locator('[data-test="logs-tiny-llama"]')
      await logs.getByText(/starting on node 1 on the CPU/).waitFor()
      await logs.getByText(/ready in [0-9.]+ s: .*tiny random-weight/).waitFor()
      await admin.screenshot({ path: join(shots, 'deployment-metrics-desktop.png'), fullPage: true })
      // The deployment on a (simulated) GPU has a GPU chart once its replica is sampled.
      await row.locator('.el-table__expand-icon').click()
      const onGpu = admin.locator('.el-table__row', { hasText: 'tiny-on-gpu' }).first()
      await onGpu.locator('.el-table__expand-icon').click()
      await admin.locator('[data-test="metrics-tiny-on-gpu"] [data-test="gpu-chart"]').waitFor({ timeout: 40_000 })
      await admin.screenshot({ path: join(shots, 'deployment-gpu-desktop.png'), fullPage: true })
    })

    await check('the administrator uploads a model folder on the models page and its version is listed', async () => {
      const modelDir = join(dataDir, 'uploaded-tiny')
      await execFileAsync(maasBin, ['dev', 'tiny-model', '--arch', 'llama', modelDir])
      const blobs = []
      const onResponse = (response) => {
        if (response.url().endsWith('/v1/blobs') && response.request().method() === 'POST') blobs.push(response.status())
      }
      admin.on('response', onResponse)
      try {
        await admin.goto(`${base}/models`)
        await admin.getByRole('tab', { name: 'Repository' }).click()
        const upload = admin.locator('[data-test="model-upload"]')
        await upload.getByText('No folder or files chosen yet.').waitFor()
        // A directory on a webkitdirectory input: each file's webkitRelativePath is `uploaded-tiny/<file>`.
        await admin.locator('[data-test="model-folder"]').setInputFiles(modelDir)
        await upload.locator('[data-test="model-upload-file"]', { hasText: 'model.safetensors' }).waitFor()
        const paths = await upload.locator('[data-test="model-upload-file"] .path').allInnerTexts()
        for (const file of ['config.json', 'tokenizer.json', 'model.safetensors']) {
          assert(paths.includes(file), `the upload lists ${file} by its path in the folder: ${JSON.stringify(paths)}`)
        }
        const name = admin.getByLabel('Model name', { exact: true })
        assert((await name.inputValue()) === 'uploaded-tiny', `the name comes from the folder: ${JSON.stringify(await name.inputValue())}`)
        await admin.screenshot({ path: join(shots, 'models-upload-desktop.png'), fullPage: true })
        const registered = admin.waitForResponse((r) => r.url().endsWith('/v1/registry/models') && r.request().method() === 'POST', { timeout: 120_000 })
        await admin.click('[data-test="model-upload-submit"]')
        const response = await registered
        assert(response.status() === 201, `registration: ${response.status()} ${await response.text()}`)
        await admin.getByText('Model uploaded-tiny version v1 is in the repository.').waitFor()
        assert(blobs.length === paths.length && blobs.every((status) => status === 200), `one blob upload per file (${paths.length}): ${JSON.stringify(blobs)}`)
        const row = admin.locator('[data-test="repository-table"] .el-table__row', { hasText: 'uploaded-tiny' }).first()
        await row.waitFor()
        await admin.screenshot({ path: join(shots, 'models-repository-desktop.png'), fullPage: true })
        const listed = await http(base, 'GET', '/v1/registry/models', undefined, adminToken)
        const version = listed.json?.versions?.find((v) => v.name === 'uploaded-tiny')
        assert(
          version?.version === 'v1' && version.format === 'safetensors' && version.files?.length === paths.length,
          `the repository has uploaded-tiny v1 with its ${paths.length} files: ${JSON.stringify(version ?? listed.text).slice(0, 800)}`,
        )
      } finally {
        admin.off('response', onResponse)
      }
    })

    await check('the administrator fine-tunes a model and watches its loss curve to the end', async () => {
      await admin.goto(`${base}/fine-tuning`)
      await admin.locator('[data-test="new-job"]').click()
      await admin.getByRole('dialog').waitFor()
      const line = JSON.stringify({ messages: [{ role: 'user', content: 'what is maas' }, { role: 'assistant', content: 'maas is the answer' }] })
      await admin.locator('[data-test="ft-file"]').setInputFiles({ name: 'train.jsonl', mimeType: 'application/jsonl', buffer: Buffer.from(`${line}\n`.repeat(6)) })
      await admin.getByRole('dialog').getByText('train.jsonl').waitFor()
      await admin.locator('[data-test="ft-epochs"] input').fill('4')
      await admin.locator('[data-test="ft-lr"] input').fill('50')
      await admin.locator('[data-test="create-job"]').click()
      // The new job is selected: its curve fills in as steps finish, and it ends succeeded.
      await admin.locator('[data-test="job-detail"]').waitFor()
      await admin.locator('[data-test="job-status"]', { hasText: 'succeeded' }).first().waitFor({ timeout: 120_000 })
      const model = await admin.locator('[data-test="job-model"]').first().innerText()
      assert(/-ft:ftjob-/.test(model), `the trained model is named: ${model}`)
      const jobs = await http(base, 'GET', '/v1/fine_tuning/jobs', undefined, adminToken)
      const job = jobs.json?.data?.[0]
      assert(job?.status === 'succeeded' && job.steps_done === job.total_steps && job.gpu_seconds >= 0, `the job: ${jobs.text.slice(0, 600)}`)
      // The curve reaches the last step.
      await admin.locator(`[data-test="loss-chart"][data-last-step="${job.total_steps}"]`).waitFor({ timeout: 20_000 })
      await admin.screenshot({ path: join(shots, 'fine-tuning-desktop.png'), fullPage: true })
      log(`     ${job.total_steps} steps of ${job.model} trained into ${model}`)
    })

    await check('the console switches to Chinese', async () => {
      await admin.goto(`${base}/admin/cluster`)
      await admin.locator('.topbar .language').click()
      await admin.getByRole('option', { name: '中文' }).click()
      await admin.getByRole('heading', { name: '集群' }).waitFor()
      await admin.screenshot({ path: join(shots, 'cluster-desktop-zh.png'), fullPage: true })
      await admin.goto(`${base}/knowledge`)
      await admin.getByRole('heading', { name: '知识库' }).waitFor()
      await admin.getByRole('button', { name: '新建知识库' }).click()
      await admin.getByText('向量模型', { exact: true }).first().waitFor()
      await admin.waitForTimeout(400) // the dialog fades in
      await admin.screenshot({ path: join(shots, 'knowledge-create-desktop-zh.png'), fullPage: true })
    })

    await check('every page reads in Chinese (title, headings, labels, buttons, menus) and names its controls', async () => {
      // The admin's console is in Chinese now. On every page, what a person reads as the
      // console's own (not the data it shows) must hold no English word: a string left out
      // of the translations, or one a component library brings in English.
      const pages = ['/', '/playground', '/models', '/deployments', '/knowledge', '/fine-tuning', '/keys', '/usage', '/orgs', '/profile',
        '/admin/cluster', '/admin/users', '/admin/prices', '/admin/audit', '/admin/outbox']
      const leaks = []
      // What the pages show of this run's data: the accounts, models, node ids, and the
      // audit filter's example (an action prefix, `key.`).
      // The fine-tuning jobs' ids (ftjob-<hex>) are data too.
      const jobs = await http(base, 'GET', '/v1/fine_tuning/jobs', undefined, adminToken)
      const jobIds = (jobs.json?.data ?? []).map((job) => job.id).join(' ')
      const dataWords = [ADMIN.email, USER.email, USER.name, jobIds, 'tiny-llama bert embed node- key uploaded-tiny ft'].flatMap((text) => text.match(/[A-Za-z][A-Za-z'-]+/g) ?? [])
      for (const path of pages) {
        await admin.goto(`${base}${path}`)
        await admin.waitForLoadState('networkidle')
        await admin.locator('main').first().waitFor()
        await admin.waitForTimeout(200)
        const found = await englishOn(admin, dataWords)
        if (!found.cjk) leaks.push(`${path}: the title is not Chinese`)
        if (found.words.length > 0) leaks.push(`${path}: ${found.words.join(', ')}`)
        const unnamed = await unnamedControls(admin)
        if (unnamed.length > 0) leaks.push(`${path}: controls without an accessible name: ${unnamed.join(', ')}`)
        await admin.screenshot({ path: join(shots, `zh${path === '/' ? '-home' : path.replaceAll('/', '-')}-desktop.png`), fullPage: true })
      }
      assert(leaks.length === 0, `English on Chinese pages:\n${leaks.join('\n')}`)
    })

    await check("a knowledge base's tabs read in Chinese too", async () => {
      const page = await userContext.newPage()
      openPages.push(page)
      await page.goto(`${base}/knowledge`)
      await page.evaluate(() => localStorage.setItem('maas.locale', 'zh'))
      await page.reload()
      await page.locator('[data-test="kb-table"]').getByText('handbook').click()
      await page.getByRole('heading', { name: 'handbook' }).waitFor()
      const tabs = page.getByRole('tab')
      const dataWords = [USER.email, USER.name, DOC_NAME, DOC_TEXT, 'handbook manual e2e embed bert tiny-llama'].flatMap((text) => text.match(/[A-Za-z][A-Za-z'-]+/g) ?? [])
      const leaks = []
      for (let tab = 0; tab < (await tabs.count()); tab += 1) {
        await tabs.nth(tab).click()
        await page.waitForLoadState('networkidle')
        await page.waitForTimeout(300)
        const found = await englishOn(page, dataWords)
        if (!found.cjk) leaks.push(`tab ${tab}: the title is not Chinese`)
        if (found.words.length > 0) leaks.push(`tab ${tab} (${await tabs.nth(tab).innerText()}): ${found.words.join(', ')}`)
        const unnamed = await unnamedControls(page)
        if (unnamed.length > 0) leaks.push(`tab ${tab}: controls without an accessible name: ${unnamed.join(', ')}`)
        await page.screenshot({ path: join(shots, `zh-knowledge-tab-${tab}-desktop.png`), fullPage: true })
      }
      // The user's other page goes on in English.
      await page.evaluate(() => localStorage.setItem('maas.locale', 'en'))
      await page.close()
      assert(leaks.length === 0, `English on a knowledge base's Chinese tabs:\n${leaks.join('\n')}`)
    })

    await check('pages fit a 375 px phone', async () => {
      const phone = await browser.newContext({ viewport: { width: 375, height: 812 }, locale: 'en-US', isMobile: true, hasTouch: true })
      await phone.addCookies(await userContext.cookies())
      const page = await phone.newPage()
      page.on('pageerror', (error) => failures.push(`page error (phone): ${error.message}`))
      const pages = [['home', '/'], ['keys', '/keys'], ['playground', '/playground'], ['usage', '/usage'], ['knowledge', '/knowledge']]
      pages.push(['knowledge-documents', kbPath], ['knowledge-retrieve', `${kbPath}?tab=retrieve`], ['knowledge-graph', `${kbPath}?tab=graph`])
      for (const [name, path] of pages) {
        await page.goto(base + path)
        await page.locator('main h1').first().waitFor()
        if (name.startsWith('knowledge')) await page.waitForLoadState('networkidle')
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
        assert(overflow <= 1, `${path} is ${overflow} px wider than the phone`)
        await page.screenshot({ path: join(shots, `${name}-phone.png`), fullPage: true })
      }
      await page.getByRole('button', { name: 'Menu' }).click()
      const drawerItem = page.locator('.nav-drawer').getByRole('menuitem', { name: 'API keys' })
      await drawerItem.waitFor()
      await page.waitForTimeout(500) // the drawer slides in
      await page.screenshot({ path: join(shots, 'menu-phone.png') })
      await drawerItem.click()
      await page.waitForURL(`${base}/keys`)
      await phone.close()
      const adminPhone = await browser.newContext({ viewport: { width: 375, height: 812 }, locale: 'en-US', isMobile: true })
      await adminPhone.addCookies(await adminContext.cookies())
      const cluster = await adminPhone.newPage()
      await cluster.goto(`${base}/admin/cluster`)
      await cluster.locator('[data-test="gpus-table"]').waitFor()
      await cluster.screenshot({ path: join(shots, 'cluster-phone.png'), fullPage: true })
      // The repository tab with the model upload (administrators only).
      await cluster.goto(`${base}/models`)
      await cluster.locator('#tab-repository').click()
      await cluster.locator('[data-test="model-upload"]').waitFor()
      await cluster.locator('[data-test="repository-table"] .el-table__row', { hasText: 'uploaded-tiny' }).first().waitFor()
      const modelsOverflow = await cluster.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
      assert(modelsOverflow <= 1, `/models (repository tab) is ${modelsOverflow} px wider than the phone`)
      await cluster.screenshot({ path: join(shots, 'models-repository-phone.png'), fullPage: true })
      await adminPhone.close()
    })

    assert(failures.length === 0, `the pages reported errors:\n${failures.join('\n')}`)
    log(`passed; screenshots in ${shots}`)
  } catch (error) {
    for (const [index, page] of openPages.entries()) {
      await page.screenshot({ path: join(shots, `failure-${index}.png`), fullPage: true }).catch(() => undefined)
    }
    // Printed last what matters most, since CI logs are often read from their end.
    console.error(`--- the node's last output ---\n${node.tail.join('\n')}`)
    console.error(`--- the node's last output other than request logs ---\n${node.events.join('\n')}`)
    if (failures.length) console.error(failures.join('\n'))
    console.error(`e2e FAILED at "${step}": ${error.stack ?? error}`)
    process.exitCode = 1
  } finally {
    await browser?.close().catch(() => undefined)
    node.child.kill('SIGTERM')
    await new Promise((resolve) => {
      const timer = setTimeout(() => {
        node.child.kill('SIGKILL')
        resolve()
      }, 10_000)
      node.child.on('exit', () => {
        clearTimeout(timer)
        resolve()
      })
      if (node.child.exitCode !== null) resolve()
    })
    rmSync(dataDir, { recursive: true, force: true })
  }
}

await main()
