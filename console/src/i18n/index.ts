import { createI18n } from 'vue-i18n'
import en from './en'
import zh from './zh'

export type Locale = 'en' | 'zh'
export const LOCALES: readonly Locale[] = ['en', 'zh']
const STORAGE_KEY = 'maas.locale'

/** The saved choice, else the browser's language (Chinese for any zh-*), else English. */
export function initialLocale(): Locale {
  const saved = globalThis.localStorage?.getItem(STORAGE_KEY)
  if (saved === 'en' || saved === 'zh') return saved
  const browser = globalThis.navigator?.language ?? 'en'
  return browser.toLowerCase().startsWith('zh') ? 'zh' : 'en'
}

export function makeI18n(locale: Locale = initialLocale()) {
  return createI18n({ legacy: false, locale, fallbackLocale: 'en', messages: { en, zh } })
}

export const i18n = makeI18n()

export function setLocale(locale: Locale): void {
  i18n.global.locale.value = locale
  globalThis.localStorage?.setItem(STORAGE_KEY, locale)
  document.documentElement.lang = locale === 'zh' ? 'zh-CN' : 'en'
}
