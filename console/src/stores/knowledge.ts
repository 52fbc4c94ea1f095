// One knowledge base's documents: the list, uploads with their progress, and polling the
// list while any document is still being ingested.
import { defineStore } from 'pinia'
import { computed, ref } from 'vue'
import { api } from '../api/client'
import type { DocumentState, KnowledgeDocument, List } from '../api/types'
import { uploadDocument, type UploadHandle } from '../api/upload'

/** States a document leaves by itself: the list is polled while any document is in one. */
export const PENDING_STATES: readonly DocumentState[] = ['queued', 'parsing', 'chunking', 'embedding', 'deleting']
export const POLL_MS = 1500

export function isPending(document: Pick<KnowledgeDocument, 'state'>): boolean {
  return PENDING_STATES.includes(document.state)
}

/** A percentage for a document's ingestion: `progress` (0..1) when it has one. */
export function ingestPercent(document: Pick<KnowledgeDocument, 'state' | 'progress' | 'chunks_total' | 'chunks_embedded'>): number {
  if (document.state === 'indexed' || document.state === 'retired') return 100
  let fraction = document.progress
  if (!(fraction > 0) && document.chunks_total > 0) fraction = document.chunks_embedded / document.chunks_total
  return Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)))
}

export interface UploadState {
  key: number
  filename: string
  /** 0..100 of the body sent. */
  percent: number
  error: unknown
  handle: UploadHandle | null
}

export const useKnowledgeStore = defineStore('knowledge', () => {
  const kbId = ref('')
  const documents = ref<KnowledgeDocument[]>([])
  const loading = ref(false)
  const error = ref<unknown>(null)
  const uploads = ref<UploadState[]>([])
  let timer: ReturnType<typeof setTimeout> | null = null
  let nextKey = 1

  const pending = computed(() => documents.value.some(isPending))

  function documentsPath(): string {
    return `/v1/knowledge_bases/${encodeURIComponent(kbId.value)}/documents`
  }

  /** Reads the documents; polls again while any is pending. */
  async function refresh(): Promise<void> {
    if (!kbId.value) return
    const wanted = kbId.value
    loading.value = true
    try {
      const list = await api.get<List<KnowledgeDocument>>(documentsPath())
      if (wanted !== kbId.value) return
      documents.value = [...list.data].sort((a, b) => b.created_at - a.created_at || a.filename.localeCompare(b.filename))
      error.value = null
    } catch (caught) {
      error.value = caught
    } finally {
      loading.value = false
    }
    schedule()
  }

  function schedule(): void {
    if (timer !== null) clearTimeout(timer)
    timer = null
    if (kbId.value && pending.value) timer = setTimeout(() => void refresh(), POLL_MS)
  }

  /** Shows the documents of `id` (and stops following any other knowledge base). */
  async function open(id: string): Promise<void> {
    if (id !== kbId.value) {
      documents.value = []
      uploads.value = []
      error.value = null
    }
    kbId.value = id
    await refresh()
  }

  function close(): void {
    if (timer !== null) clearTimeout(timer)
    timer = null
    kbId.value = ''
  }

  /** Uploads a file; its progress shows in `uploads` until the node answers. */
  async function upload(file: File, tags = '', category = ''): Promise<KnowledgeDocument | null> {
    const entry: UploadState = { key: nextKey++, filename: file.name, percent: 0, error: null, handle: null }
    uploads.value.push(entry)
    const state = uploads.value[uploads.value.length - 1] as UploadState
    const handle = uploadDocument(kbId.value, { file, tags, category }, (fraction) => {
      state.percent = Math.round(fraction * 100)
    })
    state.handle = handle
    try {
      const document = await handle.promise
      uploads.value = uploads.value.filter((u) => u.key !== state.key)
      documents.value = [document, ...documents.value.filter((d) => d.id !== document.id)]
      schedule()
      return document
    } catch (caught) {
      if (caught instanceof DOMException && caught.name === 'AbortError') {
        uploads.value = uploads.value.filter((u) => u.key !== state.key)
      } else {
        state.error = caught
        state.handle = null
      }
      return null
    }
  }

  function dismissUpload(key: number): void {
    uploads.value.find((u) => u.key === key)?.handle?.abort()
    uploads.value = uploads.value.filter((u) => u.key !== key)
  }

  async function remove(document: KnowledgeDocument): Promise<void> {
    await api.delete(`${documentsPath()}/${encodeURIComponent(document.id)}`)
    await refresh()
  }

  return { kbId, documents, loading, error, uploads, pending, open, close, refresh, upload, dismissUpload, remove }
})
