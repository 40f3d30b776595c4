// Test support: Debian's chromium (/usr/bin/chromium, or $CHROMIUM) driven by playwright-core,
// headless, with a fresh profile. No browser is downloaded.
import { chromium } from 'playwright-core'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'

export async function launch() {
  const profile = mkdtempSync(join(tmpdir(), 'luahub-chromium-'))
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
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
    viewport: { width: 1100, height: 700 },
  })
  const errors = [] // uncaught errors of every page: a test asserts there are none
  return {
    context,
    errors,
    // A page of its own (own sessionStorage) at `url`.
    async page(url) {
      const p = await context.newPage()
      p.on('pageerror', (e) => errors.push(`${url}: ${e.message}`))
      if (url) await p.goto(url)
      return p
    },
    async close() {
      await context.close()
      rmSync(profile, { recursive: true, force: true })
    },
  }
}
