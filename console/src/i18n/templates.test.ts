// Every string a person reads comes from the translations: no template may carry English
// text of its own (a text node, or a static label, placeholder, title or aria-label), which
// would stay English when the console is switched to Chinese.
import { readFileSync, readdirSync, statSync } from 'node:fs'
import { join, relative } from 'node:path'
import { describe, expect, it } from 'vitest'
import { parse } from 'vue/compiler-sfc'

const root = join(__dirname, '..')

function vueFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name)
    if (statSync(path).isDirectory()) return vueFiles(path)
    return name.endsWith('.vue') ? [path] : []
  })
}

/** Attributes whose static values people read (or hear, through a screen reader). */
const READ_ATTRIBUTES = new Set(['label', 'placeholder', 'title', 'aria-label', 'alt', 'content', 'description', 'empty-text', 'confirm-button-text', 'cancel-button-text'])

/** Words that are the same in both languages: names and units. */
const SAME_IN_BOTH = /^(maas|GPU|GPUs|CPU|API|URL|JSON|SSE|OpenAI|GitHub|Google|OIDC|MiniLM|Top p|Top k|MB|GB|KiB|MiB|GiB|ms|s|px|id|ID|k|p|v\d+|ECharts)$/

/** English words in a text: a word of two or more letters that is not a name or a unit. */
function english(text: string): string[] {
  return (text.match(/[A-Za-z][A-Za-z'-]+/g) ?? []).filter((word) => !SAME_IN_BOTH.test(word))
}

interface Node {
  type: number
  content?: unknown
  children?: Node[]
  props?: Array<{ type: number; name: string; value?: { content: string } }>
  branches?: Node[]
  loc: { start: { line: number } }
}

const TEXT = 2
const ELEMENT = 1
const ATTRIBUTE = 6

function findings(node: Node, file: string, out: string[]): void {
  if (node.type === TEXT && typeof node.content === 'string') {
    const words = english(node.content)
    if (words.length > 0) out.push(`${file}:${node.loc.start.line}: text "${node.content.trim()}"`)
  }
  if (node.type === ELEMENT) {
    for (const prop of node.props ?? []) {
      if (prop.type === ATTRIBUTE && READ_ATTRIBUTES.has(prop.name) && prop.value && english(prop.value.content).length > 0) {
        out.push(`${file}:${node.loc.start.line}: ${prop.name}="${prop.value.content}"`)
      }
    }
  }
  for (const child of [...(node.children ?? []), ...(node.branches ?? [])]) findings(child, file, out)
}

describe('templates', () => {
  const files = vueFiles(root)

  it('are found', () => {
    expect(files.length).toBeGreaterThan(20)
  })

  it('carry no English text of their own: every string goes through the translations', () => {
    const out: string[] = []
    for (const path of files) {
      const { descriptor, errors } = parse(readFileSync(path, 'utf8'), { filename: path })
      expect(errors, path).toEqual([])
      if (descriptor.template?.ast) findings(descriptor.template.ast as unknown as Node, relative(root, path), out)
    }
    expect(out).toEqual([])
  })

  it('would see English text if there were some', () => {
    const { descriptor } = parse('<template><div><el-button title="Delete it">Save now</el-button>{{ $t("a") }}</div></template>')
    const out: string[] = []
    findings(descriptor.template?.ast as unknown as Node, 'sample.vue', out)
    expect(out).toEqual(['sample.vue:1: title="Delete it"', 'sample.vue:1: text "Save now"'])
  })
})
