import { describe, expect, it } from 'vitest'
import en from './en'
import zh from './zh'

function keys(value: unknown, prefix = ''): string[] {
  if (typeof value === 'string') return [prefix]
  return Object.entries(value as Record<string, unknown>).flatMap(([key, inner]) => keys(inner, prefix ? `${prefix}.${key}` : key))
}

function lookup(messages: unknown, path: string): unknown {
  return path.split('.').reduce<unknown>((node, key) => (node as Record<string, unknown> | undefined)?.[key], messages)
}

describe('translations', () => {
  it('have the same keys in English and Chinese, none empty', () => {
    expect(keys(zh).sort()).toEqual(keys(en).sort())
    for (const key of keys(en)) {
      expect(String(lookup(en, key)).trim(), key).not.toBe('')
      expect(String(lookup(zh, key)).trim(), key).not.toBe('')
    }
  })

  it('use the same placeholders in both languages', () => {
    const placeholders = (text: string) => [...text.matchAll(/\{(\w+)\}/g)].map((m) => m[1]).sort()
    for (const key of keys(en)) {
      expect(placeholders(String(lookup(zh, key))), key).toEqual(placeholders(String(lookup(en, key))))
    }
  })

  it('contain no character vue-i18n would read as syntax', () => {
    for (const messages of [en, zh]) {
      for (const key of keys(messages)) {
        const text = String(lookup(messages, key))
        expect(text, key).not.toMatch(/[|@$]/)
      }
    }
  })

  it('say something different in Chinese for most strings', () => {
    const same = keys(en).filter((key) => lookup(en, key) === lookup(zh, key))
    // A few strings are the same in both (product names such as "Top p", "GPU", "CPU").
    expect(same.length).toBeLessThan(8)
  })
})
