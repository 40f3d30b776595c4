// Prints the size of clients/js/luahub.js minified (esbuild) and gzipped (zlib level 9), the
// way a bundler would ship it: `npm run size --prefix tests/js`. Exits 1 over the 5 KB budget.
import { buildSync } from 'esbuild'
import { gzipSync } from 'node:zlib'
import { fileURLToPath } from 'node:url'

const entry = fileURLToPath(new URL('../../clients/js/luahub.js', import.meta.url))
const out = buildSync({ entryPoints: [entry], bundle: true, minify: true, format: 'esm', write: false })
const min = out.outputFiles[0].contents
const gz = gzipSync(min, { level: 9 }).length
const BUDGET = 5000
console.log(`luahub.js: ${min.length} bytes minified, ${gz} bytes minified + gzipped (budget ${BUDGET})`)
if (gz > BUDGET) process.exit(1)
