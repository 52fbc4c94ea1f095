// Small formats the knowledge pages share.

/** "3" or "3–5", or "" when the source has no pages (plain text). */
export function pagesText(source: { page_start: number; page_end: number }): string {
  if (!source.page_start && !source.page_end) return ''
  if (!source.page_end || source.page_end === source.page_start) return String(source.page_start)
  return `${source.page_start}–${source.page_end}`
}

export function score(value: number | null | undefined): string {
  return value === null || value === undefined ? '—' : value.toFixed(3)
}

/** Element Plus tag types for a document state. */
export function stateType(state: string): 'success' | 'warning' | 'danger' | 'info' | 'primary' {
  if (state === 'indexed') return 'success'
  if (state === 'failed') return 'danger'
  if (state === 'retired' || state === 'deleting') return 'info'
  return 'warning'
}
