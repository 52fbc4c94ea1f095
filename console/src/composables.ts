// Small helpers the pages share: loading state around an API call, error text, formats.
import { onBeforeUnmount, ref, type Ref } from 'vue'
import { useI18n } from 'vue-i18n'
import { ApiError } from './api/client'
import type { Messages } from './i18n/en'

export interface Loader<T> {
  data: Ref<T | null>
  loading: Ref<boolean>
  error: Ref<unknown>
  reload: () => Promise<void>
}

/** Runs `load` now and on `reload()`, keeping `loading` and `error` current. */
export function useLoader<T>(load: () => Promise<T>, immediate = true): Loader<T> {
  const data = ref<T | null>(null) as Ref<T | null>
  const loading = ref(false)
  const error = ref<unknown>(null)
  async function reload(): Promise<void> {
    loading.value = true
    error.value = null
    try {
      data.value = await load()
    } catch (caught) {
      error.value = caught
    } finally {
      loading.value = false
    }
  }
  if (immediate) void reload()
  return { data, loading, error, reload }
}

/**
 * Reloads `loader` every `everyMs` while the calling component is mounted, skipping a beat
 * while a load is still running.
 */
export function useRefresh<T>(loader: Loader<T>, everyMs: number): void {
  const timer = window.setInterval(() => {
    if (!loader.loading.value) void loader.reload()
  }, everyMs)
  onBeforeUnmount(() => window.clearInterval(timer))
}

/** The text to show for an error: the API's own message, or a translated generic one. */
export function useErrorText(): (error: unknown) => string {
  const { t } = useI18n()
  return (error: unknown) => {
    if (error instanceof ApiError) {
      if (error.status === 0) return t('errors.network')
      if (error.message) return error.message
      return t('errors.unknown', { status: error.status })
    }
    if (error instanceof Error) return error.message
    return String(error)
  }
}

export function formatMib(mib: number): string {
  return mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib} MiB`
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let value = bytes
  let unit = 0
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024
    unit += 1
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`
}

/** Millionths of the currency unit as a decimal amount. */
export function formatMicros(micros: number): string {
  return (micros / 1_000_000).toFixed(micros % 10_000 === 0 ? 2 : 6)
}

export function formatTime(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || ms === 0) return '—'
  return new Date(ms).toLocaleString()
}

export function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`
  return String(n)
}

/** The groups of values the API sends as words (states, statuses, roles, scopes). */
export type EnumGroup = keyof Messages['enums']

/**
 * A value the API sends as a word, in the reader's language: the translation where there is
 * one, else the word itself (a value newer than this console).
 */
export function useEnumLabel(): (group: EnumGroup, value: string | null | undefined) => string {
  const { t, te } = useI18n()
  return (group, value) => {
    if (value === null || value === undefined || value === '') return '—'
    const key = `enums.${group}.${value}`
    return te(key) ? t(key) : value
  }
}
